/// A radix tree of 64-bit entries over metadata pages (fan-out 508 per page) that stores
/// runs compactly: a slot above the leaves is empty, a child page, or a run standing for
/// its whole subtree. Block maps use linear runs (entry i of the run = base + i: a vdisk
/// chunk range laid on consecutive pool chunks); the space map uses constant runs (one
/// reference count for a whole range). So a 4 TiB thick vdisk allocated in a few
/// contiguous pieces costs a few pages, and an entry changed in the middle of a run
/// splits only the pages on its path. Editing collapses a page back into a run when
/// its slots line up again.
///
/// Entry values are below 2^62 (the slot tags use the top two bits); 0 means unmapped
/// (block maps) or free (space map).
struct ChunkTree: Equatable, Sendable {
    enum Runs: UInt8, Sendable { case linear = 1, constant = 2 }

    static let fanout = UInt64(MetaPage.slotCount)
    static let childTag: UInt64 = 1 << 62
    static let runTag: UInt64 = 2 << 62
    static let valueMask: UInt64 = (1 << 62) - 1

    var runs: Runs
    /// The root slot covers fanout^height entries (height >= 1).
    var height: Int
    var root: UInt64 = 0
    /// Entries in use (the vdisk's chunk count): indexes at or past it are refused.
    var count: UInt64

    init(runs: Runs, count: UInt64) {
        self.runs = runs
        self.count = count
        var h = 1
        while Self.span(h) < count { h += 1 }
        height = h
    }

    init(runs: Runs, height: Int, root: UInt64, count: UInt64) {
        self.runs = runs
        self.height = height
        self.root = root
        self.count = count
    }

    static func span(_ level: Int) -> UInt64 {
        var s: UInt64 = 1
        for _ in 0..<level { s *= fanout }
        return s
    }

    private enum Slot { case empty, child(UInt32), run(UInt64) }

    private static func decode(_ slot: UInt64) -> Slot {
        switch slot >> 62 {
        case 1: .child(UInt32(truncatingIfNeeded: slot & valueMask))
        case 2: .run(slot & valueMask)
        default: .empty
        }
    }

    private static func runSlot(_ value: UInt64) -> UInt64 { value == 0 ? 0 : runTag | value }

    /// Entry `k` of a run with first value `base`.
    private func value(ofRun base: UInt64, at k: UInt64) -> UInt64 {
        base == 0 ? 0 : (runs == .linear ? base + k : base)
    }

    // MARK: reading

    /// The entry at `index` and how many entries from it (at most `limit`) continue its run.
    func run(at index: UInt64, limit: UInt64, in pages: some PageSource) throws(TreeError) -> (value: UInt64, count: UInt64) {
        // A map shorter than its vdisk (damage that passed the checks) fails the I/O, never traps.
        guard index < count, limit > 0 else { throw TreeError(page: nil, why: "extent \(index) is past the map's \(count) extents") }
        let limit = min(limit, count - index)
        let first = try piece(at: index, limit: limit, in: pages)
        var total = first.count
        while total < limit {
            let next = try piece(at: index + total, limit: limit - total, in: pages)
            guard next.value == value(ofRun: first.value, at: total) else { break }
            total += next.count
        }
        return (first.value, min(total, limit))
    }

    /// The entry at `index` and how many entries from it continue it inside one slot or leaf.
    private func piece(at index: UInt64, limit: UInt64, in pages: some PageSource) throws(TreeError) -> (value: UInt64, count: UInt64) {
        var slot = root, level = height, start: UInt64 = 0
        while true {
            switch Self.decode(slot) {
            case .empty:
                return (0, min(limit, start + Self.span(level) - index))
            case .run(let base):
                return (value(ofRun: base, at: index - start), min(limit, start + Self.span(level) - index))
            case .child(let n):
                guard let page = pages.page(n) else { throw TreeError(page: n, why: "not loaded") }
                level -= 1
                let span = Self.span(level)
                let i = Int((index - start) / span)
                start += UInt64(i) * span
                if level == 0 { // a leaf: the run may go on in the same page
                    let v = page.slots[i]
                    var n: UInt64 = 1
                    while n < limit, i + Int(n) < page.slots.count, page.slots[i + Int(n)] == value(ofRun: v, at: n) { n += 1 }
                    return (v, n)
                }
                slot = page.slots[i]
            }
        }
    }

    /// Calls `body` with each run of entries in `range` (maximal within the range).
    func forEachRun(in range: Range<UInt64>, _ pages: some PageSource,
                    _ body: (Range<UInt64>, UInt64) throws(TreeError) -> Void) throws(TreeError)
    {
        var i = range.lowerBound
        while i < range.upperBound {
            let (v, n) = try run(at: i, limit: range.upperBound - i, in: pages)
            try body(i..<(i + n), v)
            i += n
        }
    }

    /// Whether a page on the path to entry `index` has another slot pointing at it (a tree
    /// that shares it: a PiT): editing the entry would copy that page.
    func pathShared(at index: UInt64, in pages: some PageSource, references: (UInt32) -> Int) throws(TreeError) -> Bool {
        guard index < count else { throw TreeError(page: nil, why: "extent \(index) is past the map's \(count) extents") }
        var slot = root, level = height, start: UInt64 = 0
        while level > 0, case .child(let n) = Self.decode(slot) {
            if references(n) > 1 { return true }
            guard let page = pages.page(n) else { throw TreeError(page: n, why: "not loaded") }
            level -= 1
            let span = Self.span(level)
            let i = Int((index - start) / span)
            start += UInt64(i) * span
            slot = page.slots[i]
        }
        return false
    }

    /// Calls `body` with the runs of entries where this tree and `other` differ, in order.
    /// Subtrees both reach through the same slot (a page they share, an equal run) are
    /// skipped whole, so comparing a map with its PiT costs the paths to the entries
    /// changed since, not the map's size. Returns the pages read. Trees of different
    /// heights (one was grown) are compared run by run.
    @discardableResult
    func diff(_ other: ChunkTree, in pages: some PageSource, _ body: (Range<UInt64>) -> Void) throws(TreeError) -> Int {
        let n = max(count, other.count)
        guard height == other.height else {
            var i: UInt64 = 0
            while i < n {
                let a = i < count ? try run(at: i, limit: n - i, in: pages) : (0, n - i)
                let b = i < other.count ? try other.run(at: i, limit: n - i, in: pages) : (0, n - i)
                let step = min(a.1, b.1)
                // Two runs with different first entries differ at every entry (linear runs
                // step together; constant runs stay apart).
                if a.0 != b.0 { body(i..<(i + step)) }
                i += step
            }
            return 0
        }
        var read = 0
        var pending: Range<UInt64>?
        func emit(_ r: Range<UInt64>) {
            let r = r.clamped(to: 0..<n)
            guard !r.isEmpty else { return }
            if let p = pending, p.upperBound == r.lowerBound { pending = p.lowerBound..<r.upperBound; return }
            if let p = pending { body(p) }
            pending = r
        }
        func slots(_ slot: UInt64, _ level: Int) throws(TreeError) -> [UInt64] {
            switch Self.decode(slot) {
            case .child(let p):
                guard let page = pages.page(p) else { throw TreeError(page: p, why: "not loaded") }
                read += 1
                return page.slots
            case .run(let base):
                let span = Self.span(level - 1)
                return (0..<Int(Self.fanout)).map { k in
                    let v = value(ofRun: base, at: UInt64(k) * span)
                    return level - 1 == 0 ? v : Self.runSlot(v)
                }
            case .empty:
                return [UInt64](repeating: 0, count: Int(Self.fanout))
            }
        }
        func walk(_ a: UInt64, _ b: UInt64, _ level: Int, _ start: UInt64) throws(TreeError) {
            guard a != b, start < n else { return }
            if level == 0 { return emit(start..<(start + 1)) }
            let sa = try slots(a, level), sb = try slots(b, level)
            let span = Self.span(level - 1)
            for k in 0..<Int(Self.fanout) { try walk(sa[k], sb[k], level - 1, start + UInt64(k) * span) }
        }
        try walk(root, other.root, height, 0)
        if let p = pending { body(p) }
        return read
    }

    /// Every page of the tree, parents before children.
    func pageNumbers(in pages: some PageSource) throws(TreeError) -> [UInt32] {
        var out: [UInt32] = []
        var stack: [(UInt64, Int)] = [(root, height)]
        while let (slot, level) = stack.popLast() {
            guard case .child(let n) = Self.decode(slot) else { continue }
            out.append(n)
            guard level > 1 else { continue }
            guard let page = pages.page(n) else { throw TreeError(page: n, why: "not loaded") }
            for s in page.slots { stack.append((s, level - 1)) }
        }
        return out
    }

    /// Child pages of page `n` at `level` (for loading a tree page by page).
    static func children(of page: MetaPage, level: Int) -> [UInt32] {
        guard level > 1 else { return [] }
        return page.slots.compactMap { if case .child(let c) = decode($0) { c } else { nil } }
    }

    static func childPage(_ slot: UInt64) -> UInt32? { if case .child(let n) = decode(slot) { n } else { nil } }

    /// Why a slot read from disk cannot be one of this tree's slots at `level` (a page
    /// that passed its checksum may still hold what svsp never writes), or nil.
    func problem(slot s: UInt64, level: Int) -> String? {
        if level == 0 { return s > Self.valueMask ? "value \(s) out of range" : nil }
        switch s >> 62 {
        case 3: return "slot tag 3 is not used"
        case 2 where runs == .linear && Self.span(level) > Self.valueMask - (s & Self.valueMask): return "a run past the value range"
        default: return nil
        }
    }

    // MARK: references (trees that share pages)

    /// The pool chunks a slot at `level` references: a leaf value or a run of a block map
    /// (linear runs: value = pool chunk + 1). The space map's values are counts, not references.
    private func referenced(_ slot: UInt64, level: Int) -> Range<UInt64>? {
        guard runs == .linear else { return nil }
        let v: UInt64
        if level == 0 {
            v = slot
        } else {
            guard case .run(let b) = Self.decode(slot) else { return nil }
            v = b
        }
        return v == 0 ? nil : (v - 1)..<(v - 1 + Self.span(level))
    }

    /// Calls `body` with every reference to pool chunks the tree holds, counting each page
    /// once across calls that share `visited` (a page two trees share holds its references
    /// once). Each page's number is in `visited` afterwards.
    func forEachReference(_ pages: some PageSource, visited: inout Set<UInt32>, _ body: (Range<UInt64>) -> Void) throws(TreeError) {
        var stack: [(UInt64, Int)] = [(root, height)]
        while let (slot, level) = stack.popLast() {
            if let r = referenced(slot, level: level) { body(r); continue }
            guard level > 0, case .child(let n) = Self.decode(slot) else { continue }
            guard visited.insert(n).inserted else { continue }
            guard let page = pages.page(n) else { throw TreeError(page: n, why: "not loaded") }
            for s in page.slots { stack.append((s, level - 1)) }
        }
    }

    /// A copy of this tree that shares its pages (a PiT): the root page gains a reference
    /// (a root that is a run references its chunks once more: `changes.shared`).
    func cloned(in tx: MetaTransaction, _ changes: inout ReferenceChanges) -> ChunkTree {
        share(root, level: height, tx, &changes)
        return self
    }

    /// A slot copied into a second place: its page gains a reference, its chunks one more holder.
    private func share(_ slot: UInt64, level: Int, _ tx: MetaTransaction, _ changes: inout ReferenceChanges) {
        if let r = referenced(slot, level: level) { changes.shared.append(r); return }
        if level > 0, case .child(let n) = Self.decode(slot) { tx.addReference(n) }
    }

    /// A slot going away: its chunks lose a holder; its page loses a reference, and a page
    /// no slot points at any more takes its own slots with it.
    private func drop(_ slot: UInt64, level: Int, _ tx: MetaTransaction, _ changes: inout ReferenceChanges) {
        if let r = referenced(slot, level: level) { changes.dropped.append(r); return }
        guard level > 0, case .child(let n) = Self.decode(slot) else { return }
        let page = tx.references(n) == 1 ? tx.page(n) : nil // read before it is freed
        if tx.dropReference(n) == 0, let page {
            for s in page.slots { drop(s, level: level - 1, tx, &changes) }
        }
    }

    // MARK: editing

    /// Sets entries `range` to `base` (linear: base, base+1, ...; constant: base each;
    /// 0 clears them). A page another tree shares is copied before it is edited (its
    /// contents gain a holder: `changes.shared`); references overwritten or in pages
    /// freed go to `changes.dropped`. The caller turns both into space-map counts.
    mutating func set(_ range: Range<UInt64>, to base: UInt64, in tx: MetaTransaction,
                      _ changes: inout ReferenceChanges) throws(PageStore.Failure)
    {
        guard range.upperBound <= count, base <= Self.valueMask else {
            throw .damaged("a map edit of extents \(range) (value \(base)) is outside the map's \(count) extents")
        }
        guard !range.isEmpty else { return }
        root = try set(slot: root, level: height, start: 0, range, base, tx, &changes)
    }

    /// An edit of a tree whose values are not references (the space map).
    mutating func set(_ range: Range<UInt64>, to base: UInt64, in tx: MetaTransaction) throws(PageStore.Failure) {
        var none = ReferenceChanges()
        try set(range, to: base, in: tx, &none)
        precondition(none.shared.isEmpty && none.dropped.isEmpty, "a block map edited without counting its references")
    }

    /// The value entry `at` gets from an edit of `range` to `base`.
    private func edited(_ at: UInt64, _ range: Range<UInt64>, _ base: UInt64) -> UInt64 {
        base == 0 ? 0 : (runs == .linear ? base + (at - range.lowerBound) : base)
    }

    private func set(slot: UInt64, level: Int, start: UInt64, _ range: Range<UInt64>, _ base: UInt64,
                     _ tx: MetaTransaction, _ changes: inout ReferenceChanges) throws(PageStore.Failure) -> UInt64
    {
        let span = Self.span(level)
        let lo = max(range.lowerBound, start), hi = min(range.upperBound, start + span)
        guard lo < hi else { return slot }
        if level == 0 {
            let value = edited(start, range, base)
            if value != slot { drop(slot, level: 0, tx, &changes) }
            return value
        }
        if lo == start && hi == start + span { // the whole subtree: one run
            drop(slot, level: level, tx, &changes)
            return Self.runSlot(edited(start, range, base))
        }
        let childSpan = Self.span(level - 1)
        var page: MetaPage
        var fresh = false // a page this edit made: written whatever it holds
        switch Self.decode(slot) {
        case .child(let n):
            guard let p = tx.page(n) else { throw .damaged("metadata page \(n): not loaded") }
            if tx.references(n) > 1 { // shared with another tree: edit a copy, the others keep theirs
                page = MetaPage(kind: .treeNode, number: try tx.newPage())
                page.slots = p.slots
                tx.dropReference(n)
                for s in page.slots { share(s, level: level - 1, tx, &changes) }
                fresh = true
            } else {
                page = p
            }
        case .empty, .run: // the same chunks, now referenced from a page's slots
            let runBase: UInt64 = if case .run(let b) = Self.decode(slot) { b } else { 0 }
            page = MetaPage(kind: .treeNode, number: try tx.newPage())
            for k in 0..<Int(Self.fanout) {
                let v = value(ofRun: runBase, at: UInt64(k) * childSpan)
                page.slots[k] = level - 1 == 0 ? v : Self.runSlot(v)
            }
            fresh = true
        }
        let first = Int((lo - start) / childSpan), last = Int((hi - 1 - start) / childSpan)
        var changed = fresh
        for k in first...last {
            let edited = try set(slot: page.slots[k], level: level - 1, start: start + UInt64(k) * childSpan, range, base, tx, &changes)
            if edited != page.slots[k] { page.slots[k] = edited; changed = true }
        }
        if let v = uniformRun(page.slots, childLevel: level - 1) {
            tx.dropReference(page.number) // its own (only) reference: the page goes, its chunks stay referenced by the run
            return Self.runSlot(v)
        }
        if changed { tx.put(page) } // a page whose slots stay as they were costs nothing
        return Self.childTag | UInt64(page.number)
    }

    /// The run a page's slots form together, if they do.
    private func uniformRun(_ slots: [UInt64], childLevel: Int) -> UInt64? {
        let span = Self.span(childLevel)
        func base(_ s: UInt64) -> UInt64? {
            if childLevel == 0 { return s }
            switch Self.decode(s) {
            case .empty: return 0
            case .run(let b): return b
            case .child: return nil
            }
        }
        guard let v0 = base(slots[0]) else { return nil }
        for k in 1..<slots.count {
            guard let v = base(slots[k]), v == value(ofRun: v0, at: UInt64(k) * span) else { return nil }
        }
        return v0
    }

    /// A new entry count (the caller has cleared entries past a shrink). Growing past what
    /// the root covers adds levels above it: the old root becomes the first slot of a new
    /// root page (the same references, from another place).
    mutating func resize(to newCount: UInt64, in tx: MetaTransaction) throws(PageStore.Failure) {
        while Self.span(height) < newCount {
            if root != 0 {
                var page = MetaPage(kind: .treeNode, number: try tx.newPage())
                page.slots[0] = root
                tx.put(page)
                root = Self.childTag | UInt64(page.number)
            }
            height += 1
        }
        count = newCount
    }

    /// Lets go of every page and reference of the tree (the tree is being deleted).
    mutating func freeAll(in tx: MetaTransaction, _ changes: inout ReferenceChanges) {
        drop(root, level: height, tx, &changes)
        root = 0
    }
}

/// What an edit did to the pool chunks a block map references: `shared`, references a
/// copied page now holds as well (their chunks gain a holder); `dropped`, references that
/// went (they lose one). A chunk's space-map count is the number of its references, each
/// page counted once however many trees share it.
struct ReferenceChanges {
    var shared: [Range<UInt64>] = []
    var dropped: [Range<UInt64>] = []
}
