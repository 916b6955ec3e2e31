import Foundation
import IOEngine

/// `svsp-ctl pool check NAME`: the pool's space accounting and labels, read-only and
/// safe on a live pool. Today's maps are the extent lists in the catalog; the check
/// grows with the block maps (pages, checksums, reference counts).
extension Domain {
    public struct PoolCheckReport: Encodable, Sendable {
        public var pool: String
        public var extents: Int
        public var mapped: Int
        public var beingZeroed: Int
        public var free: Int
        public var heldBack: Int
        public var problems: [String]
        public var clean: Bool { problems.isEmpty }

        enum CodingKeys: String, CodingKey { case pool, extents, mapped, beingZeroed, free, heldBack, problems, clean }
        public func encode(to encoder: Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(pool, forKey: .pool)
            try c.encode(extents, forKey: .extents)
            try c.encode(mapped, forKey: .mapped)
            try c.encode(beingZeroed, forKey: .beingZeroed)
            try c.encode(free, forKey: .free)
            try c.encode(heldBack, forKey: .heldBack)
            try c.encode(problems, forKey: .problems)
            try c.encode(clean, forKey: .clean)
        }
    }

    /// Every extent mapped at most once and inside the pool, none both mapped and being
    /// zeroed, the zeroing list without repeats, every LUN present and carrying this
    /// pool's label, and the pool's setup-vdisk copy (if any) current.
    public func checkPool(name: String) throws(DomainError) -> PoolCheckReport {
        let m = metadata
        guard let pool = m.pool(named: name) else { throw DomainError("pool '\(name)' not found") }
        var problems: [String] = []
        var owner: [ExtentRef: String] = [:]
        for v in m.vdisks {
            for (l, leg) in v.legs.enumerated() where leg.poolId == pool.id {
                for (i, ref) in leg.extents.enumerated() {
                    guard let ref else { continue }
                    let here = "vdisk '\(v.name)' leg \(l) extent \(i)"
                    guard pool.holds(ref) else {
                        problems.append("\(here) maps LUN \(ref.lun) extent \(ref.extent), outside the pool")
                        continue
                    }
                    if let first = owner[ref] {
                        problems.append("LUN \(ref.lun) extent \(ref.extent) is mapped twice: by \(first) and by \(here)")
                    } else {
                        owner[ref] = here
                    }
                }
            }
        }
        var listed = Set<ExtentRef>()
        for ref in pool.zeroing ?? [] {
            if !listed.insert(ref).inserted { problems.append("LUN \(ref.lun) extent \(ref.extent) is listed twice for zeroing") }
            if let user = owner[ref] { problems.append("LUN \(ref.lun) extent \(ref.extent) is being zeroed while mapped by \(user)") }
            if !pool.holds(ref) { problems.append("LUN \(ref.lun) extent \(ref.extent) to zero is outside the pool") }
        }
        let runtime = runtime(of: pool.id)
        for lun in pool.luns {
            guard let handle = runtime?.luns[lun.index]?.handle else {
                problems.append("LUN \(lun.path) is missing")
                continue
            }
            let label = (try? probe(handle, signature: false))?.label
            guard case .label(let l)? = label, l.domainId == m.domainId, l.poolId == pool.id, Int(l.lunIndex) == lun.index else {
                problems.append("LUN \(lun.path) does not carry this pool's label (index \(lun.index))")
                continue
            }
        }
        for copy in setupCopyStates where copy.poolName == pool.name {
            if let problem = copy.problem { problems.append("setup vdisk copy: \(problem)") }
        }
        let zeroing = listed.count
        return PoolCheckReport(pool: pool.name, extents: pool.extentCount, mapped: owner.count, beingZeroed: zeroing,
                               free: max(0, pool.extentCount - owner.count - zeroing), heldBack: quarantined(in: pool.id).count,
                               problems: problems)
    }
}
