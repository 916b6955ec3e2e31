/// Read access to metadata pages: committed ones, or a transaction's view of them.
protocol PageSource {
    func page(_ n: UInt32) -> MetaPage?
}

/// A tree walk that met a page it cannot use.
public struct TreeError: Error, CustomStringConvertible {
    public var page: UInt32?
    public var why: String
    public init(page: UInt32?, why: String) {
        self.page = page
        self.why = why
    }
    public var description: String { page.map { "metadata page \($0): \(why)" } ?? why }
}

/// Private copies of the pages one commit changes. Pages taken for it are handed back
/// if it is abandoned; pages it frees (even those it took itself) are reused only after
/// it commits: a change of a group commit that is rolled back may still need them.
final class MetaTransaction: PageSource {
    unowned let store: PageStore
    private(set) var pages: [UInt32: MetaPage] = [:]
    private(set) var changed: Set<UInt32> = []
    private(set) var freed: Set<UInt32> = []
    private var taken: Set<UInt32> = []
    /// Pages taken and freed again by this transaction: given back at its end.
    private(set) var dropped: Set<UInt32> = []
    /// Changes to the number of slots pointing at each page (published with the pages).
    private(set) var referenceDelta: [UInt32: Int] = [:]

    init(store: PageStore) { self.store = store }

    func page(_ n: UInt32) -> MetaPage? {
        if freed.contains(n) { return nil }
        return pages[n] ?? store.committed(n)
    }

    /// Stores a changed copy of a page.
    func put(_ page: MetaPage) {
        pages[page.number] = page
        changed.insert(page.number)
    }

    /// A fresh, zeroed tree page, with the one slot that will point at it counted.
    func newPage() throws(PageStore.Failure) -> UInt32 {
        guard let n = store.takeFreePage() else {
            throw .full("the metadata area of the pool is full (\(store.layout.treePages) tree pages in use)")
        }
        taken.insert(n)
        referenceDelta[n, default: 0] += 1
        put(MetaPage(kind: .treeNode, number: n))
        return n
    }

    /// How many slots point at page `n` in this transaction's view.
    func references(_ n: UInt32) -> Int { store.referenceCount(n) + referenceDelta[n, default: 0] }

    /// One more slot points at page `n` (a tree shares it).
    func addReference(_ n: UInt32) { referenceDelta[n, default: 0] += 1 }

    /// One slot fewer points at page `n`; at none, the page is free. Returns what is left.
    @discardableResult
    func dropReference(_ n: UInt32) -> Int {
        referenceDelta[n, default: 0] -= 1
        let left = references(n)
        precondition(left >= 0, "metadata page \(n): more references dropped than held")
        if left == 0 { free(n) }
        return left
    }

    private func free(_ n: UInt32) {
        pages[n] = nil
        changed.remove(n)
        if taken.remove(n) != nil { dropped.insert(n) } else { freed.insert(n) }
    }

    /// What `rollBack` returns to: one change of a group commit that fails is undone alone.
    struct Savepoint {
        fileprivate var pages: [UInt32: MetaPage], changed: Set<UInt32>, freed: Set<UInt32>, taken: Set<UInt32>, dropped: Set<UInt32>
        fileprivate var referenceDelta: [UInt32: Int]
    }

    var savepoint: Savepoint {
        Savepoint(pages: pages, changed: changed, freed: freed, taken: taken, dropped: dropped, referenceDelta: referenceDelta)
    }

    /// Back to `s`: pages taken since are given back; pages taken before and freed since are
    /// the savepoint's again (never given back meanwhile, so no other change can have them).
    func rollBack(to s: Savepoint) {
        for n in taken.union(dropped).subtracting(s.taken.union(s.dropped)) { store.giveBack(n) }
        (pages, changed, freed, taken, dropped, referenceDelta) = (s.pages, s.changed, s.freed, s.taken, s.dropped, s.referenceDelta)
    }

    /// Gives back the pages taken; nothing of it was written.
    func abandon() {
        for n in taken.union(dropped) { store.giveBack(n) }
        taken = []
        dropped = []
        pages = [:]
        changed = []
        freed = []
        referenceDelta = [:]
    }
}
