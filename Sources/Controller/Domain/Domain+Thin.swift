import Foundation
import IOEngine

/// Thin provisioning: extents allocated on first write (zeroed first) and freed by trims.
extension Domain {
    /// Thin provisioning: every leg's extents covering [offset, offset+length), allocated and committed now.
    ///
    /// A freed extent still holds what its last owner wrote, so each new one is zeroed
    /// (FUA) before it is mapped: the rest of it reads as zeroes, not another vdisk's data.
    /// A failed leg is not zeroed; instead the new extents' range is marked dirty, so its
    /// resync copies all of it. A leg that cannot be zeroed fails like a leg that cannot
    /// take a write (automatic-failover goes on without it); otherwise the write fails.
    func allocateExtents(vdisk name: String, offset: UInt64, length: Int) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        guard let vi = metadata.vdisks.firstIndex(where: { $0.name == name }) else { throw DomainError("vdisk '\(name)' not found", code: ENODEV) }
        var next = metadata
        var changed = false
        var dirtyRange: Range<UInt64>?
        for l in next.vdisks[vi].legs.indices {
            guard let pool = next.pool(id: next.vdisks[vi].legs[l].poolId) else { continue }
            let first = Int(offset / pool.extentBytes), last = Int((offset + UInt64(max(length, 1)) - 1) / pool.extentBytes)
            let missing = (first...last).filter { next.vdisks[vi].legs[l].extents[$0] == nil }
            guard !missing.isEmpty else { continue }
            guard let picked = allocate(missing.count, in: pool, metadata: next) else {
                throw DomainError("pool '\(pool.name)' is full: thin vdisk '\(name)' cannot allocate \(missing.count) extent(s)", code: ENOSPC)
            }
            var failed = next.vdisks[vi].legs[l].state == .failed
            if !failed, let problem = await zero(picked, of: pool) {
                let others = next.vdisks[vi].legs.indices.contains { $0 != l && next.vdisks[vi].legs[$0].state != .failed }
                guard next.vdisks[vi].mode == .automaticFailover, others else { throw problem }
                next.vdisks[vi].legs[l].markFailed(atGeneration: metadata.generation + 1)
                failed = true
            }
            if failed {
                let span = UInt64(first) * pool.extentBytes..<UInt64(last + 1) * pool.extentBytes
                dirtyRange = dirtyRange.map { min($0.lowerBound, span.lowerBound)..<max($0.upperBound, span.upperBound) } ?? span
            }
            for (i, e) in zip(missing, picked) { next.vdisks[vi].legs[l].extents[i] = e }
            changed = true
        }
        // A failed leg's new extents are dirty, held in flight until the commit that maps
        // them, so `clean` cannot clear them first.
        let log = dirtyRange == nil ? nil : (try? port(for: name))?.dirtyLog
        defer { if let log, let r = dirtyRange { log.endWrite(offset: r.lowerBound, length: r.count) } }
        if let log, let r = dirtyRange, !log.markDirty(offset: r.lowerBound, length: r.count) {
            throw DomainError("vdisk '\(name)': cannot write its dirty-region bitmap")
        }
        if changed { try await commit(next) }
    }

    /// Writes zeroes over the extents, durably (FUA), at most `zeroingWidth` 1 MiB pieces
    /// at a time. Nil, or what failed. Every piece has finished when it returns.
    func zero(_ extents: [ExtentRef], of pool: PoolRecord) async -> DomainError? {
        let runtime = runtime(of: pool.id)
        var pieces: [(lun: LUNHandle, offset: UInt64, length: Int)] = []
        for e in extents {
            guard let lun = runtime?.luns[e.lun]?.handle else { return DomainError("pool '\(pool.name)': LUN \(e.lun) is missing") }
            let start = pool.luns[e.lun].dataStartBytes + UInt64(e.extent) * pool.extentBytes
            for at in stride(from: UInt64(0), to: pool.extentBytes, by: SharedZeros.bytes) {
                pieces.append((lun, start + at, Int(min(UInt64(SharedZeros.bytes), pool.extentBytes - at))))
            }
        }
        return await withTaskGroup(of: DomainError?.self) { group in
            var problem: DomainError?
            for (i, p) in pieces.enumerated() {
                if i >= Self.zeroingWidth, let done = await group.next(), let failed = done { problem = problem ?? failed }
                group.addTask { [engine] in
                    do {
                        _ = try await engine.write(lun: p.lun, from: SharedZeros.pointer, length: p.length, offset: p.offset, fua: true)
                        return nil
                    } catch {
                        return DomainError("pool '\(pool.name)': cannot zero a new extent: \(error)")
                    }
                }
            }
            for await done in group { if let failed = done { problem = problem ?? failed } }
            return problem
        }
    }

    static let zeroingWidth = 16

    /// Thin provisioning: frees every leg's extents lying wholly inside [offset, offset+length)
    /// (a trim) and commits; the caller makes sure no I/O into them is in flight. Returns how
    /// many extents were freed.
    @discardableResult
    func deallocateExtents(vdisk name: String, offset: UInt64, length: Int) async throws(DomainError) -> Int {
        try await beginChange()
        defer { mutation.release() }
        guard let vi = metadata.vdisks.firstIndex(where: { $0.name == name }), metadata.vdisks[vi].thin else { return 0 }
        var next = metadata
        var freed: [LegRecord] = [] // what each leg gives back, zeroed before reuse
        let end = offset + UInt64(length)
        for l in next.vdisks[vi].legs.indices {
            guard let pool = next.pool(id: next.vdisks[vi].legs[l].poolId) else { continue }
            let first = Int((offset + pool.extentBytes - 1) / pool.extentBytes), last = Int(end / pool.extentBytes)
            var given = LegRecord(poolId: pool.id, extents: [])
            for i in first..<max(first, last) where next.vdisks[vi].legs[l].extents[i] != nil {
                given.extents.append(next.vdisks[vi].legs[l].extents[i])
                next.vdisks[vi].legs[l].extents[i] = nil
            }
            freed.append(given)
        }
        let count = freed.reduce(0) { $0 + $1.extents.count }
        guard count > 0 else { return 0 }
        listForZeroing(freed, in: &next)
        try await commit(next)
        zeroingWork.signal()
        return count
    }
}
