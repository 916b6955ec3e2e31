import Foundation

/// Long operations in progress, for `svsp-ctl`'s progress bars (the `progress` command).
/// Mirror copies and async cycles keep their own progress; this board holds the rest
/// (`vdisk verify`), keyed like the command reads them: "vdisk.verify:NAME".
public final class ProgressBoard: @unchecked Sendable {
    public struct Entry: Codable, Sendable {
        public var key: String
        public var operation: String
        public var doneBytes: UInt64
        public var totalBytes: UInt64
        /// Set when the operation has reached its end state (an async group's first PiT confirmed).
        public var complete: Bool = false
    }

    private let lock = NSLock()
    private var entries: [String: Entry] = [:]

    public init() {}

    public func begin(_ key: String, operation: String, totalBytes: UInt64) {
        lock.withLock { entries[key] = Entry(key: key, operation: operation, doneBytes: 0, totalBytes: totalBytes) }
    }

    public func update(_ key: String, doneBytes: UInt64, operation: String? = nil) {
        lock.withLock {
            entries[key]?.doneBytes = doneBytes
            if let operation { entries[key]?.operation = operation }
        }
    }

    public func end(_ key: String) { lock.withLock { entries[key] = nil } }

    public var all: [Entry] { lock.withLock { Array(entries.values) } }
}
