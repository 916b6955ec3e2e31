import Foundation

/// Named points where a test may make the daemon die as if the power went: with
/// `SVSP_CRASH_AT=<name>` in its environment the process exits at once (no cleanup,
/// no flush: what is on disk is what a crash there leaves). Off unless set; the daemon
/// logs it loudly at start when it is.
public enum CrashPoint {
    public static let armed: String? = ProcessInfo.processInfo.environment["SVSP_CRASH_AT"]

    static func hit(_ name: String) {
        guard armed == name else { return }
        _exit(137)
    }
}
