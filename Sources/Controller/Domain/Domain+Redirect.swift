import Foundation
import IOEngine

/// Redirect-on-write: a write into a chunk a leg's map shares with a PiT or snapshot
/// goes to a new chunk, so what the others read never changes. For each shared chunk:
///
/// 1. reserve a free chunk (committed: a crash from here on sends it to the zeroer);
/// 2. copy the old chunk into it, durably (FUA);
/// 3. commit the map entry onto the new chunk (the old one loses this map's reference).
///
/// Only then does the write go on, to the new chunk; so a crash at any point leaves the
/// chunk with its old data or the write's, never zeros. A chunk written ten times after
/// a PiT is redirected once: after step 3 it is no longer shared. Concurrent writes into
/// one chunk wait for its redirect (`RedirectTable`) instead of copying it twice; those
/// into different chunks share the group commits.
extension Domain {
    /// Redirects every shared chunk of [offset, offset+length) on the vdisk's legs that
    /// take writes (`only`: that leg alone, for a copier). The caller holds the range
    /// against other writers (a host write's range, a copier's gate). A leg whose pool
    /// cannot redirect fails like a leg that cannot take a write.
    func redirectShared(vdisk name: String, offset: UInt64, length: Int, only: UUID? = nil) async throws(DomainError) {
        if let why = readOnlyReason { throw DomainError(why, code: EROFS) }
        let m = metadata
        guard let v = m.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found", code: ENODEV) }
        for leg in v.legs where only == nil ? leg.state != .failed : leg.id == only {
            guard let pool = m.pool(id: leg.poolId), let meta = poolMeta(pool.id) else { continue }
            let first = offset / pool.extentBytes, last = (offset + UInt64(max(length, 1)) - 1) / pool.extentBytes
            do {
                try await redirect(leg.id, chunks: first...last, in: pool, meta)
            } catch where error.code == ENOSPC {
                throw DomainError("pool '\(pool.name)' is full: vdisk '\(name)' cannot redirect a write away from its PiTs (\(error))", code: ENOSPC)
            } catch {
                let others = v.legs.contains { $0.id != leg.id && $0.state != .failed }
                guard only == nil, v.mode == .automaticFailover, others else { throw error }
                try await markLegsFailed(vdisk: name, legs: [leg.id])
                report("vdisk '\(name)': leg in pool '\(pool.name)' failed: cannot redirect a write away from its PiTs: \(error)")
            }
        }
    }

    /// Redirects the shared chunks of `chunks` in map `id` (the loop: a chunk another
    /// writer is redirecting is waited for, then looked at again).
    private func redirect(_ id: UUID, chunks: ClosedRange<UInt64>, in pool: PoolRecord, _ meta: PoolMetadata) async throws(DomainError) {
        while true {
            var shared: [UInt64] = []
            for c in chunks {
                // A map that cannot be read: the write's own dispatch fails the leg's I/O with the reason.
                if (try? meta.isShared(map: id, chunk: c)) == true { shared.append(c) }
            }
            if shared.isEmpty { return }
            let (mine, busy) = redirects.claim(shared.map { RedirectTable.Key(map: id, chunk: $0) })
            if !mine.isEmpty {
                defer { redirects.finish(mine) }
                try await copyAndRemap(id, mine.map(\.chunk), in: pool, meta)
            }
            for key in busy { await redirects.wait(for: key) }
            if busy.isEmpty { return }
        }
    }

    /// Steps 1-3 for chunks this caller claimed. On a failure the reserved chunks go to
    /// the zeroer and the map is unchanged.
    private func copyAndRemap(_ id: UUID, _ chunks: [UInt64], in pool: PoolRecord, _ meta: PoolMetadata) async throws(DomainError) {
        var olds: [UInt64] = []
        for c in chunks {
            guard let o = try? meta.lookup(map: id, chunk: c, limit: 1).poolChunk else {
                throw DomainError("pool '\(pool.name)': block map \(id) lost extent \(c) during a redirect", code: EIO)
            }
            olds.append(o)
        }
        let runs = try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
            try t.reserve(UInt64(chunks.count))
        }
        let news = runs.flatMap { Array($0) }
        CrashPoint.hit("redirect-reserved")
        do {
            try await copyChunks(zip(olds, news).map { ($0, $1) }, in: pool)
            CrashPoint.hit("redirect-copied")
            try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
                for (i, c) in chunks.enumerated() { try t.redirect(id, chunk: c, from: olds[i], to: news[i]) }
            }
        } catch {
            _ = try? await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
                for r in runs { try t.unreserve(r) }
            }
            zeroingWork.signal()
            throw error
        }
    }

    /// Copies whole pool chunks (old -> new), 1 MiB at a time, each write FUA.
    private func copyChunks(_ pairs: [(UInt64, UInt64)], in pool: PoolRecord) async throws(DomainError) {
        let geometry = PoolGeometry(pool)
        let piece = Int(min(pool.extentBytes, 1 << 20))
        let buffer: AlignedBuffer
        do { buffer = try AlignedBuffer(count: piece) } catch { throw DomainError("cannot allocate a copy buffer: \(error)", code: ENOMEM) }
        for (old, new) in pairs {
            let from = geometry.lunOffset(old), to = geometry.lunOffset(new)
            guard let src = runtime(of: pool.id)?.luns[from.lun]?.handle, let dst = runtime(of: pool.id)?.luns[to.lun]?.handle else {
                throw DomainError("pool '\(pool.name)': a LUN of a redirect is missing", code: EIO)
            }
            var at: UInt64 = 0
            while at < pool.extentBytes {
                let n = Int(min(UInt64(piece), pool.extentBytes - at))
                do {
                    _ = try await engine.read(lun: src, into: buffer.pointer, length: n, offset: from.offset + at)
                    _ = try await engine.write(lun: dst, from: buffer.pointer, length: n, offset: to.offset + at, fua: true)
                } catch {
                    throw DomainError("pool '\(pool.name)': copying a shared extent: \(error)", code: EIO)
                }
                at += UInt64(n)
            }
        }
    }

    /// At open: chunks reserved by redirects a crash cut short go to the zeroer.
    func releaseReservations() async {
        guard readOnlyReason == nil else { return }
        for pool in metadata.pools {
            guard let meta = poolMeta(pool.id), let n = try? meta.reservedChunks(), n > 0 else { continue }
            do throws(DomainError) {
                _ = try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in try t.releaseReservations() }
                zeroingWork.signal()
            } catch {
                report("pool '\(pool.name)': cannot release \(n) chunk(s) reserved by unfinished redirects: \(error)")
            }
        }
    }
}

/// The chunks being redirected now, by map and chunk: a second writer of one waits for
/// the first's redirect instead of copying it again.
final class RedirectTable: @unchecked Sendable {
    struct Key: Hashable {
        var map: UUID
        var chunk: UInt64
    }

    private let lock = NSLock()
    private var running: [Key: [CheckedContinuation<Void, Never>]] = [:]

    /// Claims the keys nobody is redirecting (`mine`); the others are `busy`.
    func claim(_ keys: [Key]) -> (mine: [Key], busy: [Key]) {
        lock.withLock {
            var mine: [Key] = [], busy: [Key] = []
            for k in keys {
                if running[k] != nil { busy.append(k) } else { running[k] = []; mine.append(k) }
            }
            return (mine, busy)
        }
    }

    /// Returns once `key` is not being redirected.
    func wait(for key: Key) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            lock.lock()
            if running[key] != nil {
                running[key]!.append(c)
                lock.unlock()
            } else {
                lock.unlock()
                c.resume()
            }
        }
    }

    func finish(_ keys: [Key]) {
        let waiters = lock.withLock { keys.flatMap { running.removeValue(forKey: $0) ?? [] } }
        for w in waiters { w.resume() }
    }
}
