import Foundation

/// Decoded metadata is checked before it is trusted: a record whose checksums pass
/// but whose contents are impossible (a LUN index past the pool's LUNs, an extent
/// past its LUN, a leg in an unknown pool) would otherwise trap or misroute I/O.
extension DomainMetadata {
    /// The first impossible thing in the record, or nil when it is consistent.
    public var consistencyProblem: String? {
        var poolIds = Set<UUID>()
        for pool in pools {
            guard poolIds.insert(pool.id).inserted else { return "pool id \(pool.id) appears twice" }
            guard pool.extentBytes > 0, pool.extentBytes % 4096 == 0 else { return "pool '\(pool.name)': extent size \(pool.extentBytes)" }
            for (i, lun) in pool.luns.enumerated() {
                guard lun.index == i else { return "pool '\(pool.name)': LUN \(lun.path) has index \(lun.index), expected \(i)" }
                guard lun.extentCount >= 0, lun.dataStartBytes <= lun.sizeBytes,
                      UInt64(lun.extentCount) <= (lun.sizeBytes - lun.dataStartBytes) / pool.extentBytes
                else { return "pool '\(pool.name)': LUN \(lun.path) claims more extents than it holds" }
            }
            for e in pool.zeroing ?? [] where !pool.holds(e) { return "pool '\(pool.name)': extent \(e.lun)/\(e.extent) to zero is outside the pool" }
            if let area = pool.metadataArea {
                guard pool.luns.indices.contains(area.lun), area.firstExtent >= 0, area.extentCount > 0,
                      area.firstExtent + area.extentCount <= pool.luns[area.lun].extentCount
                else { return "pool '\(pool.name)': its metadata area lies outside its LUNs" }
            } else if (format ?? 0) >= 3 {
                return "pool '\(pool.name)' has no metadata area"
            }
        }
        for id in setupPools where !poolIds.contains(id) { return "setup pool \(id) is not a pool of the domain" }
        var names = Set<String>()
        for v in vdisks {
            guard names.insert(v.name).inserted else { return "vdisk name '\(v.name)' appears twice" }
            guard v.blockSize == 512 || v.blockSize == 4096, v.sizeBytes > 0, v.sizeBytes % UInt64(v.blockSize) == 0 else {
                return "vdisk '\(v.name)': size \(v.sizeBytes) or block size \(v.blockSize)"
            }
            guard (1...4).contains(v.legs.count) else { return "vdisk '\(v.name)' has \(v.legs.count) legs" }
            for leg in v.legs {
                guard let pool = pool(id: leg.poolId) else { return "vdisk '\(v.name)': a leg is in unknown pool \(leg.poolId)" }
                guard let extents = leg.legacyExtents else {
                    if (format ?? 0) < 3 { return "vdisk '\(v.name)': a leg has no extent list" }
                    continue // format 3: the pool's block map (checked when the pool opens)
                }
                let needed = (v.sizeBytes + pool.extentBytes - 1) / pool.extentBytes
                guard UInt64(extents.count) >= needed else { return "vdisk '\(v.name)': a leg maps \(extents.count) extents, needs \(needed)" }
                for case let e? in extents where !pool.holds(e) {
                    return "vdisk '\(v.name)': extent \(e.lun)/\(e.extent) is outside pool '\(pool.name)'"
                }
            }
        }
        return nil
    }
}

extension DomainMetadata {
    /// Records written before legs had ids (format nil) get ids derived from the vdisk's id
    /// and the leg's position, the same at every load until the converted record commits:
    /// a random id per decode would change under ports and copiers between two reloads.
    func withLegacyLegIds() -> DomainMetadata {
        guard format == nil else { return self }
        var m = self
        for v in m.vdisks.indices {
            for l in m.vdisks[v].legs.indices {
                var bytes = m.vdisks[v].id.uuid
                bytes.15 ^= UInt8(l + 1)
                bytes.14 ^= 0x5A
                m.vdisks[v].legs[l].id = UUID(uuid: bytes)
            }
        }
        return m
    }
}

extension PoolRecord {
    /// Whether `e` names an extent of one of the pool's LUNs.
    func holds(_ e: ExtentRef) -> Bool {
        luns.indices.contains(e.lun) && e.extent >= 0 && e.extent < luns[e.lun].extentCount
    }
}
