import Foundation
import IOEngine

/// `svsp-ctl pool check NAME`: the pool's block maps against its space map, its metadata
/// pages against their checksums, and its labels; read-only and safe on a live pool.
extension Domain {
    public struct PoolCheckReport: Encodable, Sendable {
        public var pool: String
        public var extents: Int
        /// Chunks some block map references.
        public var mapped: Int
        public var beingZeroed: Int
        public var free: Int
        /// Chunks held by maps no leg names (being released after a delete, or left by a crash).
        public var heldBack: Int
        /// Chunks reserved by redirect-on-writes in flight (a restart sends them to the zeroer).
        public var beingRedirected = 0
        public var metadataPages: Int
        /// Journal pages holding commits not yet written in place (a checkpoint empties it).
        public var journalPagesInUse: Int
        /// What `--repair` did before this check (nil without it).
        public var repair: String?
        public var problems: [String]
        public var clean: Bool { problems.isEmpty }

        enum CodingKeys: String, CodingKey { case pool, extents, mapped, beingZeroed, free, heldBack, beingRedirected, metadataPages, journalPagesInUse, repair, problems, clean }
        public func encode(to encoder: Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(pool, forKey: .pool)
            try c.encode(extents, forKey: .extents)
            try c.encode(mapped, forKey: .mapped)
            try c.encode(beingZeroed, forKey: .beingZeroed)
            try c.encode(free, forKey: .free)
            try c.encode(heldBack, forKey: .heldBack)
            try c.encode(beingRedirected, forKey: .beingRedirected)
            try c.encode(metadataPages, forKey: .metadataPages)
            try c.encode(journalPagesInUse, forKey: .journalPagesInUse)
            try c.encodeIfPresent(repair, forKey: .repair)
            try c.encode(problems, forKey: .problems)
            try c.encode(clean, forKey: .clean)
        }
    }

    /// Walks every block map of the pool and the space map: each chunk's count equals the
    /// references to it (a count above: leaked; below: referenced twice without a share),
    /// no map points at free, zeroing or metadata chunks or outside the pool, every leg has
    /// its map; every metadata page on disk passes its checksum; every LUN carries the
    /// pool's label; the pool's setup-vdisk copy (if any) is current.
    public func checkPool(name: String) async throws(DomainError) -> PoolCheckReport {
        let m = metadata
        guard let pool = m.pool(named: name) else { throw DomainError("pool '\(name)' not found") }
        var problems: [String] = []
        var report = PoolCheckReport(pool: pool.name, extents: pool.extentCount, mapped: 0, beingZeroed: 0, free: 0, heldBack: 0,
                                     metadataPages: 0, journalPagesInUse: 0, problems: [])
        if let meta = poolMeta(pool.id) {
            report.journalPagesInUse = Int(meta.store.journalUsed)
            problems += checkMaps(pool, meta, m, &report)
            problems += await meta.store.verifyOnDisk()
        } else {
            problems.append("its block maps are not open (see `svsp-ctl status`)")
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
        report.problems = problems
        return report
    }

    /// `pool check --repair`: a pool whose block maps could not be opened (a damaged space
    /// map) gets a space map rebuilt from its block maps (`PoolMetadata.rebuildSpaceMap`);
    /// then leaked extents are given back. Returns what it did, as one line.
    public func repairPool(name: String) async throws(DomainError) -> String {
        try await beginChange()
        var rebuilt: String?
        do {
            defer { mutation.release() }
            guard let pool = metadata.pool(named: name) else { throw DomainError("pool '\(name)' not found") }
            if poolMeta(pool.id) == nil {
                guard let areaRecord = pool.metadataArea, let area = metaArea(of: pool, areaRecord) else {
                    throw DomainError("pool '\(name)': its metadata area cannot be read (a LUN is missing): nothing to repair from")
                }
                let geometry = PoolGeometry(pool)
                let meta: PoolMetadata
                do {
                    meta = try await PoolMetadata.rebuildSpaceMap(area: area, poolId: pool.id, chunkCount: geometry.chunkCount,
                                                                  reserved: Self.chunks(of: areaRecord, in: geometry))
                } catch {
                    throw DomainError("pool '\(name)': cannot rebuild its space map: \(error)")
                }
                setPoolMeta(meta, of: pool.id)
                clearProblems(startingWith: "pool '\(name)': block maps unusable")
                try await commit(metadata) // a new generation: open ports pick up the pool's maps
                let waiting = zeroingExtents(of: pool)
                rebuilt = "space map rebuilt from \(meta.mapIds.count) block map(s); \(waiting) extent(s) no map references are zeroed before reuse"
                zeroingWork.signal()
            }
        }
        let reclaimed = try await reclaimLeakedChunks(pool: name)
        return (rebuilt.map { $0 + "; " } ?? "") + "\(reclaimed) leaked extent(s) given back"
    }

    /// Gives back the pool's leaked chunks (see
    /// `VolumeTransaction.reclaimLeaks`) in commits of bounded size, on a live pool (each
    /// step counts references in its own transaction, so concurrent changes are seen), and
    /// wakes the zeroer. Returns how many chunks it gave back.
    public func reclaimLeakedChunks(pool name: String) async throws(DomainError) -> Int {
        if let why = readOnlyReason { throw DomainError(why, code: EROFS) }
        guard let pool = metadata.pool(named: name) else { throw DomainError("pool '\(name)' not found") }
        guard let budget = poolMeta(pool.id)?.stepPageBudget else { throw DomainError("pool '\(name)': its block maps are not open") }
        var total: UInt64 = 0
        while true {
            let (n, done) = try await changeBlockMaps(pool) { (v: inout VolumeTransaction) throws(PageStore.Failure) in
                try v.reclaimLeaks(pageBudget: budget)
            }
            total += n
            if n > 0 { zeroingWork.signal() }
            if done { return Int(total) }
        }
    }

    /// The map walk: references counted by a sweep over the maps' runs (never per chunk
    /// in memory), then compared with the space map's runs.
    private func checkMaps(_ pool: PoolRecord, _ meta: PoolMetadata, _ m: DomainMetadata, _ report: inout PoolCheckReport) -> [String] {
        var problems: [String] = []
        let legs = m.vdisks.flatMap { v in v.legs.enumerated().filter { $0.element.poolId == pool.id }.map { (v, $0.offset, $0.element) } }
        let named = Set(legs.map(\.2.id)).union(m.pitMapIds(in: pool.id))
        var events: [(at: UInt64, delta: Int)] = []
        var readable: [UUID] = []
        for id in meta.mapIds {
            do { _ = try meta.mapRuns(id); readable.append(id) } catch {
                if meta.hasMap(id) { problems.append("block map \(id): \(error)") } // else deleted meanwhile (a PiT, a removed leg)
            }
        }
        // Named maps first: chunks a removed leg's map shares with a live one are not held back.
        let unreadable = Set(meta.mapIds).subtracting(readable).filter { id in problems.contains { $0.hasPrefix("block map \(id)") } }
        var space: [(Range<UInt64>, UInt64)] = []
        do {
            let state = try meta.referencesAndSpace(first: named, excluding: unreadable)
            space = state.space
            for (id, poolChunks) in state.references {
                if poolChunks.upperBound > meta.chunkCount {
                    problems.append("block map \(id) references pool chunks \(poolChunks), outside the pool")
                    continue
                }
                if !named.contains(id) { report.heldBack += poolChunks.count }
                events.append((poolChunks.lowerBound, 1))
                events.append((poolChunks.upperBound, -1))
            }
        } catch {
            return problems + ["block maps: \(error)"]
        }
        for (v, l, leg) in legs {
            guard let count = meta.mapCount(leg.id) else {
                problems.append("vdisk '\(v.name)' leg \(l) " + (meta.lostReason(leg.id).map { "has lost its block map: \($0)" } ?? "has no block map"))
                continue
            }
            if count < Self.chunkCount(v.sizeBytes, pool) {
                problems.append("vdisk '\(v.name)' leg \(l): its block map covers \(count) chunks, the vdisk needs \(Self.chunkCount(v.sizeBytes, pool))")
            }
        }
        let refs = PoolMetadata.referenceRuns(events, chunkCount: meta.chunkCount)
        var r = 0
        for (range, value) in space {
            switch value {
            case PoolMetadata.SpaceValue.free: report.free += range.count
            case PoolMetadata.SpaceValue.awaitingZeroing: report.beingZeroed += range.count
            case PoolMetadata.SpaceValue.metadata: break
            case PoolMetadata.SpaceValue.reserved: report.beingRedirected += range.count
            default: report.mapped += range.count
            }
            var c = range.lowerBound
            while c < range.upperBound {
                while r < refs.count, refs[r].0.upperBound <= c { r += 1 }
                guard r < refs.count else { break }
                let piece = c..<min(range.upperBound, refs[r].0.upperBound)
                let referenced = refs[r].1
                let counted: Int? = value >= 1 && value < PoolMetadata.SpaceValue.awaitingZeroing ? Int(value) : nil
                if let counted, counted != referenced {
                    problems.append(counted > referenced
                        ? "pool chunks \(piece): counted \(counted), referenced \(referenced) times (leaked)"
                        : "pool chunks \(piece): referenced \(referenced) times, counted \(counted) (mapped twice without a share)")
                } else if counted == nil, referenced > 0 {
                    let what = value == PoolMetadata.SpaceValue.free ? "free" : value == PoolMetadata.SpaceValue.metadata ? "the metadata area" : "being zeroed"
                    problems.append("pool chunks \(piece) are mapped \(referenced) time(s) but are \(what)")
                }
                c = piece.upperBound
            }
        }
        report.metadataPages = Int(meta.store.layout.pageCount)
        return problems
    }
}
