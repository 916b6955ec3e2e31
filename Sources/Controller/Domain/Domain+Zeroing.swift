import Foundation
import IOEngine

/// Freed space reads as zeros before anyone else can read it.
///
/// A chunk that its last holder releases (a vdisk or leg deleted, a thin trim) goes to
/// "awaiting zeroing" in its pool's space map, in the same commit; `allocate` takes only
/// free chunks. A background zeroer overwrites them with zeros (FUA) and commits them
/// free in batches; a restart finishes what a stop cut short. So a thick create costs
/// one commit whatever its size, and the price of zeroing is paid once, at disk speed,
/// in the background after a delete. A deleted leg's map is released only after the I/O
/// sent with its old mapping has landed, so no late write lands on zeros.
extension Domain {
    /// Chunks zeroed per commit: bounds both the commit rate and the work a stop repeats.
    static let zeroingBatchBytes: UInt64 = 1 << 30
    /// The same where the LUNs zero without writing (holes, fallocate, BLKZEROOUT): a pool
    /// made on an 8 TiB device or sparse file is cleared in a few dozen commits.
    static let offloadedBatchBytes: UInt64 = 256 << 30

    /// Runs until cancelled: zeroes what the space maps hold for it, a batch at a time, and commits.
    /// The daemon runs one; so does a tool that opens a domain itself (`bench mirror`).
    public func runZeroer(log: @escaping @Sendable (String) -> Void) async {
        var reported: String?
        var offloading = Set<UUID>() // pools whose last batch was zeroed without writing
        while !Task.isCancelled {
            guard let (pool, batch) = nextZeroingBatch(offloading) else {
                await zeroingWork.wait(timeoutNs: 1_000_000_000) // woken by a release; the timeout rechecks pool health
                continue
            }
            var (problem, offloaded) = await zero(batch, of: pool)
            if offloaded { offloading.insert(pool.id) } else { offloading.remove(pool.id) }
            if problem == nil {
                do throws(DomainError) {
                    try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
                        for r in batch { try t.markZeroed(r) }
                    }
                } catch {
                    problem = error
                }
                zeroingProgress.signal()
            }
            if let problem {
                // Never silently: the chunks stay awaiting zeroing (not allocatable) and the reason is logged once.
                if reported != problem.message { log("zeroing freed extents of pool '\(pool.name)': \(problem); retrying") }
                reported = problem.message
                try? await Task.sleep(nanoseconds: 2_000_000_000)
            } else {
                reported = nil
            }
        }
    }

    /// Up to a batch (`zeroingBatchBytes`, or `offloadedBatchBytes` for the pools in
    /// `offloading`) of one healthy pool's chunks awaiting zeroing.
    private func nextZeroingBatch(_ offloading: Set<UUID>) -> (PoolRecord, [Range<UInt64>])? {
        // A read-only domain may run on a stale catalog: nothing is changed until a majority is back.
        guard readOnlyReason == nil else { return nil }
        for pool in metadata.pools {
            guard let meta = poolMeta(pool.id), runtime(of: pool.id)?.isHealthy == true else { continue }
            let limit = max(1, (offloading.contains(pool.id) ? Self.offloadedBatchBytes : Self.zeroingBatchBytes) / pool.extentBytes)
            if let batch = try? meta.awaitingZeroing(limit: limit), !batch.isEmpty { return (pool, batch) }
        }
        return nil
    }

    /// Extents of the pool still being zeroed.
    public func zeroingExtents(of pool: PoolRecord) -> Int {
        guard let runs = try? poolMeta(pool.id)?.awaitingZeroing(limit: .max) else { return 0 }
        return runs.reduce(0) { $0 + $1.count }
    }

    /// Waits until the zeroer frees some of what `pools` have awaiting zeroing (a change
    /// that lacks free extents there waits and tries again instead of failing). False when
    /// nothing was being zeroed, or when zeroing made no progress for 30 s (a failing LUN:
    /// the caller reports).
    func waitForZeroing(in pools: [UUID]) async -> Bool {
        func remaining() -> Int { pools.reduce(0) { sum, id in sum + (metadata.pool(id: id).map { zeroingExtents(of: $0) } ?? 0) } }
        let left = remaining()
        guard left > 0 else { return false }
        let start = DispatchTime.now().uptimeNanoseconds
        while DispatchTime.now().uptimeNanoseconds - start < 30_000_000_000 {
            await zeroingProgress.wait(timeoutNs: 1_000_000_000)
            if remaining() < left { return true }
        }
        return false
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
