import Foundation
import IOEngine

/// Thin provisioning: chunks mapped on first write and released by trims.
extension Domain {
    /// Maps every leg's chunks covering [offset, offset+length) that are not mapped yet,
    /// durably (the pool's group commit) before it returns. Free chunks read as zeros (the
    /// zeroer clears released ones before they are free again), so nothing is written to
    /// them here and the rest of a chunk a write covers partly reads as zeros on every leg.
    /// Concurrent first writes into one chunk share its allocation: the second finds it mapped.
    ///
    /// A leg whose pool cannot commit the allocation (a failing metadata area) fails like a
    /// leg that cannot take a write: with automatic-failover and another leg left, it is
    /// marked failed and the write goes on; resync allocates its chunks when it copies.
    /// A full pool is ENOSPC for the write. `only` restricts it to one leg (a copier's write).
    func allocateExtents(vdisk name: String, offset: UInt64, length: Int, only: UUID? = nil) async throws(DomainError) {
        if let why = readOnlyReason { throw DomainError(why, code: EROFS) }
        let m = metadata
        guard let v = m.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found", code: ENODEV) }
        // A failed leg gets no write, so no chunk: resync maps what it copies (`only`).
        for leg in v.legs where only == nil ? leg.state != .failed : leg.id == only {
            guard let pool = m.pool(id: leg.poolId) else { continue }
            let first = offset / pool.extentBytes, last = (offset + UInt64(max(length, 1)) - 1) / pool.extentBytes
            let id = leg.id
            do {
                try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
                    var i = first
                    while i <= last {
                        if try t.isMapped(id, i) { i += 1; continue }
                        var j = i + 1
                        while j <= last, try !t.isMapped(id, j) { j += 1 }
                        try t.map(id, at: i, to: try t.allocate(j - i))
                        i = j
                    }
                }
            } catch where error.code == ENOSPC {
                throw DomainError("pool '\(pool.name)' is full: thin vdisk '\(name)' cannot allocate (\(error))", code: ENOSPC)
            } catch {
                let others = v.legs.contains { $0.id != id && $0.state != .failed }
                guard only == nil, v.mode == .automaticFailover, others else { throw error }
                try await markLegsFailed(vdisk: name, legs: [id])
                report("vdisk '\(name)': leg in pool '\(pool.name)' failed: cannot map a new chunk: \(error)")
            }
        }
    }

    /// Makes pool chunks read as zeros, durably. Where the LUN can, without writing them
    /// (a file's hole, fallocate, BLKZEROOUT: see `LUNHandle.zeroRange`), else by writing
    /// zeroes (FUA) at most `zeroingWidth` 1 MiB pieces at a time. Returns what failed (or
    /// nil) and whether every range was zeroed without writing. All done when it returns.
    func zero(_ chunks: [Range<UInt64>], of pool: PoolRecord) async -> (problem: DomainError?, offloaded: Bool) {
        let runtime = runtime(of: pool.id)
        let geometry = PoolGeometry(pool)
        var spans: [(lun: LUNHandle, offset: UInt64, length: UInt64)] = [] // back to back on one LUN each
        for run in chunks {
            var c = run.lowerBound
            while c < run.upperBound {
                let n = geometry.contiguous(from: c, limit: run.upperBound - c)
                let place = geometry.lunOffset(c)
                guard let lun = runtime?.luns[place.lun]?.handle else { return (DomainError("pool '\(pool.name)': LUN \(place.lun) is missing"), false) }
                spans.append((lun, place.offset, n * pool.extentBytes))
                c += n
            }
        }
        var pieces: [(lun: LUNHandle, offset: UInt64, length: Int)] = []
        for span in spans {
            // The call blocks (fallocate, an ioctl): off the cooperative threads.
            let done: Result<Bool, IOError> = await withCheckedContinuation { c in
                Self.zeroingQueue.async {
                    do throws(IOError) { c.resume(returning: .success(try span.lun.zeroRange(offset: span.offset, length: span.length))) } catch {
                        c.resume(returning: .failure(error))
                    }
                }
            }
            switch done {
            case .success(true): continue
            case .success(false):
                for at in stride(from: UInt64(0), to: span.length, by: SharedZeros.bytes) {
                    pieces.append((span.lun, span.offset + at, Int(min(UInt64(SharedZeros.bytes), span.length - at))))
                }
            case .failure(let error):
                return (DomainError("pool '\(pool.name)': cannot zero a freed extent: \(error)"), false)
            }
        }
        let problem = await withTaskGroup(of: DomainError?.self) { group in
            var problem: DomainError?
            for (i, p) in pieces.enumerated() {
                if i >= Self.zeroingWidth, let done = await group.next(), let failed = done { problem = problem ?? failed }
                group.addTask { [engine] in
                    do {
                        _ = try await engine.write(lun: p.lun, from: SharedZeros.pointer, length: p.length, offset: p.offset, fua: true)
                        return nil
                    } catch {
                        return DomainError("pool '\(pool.name)': cannot zero a freed extent: \(error)")
                    }
                }
            }
            for await done in group { if let failed = done { problem = problem ?? failed } }
            return problem
        }
        return (problem, pieces.isEmpty)
    }

    static let zeroingQueue = DispatchQueue(label: "svsp.zeroing")
    static let zeroingWidth = 16

    /// Thin provisioning: releases every leg's chunks lying wholly inside [offset, offset+length)
    /// (a trim); the caller makes sure no I/O into them is in flight. They are zeroed in
    /// the background before anyone can have them. Returns how many were released.
    @discardableResult
    func deallocateExtents(vdisk name: String, offset: UInt64, length: Int) async throws(DomainError) -> Int {
        if let why = readOnlyReason { throw DomainError(why, code: EROFS) }
        let m = metadata
        guard let v = m.vdisk(named: name), v.thin else { return 0 }
        let end = offset + UInt64(length)
        var released = 0
        for leg in v.legs {
            guard let pool = m.pool(id: leg.poolId) else { continue }
            let first = (offset + pool.extentBytes - 1) / pool.extentBytes, last = end / pool.extentBytes
            guard first < last else { continue }
            let id = leg.id
            released += try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) -> Int in
                var n = 0
                for i in first..<last where try t.isMapped(id, i) { n += 1 }
                try t.unmap(id, first..<last)
                return n
            }
        }
        if released > 0 { zeroingWork.signal() }
        return released
    }
}
