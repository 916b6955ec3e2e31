import Foundation

/// Pool metadata checkpoints beyond the ones a full journal forces: when a pool's
/// metadata has been quiet for a moment, and at a clean stop. So a restart replays
/// little (nothing after a clean stop) and a burst of commits meets an empty journal.
extension Domain {
    /// A pool's metadata is checkpointed once no commit came for this long.
    static let checkpointIdleNs: UInt64 = 1_000_000_000

    /// Runs until cancelled: every second, checkpoints the pools whose journal holds
    /// commits and that have been quiet for `checkpointIdleNs`. A failure is logged once
    /// per reason; the journal keeps what it holds (replayed at the next open).
    public func runCheckpointer(log: @escaping @Sendable (String) -> Void) async {
        var reported: [UUID: String] = [:]
        while !Task.isCancelled {
            try? await Task.sleep(nanoseconds: 1_000_000_000)
            for (pool, problem) in await checkpointPools(idleNs: Self.checkpointIdleNs) {
                if reported[pool.id] != problem { log("pool '\(pool.name)': metadata checkpoint failed: \(problem)") }
                reported[pool.id] = problem
            }
        }
    }

    /// Checkpoints every open pool whose journal holds commits and whose last commit is
    /// `idleNs` old (0: all of them, as at a clean stop). Returns the pools that failed, and why.
    @discardableResult
    public func checkpointPools(idleNs: UInt64 = 0) async -> [(PoolRecord, String)] {
        var failed: [(PoolRecord, String)] = []
        for pool in metadata.pools {
            guard let meta = poolMeta(pool.id), runtime(of: pool.id)?.isHealthy == true else { continue }
            do { try await meta.store.checkpointIfIdle(idleNs: idleNs) } catch { failed.append((pool, "\(error)")) }
        }
        return failed
    }
}
