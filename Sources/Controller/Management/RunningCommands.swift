import Foundation
import Synchronization

/// Counts management commands from accept to reply, so shutdown can wait for them.
final class RunningCommands: Sendable {
    private struct State {
        var count = 0
        var closed = false
    }

    private let state = DataPathMutex(State())
    private let group = DispatchGroup()

    /// Counts one more command; false once shutdown has begun waiting (answer "stopping").
    func tryEnter() -> Bool {
        state.withLock { s in
            guard !s.closed else { return false }
            s.count += 1
            group.enter()
            return true
        }
    }

    func leave() {
        state.withLock { $0.count -= 1 }
        group.leave()
    }

    /// Refuses new commands, then blocks until none is running or `seconds` pass;
    /// returns how many still run.
    func closeAndWait(seconds: Double) -> Int {
        state.withLock { $0.closed = true }
        _ = group.wait(timeout: .now() + seconds)
        return state.withLock { $0.count }
    }
}
