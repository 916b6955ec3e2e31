import Foundation

/// The sync mirror, the layer above the block maps in a vdisk's data path: which legs a
/// request goes to, how a leg's failed piece counts, and what a request's outcome is
/// once every piece is back. Pure decisions over leg states and the request's leg bit
/// masks (bit l = leg l, at most four legs): nothing here touches a slot, a lock or a
/// device, so the rules are tested alone (`SyncMirrorTests`) and the request core
/// (`VDiskPort`) carries them out.
///
/// The rules: writes go to every leg that is not failed (in sync and copying); the host
/// hears only when all of them answered. Reads go to the in-sync leg with the fewest
/// requests outstanding; a read error is retried whole on another in-sync leg and the
/// leg that failed it is repaired from the one that served it. A leg that fails a write
/// is marked failed in the catalog before the host is answered; `automatic-failover`
/// then acknowledges from the surviving legs, `synchronous-always` fails the write.
enum SyncMirror {
    /// The legs a write (trim, write-zeroes, flush) goes to: every leg not failed.
    static func writeLegs(_ states: some Collection<LegState>) -> UInt8 {
        var mask: UInt8 = 0
        for (l, state) in states.enumerated() where state != .failed { mask |= 1 << l }
        return mask
    }

    /// The in-sync legs, as a mask.
    static func inSyncLegs(_ states: some Collection<LegState>) -> UInt8 {
        var mask: UInt8 = 0
        for (l, state) in states.enumerated() where state == .inSync { mask |= 1 << l }
        return mask
    }

    /// The leg a read goes to: the in-sync leg not tried yet with the fewest requests
    /// outstanding (the first such on a tie), or nil when none is left.
    static func readLeg(inSync: UInt8, outstanding: [Int], excluding tried: UInt8) -> Int? {
        var best: Int?
        for l in outstanding.indices where inSync & ~tried & (1 << l) != 0 {
            if best == nil || outstanding[l] < outstanding[best!] { best = l }
        }
        return best
    }

    /// How a leg's failed piece counts.
    enum PieceFailure: Equatable {
        /// The request's result: a read (retried on another leg at the end), a vdisk with
        /// one leg, or a full scheduler (back-pressure, never a broken leg).
        case requestError
        /// The leg failed the write: the request decides at the end (fail the leg over, or the write).
        case legFailed
    }

    static func pieceFailure(isRead: Bool, legCount: Int, busy: Bool) -> PieceFailure {
        isRead || legCount == 1 || busy ? .requestError : .legFailed
    }

    /// What the masks of a request that went to every leg say once all its pieces are back.
    struct Answers {
        var isRead: Bool
        var result: Int64 // the request's own result (negative: the first error kept)
        var targetLegs: UInt8 // legs a write went to
        var failedLegs: UInt8 // legs whose piece failed
        var busyLegs: UInt8 // legs whose scheduler was full (EBUSY)
        var triedLegs: UInt8 // legs a read went to
    }

    enum Outcome: Equatable {
        /// Send the read again, whole, to another in-sync leg.
        case retryRead
        /// Keep the write's regions dirty (the legs may differ there: a copy reconciles them), then `then`.
        indirect case pinDirty(then: Outcome)
        /// Mark `legs` failed in the catalog first, then answer per the mirror mode.
        case failLegs(legs: UInt8, survivors: UInt8)
        /// Answer now: the request's own result.
        case answer
    }

    /// The outcome of a finished request on a vdisk with `legCount` legs (`inSync`: its
    /// in-sync legs now; `dirtyLog`: whether a write-intent bitmap tracks its regions).
    static func outcome(_ a: Answers, legCount: Int, inSync: UInt8, dirtyLog: Bool) -> Outcome {
        if a.isRead, a.result < 0, inSync & ~a.triedLegs != 0 { return .retryRead }
        let mirrored = legCount > 1
        var failed = a.failedLegs
        var pin = false
        if a.busyLegs != 0, mirrored {
            // A write a full scheduler refused on some legs may have landed on others: with a
            // bitmap the regions stay pinned dirty; without one nothing could track them, so
            // the refused legs fail over like legs that could not take the write. Only when an
            // in-sync leg took it whole: back-pressure alone must never take the last in-sync
            // legs away (with none, the legs are kept and EBUSY answers).
            if dirtyLog {
                pin = true
            } else if a.targetLegs & ~a.failedLegs & ~a.busyLegs & inSync != 0 {
                failed |= a.busyLegs
            }
        }
        let base: Outcome = failed != 0 && !a.isRead && mirrored
            ? .failLegs(legs: failed, survivors: a.targetLegs & ~failed) : .answer
        return pin ? .pinDirty(then: base) : base
    }

    /// The answer after `failLegs` was recorded (`recorded` false: the catalog could not
    /// take it, so the write must not be acknowledged).
    static func answerAfterLegFailure(survivors: UInt8, mode: MirrorMode, recorded: Bool, success: Int64, error: Int64) -> Int64 {
        guard recorded else { return -Int64(EIO) }
        if survivors != 0, mode == .automaticFailover { return success }
        return error < 0 ? error : -Int64(EIO)
    }

    /// The legs to repair after a read that succeeded on `servedBy` after failing on others.
    static func repairLegs(tried: UInt8, servedBy: Int) -> UInt8 { tried & ~(1 << UInt8(max(servedBy, 0))) }
}
