import Foundation
import Synchronization

/// Counts management commands between accept and reply, so shutdown can wait for them.
final class RunningCommands: Sendable {
    private let count = Mutex(0)
    private let group = DispatchGroup()

    func enter() {
        group.enter()
        count.withLock { $0 += 1 }
    }

    func leave() {
        count.withLock { $0 -= 1 }
        group.leave()
    }

    /// Blocks until none is running or `seconds` pass; returns how many still run.
    func wait(seconds: Double) -> Int {
        _ = group.wait(timeout: .now() + seconds)
        return count.withLock { $0 }
    }
}
