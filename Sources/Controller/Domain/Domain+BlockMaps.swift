import Foundation
import IOEngine

/// The second level of metadata: each pool's block maps and space map (see `PoolMetadata`),
/// kept in a metadata area carved from the pool's first extents. The catalog (this
/// domain's record) names the area and, for each leg, its pool; the leg's id names its
/// block map there.
///
/// Order of commits: a map is made (and its chunks taken) before the catalog commit that
/// adds its leg, and released only after the commit that removes the leg (and after the
/// I/O sent with the old catalog has landed). A crash in between leaves a map no leg
/// names, which the next open releases; never a leg without its map.
extension Domain {
    /// The metadata area of a new pool: sized from its chunk count, in the last extents of
    /// LUN 0 (so data starts right after the LUN's reserve, where it always did).
    static func plannedMetadataArea(for pool: PoolRecord) -> (record: MetadataAreaRecord, layout: MetaLayout)? {
        let layout = MetaLayout.sized(forChunks: pool.extentCount)
        let extents = Int((layout.bytes + pool.extentBytes - 1) / pool.extentBytes)
        guard let lun = pool.luns.first, lun.extentCount > extents else { return nil }
        return (MetadataAreaRecord(lun: 0, firstExtent: lun.extentCount - extents, extentCount: extents), layout)
    }

    /// The pool chunks an area occupies.
    static func chunks(of area: MetadataAreaRecord, in geometry: PoolGeometry) -> [Range<UInt64>] {
        (area.firstExtent..<(area.firstExtent + area.extentCount)).map {
            let c = geometry.chunk(of: ExtentRef(lun: area.lun, extent: $0))
            return c..<(c + 1)
        }.coalesced()
    }

    func metaArea(of pool: PoolRecord, _ area: MetadataAreaRecord) -> MetaArea? {
        guard let lun = runtime(of: pool.id)?.luns[area.lun]?.handle else { return nil }
        return MetaArea(lun: lun, engine: engine, startBytes: pool.luns[area.lun].dataStartBytes + UInt64(area.firstExtent) * pool.extentBytes,
                        pageCount: UInt32(UInt64(area.extentCount) * pool.extentBytes / UInt64(MetaPage.bytes)))
    }

    /// Formats a pool's metadata area. `unzeroed`: the LUNs held data before, so all free
    /// space waits for the zeroer before it is handed out.
    func formatBlockMaps(of pool: PoolRecord, area: MetadataAreaRecord, unzeroed: Bool) async throws(DomainError) -> PoolMetadata {
        guard let device = metaArea(of: pool, area) else { throw DomainError("pool '\(pool.name)': LUN \(area.lun) of its metadata area is missing") }
        let geometry = PoolGeometry(pool)
        do {
            return try await PoolMetadata.format(area: device, layout: MetaLayout.sized(forChunks: pool.extentCount), poolId: pool.id,
                                                 chunkCount: geometry.chunkCount, reserved: Self.chunks(of: area, in: geometry), unzeroed: unzeroed)
        } catch {
            throw DomainError("pool '\(pool.name)': cannot write its metadata area: \(error)")
        }
    }

    /// Opens every pool's block maps that has an area and its LUN; a damaged area is a
    /// problem of the pool (its legs fail their I/O), never a reason to refuse the domain.
    func openBlockMaps() async {
        for pool in metadata.pools where poolMeta(pool.id) == nil {
            guard let area = pool.metadataArea else { continue }
            guard let device = metaArea(of: pool, area) else { continue } // the missing LUN is reported already
            do {
                let meta = try await PoolMetadata.open(area: device, poolId: pool.id)
                guard meta.chunkCount == PoolGeometry(pool).chunkCount else {
                    report("pool '\(pool.name)': its space map covers \(meta.chunkCount) chunks, the pool has \(PoolGeometry(pool).chunkCount)")
                    continue
                }
                setPoolMeta(meta, of: pool.id)
                for id in meta.lostMapIds {
                    report("pool '\(pool.name)': \(legName(id)): block map unusable: \(meta.lostReason(id) ?? "?")")
                }
            } catch {
                report("pool '\(pool.name)': block maps unusable: \(error)")
            }
        }
    }

    /// "vdisk 'm' leg 1" for a leg id (or the bare id of a map no leg names).
    func legName(_ id: UUID) -> String {
        for v in metadata.vdisks { if let l = v.legIndex(id) { return "vdisk '\(v.name)' leg \(l)" } }
        return "block map \(id)"
    }

    /// Legs whose block map was lost (a damaged page): a leg with another leg to copy from
    /// fails over (committed), gets a new map (thick: every extent allocated) and is
    /// rebuilt by resync from that leg; its old extents stay counted (they are unknown),
    /// which `pool check` reports as leaked. A leg with no other leg keeps failing its I/O
    /// with the reason, so nothing is read through a guess.
    func recoverLostMaps() async {
        guard readOnlyReason == nil else { return }
        for v in metadata.vdisks {
            for leg in v.legs {
                guard let pool = metadata.pool(id: leg.poolId), let meta = poolMeta(pool.id), meta.lostReason(leg.id) != nil else { continue }
                let others = v.legs.contains { o in
                    o.id != leg.id && o.state == .inSync && poolMeta(o.poolId).map { $0.lostReason(o.id) == nil && $0.hasMap(o.id) } == true
                }
                guard others else {
                    report("\(legName(leg.id)): no other leg to rebuild it from: its I/O fails until the vdisk is restored")
                    continue
                }
                do throws(DomainError) {
                    try await markLegsFailed(vdisk: v.name, legs: [leg.id])
                    try await makeLegMap(leg, in: pool, sizeBytes: v.sizeBytes, thin: v.thin, vdisk: v.name)
                    report("\(legName(leg.id)): its block map was lost; the leg failed over and a resync rebuilds it")
                    mirrors.resyncInBackground(vdisk: v.name, why: "a lost block map")
                } catch {
                    report("\(legName(leg.id)): cannot rebuild its lost block map: \(error)")
                }
            }
        }
    }

    /// A pool's block maps and space map (for tools and tests; nil when not open).
    public func blockMaps(ofPool name: String) -> PoolMetadata? { metadata.pool(named: name).flatMap { poolMeta($0.id) } }

    /// Where a leg's data lies (nil: its pool's metadata is not open).
    func route(_ leg: LegRecord, in m: DomainMetadata) -> LegRoute? {
        guard let pool = m.pool(id: leg.poolId) else { return nil }
        return route(map: leg.id, in: pool)
    }

    /// Where block map `map` of `pool` (a leg's, or a PiT's) puts its chunks.
    func route(map: UUID, in pool: PoolRecord) -> LegRoute? {
        guard let meta = poolMeta(pool.id) else { return nil }
        return LegRoute(map: map, meta: meta, geometry: PoolGeometry(pool))
    }

    /// Chunks the leg's block map maps (0 when its pool's metadata is not open).
    public func mappedChunks(of leg: LegRecord) -> UInt64 {
        guard let runs = try? poolMeta(leg.poolId)?.mapRuns(leg.id) else { return 0 }
        return runs.reduce(0) { $0 + ($1.1 == nil ? 0 : UInt64($1.0.count)) }
    }

    /// Chunks a leg of `sizeBytes` needs in `pool`.
    static func chunkCount(_ sizeBytes: UInt64, _ pool: PoolRecord) -> UInt64 { (sizeBytes + pool.extentBytes - 1) / pool.extentBytes }

    /// Runs a change of a pool's metadata; a full pool is ENOSPC (so callers may wait for the zeroer).
    func changeBlockMaps<T>(_ pool: PoolRecord, flushFirst: Bool = false,
                            _ body: @escaping (inout VolumeTransaction) throws(PageStore.Failure) -> T) async throws(DomainError) -> T {
        guard let meta = poolMeta(pool.id) else { throw DomainError("pool '\(pool.name)': its block maps are not available", code: EIO) }
        do {
            return try await meta.change(flushFirst: flushFirst, body)
        } catch {
            if case .full = error { throw DomainError("pool '\(pool.name)': \(error)", code: ENOSPC) }
            throw DomainError("pool '\(pool.name)': \(error)", code: EIO)
        }
    }

    /// Flushes every open LUN of the pool (writes that completed are durable after).
    func flushLUNs(of pool: UUID) async -> PageStore.Failure? {
        guard let runtime = runtime(of: pool) else { return .damaged("the pool is not open") }
        for case let lun? in runtime.luns {
            do { try await engine.flush(lun: lun.handle) } catch { return .io(error) }
        }
        return nil
    }

    /// A new leg's block map in `pool`: every chunk allocated (thick, as few runs as the
    /// free space allows) or none (thin). Durable when it returns; the caller commits the leg.
    func makeLegMap(_ leg: LegRecord, in pool: PoolRecord, sizeBytes: UInt64, thin: Bool, vdisk: String) async throws(DomainError) {
        let chunks = Self.chunkCount(sizeBytes, pool)
        let zeroing = zeroingExtents(of: pool)
        do {
            try await changeBlockMaps(pool) { (v: inout VolumeTransaction) throws(PageStore.Failure) in
                try v.createMap(leg.id, chunks: chunks)
                if !thin { try v.map(leg.id, at: 0, to: try v.allocate(chunks)) }
            }
        } catch where error.code == ENOSPC && !thin {
            let free = poolMeta(pool.id)?.freeChunks ?? 0
            throw DomainError("pool '\(pool.name)' has \(free) free extents of \(ByteSize.format(pool.extentBytes))"
                + (zeroing > 0 ? " (\(zeroing) more being zeroed)" : "") + "; vdisk '\(vdisk)' needs \(chunks)", code: ENOSPC)
        }
    }

    /// Releases the block maps of legs the catalog no longer has, once the I/O that `port`
    /// had in flight (sent with the old catalog) has landed; then wakes the zeroer.
    func releaseLegMaps(_ legs: [LegRecord], after port: VDiskPort?) {
        let waiting = port?.requestsInFlight() ?? []
        Task {
            // A device that hangs keeps the chunks out of reach until the daemon restarts
            // (the next open releases maps no leg names).
            if let port, !waiting.isEmpty { await port.drain(waiting) }
            await self.deleteMaps(legs.map { ($0.id, $0.poolId) })
        }
    }

    /// Releases maps that no leg or PiT of the catalog names (a crash between the two commits).
    func releaseOrphanMaps() async {
        guard readOnlyReason == nil else { return }
        let m = metadata
        for pool in m.pools {
            guard let meta = poolMeta(pool.id) else { continue }
            let named = Set(m.vdisks.flatMap(\.legs).filter { $0.poolId == pool.id }.map(\.id)).union(m.pitMapIds(in: pool.id))
            let orphans = (meta.mapIds + meta.lostMapIds).filter { !named.contains($0) }
            guard !orphans.isEmpty else { continue }
            do throws(DomainError) {
                for id in orphans { try await deleteBlockMap(id, in: pool) }
            } catch {
                report("pool '\(pool.name)': cannot release \(orphans.count) block map(s) no vdisk uses: \(error)")
            }
        }
    }

    /// Deletes a block map no leg names any more, in commits of bounded size (a huge,
    /// fragmented thin map would not fit one journal); the zeroer starts on what each step
    /// released. A crash part-way leaves the rest of the map, which the next open releases.
    func deleteBlockMap(_ id: UUID, in pool: PoolRecord) async throws(DomainError) {
        guard let budget = poolMeta(pool.id)?.stepPageBudget else { return }
        while try await !changeBlockMaps(pool, { (v: inout VolumeTransaction) throws(PageStore.Failure) -> Bool in
            try v.deleteMapStep(id, pageBudget: budget)
        }) {
            zeroingWork.signal()
        }
    }

    // MARK: format 2 -> 3

    /// Moves the extent lists of a format-2 record into block maps in each pool's new
    /// metadata area (taken from free extents), keeping every byte where it is. Idempotent
    /// until the catalog commit: a crash before it redoes the same conversion.
    func convertExtentLists(_ next: inout DomainMetadata) async throws(DomainError) {
        for p in next.pools.indices where next.pools[p].metadataArea == nil {
            let pool = next.pools[p]
            let geometry = PoolGeometry(pool)
            var used = Set(pool.zeroing ?? [])
            for leg in next.vdisks.flatMap(\.legs) where leg.poolId == pool.id { for case let e? in leg.legacyExtents ?? [] { used.insert(e) } }
            let needed = Int((MetaLayout.sized(forChunks: pool.extentCount).bytes + pool.extentBytes - 1) / pool.extentBytes)
            guard let area = Self.freeRun(of: needed, in: pool, excluding: used) else {
                throw DomainError("pool '\(pool.name)': converting to block maps needs \(needed) contiguous free extents on one LUN for "
                    + "its metadata area; free some space with the previous release, then start again")
            }
            // Free extents of a format-2 pool may hold what a thick vdisk left: zeroed before reuse.
            let meta = try await formatBlockMaps(of: pool, area: area, unzeroed: true)
            setPoolMeta(meta, of: pool.id)
            for v in next.vdisks {
                for leg in v.legs where leg.poolId == pool.id {
                    let extents = leg.legacyExtents ?? []
                    let chunks = max(UInt64(extents.count), Self.chunkCount(v.sizeBytes, pool))
                    var pieces: [(at: UInt64, runs: [Range<UInt64>])] = []
                    for (i, e) in extents.enumerated() {
                        guard let e else { continue }
                        guard pool.holds(e) else { throw DomainError("vdisk '\(v.name)': extent \(e.lun)/\(e.extent) is outside pool '\(pool.name)'") }
                        let c = geometry.chunk(of: e)
                        if let last = pieces.last, last.at + UInt64(last.runs[0].count) == UInt64(i), last.runs[0].upperBound == c {
                            pieces[pieces.count - 1].runs[0] = last.runs[0].lowerBound..<(c + 1)
                        } else {
                            pieces.append((UInt64(i), [c..<(c + 1)]))
                        }
                    }
                    let id = leg.id
                    try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
                        try t.createMap(id, chunks: chunks)
                        for piece in pieces { try t.adopt(id, at: piece.at, runs: piece.runs) }
                    }
                }
            }
            next.pools[p].metadataArea = area
            next.pools[p].zeroing = nil
        }
        for v in next.vdisks.indices { for l in next.vdisks[v].legs.indices { next.vdisks[v].legs[l].legacyExtents = nil } }
    }

    /// The first run of `count` extents on one LUN that `excluding` does not touch.
    private static func freeRun(of count: Int, in pool: PoolRecord, excluding used: Set<ExtentRef>) -> MetadataAreaRecord? {
        for lun in pool.luns {
            var start = 0
            for e in 0..<lun.extentCount {
                if used.contains(ExtentRef(lun: lun.index, extent: e)) { start = e + 1; continue }
                if e - start + 1 == count { return MetadataAreaRecord(lun: lun.index, firstExtent: start, extentCount: count) }
            }
        }
        return nil
    }
}

extension Array where Element == Range<UInt64> {
    /// Sorted, with touching ranges merged.
    func coalesced() -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for r in sorted(by: { $0.lowerBound < $1.lowerBound }) {
            if let last = out.last, last.upperBound >= r.lowerBound {
                out[out.count - 1] = last.lowerBound..<Swift.max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }
}
