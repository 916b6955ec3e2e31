import Foundation
import IOEngine

/// Redirect-on-write: a write into a chunk a leg's map shares with a PiT or snapshot
/// goes to a new chunk, so what the others read never changes. For each shared chunk:
///
/// 1. reserve a free chunk (committed: a crash from here on sends it to the zeroer);
/// 2. copy the old chunk into it (with the write's own bytes where it covers the chunk);
/// 3. flush the pool's LUNs and commit the map entry onto the new chunk (the old one
///    loses this map's reference); concurrent redirects share the flush and the commit.
///
/// Only then does the write go on, to the new chunk; so a crash at any point leaves the
/// chunk with its old data or the write's, never zeros. A chunk written ten times after
/// a PiT is redirected once: after step 3 it is no longer shared. Concurrent writes into
/// one chunk wait for its redirect (`RedirectTable`) instead of copying it twice; those
/// into different chunks share the group commits.
extension Domain {
    /// A write's bytes (vdisk offset, length, where they are in memory): a redirect puts them
    /// into the new chunk together with what it keeps of the old one.
    struct HostData: @unchecked Sendable {
        var offset: UInt64
        var length: Int
        var bytes: UnsafeRawPointer
    }

    /// Redirects every shared chunk of [offset, offset+length) on the vdisk's legs that
    /// take writes (`only`: that leg alone, for a copier). The caller holds the range
    /// against other writers (a host write's range, a copier's gate). A leg whose pool
    /// cannot redirect fails like a leg that cannot take a write.
    ///
    /// With `data` (a host write), each new chunk is filled with the write's bytes where it
    /// covers the chunk and the old chunk's elsewhere, so the write is already in place:
    /// returns true when that holds for every chunk of the range on every leg (the caller
    /// then answers without writing again), false when some chunk still needs the write.
    @discardableResult
    func redirectShared(vdisk name: String, offset: UInt64, length: Int, only: UUID? = nil, data: HostData? = nil) async throws(DomainError) -> Bool {
        if let why = readOnlyReason { throw DomainError(why, code: EROFS) }
        let m = metadata
        guard let v = m.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found", code: ENODEV) }
        var complete = data != nil
        for leg in v.legs where only == nil ? leg.state != .failed : leg.id == only {
            guard let pool = m.pool(id: leg.poolId), let meta = poolMeta(pool.id) else { complete = false; continue }
            let first = offset / pool.extentBytes, last = (offset + UInt64(max(length, 1)) - 1) / pool.extentBytes
            do {
                let filled = try await redirect(leg.id, chunks: first...last, in: pool, meta, data: data)
                if filled < last - first + 1 { complete = false }
            } catch where error.code == ENOSPC {
                throw DomainError("pool '\(pool.name)' is full: vdisk '\(name)' cannot redirect a write away from its PiTs (\(error))", code: ENOSPC)
            } catch {
                let others = v.legs.contains { $0.id != leg.id && $0.state != .failed }
                guard only == nil, v.mode == .automaticFailover, others else { throw error }
                try await markLegsFailed(vdisk: name, legs: [leg.id])
                report("vdisk '\(name)': leg in pool '\(pool.name)' failed: cannot redirect a write away from its PiTs: \(error)")
                complete = false
            }
        }
        return complete
    }

    /// Redirects the shared chunks of `chunks` in map `id` (the loop: a chunk another
    /// writer is redirecting is waited for, then looked at again). Returns how many this
    /// call filled with `data` (0 without it).
    private func redirect(_ id: UUID, chunks: ClosedRange<UInt64>, in pool: PoolRecord, _ meta: PoolMetadata, data: HostData?) async throws(DomainError) -> UInt64 {
        var filled: UInt64 = 0
        while true {
            var shared: [UInt64] = []
            for c in chunks {
                // A map that cannot be read: the write's own dispatch fails the leg's I/O with the reason.
                if (try? meta.isShared(map: id, chunk: c)) == true { shared.append(c) }
            }
            if shared.isEmpty { return filled }
            let (mine, busy) = redirects.claim(shared.map { RedirectTable.Key(map: id, chunk: $0) })
            if !mine.isEmpty {
                defer { redirects.finish(mine) }
                try await copyAndRemap(id, mine.map(\.chunk), in: pool, meta, data: data)
                if data != nil { filled += UInt64(mine.count) }
            }
            for key in busy { await redirects.wait(for: key) }
            if busy.isEmpty { return filled }
        }
    }

    /// Steps 1-3 for chunks this caller claimed. On a failure the reserved chunks go to
    /// the zeroer and the map is unchanged.
    private func copyAndRemap(_ id: UUID, _ chunks: [UInt64], in pool: PoolRecord, _ meta: PoolMetadata, data: HostData?) async throws(DomainError) {
        var olds: [UInt64] = []
        for c in chunks {
            guard let o = try? meta.lookup(map: id, chunk: c, limit: 1).poolChunk else {
                throw DomainError("pool '\(pool.name)': block map \(id) lost extent \(c) during a redirect", code: EIO)
            }
            olds.append(o)
        }
        let news = try await takeReserved(chunks.count, in: pool, meta)
        CrashPoint.hit("redirect-reserved")
        do {
            try await fill(chunks.indices.map { (chunks[$0], olds[$0], news[$0]) }, in: pool, data: data)
            CrashPoint.hit("redirect-copied")
            // The fills are durable before the map points at them: one flush of the pool's
            // LUNs for every redirect of the group commit.
            try await changeBlockMaps(pool, flushFirst: true) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
                for (i, c) in chunks.enumerated() { try t.redirect(id, chunk: c, from: olds[i], to: news[i]) }
            }
        } catch {
            _ = try? await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
                for c in news { try t.unreserve(c..<(c + 1)) }
            }
            zeroingWork.signal()
            throw error
        }
    }

    /// Fills each new chunk (made durable by the remap commit's flush): the host write's bytes where it covers the
    /// chunk, the old chunk's elsewhere (read only where needed; a piece the write covers
    /// whole is written straight from the host's buffer). Chunks in parallel, 1 MiB pieces.
    private func fill(_ work: [(chunk: UInt64, old: UInt64, new: UInt64)], in pool: PoolRecord, data: HostData?) async throws(DomainError) {
        let geometry = PoolGeometry(pool)
        let pieceBytes = min(pool.extentBytes, 1 << 20)
        guard let runtime = runtime(of: pool.id) else { throw DomainError("pool '\(pool.name)' is not open", code: EIO) }
        let engine = engine
        let problem = await withTaskGroup(of: DomainError?.self) { group -> DomainError? in
            for (i, w) in work.enumerated() {
                if i >= Self.redirectWidth, let done = await group.next(), let failed = done {
                    group.cancelAll()
                    return failed
                }
                group.addTask { () -> DomainError? in
                    let from = geometry.lunOffset(w.old), to = geometry.lunOffset(w.new)
                    guard let src = runtime.luns[from.lun]?.handle, let dst = runtime.luns[to.lun]?.handle else {
                        return DomainError("pool '\(pool.name)': a LUN of a redirect is missing", code: EIO)
                    }
                    var buffer: UnsafeMutableRawPointer? // only when the old chunk is read
                    defer { buffer?.deallocate() }
                    let chunkStart = w.chunk * pool.extentBytes
                    var at: UInt64 = 0
                    while at < pool.extentBytes {
                        let n = min(pieceBytes, pool.extentBytes - at)
                        let piece = (chunkStart + at)..<(chunkStart + at + n)
                        let covered = data.map { piece.clamped(to: $0.offset..<($0.offset + UInt64($0.length))) } ?? piece.lowerBound..<piece.lowerBound
                        do {
                            if covered == piece, let data {
                                _ = try await engine.write(lun: dst, from: data.bytes + Int(piece.lowerBound - data.offset), length: Int(n),
                                                           offset: to.offset + at)
                            } else {
                                if buffer == nil { buffer = .allocate(byteCount: Int(pieceBytes), alignment: 4096) }
                                let p = buffer!
                                _ = try await engine.read(lun: src, into: p, length: Int(n), offset: from.offset + at)
                                if !covered.isEmpty, let data {
                                    memcpy(p + Int(covered.lowerBound - piece.lowerBound), data.bytes + Int(covered.lowerBound - data.offset), covered.count)
                                }
                                _ = try await engine.write(lun: dst, from: p, length: Int(n), offset: to.offset + at)
                            }
                        } catch {
                            return DomainError("pool '\(pool.name)': filling a redirected extent: \(error)", code: EIO)
                        }
                        at += n
                    }
                    return nil
                }
            }
            for await done in group { if let failed = done { return failed } }
            return nil
        }
        if let problem { throw problem }
    }

    /// Chunks filled at once by one redirect.
    static let redirectWidth = 16

    /// `n` reserved chunks for a redirect: from the pool's spares, else a batch reserved in
    /// one commit (the rest kept as spares), so most redirects wait for one commit, not two.
    /// Spares are zeros (taken from free); a crash sends them to the zeroer with the rest.
    private func takeReserved(_ n: Int, in pool: PoolRecord, _ meta: PoolMetadata) async throws(DomainError) -> [UInt64] {
        if let spare = spareChunks.take(n, from: pool.id) { return spare }
        let batch = UInt64(max(n, min(Self.spareBatchBytes / Int(pool.extentBytes), Int(meta.freeChunks / 16))))
        let runs = try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in try t.reserve(batch) }
        let chunks = runs.flatMap { Array($0) }
        spareChunks.put(Array(chunks.dropFirst(n)), into: pool.id)
        return Array(chunks.prefix(n))
    }

    static let spareBatchBytes = 16 << 20

    /// Gives the spare reserved chunks back as free (they were never written): when no PiT
    /// or snapshot is left, nothing will be redirected for a while.
    func releaseSpareChunks() {
        let all = spareChunks.takeAll()
        guard !all.isEmpty else { return }
        Task {
            for (poolId, chunks) in all {
                guard let pool = metadata.pool(id: poolId) else { continue }
                do throws(DomainError) {
                    try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
                        for c in chunks { try t.returnSpare(c..<(c + 1)) }
                    }
                } catch {
                    report("pool '\(pool.name)': cannot give back \(chunks.count) chunk(s) reserved for redirects (\(error)); they are freed at the next start")
                }
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

/// Reserved chunks no redirect has taken yet, by pool.
final class SpareChunks: @unchecked Sendable {
    private let lock = NSLock()
    private var spares: [UUID: [UInt64]] = [:]

    func take(_ n: Int, from pool: UUID) -> [UInt64]? {
        lock.withLock {
            guard let have = spares[pool], have.count >= n else { return nil }
            spares[pool] = Array(have.dropFirst(n))
            return Array(have.prefix(n))
        }
    }

    func put(_ chunks: [UInt64], into pool: UUID) {
        guard !chunks.isEmpty else { return }
        lock.withLock { spares[pool, default: []] += chunks }
    }

    func takeAll() -> [UUID: [UInt64]] {
        lock.withLock {
            let all = spares.filter { !$0.value.isEmpty }
            spares = [:]
            return all
        }
    }
}
