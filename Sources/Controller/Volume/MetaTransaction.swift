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
/// if it is abandoned; pages it frees are reused only after it commits.
final class MetaTransaction: PageSource {
    unowned let store: PageStore
    private(set) var pages: [UInt32: MetaPage] = [:]
    private(set) var changed: Set<UInt32> = []
    private(set) var freed: Set<UInt32> = []
    private var taken: Set<UInt32> = []

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

    /// A fresh, zeroed tree page.
    func newPage() throws(PageStore.Failure) -> UInt32 {
        guard let n = store.takeFreePage() else {
            throw .full("the metadata area of the pool is full (\(store.layout.treePages) tree pages in use)")
        }
        taken.insert(n)
        put(MetaPage(kind: .treeNode, number: n))
        return n
    }

    func free(_ n: UInt32) {
        pages[n] = nil
        changed.remove(n)
        if taken.remove(n) != nil { store.giveBack(n) } else { freed.insert(n) }
    }

    /// What `rollBack` returns to: one change of a group commit that fails is undone alone.
    struct Savepoint {
        fileprivate var pages: [UInt32: MetaPage], changed: Set<UInt32>, freed: Set<UInt32>, taken: Set<UInt32>
    }

    var savepoint: Savepoint { Savepoint(pages: pages, changed: changed, freed: freed, taken: taken) }

    func rollBack(to s: Savepoint) {
        for n in taken.subtracting(s.taken) { store.giveBack(n) }
        (pages, changed, freed, taken) = (s.pages, s.changed, s.freed, s.taken)
    }

    /// Gives back the pages taken; nothing of it was written.
    func abandon() {
        for n in taken { store.giveBack(n) }
        taken = []
        pages = [:]
        changed = []
        freed = []
    }
}
