import Foundation

/// Progress of long work on stderr: on a terminal a bar redrawn in place with the rate and
/// the time left; otherwise (a log, a pipe) a plain line every `lineInterval` seconds. Silent
/// when the command prints JSON. stdout stays the command's result alone.
final class ProgressDisplay: @unchecked Sendable {
    /// What `done` and `total` count: bytes, steps, or milliseconds of a timed run.
    enum Unit { case bytes, steps, milliseconds }

    private let label: String
    private let unit: Unit
    private let silent: Bool
    private let terminal: Bool
    private let lineInterval: Double
    private let started = Date()
    private var lastDrawn: Date
    private var shown = false
    private var last: (done: UInt64, total: UInt64, note: String) = (0, 0, "")
    private let lock = NSLock()

    /// `json`: the command prints JSON, so nothing is shown. `SVSP_PROGRESS=plain|bar|off` overrides
    /// the choice, `SVSP_PROGRESS_INTERVAL=SECONDS` the time between plain lines (default 5).
    init(label: String, unit: Unit = .bytes, json: Bool) {
        self.label = label
        self.unit = unit
        let environment = ProcessInfo.processInfo.environment
        let mode = environment["SVSP_PROGRESS"]
        silent = json || mode == "off"
        terminal = mode == "bar" || (mode != "plain" && isatty(STDERR_FILENO) == 1)
        lineInterval = environment["SVSP_PROGRESS_INTERVAL"].flatMap(Double.init).map { max(0, $0) } ?? 5
        // Plain lines start after one interval, so short work prints none.
        lastDrawn = terminal ? .distantPast : Date()
    }

    /// A bar redrawn in place (stderr is a terminal), not periodic lines.
    var isTerminal: Bool { terminal && !silent }

    /// How often a poller should ask for news.
    var pollSeconds: Double { terminal ? 0.25 : 1 }

    /// Shows `done` of `total` (redrawn at most 5 times a second, or a line per interval).
    func update(done: UInt64, total: UInt64, note: String = "") {
        guard !silent else { return }
        lock.withLock {
            last = (done, total, note)
            let now = Date()
            guard now.timeIntervalSince(lastDrawn) >= (terminal ? 0.2 : lineInterval) else { return }
            lastDrawn = now
            write(render(done: done, total: total, note: note, now: now))
        }
    }

    /// The work ended well: a bar or lines that were shown end at 100 % (the bar keeps its line).
    func finishIfShown() {
        guard !silent else { return }
        lock.withLock {
            guard shown else { return }
            let total = max(last.total, last.done)
            write(render(done: total, total: total, note: "done", now: Date()))
            if terminal { FileHandle.standardError.write(Data("\n".utf8)) }
        }
    }

    /// One line (without a newline on a terminal): label, bar, percent, amount, rate, time left.
    func render(done: UInt64, total: UInt64, note: String, now: Date) -> String {
        let elapsed = max(now.timeIntervalSince(started), 0.001)
        let fraction = total > 0 ? min(1, Double(done) / Double(total)) : 0
        let rate = Double(done) / elapsed
        let left = rate > 0 && total > done ? Double(total - done) / rate : (total > 0 && done >= total ? 0 : nil)
        var parts = [String(format: "%3.0f%%", fraction * 100), amount(done) + " of " + amount(total)]
        if unit != .milliseconds { parts.append(rateText(rate)) }
        parts.append(left.map { Self.clock($0) + " left" } ?? "--:-- left")
        if !note.isEmpty { parts.append(note) }
        if terminal {
            let width = 24
            let filled = Int((fraction * Double(width)).rounded(.down))
            let bar = String(repeating: "#", count: filled) + String(repeating: "-", count: width - filled)
            return "\r\u{1B}[K\(label) [\(bar)] " + parts.joined(separator: "  ")
        }
        return "\(label): " + parts.joined(separator: ", ") + ", \(Self.clock(elapsed)) elapsed\n"
    }

    private func write(_ text: String) {
        shown = true
        FileHandle.standardError.write(Data(text.utf8))
    }

    private func amount(_ value: UInt64) -> String {
        switch unit {
        case .bytes: Self.bytes(Double(value))
        case .steps: "\(value)"
        case .milliseconds: Self.clock(Double(value) / 1000)
        }
    }

    private func rateText(_ perSecond: Double) -> String {
        unit == .bytes ? Self.bytes(perSecond) + "/s" : String(format: "%.1f/s", perSecond)
    }

    static func bytes(_ value: Double) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var v = value, i = 0
        while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
        return i == 0 ? String(format: "%.0f %@", v, units[i]) : String(format: "%.1f %@", v, units[i])
    }

    /// 75 -> "1:15", 3700 -> "1:01:40".
    static func clock(_ seconds: Double) -> String {
        let s = Int(seconds.rounded())
        return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%d:%02d", s / 60, s % 60)
    }
}
