import Foundation
import Synchronization

/// Client-chosen text (export names) on its way into our log: printable ASCII only,
/// everything else as \xNN, at most 64 bytes, so a client can neither forge log lines
/// nor fill the log with one name.
enum NBDClientText {
    static let maxLoggedBytes = 64

    static func escaped(_ text: String) -> String {
        var out = "'"
        for (i, byte) in text.utf8.enumerated() {
            if i == maxLoggedBytes { out += "...(\(text.utf8.count) bytes)"; break }
            if byte >= 0x20 && byte < 0x7F && byte != UInt8(ascii: "'") && byte != UInt8(ascii: "\\") {
                out.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                out += String(format: "\\x%02x", byte)
            }
        }
        return out + "'"
    }
}

/// At most `perSecond` log lines of one kind across every connection; the lines held
/// back are counted and reported with the next line let through.
final class LogRateLimit: Sendable {
    private struct State {
        var windowStart = DispatchTime.now().uptimeNanoseconds
        var inWindow = 0
        var suppressed = 0
    }

    private let state = DataPathMutex(State())
    let perSecond: Int

    init(perSecond: Int) { self.perSecond = perSecond }

    /// The line to log (with how many were held back since the last one), or nil to drop it.
    func admit(_ line: String) -> String? {
        state.withLock { s in
            let now = DispatchTime.now().uptimeNanoseconds
            if now - s.windowStart >= 1_000_000_000 {
                s.windowStart = now
                s.inWindow = 0
            }
            guard s.inWindow < perSecond else {
                s.suppressed += 1
                return nil
            }
            s.inWindow += 1
            defer { s.suppressed = 0 }
            return s.suppressed > 0 ? line + " (\(s.suppressed) similar lines suppressed)" : line
        }
    }
}
