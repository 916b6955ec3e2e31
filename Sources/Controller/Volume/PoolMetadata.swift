import Foundation

/// A pool's block maps and space map, kept in the pool's own metadata area.
///
/// Each leg in the pool has a block map: vdisk chunk -> pool chunk (+1; 0 = unmapped).
/// The space map holds a reference count per pool chunk (a chunk shared by a vdisk and
/// its PiTs counts each). Changes go through `change`, which runs concurrent callers'
/// edits in one transaction and one journal write (group commit); each caller's edits
/// stand or fall alone, and each caller returns only once its edits are durable.
public final class PoolMetadata: @unchecked Sendable {
    public let store: PageStore
    public let chunkCount: UInt64
    // Guarded by the store's lock (published with the pages they point into).
    var trees: [UUID: TreeEntry]
    private var freeIndex: FreeChunks
    /// Block maps whose pages could not be read at open (a checksum, a misplaced page):
    /// their root-table slot and why. Their leg's I/O fails naming the page; the domain
    /// rebuilds a mirror leg from another leg (`Domain.recoverLostMaps`).
    private var lost: [UUID: LostMap] = [:]

    struct LostMap: Equatable {
        var slot: Int
        var why: String
    }
    /// Makes every completed write to the pool's data LUNs durable (nil when it did); set by
    /// the domain when it opens the pool. Runs before a commit that asked for it.
    public var flushData: (@Sendable () async -> PageStore.Failure?)? {
        get { queueLock.withLock { storedFlushData } }
        set { queueLock.withLock { storedFlushData = newValue } }
    }
    private var storedFlushData: (@Sendable () async -> PageStore.Failure?)?
    private let queueLock = NSLock()
    private var queue: [Waiter] = []
    private var committing = false

    /// Space-map values besides reference counts.
    public enum SpaceValue {
        /// Free, and reads as zeros: the only value `allocate` takes.
        public static let free: UInt64 = 0
        /// Released by its last holder: zeroed before it is free again.
        public static let awaitingZeroing: UInt64 = 1 << 61
        /// Holds the metadata area (never allocated).
        public static let metadata: UInt64 = (1 << 61) + 1
        /// Taken by a redirect-on-write that is copying into it, mapped by no map yet: it
        /// may hold data, so the next open sends it to the zeroer (never back to free).
        public static let reserved: UInt64 = (1 << 61) + 2
    }

    static let spaceMapId = UUID(halves: (UInt64.max, 1))

    struct TreeEntry: Equatable {
        var slot: Int // index in the root table
        var tree: ChunkTree
    }

    private init(store: PageStore, chunkCount: UInt64, trees: [UUID: TreeEntry], free: FreeChunks, lost: [UUID: LostMap] = [:]) {
        self.store = store
        self.chunkCount = chunkCount
        self.trees = trees
        freeIndex = free
        self.lost = lost
    }

    // MARK: open and format

    /// A new pool's metadata: an empty space map with `reserved` chunks (the area itself) held.
    /// With `unzeroed`, every other chunk awaits zeroing (LUNs that held data before): free
    /// space is handed out only once the zeroer has cleared it.
    public static func format(area: MetaArea, layout: MetaLayout, poolId: UUID, chunkCount: UInt64,
                              reserved: [Range<UInt64>], unzeroed: Bool = false) async throws(PageStore.Failure) -> PoolMetadata
    {
        let store = try await PageStore.format(area: area, layout: layout, poolId: poolId)
        let meta = PoolMetadata(store: store, chunkCount: chunkCount, trees: [:], free: FreeChunks())
        let tx = MetaTransaction(store: store)
        var space = ChunkTree(runs: .constant, count: chunkCount)
        if unzeroed { try space.set(0..<chunkCount, to: SpaceValue.awaitingZeroing, in: tx) }
        for r in reserved { try space.set(r, to: SpaceValue.metadata, in: tx) }
        var trees: [UUID: TreeEntry] = [:]
        trees[spaceMapId] = TreeEntry(slot: 0, tree: space)
        writeRoot(trees[spaceMapId]!, id: spaceMapId, in: tx)
        var free = FreeChunks()
        do { try space.forEachRun(in: 0..<chunkCount, tx) { r, v in if v == SpaceValue.free { free.insert(r) } } } catch { throw .damaged("\(error)") }
        try await store.commit(tx) { meta.trees = trees; meta.freeIndex = free }
        try await store.checkpoint()
        return meta
    }

    /// Opens a pool's metadata: replays its journal, reads every tree page (checked), and
    /// indexes the free chunks. A block map with a page that fails its check is set aside
    /// as lost (its leg's I/O fails; its extents stay counted, so nothing it held is handed
    /// out); a damaged space map leaves the pool unusable.
    public static func open(area: MetaArea, poolId: UUID) async throws(PageStore.Failure) -> PoolMetadata {
        let store = try await PageStore.open(area: area, poolId: poolId)
        var trees = try rootTable(store)
        guard let space = trees[spaceMapId]?.tree else { throw .damaged("metadata: the space map's root is missing") }
        guard space.runs == .constant else { throw .damaged("metadata: the space map's root table entry has the kind of a block map") }
        var lost: [UUID: LostMap] = [:]
        var visited = Set<UInt32>()
        for (id, entry) in trees {
            do throws(PageStore.Failure) {
                if id != spaceMapId, entry.tree.runs != .linear { throw PageStore.Failure.damaged("its root table entry has the space map's kind") }
                try await load(entry.tree, store, visited: &visited)
            } catch {
                guard id != spaceMapId, case .damaged(let why) = error else { throw error }
                lost[id] = LostMap(slot: entry.slot, why: why)
                trees[id] = nil
            }
        }
        var free = FreeChunks()
        do {
            try store.reading { pages throws(TreeError) in
                try space.forEachRun(in: 0..<space.count, pages) { r, v in if v == SpaceValue.free { free.insert(r) } }
            }
        } catch { throw .damaged("\(error)") }
        return PoolMetadata(store: store, chunkCount: space.count, trees: trees, free: free, lost: lost)
    }

    /// Opens a pool whose space map is damaged by building a new one from the block maps
    /// (`pool check --repair`): each chunk counts the references the maps hold; chunks no
    /// map references await zeroing (they may hold old data); `reserved` (the metadata
    /// area) stays held. The old space map's pages are simply no longer reachable, so they
    /// are free. Refused when a block map is damaged too: what it references is unknown.
    /// Written in commits of bounded size, the root last, then checkpointed; a crash
    /// before the last commit leaves the damaged map in place, to rebuild again.
    public static func rebuildSpaceMap(area: MetaArea, poolId: UUID, chunkCount: UInt64,
                                       reserved: [Range<UInt64>]) async throws(PageStore.Failure) -> PoolMetadata
    {
        let store = try await PageStore.open(area: area, poolId: poolId)
        var trees = try rootTable(store)
        guard let spaceSlot = trees.removeValue(forKey: spaceMapId)?.slot else { throw .damaged("metadata: the space map's root is missing") }
        var visited = Set<UInt32>()
        for (id, entry) in trees {
            do throws(PageStore.Failure) {
                if entry.tree.runs != .linear { throw PageStore.Failure.damaged("its root table entry has the space map's kind") }
                try await load(entry.tree, store, visited: &visited)
            } catch {
                throw .damaged("block map \(id) is damaged too (\(error)): the space map cannot be rebuilt from the maps")
            }
        }
        let events: [(at: UInt64, delta: Int)]
        do {
            events = try store.reading { pages throws(TreeError) in try references(of: trees.values.map(\.tree), pages) }
        } catch { throw .damaged("\(error)") }
        if let past = events.first(where: { $0.at > chunkCount }) {
            throw .damaged("a block map references pool chunks up to \(past.at), past the pool's \(chunkCount)")
        }
        var space = ChunkTree(runs: .constant, count: chunkCount)
        var tx = MetaTransaction(store: store)
        let budget = max(16, Int(store.layout.journalPages) / 4)
        func set(_ r: Range<UInt64>, _ value: UInt64) async throws(PageStore.Failure) {
            try space.set(r, to: value, in: tx)
            if tx.changed.count >= budget { // pages no root reaches yet: harmless if a crash comes
                try await store.commit(tx)
                tx = MetaTransaction(store: store)
            }
        }
        for (r, references) in referenceRuns(events, chunkCount: chunkCount) {
            try await set(r, references == 0 ? SpaceValue.awaitingZeroing : UInt64(references))
        }
        for r in reserved { try await set(r, SpaceValue.metadata) }
        writeRoot(TreeEntry(slot: spaceSlot, tree: space), id: spaceMapId, in: tx)
        try await store.commit(tx)
        try await store.checkpoint()
        return try await open(area: area, poolId: poolId)
    }

    /// The root table's entries: each tree's slot and root (its pages are read by `load`).
    private static func rootTable(_ store: PageStore) throws(PageStore.Failure) -> [UUID: TreeEntry] {
        var trees: [UUID: TreeEntry] = [:]
        for slot in 0..<rootSlots {
            let (page, at) = rootLocation(slot, store.layout)
            guard let s = store.committed(page)?.slots, s[at] != 0 || s[at + 1] != 0 else { continue }
            let info = s[at + 3]
            guard let runs = ChunkTree.Runs(rawValue: UInt8(info >> 56)) else {
                throw .damaged("metadata page \(page): root table entry \(slot) has an unknown tree kind")
            }
            let tree = ChunkTree(runs: runs, height: Int((info >> 48) & 0xFF), root: s[at + 2], count: info & 0xFFFF_FFFF_FFFF)
            guard tree.height >= 1, tree.height <= 7, ChunkTree.span(tree.height) >= tree.count else {
                throw .damaged("metadata page \(page): root table entry \(slot) has height \(tree.height) for \(tree.count) entries")
            }
            trees[UUID(halves: (s[at], s[at + 1]))] = TreeEntry(slot: slot, tree: tree)
        }
        return trees
    }

    /// Reads every page of a tree, level by level, checking each: its checksum (`load`)
    /// and that every slot is one svsp could have written.
    /// Counts every slot pointing at a page (the store's reference counts): a page that
    /// trees share is read and descended once (`visited`, shared by the calls of one open).
    private static func load(_ tree: ChunkTree, _ store: PageStore, visited: inout Set<UInt32>) async throws(PageStore.Failure) {
        if let why = tree.problem(slot: tree.root, level: tree.height) { throw .damaged("metadata: a tree's root: \(why)") }
        var level = tree.height
        var frontier = ChunkTree.childPage(tree.root).map { [$0] } ?? []
        while !frontier.isEmpty {
            var next: [UInt32] = []
            for n in frontier {
                if visited.contains(n) { // shared: read, checked and descended once
                    store.countReference(n)
                    continue
                }
                let page: MetaPage
                do { page = try await store.load(n, kind: .treeNode) } catch {
                    // A lost map's root-table entry still names this page: were it handed to another
                    // tree, the next open would read that tree's page as the lost map's.
                    store.holdDamaged(n)
                    throw error
                }
                for (k, s) in page.slots.enumerated() {
                    if let why = tree.problem(slot: s, level: level - 1) { throw .damaged("metadata page \(n): slot \(k): \(why)") }
                }
                // Counted only once checked: a tree sharing a damaged page finds it damaged too.
                store.countReference(n)
                visited.insert(n)
                next += ChunkTree.children(of: page, level: level)
            }
            frontier = next
            level -= 1
        }
    }

    // MARK: root table

    static let rootsPerPage = MetaPage.slotCount / 4
    static var rootSlots: Int { rootsPerPage * Int(MetaLayout.rootTablePages) }

    private static func rootLocation(_ slot: Int, _ layout: MetaLayout) -> (page: UInt32, at: Int) {
        (layout.rootTableStart + UInt32(slot / rootsPerPage), (slot % rootsPerPage) * 4)
    }

    fileprivate static func writeRoot(_ entry: TreeEntry?, id: UUID, slot: Int? = nil, in tx: MetaTransaction) {
        let (n, at) = rootLocation(entry?.slot ?? slot!, tx.store.layout)
        var page = tx.page(n) ?? MetaPage(kind: .rootTable, number: n)
        if let entry {
            (page.slots[at], page.slots[at + 1]) = id.halves
            page.slots[at + 2] = entry.tree.root
            page.slots[at + 3] = UInt64(entry.tree.runs.rawValue) << 56 | UInt64(entry.tree.height) << 48 | entry.tree.count
        } else {
            for i in 0..<4 { page.slots[at + i] = 0 }
        }
        tx.put(page)
    }

    // MARK: reading (data path)

    /// Where chunk `chunk` of block map `map` lives (pool chunk, nil = unmapped) and how many
    /// chunks from it (at most `limit`) are laid out consecutively the same way.
    public func lookup(map: UUID, chunk: UInt64, limit: UInt64) throws(TreeError) -> (poolChunk: UInt64?, count: UInt64) {
        try store.reading { pages throws(TreeError) in
            guard let tree = trees[map]?.tree else { throw missing(map) }
            let (v, n) = try tree.run(at: chunk, limit: limit, in: pages)
            return (v == 0 ? nil : v - 1, n)
        }
    }

    public func hasMap(_ id: UUID) -> Bool { store.locked { trees[id] != nil } }

    /// Why block map `id` is unusable (its pages failed their check at open), or nil.
    public func lostReason(_ id: UUID) -> String? { store.locked { lost[id]?.why } }

    /// The lost maps' ids.
    public var lostMapIds: [UUID] { store.locked { Array(lost.keys) } }

    /// The error for a map that is not there (caller holds the store's lock).
    func missing(_ id: UUID) -> TreeError {
        TreeError(page: nil, why: lost[id].map { "block map unusable: \($0.why)" } ?? "no block map \(id)")
    }

    /// Pages one step of a long change (`deleteMapStep`) may change: a quarter of the
    /// journal, leaving room for the other changes of its group commit, and at most 256
    /// (a 1 MiB record): host writes that allocate or redirect wait for the commit.
    public var stepPageBudget: Int { max(16, min(256, Int(store.layout.journalPages) / 4)) }

    /// Chunks free to allocate now.
    public var freeChunks: UInt64 { store.locked { freeIndex.count } }

    /// Runs of the space map (chunk range, value), for checks and reports.
    public func spaceRuns() throws(TreeError) -> [(Range<UInt64>, UInt64)] {
        try store.reading { pages throws(TreeError) in
            var out: [(Range<UInt64>, UInt64)] = []
            try trees[Self.spaceMapId]!.tree.forEachRun(in: 0..<chunkCount, pages) { out.append(($0, $1)) }
            return out
        }
    }

    /// Runs of a block map (vdisk chunk range, first pool chunk or nil).
    public func mapRuns(_ id: UUID) throws(TreeError) -> [(Range<UInt64>, UInt64?)] {
        try store.reading { pages throws(TreeError) in
            guard let tree = trees[id]?.tree else { throw missing(id) }
            var out: [(Range<UInt64>, UInt64?)] = []
            try tree.forEachRun(in: 0..<tree.count, pages) { out.append(($0, $1 == 0 ? nil : $1 - 1)) }
            return out
        }
    }

    /// Every reference to pool chunks the block maps hold, with the map it was reached
    /// from first: a page maps share (a PiT) counts once, as the space map counts it.
    public func references(ofMaps ids: [UUID]) throws(TreeError) -> [(map: UUID, chunks: Range<UInt64>)] {
        try store.reading { pages throws(TreeError) in
            var out: [(map: UUID, chunks: Range<UInt64>)] = []
            var visited = Set<UInt32>()
            for id in ids {
                guard let tree = trees[id]?.tree else { throw missing(id) }
                try tree.forEachReference(pages, visited: &visited) { out.append((id, $0)) }
            }
            return out
        }
    }

    /// `references(ofMaps:)` of every block map but `excluding`, and `spaceRuns()`, of one
    /// committed state: a check on a live pool must not compare references before a
    /// commit (a PiT taken, a map deleted) with counts after it. Maps in `first` are
    /// walked first (a page shared with a later map counts for them).
    public func referencesAndSpace(first: Set<UUID>, excluding: Set<UUID>) throws(TreeError)
        -> (references: [(map: UUID, chunks: Range<UInt64>)], space: [(Range<UInt64>, UInt64)])
    {
        try store.reading { pages throws(TreeError) in
            var refs: [(map: UUID, chunks: Range<UInt64>)] = []
            var visited = Set<UInt32>()
            let ids = trees.keys.filter { $0 != Self.spaceMapId && !excluding.contains($0) }.sorted { first.contains($0) && !first.contains($1) }
            for id in ids {
                guard let tree = trees[id]?.tree else { continue }
                try tree.forEachReference(pages, visited: &visited) { refs.append((id, $0)) }
            }
            var space: [(Range<UInt64>, UInt64)] = []
            try trees[Self.spaceMapId]!.tree.forEachRun(in: 0..<chunkCount, pages) { space.append(($0, $1)) }
            return (refs, space)
        }
    }

    /// A tree as committed (checks and tests; the caller holds the store's lock: `store.reading`).
    func tree(_ id: UUID) throws(TreeError) -> ChunkTree {
        guard let tree = trees[id]?.tree else { throw missing(id) }
        return tree
    }

    /// The block maps the pool holds (leg ids).
    public var mapIds: [UUID] { store.locked { trees.keys.filter { $0 != Self.spaceMapId } } }

    /// Entries of a block map (its vdisk's chunk count), or nil.
    public func mapCount(_ id: UUID) -> UInt64? { store.locked { trees[id]?.tree.count } }

    /// Chunks released and not yet zeroed, at most `limit` of them.
    public func awaitingZeroing(limit: UInt64) throws(TreeError) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        var total: UInt64 = 0
        for (r, v) in try spaceRuns() where v == SpaceValue.awaitingZeroing && total < limit {
            let take = r.lowerBound..<(r.lowerBound + min(UInt64(r.count), limit - total))
            out.append(take)
            total += UInt64(take.count)
        }
        return out
    }

    /// The start (+1) and end (-1) of every reference the trees hold, each page counted
    /// once however many of them share it.
    static func references(of trees: [ChunkTree], _ pages: some PageSource) throws(TreeError) -> [(at: UInt64, delta: Int)] {
        var events: [(at: UInt64, delta: Int)] = []
        var visited = Set<UInt32>()
        for tree in trees {
            try tree.forEachReference(pages, visited: &visited) { r in
                events.append((r.lowerBound, 1))
                events.append((r.upperBound, -1))
            }
        }
        return events
    }

    /// How often each pool chunk is referenced, as runs (range, count) from 0 to
    /// `chunkCount`, from the start (+1) and end (-1) of every mapped run of every map: a
    /// sweep that costs the runs, never a count per chunk in memory.
    static func referenceRuns(_ events: [(at: UInt64, delta: Int)], chunkCount: UInt64) -> [(Range<UInt64>, Int)] {
        var refs: [(Range<UInt64>, Int)] = []
        var level = 0, at: UInt64 = 0
        for e in events.sorted(by: { $0.at < $1.at }) {
            if e.at > at { refs.append((at..<e.at, level)); at = e.at }
            level += e.delta
        }
        if at < chunkCount { refs.append((at..<chunkCount, 0)) }
        return refs
    }

    /// The pages of the space map's tree (checks, tests).
    public func spaceTreePages() throws(TreeError) -> [UInt32] {
        try store.reading { pages throws(TreeError) in try trees[Self.spaceMapId]!.tree.pageNumbers(in: pages) }
    }

    /// The pages of a block map's tree, parents first (checks, tests).
    public func treePages(_ id: UUID) throws(TreeError) -> [UInt32] {
        try store.reading { pages throws(TreeError) in
            guard let tree = trees[id]?.tree else { throw missing(id) }
            return try tree.pageNumbers(in: pages)
        }
    }

    // MARK: changes (group commit)

    private final class Waiter: @unchecked Sendable {
        let apply: (inout VolumeTransaction) throws(PageStore.Failure) -> Void
        /// Data written before this change must be durable first (`flushData`).
        var flushFirst = false
        var outcome: PageStore.Failure?
        private let lock = NSLock()
        private var done = false
        private var continuation: CheckedContinuation<Void, Never>?
        init(_ apply: @escaping (inout VolumeTransaction) throws(PageStore.Failure) -> Void) { self.apply = apply }

        /// Returns once `finish` was called (before or after).
        func wait() async {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
                lock.lock()
                if done {
                    lock.unlock()
                    c.resume()
                } else {
                    continuation = c
                    lock.unlock()
                }
            }
        }

        func finish() {
            lock.lock()
            done = true
            let c = continuation
            continuation = nil
            lock.unlock()
            c?.resume()
        }
    }

    /// Runs `body` in a transaction shared with whatever other changes are waiting, and
    /// returns once it is durable. A `body` that throws leaves no trace.
    /// With `flushFirst`, the pool's data LUNs are flushed (`flushData`) before the
    /// commit: writes that completed before the call are durable before the change is, with
    /// one flush for every such change of a group commit (redirects fill new chunks this way).
    public func change<T>(flushFirst: Bool = false, _ body: @escaping (inout VolumeTransaction) throws(PageStore.Failure) -> T) async throws(PageStore.Failure) -> T {
        var result: T?
        let waiter = Waiter { (v: inout VolumeTransaction) throws(PageStore.Failure) in result = try body(&v) }
        waiter.flushFirst = flushFirst
        enqueue([waiter])
        await waiter.wait()
        if let failure = waiter.outcome { throw failure }
        return result!
    }

    /// Runs `bodies` in one group commit, in order, each standing or falling alone (what
    /// concurrent callers of `change` get when they arrive together; tests use it to fix
    /// the order). Nil for a body that was applied, else why it was not.
    public func changeTogether(_ bodies: [(inout VolumeTransaction) throws(PageStore.Failure) -> Void]) async -> [PageStore.Failure?] {
        let waiters = bodies.map { Waiter($0) }
        enqueue(waiters)
        for w in waiters { await w.wait() }
        return waiters.map(\.outcome)
    }

    private func enqueue(_ waiters: [Waiter]) {
        let lead = queueLock.withLock { () -> Bool in
            queue += waiters
            if committing { return false }
            committing = true
            return true
        }
        if lead { Task { await self.commitQueued() } }
    }

    /// Commits what is queued, then what queued meanwhile, until the queue is empty.
    private func commitQueued() async {
        while true {
            let group: [Waiter] = queueLock.withLock {
                let g = queue
                queue = []
                if g.isEmpty { committing = false }
                return g
            }
            if group.isEmpty { return }
            await store.writer.acquire()
            if group.contains(where: \.flushFirst) {
                let failed: PageStore.Failure? = if let flush = flushData { await flush() } else { .damaged("no data flush is set for this pool") }
                if let failed { for w in group where w.flushFirst { w.outcome = failed } }
            }
            let tx = MetaTransaction(store: store)
            var v = store.locked { VolumeTransaction(tx: tx, trees: trees, free: freeIndex, chunkCount: chunkCount, lost: lost) }
            var applied: [Waiter] = []
            for w in group where w.outcome == nil {
                let saved = (v, tx.savepoint)
                do throws(PageStore.Failure) {
                    try w.apply(&v)
                    applied.append(w)
                } catch {
                    (v, _) = saved
                    tx.rollBack(to: saved.1)
                    w.outcome = error
                }
            }
            for id in v.touched {
                if let slot = v.removedSlots[id] { Self.writeRoot(nil, id: id, slot: slot, in: tx) }
                if let entry = v.trees[id] { Self.writeRoot(entry, id: id, in: tx) }
            }
            do throws(PageStore.Failure) {
                let (trees, free, lost) = (v.trees, v.free, v.lost)
                try await store.commit(tx) { self.trees = trees; self.freeIndex = free; self.lost = lost }
            } catch {
                tx.abandon()
                for w in applied { w.outcome = error }
            }
            store.writer.release()
            for w in group { w.finish() }
        }
    }
}

/// The edits one `PoolMetadata.change` may make.
public struct VolumeTransaction {
    let tx: MetaTransaction
    var trees: [UUID: PoolMetadata.TreeEntry]
    var free: FreeChunks
    let chunkCount: UInt64
    /// Trees whose root entry changed (written into the root table at commit).
    var touched: Set<UUID> = []
    fileprivate(set) var removedSlots: [UUID: Int] = [:]
    fileprivate(set) var lost: [UUID: PoolMetadata.LostMap]

    init(tx: MetaTransaction, trees: [UUID: PoolMetadata.TreeEntry], free: FreeChunks, chunkCount: UInt64,
         lost: [UUID: PoolMetadata.LostMap] = [:]) {
        self.tx = tx
        self.trees = trees
        self.free = free
        self.chunkCount = chunkCount
        self.lost = lost
    }

    private typealias Failure = PageStore.Failure
    private typealias SpaceValue = PoolMetadata.SpaceValue

    /// A new, empty block map of `chunks` chunks. A lost map of the same id is replaced
    /// (its root-table entry cleared; what it held stays counted: its extents are unknown).
    public mutating func createMap(_ id: UUID, chunks: UInt64) throws(PageStore.Failure) {
        guard trees[id] == nil else { throw .damaged("block map \(id) already exists") }
        if let gone = lost.removeValue(forKey: id) {
            removedSlots[id] = gone.slot
            touched.insert(id)
        }
        let used = Set(trees.values.map(\.slot)).union(removedSlots.values).union(lost.values.map(\.slot))
        guard let slot = (0..<PoolMetadata.rootSlots).first(where: { !used.contains($0) }) else {
            throw .full("the pool's root table is full (\(PoolMetadata.rootSlots) block maps)")
        }
        trees[id] = PoolMetadata.TreeEntry(slot: slot, tree: ChunkTree(runs: .linear, count: chunks))
        touched.insert(id)
    }

    /// Deletes a block map, releasing every chunk it references. A lost map's entry is
    /// only cleared: what it referenced stays counted (leaked) until `reclaimLeaks`.
    public mutating func deleteMap(_ id: UUID) throws(PageStore.Failure) {
        if let gone = lost.removeValue(forKey: id) {
            removedSlots[id] = gone.slot
            touched.insert(id)
            return
        }
        guard let entry = trees[id] else { return }
        try unmap(id, 0..<entry.tree.count)
        var tree = trees[id]!.tree
        var changes = ReferenceChanges()
        tree.freeAll(in: tx, &changes)
        try apply(changes)
        removedSlots[id] = entry.slot
        trees[id] = nil
        touched.insert(id)
    }

    /// Deletes a block map a piece at a time: unmaps its entries from the start until this
    /// transaction has changed `pageBudget` pages, and deletes the map once it is empty.
    /// True when the map is gone; false: call again in another transaction. So a huge,
    /// fragmented map is released in commits that each fit the journal.
    public mutating func deleteMapStep(_ id: UUID, pageBudget: Int) throws(PageStore.Failure) -> Bool {
        guard let count = trees[id]?.tree.count else {
            try deleteMap(id) // a lost map: its entry goes
            return true
        }
        var at: UInt64 = 0
        while at < count {
            if tx.changed.count >= pageBudget { return false }
            let (value, n): (UInt64, UInt64)
            do { (value, n) = try trees[id]!.tree.run(at: at, limit: count - at, in: tx) } catch { throw .damaged("\(error)") }
            // A mapped run is unmapped a leaf's span at a time, aligned, so the budget is checked
            // often and a leaf another map shares is let go of whole, never copied to be cleared.
            let step = value == 0 ? n : min(n, ChunkTree.fanout - at % ChunkTree.fanout)
            if value != 0 { try unmap(id, at..<(at + step)) }
            at += step
        }
        try deleteMap(id)
        return true
    }

    /// Gives back leaked chunks: a chunk counted more often than the block maps reference
    /// it (the extents of a lost map once its leg has a new one; chunks an older release
    /// leaked) gets the count of its references, and one no map references awaits zeroing.
    /// Chunks referenced more often than counted are left alone: that is damage a count
    /// cannot repair (`pool check` names it). Refused while a map is lost (what it
    /// references is unknown). Stops once this transaction has changed `pageBudget` pages;
    /// returns the chunks given back and whether none is left.
    public mutating func reclaimLeaks(pageBudget: Int) throws(PageStore.Failure) -> (chunks: UInt64, done: Bool) {
        if let (id, lostMap) = lost.first {
            throw .damaged("block map \(id) is lost (\(lostMap.why)): what it references is unknown, so no count can be lowered")
        }
        // References as a sweep over the maps' runs (never a count per chunk in memory).
        let refs: [(Range<UInt64>, Int)]
        do {
            refs = PoolMetadata.referenceRuns(try PoolMetadata.references(of: trees.filter { $0.key != PoolMetadata.spaceMapId }.map(\.value.tree), tx),
                                              chunkCount: chunkCount)
        } catch { throw .damaged("\(error)") }
        var leaks: [(Range<UInt64>, UInt64)] = [] // (chunks, the count they should have)
        var r = 0
        do {
            try trees[PoolMetadata.spaceMapId]!.tree.forEachRun(in: 0..<chunkCount, tx) { range, value in
                guard value >= 1, value < SpaceValue.awaitingZeroing else { return }
                var c = range.lowerBound
                while c < range.upperBound {
                    while r < refs.count, refs[r].0.upperBound <= c { r += 1 }
                    guard r < refs.count else { return }
                    let piece = c..<Swift.min(range.upperBound, refs[r].0.upperBound)
                    if value > refs[r].1 { leaks.append((piece, UInt64(refs[r].1))) }
                    c = piece.upperBound
                }
            }
        } catch { throw .damaged("\(error)") }
        var reclaimed: UInt64 = 0
        for (piece, references) in leaks {
            if tx.changed.count >= pageBudget { return (reclaimed, false) }
            try setSpace(piece, to: references == 0 ? SpaceValue.awaitingZeroing : references)
            reclaimed += UInt64(piece.count)
        }
        return (reclaimed, true)
    }

    /// Whether vdisk chunk `chunk` of map `id` is mapped (in this transaction's view).
    public func isMapped(_ id: UUID, _ chunk: UInt64) throws(PageStore.Failure) -> Bool {
        guard let tree = trees[id]?.tree else { throw .damaged("no block map \(id)") }
        do { return try tree.run(at: chunk, limit: 1, in: tx).value != 0 } catch { throw .damaged("\(error)") }
    }

    /// Changes a block map's chunk count (a vdisk grown or shrunk; entries past a shrink are released).
    public mutating func resizeMap(_ id: UUID, chunks: UInt64) throws(PageStore.Failure) {
        guard let entry = trees[id] else { throw .damaged("no block map \(id)") }
        if chunks < entry.tree.count { try unmap(id, chunks..<entry.tree.count) }
        try edit(id) { tree, tx throws(PageStore.Failure) in try tree.resize(to: chunks, in: tx) }
        touched.insert(id)
    }

    /// Maps vdisk chunks from `chunk` onto pool chunks `runs` that no map holds yet
    /// (converting a record of format 2): their counts become 1.
    public mutating func adopt(_ id: UUID, at chunk: UInt64, runs: [Range<UInt64>]) throws(PageStore.Failure) {
        for r in runs {
            var held: [(Range<UInt64>, UInt64)] = []
            do { try trees[PoolMetadata.spaceMapId]!.tree.forEachRun(in: r, tx) { held.append(($0, $1)) } } catch { throw .damaged("\(error)") }
            if let (twice, _) = held.first(where: { $0.1 >= 1 && $0.1 < SpaceValue.awaitingZeroing || $0.1 == SpaceValue.metadata }) {
                throw .damaged("pool chunks \(twice) are mapped twice")
            }
            for (part, v) in held where v == SpaceValue.free { free.remove(part) }
            try setSpace(r, to: 1)
        }
        var at = chunk
        for r in runs {
            let range = at..<(at + UInt64(r.count))
            var changes = ReferenceChanges()
            try edit(id) { tree, tx throws(PageStore.Failure) in try tree.set(range, to: r.lowerBound + 1, in: tx, &changes) }
            try apply(changes)
            at += UInt64(r.count)
        }
    }

    /// A new block map `id` with the same entries as `source`, sharing its pages (a PiT of
    /// a leg): no page is copied now; an edit of either later copies the pages on its path.
    public mutating func cloneMap(_ source: UUID, as id: UUID) throws(PageStore.Failure) {
        guard let entry = trees[source] else { throw .damaged("no block map \(source)") }
        try createMap(id, chunks: entry.tree.count)
        var changes = ReferenceChanges()
        trees[id]!.tree = entry.tree.cloned(in: tx, &changes)
        try apply(changes)
    }

    /// Takes `n` free chunks (reference count 1 each) as few runs as the free space allows.
    public mutating func allocate(_ n: UInt64) throws(PageStore.Failure) -> [Range<UInt64>] {
        guard let runs = free.take(n) else {
            throw .full("the pool is full: \(free.count) free chunk(s), \(n) needed")
        }
        for r in runs { try setSpace(r, to: 1) }
        return runs
    }

    /// Maps vdisk chunks from `chunk` onto the pool chunks of `runs` (in order). What the
    /// entries referenced before is released.
    public mutating func map(_ id: UUID, at chunk: UInt64, to runs: [Range<UInt64>]) throws(PageStore.Failure) {
        var at = chunk
        for r in runs {
            let range = at..<(at + UInt64(r.count))
            try unmap(id, range)
            var changes = ReferenceChanges()
            try edit(id) { tree, tx throws(PageStore.Failure) in try tree.set(range, to: r.lowerBound + 1, in: tx, &changes) }
            try apply(changes)
            at += UInt64(r.count)
        }
    }

    /// Unmaps vdisk chunks `range`, releasing the pool chunks they referenced.
    public mutating func unmap(_ id: UUID, _ range: Range<UInt64>) throws(PageStore.Failure) {
        guard let tree = trees[id]?.tree else { throw .damaged("no block map \(id)") }
        var mapped = false
        do { try tree.forEachRun(in: range, tx) { _, v in if v != 0 { mapped = true } } } catch { throw .damaged("\(error)") }
        guard mapped else { return } // nothing to release (and no shared page copied for nothing)
        var changes = ReferenceChanges()
        try edit(id) { tree, tx throws(PageStore.Failure) in try tree.set(range, to: 0, in: tx, &changes) }
        try apply(changes)
    }

    /// Turns what an edit did to a map's references into space-map counts: chunks in a
    /// copied page gain a holder first, then the references that went are released.
    private mutating func apply(_ changes: ReferenceChanges) throws(PageStore.Failure) {
        for r in changes.shared { try addHolder(r) }
        for r in changes.dropped { try release(r) }
    }

    /// Raises the reference count of each chunk of `range` (a page that holds it was copied).
    mutating func addHolder(_ range: Range<UInt64>) throws(PageStore.Failure) {
        var runs: [(Range<UInt64>, UInt64)] = []
        do { try trees[PoolMetadata.spaceMapId]!.tree.forEachRun(in: range, tx) { runs.append(($0, $1)) } } catch { throw .damaged("\(error)") }
        for (r, v) in runs {
            guard v >= 1, v + 1 < SpaceValue.awaitingZeroing else {
                throw .damaged("space map: chunks \(r) gain a holder while their count is \(v)")
            }
            try setSpace(r, to: v + 1)
        }
    }

    /// Lowers the reference count of each chunk of `range`; a chunk left unreferenced
    /// awaits zeroing.
    mutating func release(_ range: Range<UInt64>) throws(PageStore.Failure) {
        var runs: [(Range<UInt64>, UInt64)] = []
        do { try trees[PoolMetadata.spaceMapId]!.tree.forEachRun(in: range, tx) { runs.append(($0, $1)) } } catch { throw .damaged("\(error)") }
        for (r, v) in runs {
            guard v >= 1, v < SpaceValue.awaitingZeroing else {
                throw .damaged("space map: chunks \(r) released while their count is \(v)")
            }
            try setSpace(r, to: v == 1 ? SpaceValue.awaitingZeroing : v - 1)
        }
    }

    /// Chunks released and not yet zeroed (at most `limit` of them).
    public func awaitingZeroing(limit: UInt64) throws(PageStore.Failure) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        var total: UInt64 = 0
        do {
            try trees[PoolMetadata.spaceMapId]!.tree.forEachRun(in: 0..<chunkCount, tx) { r, v in
                guard v == SpaceValue.awaitingZeroing, total < limit else { return }
                let take = r.lowerBound..<(r.lowerBound + min(UInt64(r.count), limit - total))
                out.append(take)
                total += UInt64(take.count)
            }
        } catch { throw .damaged("\(error)") }
        return out
    }

    /// Zeroed chunks become free.
    public mutating func markZeroed(_ range: Range<UInt64>) throws(PageStore.Failure) {
        try setSpace(range, to: SpaceValue.free)
        free.insert(range)
    }

    mutating func setSpace(_ range: Range<UInt64>, to value: UInt64) throws(PageStore.Failure) {
        try edit(PoolMetadata.spaceMapId) { tree, tx throws(PageStore.Failure) in try tree.set(range, to: value, in: tx) }
    }

    mutating func edit(_ id: UUID, _ body: (inout ChunkTree, MetaTransaction) throws(PageStore.Failure) -> Void) throws(PageStore.Failure) {
        guard var entry = trees[id] else { throw .damaged("no tree \(id)") }
        let before = entry.tree.root
        try body(&entry.tree, tx)
        trees[id] = entry
        if entry.tree.root != before { touched.insert(id) }
    }
}
