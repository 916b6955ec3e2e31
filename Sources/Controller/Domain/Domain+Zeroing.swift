import Foundation
import IOEngine

/// Freed space reads as zeros before anyone else can read it.
///
/// Extents that a vdisk (or a leg, or a thin trim) gives back are not free yet: the
/// same commit that frees them lists them in their pool's `zeroing`, and `allocate`
/// skips them. A background zeroer overwrites them with zeros (FUA) and commits them
/// free in batches; a restart finishes what a stop cut short. So a thick create costs
/// one commit whatever its size, and the price of zeroing is paid once, at disk speed,
/// in the background after a delete. An extent is zeroed only after the I/O sent to it
/// with its old mapping has landed (the quarantine), so no late write lands on zeros.
extension Domain {
    /// Extents zeroed per commit: bounds both the commit rate and the work a stop repeats.
    static let zeroingBatchBytes: UInt64 = 1 << 30

    /// `next` with the legs' extents listed as being zeroed in their pools.
    func listForZeroing(_ legs: [LegRecord], in next: inout DomainMetadata) {
        for leg in legs {
            guard let p = next.pools.firstIndex(where: { $0.id == leg.poolId }) else { continue }
            let freed = leg.extents.compactMap { $0 }
            guard !freed.isEmpty else { continue }
            next.pools[p].zeroing = (next.pools[p].zeroing ?? []) + freed
        }
    }

    /// Runs until cancelled: zeroes what the pools list, a batch at a time, and commits.
    func runZeroer(log: @escaping @Sendable (String) -> Void) async {
        var reported: String?
        while !Task.isCancelled {
            guard let (pool, batch) = nextZeroingBatch() else {
                await zeroingWork.wait(timeoutNs: 1_000_000_000) // woken by a free; the timeout rechecks quarantines
                continue
            }
            var problem: DomainError? = await zero(batch, of: pool)
            if problem == nil {
                defer { zeroingProgress.signal() }
                do throws(DomainError) {
                    try await beginChange()
                    defer { mutation.release() }
                    var next = metadata
                    if let p = next.pools.firstIndex(where: { $0.id == pool.id }) {
                        let done = Set(batch)
                        next.pools[p].zeroing = next.pools[p].zeroing?.filter { !done.contains($0) }
                        if next.pools[p].zeroing?.isEmpty == true { next.pools[p].zeroing = nil }
                        try await commit(next)
                    }
                } catch {
                    problem = error
                }
            }
            if let problem {
                // Never silently: the extents stay listed (not allocatable) and the reason is logged once.
                if reported != problem.message { log("zeroing freed extents of pool '\(pool.name)': \(problem); retrying") }
                reported = problem.message
                try? await Task.sleep(nanoseconds: 2_000_000_000)
            } else {
                reported = nil
            }
        }
    }

    /// Up to `zeroingBatchBytes` of one pool's listed extents that no old I/O can still reach.
    private func nextZeroingBatch() -> (PoolRecord, [ExtentRef])? {
        // A read-only domain may run on a stale copy of the metadata: its list may name
        // extents that a newer generation gave to a vdisk. Nothing is zeroed until a majority is back.
        guard readOnlyReason == nil else { return nil }
        for pool in metadata.pools where !(pool.zeroing ?? []).isEmpty {
            let held = quarantined(in: pool.id)
            let limit = max(1, Int(Self.zeroingBatchBytes / pool.extentBytes))
            let batch = Array(pool.zeroing!.lazy.filter { !held.contains($0) }.prefix(limit))
            if !batch.isEmpty, runtime(of: pool.id)?.isHealthy == true { return (pool, batch) }
        }
        return nil
    }

    /// Extents of the pool still being zeroed.
    public func zeroingExtents(of pool: PoolRecord) -> Int { pool.zeroing?.count ?? 0 }

    /// Waits while `pools` have extents being zeroed (a change that lacks free extents
    /// there waits for them instead of failing). False when nothing was being zeroed, or
    /// when zeroing made no progress for 30 s (a failing LUN: the caller reports).
    func waitForZeroing(in pools: [UUID]) async -> Bool {
        func remaining() -> Int { pools.reduce(0) { $0 + (metadata.pool(id: $1)?.zeroing?.count ?? 0) } }
        var left = remaining()
        guard left > 0 else { return false }
        var lastProgress = DispatchTime.now().uptimeNanoseconds
        while left > 0 {
            await zeroingProgress.wait(timeoutNs: 1_000_000_000)
            let now = remaining()
            if now < left { lastProgress = DispatchTime.now().uptimeNanoseconds }
            left = now
            if DispatchTime.now().uptimeNanoseconds - lastProgress > 30_000_000_000 { return false }
        }
        return true
    }
}

/// A wake-up for background tasks: `signal` wakes every task in `wait` (or, with none
/// waiting, the next `wait` returns at once).
final class WakeSignal: @unchecked Sendable {
    private let lock = NSLock()
    private var pending = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func signal() {
        lock.lock()
        let all = waiters
        waiters = []
        pending = all.isEmpty
        lock.unlock()
        for w in all { w.resume() }
    }

    /// Returns at the next signal (or at once if one came since the last wait), or after the timeout.
    func wait(timeoutNs: UInt64) async {
        let timer = Task { [self] in
            try? await Task.sleep(nanoseconds: timeoutNs)
            if !Task.isCancelled { signal() }
        }
        defer { timer.cancel() }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            lock.lock()
            if pending {
                pending = false
                lock.unlock()
                c.resume()
            } else {
                waiters.append(c)
                lock.unlock()
            }
        }
    }
}
