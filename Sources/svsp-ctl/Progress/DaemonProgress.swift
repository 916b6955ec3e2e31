import Controller
import Foundation

extension DomainOptions {
    /// The daemon's progress entry `key` (nil when nothing by that key is running).
    func progress(_ key: String) throws -> ProgressBoard.Entry? {
        let response = try exchange("progress")
        guard let entries = try? JSONDecoder().decode([ProgressBoard.Entry].self, from: Data(response.json.utf8)) else {
            throw CommandFailure("the daemon's progress answer does not decode")
        }
        return entries.first { $0.key == key }
    }

    /// Sends a long command and, while the daemon works on it, shows its progress entry `key`
    /// on stderr (a bar on a terminal, periodic lines otherwise, nothing with --json).
    func sendShowingProgress(_ command: String, _ args: [String: String], key: String, label: String) throws {
        let display = ProgressDisplay(label: label, json: json)
        let poller = ProgressPoller(every: display.pollSeconds) { [self] in
            guard let p = try? progress(key) else { return } // a missed poll only delays the bar
            display.update(done: p.doneBytes, total: p.totalBytes, note: p.operation)
        }
        let response: MgmtResponse
        do {
            defer { poller.stop() }
            response = try exchange(command, args)
        }
        display.finishIfShown()
        try present(response)
    }
}

extension DomainOptions {
    /// Follows an async group's initial copy until the destination holds its first PiT.
    func waitForInitialCopy(group: String) throws {
        let display = ProgressDisplay(label: "initial copy \(group)", json: json)
        while true {
            guard let p = try progress("async:\(group)") else {
                throw CommandFailure("async group '\(group)' is gone; its initial copy did not complete")
            }
            if p.complete { break }
            display.update(done: p.doneBytes, total: p.totalBytes, note: p.operation)
            Thread.sleep(forTimeInterval: display.pollSeconds)
        }
        display.finishIfShown()
        if !json { print("async group '\(group)': initial copy complete at the destination") }
    }
}

/// Calls `poll` every `every` seconds on a thread of its own until `stop()`.
final class ProgressPoller: @unchecked Sendable {
    private let stopped = DispatchSemaphore(value: 0)
    private let exited = DispatchSemaphore(value: 0)

    init(every seconds: Double, poll: @escaping @Sendable () -> Void) {
        Thread { [stopped, exited] in
            while stopped.wait(timeout: .now() + seconds) == .timedOut { poll() }
            exited.signal()
        }.start()
    }

    func stop() {
        stopped.signal()
        exited.wait()
    }
}
