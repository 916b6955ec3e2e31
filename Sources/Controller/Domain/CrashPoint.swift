import Foundation

/// Knobs that only tests turn (through the environment; the daemon logs them loudly).
public enum TestKnobs {
    /// `SVSP_SCHEDULER_CAPACITY=N`: every pool's scheduler holds N requests instead of
    /// 1024, so tests can fill one leg's queue (EBUSY) with a handful of writes.
    public static let schedulerCapacity: Int? = ProcessInfo.processInfo.environment["SVSP_SCHEDULER_CAPACITY"].flatMap { Int($0) }
        .map { min(max($0, 1), 1024) }
}

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
