import Glibc

/// A management failure, always one line naming what was wrong (`pool 'p9' not found`).
public struct DomainError: Error, Equatable, Sendable, CustomStringConvertible {
    public let message: String
    /// The errno a data-path caller answers with (EIO unless the error says otherwise).
    public let code: Int32
    public init(_ message: String, code: Int32 = EIO) {
        self.message = message
        self.code = code
    }
    public var description: String { message }
}
