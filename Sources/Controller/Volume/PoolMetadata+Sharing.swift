import Foundation

/// What PiTs need of a pool's metadata: whether a map's chunk is shared with another map
/// (so a write must be redirected), and the two commits of a redirect-on-write:
/// `reserve` takes new chunks (durably marked reserved, so a crash while they are being
/// filled sends them to the zeroer, never back to free with data in them), `redirect`
/// maps the filled chunk in place of the shared one and lets go of the old reference.
extension PoolMetadata {
    /// Whether writing chunk `chunk` of map `map` in place would change what another map
    /// (a PiT, a snapshot) reads: a page on its path is shared, or its pool chunk has
    /// more than one holder. An unmapped chunk is not shared (a first write maps a new one).
    public func isShared(map: UUID, chunk: UInt64) throws(TreeError) -> Bool {
        try store.reading { pages throws(TreeError) in
            guard let tree = trees[map]?.tree else { throw missing(map) }
            let (value, _) = try tree.run(at: chunk, limit: 1, in: pages)
            guard value != 0 else { return false }
            if try tree.pathShared(at: chunk, in: pages, references: pages.referenceCount) { return true }
            let (holders, _) = try trees[Self.spaceMapId]!.tree.run(at: value - 1, limit: 1, in: pages)
            return holders > 1 && holders < SpaceValue.awaitingZeroing
        }
    }

    /// The vdisk chunk runs where maps `a` and `b` map differently (a PiT against a later
    /// PiT or the live map), and the metadata pages read: proportional to the chunks
    /// changed since they shared everything, not to the maps' size.
    public func differences(_ a: UUID, _ b: UUID) throws(TreeError) -> (runs: [Range<UInt64>], pagesRead: Int) {
        try store.reading { pages throws(TreeError) in
            guard let ta = trees[a]?.tree else { throw missing(a) }
            guard let tb = trees[b]?.tree else { throw missing(b) }
            var out: [Range<UInt64>] = []
            let read = try ta.diff(tb, in: pages) { out.append($0) }
            return (out, read)
        }
    }

    /// How many pool chunks map `id` references that none of `others` reaches (what
    /// deleting it would give back). Walks every map given: for reports, not the data path.
    public func chunksOnlyIn(_ id: UUID, comparedWith others: [UUID]) throws(TreeError) -> UInt64 {
        try store.reading { pages throws(TreeError) in
            guard let tree = trees[id]?.tree else { throw missing(id) }
            var visited = Set<UInt32>(), theirs: [Range<UInt64>] = []
            for o in others { try trees[o]?.tree.forEachReference(pages, visited: &visited) { theirs.append($0) } }
            var own = Set<UInt32>(), mine: [Range<UInt64>] = []
            try tree.forEachReference(pages, visited: &own) { mine.append($0) }
            let covered = theirs.coalesced()
            var only: UInt64 = 0, k = 0
            for r in mine.coalesced() {
                var c = r.lowerBound
                while c < r.upperBound {
                    while k < covered.count, covered[k].upperBound <= c { k += 1 }
                    if k < covered.count, covered[k].lowerBound <= c { c = Swift.min(r.upperBound, covered[k].upperBound); continue }
                    let end = k < covered.count ? Swift.min(r.upperBound, covered[k].lowerBound) : r.upperBound
                    only += end - c
                    c = end
                }
            }
            return only
        }
    }

    /// Chunks reserved by redirects that never finished (a crash): found at open.
    public func reservedChunks() throws(TreeError) -> UInt64 {
        try spaceRuns().reduce(0) { $0 + ($1.1 == SpaceValue.reserved ? UInt64($1.0.count) : 0) }
    }
}

extension VolumeTransaction {
    private typealias SpaceValue = PoolMetadata.SpaceValue

    /// Takes `n` free chunks as reserved (see `PoolMetadata.SpaceValue.reserved`).
    public mutating func reserve(_ n: UInt64) throws(PageStore.Failure) -> [Range<UInt64>] {
        guard let runs = free.take(n) else {
            throw .full("the pool is full: \(free.count) free chunk(s), \(n) needed")
        }
        for r in runs { try setSpace(r, to: SpaceValue.reserved) }
        return runs
    }

    /// The pool chunk map `id` maps vdisk chunk `chunk` to (nil: unmapped).
    public func poolChunk(_ id: UUID, _ chunk: UInt64) throws(PageStore.Failure) -> UInt64? {
        guard let tree = trees[id]?.tree else { throw .damaged("no block map \(id)") }
        do {
            let v = try tree.run(at: chunk, limit: 1, in: tx).value
            return v == 0 ? nil : v - 1
        } catch { throw .damaged("\(error)") }
    }

    /// Maps vdisk chunk `chunk` of `id` to the reserved pool chunk `to` (now filled) in
    /// place of `from`, whose reference goes. Refused when the map no longer maps `from`
    /// there (the caller gives `to` back with `unreserve`).
    public mutating func redirect(_ id: UUID, chunk: UInt64, from: UInt64, to: UInt64) throws(PageStore.Failure) {
        guard try poolChunk(id, chunk) == from else { throw .damaged("block map \(id): extent \(chunk) changed during its redirect") }
        var held: UInt64 = 0
        do { held = try trees[PoolMetadata.spaceMapId]!.tree.run(at: to, limit: 1, in: tx).value } catch { throw .damaged("\(error)") }
        guard held == SpaceValue.reserved else { throw .damaged("space map: chunk \(to) is not reserved (\(held))") }
        try setSpace(to..<(to + 1), to: 1)
        try map(id, at: chunk, to: [to..<(to + 1)])
    }

    /// Gives back reserved chunks a redirect did not use: they may hold data, so they
    /// await zeroing.
    public mutating func unreserve(_ range: Range<UInt64>) throws(PageStore.Failure) {
        try setSpace(range, to: SpaceValue.awaitingZeroing)
    }

    /// Gives back a reserved chunk that was never written: free again.
    public mutating func returnSpare(_ range: Range<UInt64>) throws(PageStore.Failure) {
        var held: UInt64 = 0
        do { held = try trees[PoolMetadata.spaceMapId]!.tree.run(at: range.lowerBound, limit: 1, in: tx).value } catch { throw .damaged("\(error)") }
        guard held == SpaceValue.reserved else { throw .damaged("space map: chunk \(range.lowerBound) is not reserved (\(held))") }
        try setSpace(range, to: SpaceValue.free)
        free.insert(range)
    }

    /// Every reserved chunk awaits zeroing (at open: the redirects they were for died with
    /// the process, and their writes were never acknowledged). Returns how many.
    public mutating func releaseReservations() throws(PageStore.Failure) -> UInt64 {
        var runs: [Range<UInt64>] = []
        do {
            try trees[PoolMetadata.spaceMapId]!.tree.forEachRun(in: 0..<chunkCount, tx) { r, v in
                if v == SpaceValue.reserved { runs.append(r) }
            }
        } catch { throw .damaged("\(error)") }
        for r in runs { try unreserve(r) }
        return runs.reduce(0) { $0 + UInt64($1.count) }
    }

    /// Exchanges the contents of two block maps (a rollback: the leg takes a fresh clone
    /// of its PiT, the clone's id takes what the leg held, to be deleted step by step).
    public mutating func swapMaps(_ a: UUID, _ b: UUID) throws(PageStore.Failure) {
        guard let ta = trees[a]?.tree, let tb = trees[b]?.tree else { throw .damaged("no block map \(trees[a] == nil ? a : b)") }
        trees[a]!.tree = tb
        trees[b]!.tree = ta
        touched.insert(a)
        touched.insert(b)
    }
}
