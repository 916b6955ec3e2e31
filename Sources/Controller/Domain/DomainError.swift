/// A management failure, always one line naming what was wrong (`pool 'p9' not found`).
public struct DomainError: Error, Equatable, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
