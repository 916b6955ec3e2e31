import Foundation
import IOEngine

/// A pool's metadata pages: committed images in memory, made durable by a journal and
/// written in place at checkpoints.
///
/// A transaction edits private copies of pages. `commit` writes them as one journal
/// record (header page + full page images, checksummed, FUA) and only then publishes
/// them; so a commit costs the pages it changes plus one, whatever the size of the pool.
/// A checkpoint writes the pages committed since the last one in place, flushes, and
/// writes the superblock (alternating slots) to move the journal's tail; after a crash,
/// opening replays every complete transaction from the tail. Full page images make the
/// replay repair an in-place write that was torn by the crash.
///
/// Why a journal over copy-on-write trees (dm-thin's way): pages never move, so a tree's
/// root and interior pages stay put and no allocator of metadata pages has to be itself
/// copy-on-write; the price is writing a changed page twice (journal, then in place),
/// batched by checkpoints.
public final class PageStore: @unchecked Sendable {
    public let area: MetaArea
    public let layout: MetaLayout
    public let poolId: UUID
    private let lock = NSLock()
    private var pages: [UInt32: MetaPage] = [:]
    /// Committed since the last checkpoint: written in place by the next one.
    private var unwritten: Set<UInt32> = []
    /// Tree pages in use (reachable from a root, or taken by a transaction), indexed from `layout.treeStart`.
    private var inUse: [Bool]
    /// How many slots point at each tree page (a root-table entry or a parent page's slot):
    /// more than one when trees share the page (a block map and its PiTs). Derived when the
    /// trees are loaded at open, kept by commits.
    private var references: [UInt32]
    private var freeCursor = 0
    private(set) var freeTreePages: Int
    // The journal ring: next record at `head`, `used` pages since the tail (waste included).
    // Both change only under `writer`; `used` also under `lock`, for readers outside it.
    private var head: UInt32 = 0
    private var used: UInt32 = 0
    private var nextSequence: UInt64 = 1
    private var superblockSequence: UInt64 = 0
    /// Records of a transaction that did not commit may lie in the ring past the head,
    /// under the sequence numbers that come next: after a record write failed (the commit
    /// is abandoned, yet the record, or an earlier record of it, may be on disk), and at
    /// open (a crash may have cut a transaction). Replay would take them for the next
    /// commit's. So the next commit first checkpoints with sequences a whole ring further on.
    private var mayHoldStaleRecords = false
    /// Commits and checkpoints, one at a time.
    let writer = AsyncSemaphore(permits: 1)
    /// Counters tests and `pool check` read: commits, and the journal bytes they wrote.
    public private(set) var commits = 0
    public private(set) var lastCommitBytes = 0
    /// When the last commit was published (uptime ns): idle checkpoints wait for quiet.
    private var lastCommitNs: UInt64 = 0

    private init(area: MetaArea, layout: MetaLayout, poolId: UUID) {
        self.area = area
        self.layout = layout
        self.poolId = poolId
        inUse = Array(repeating: false, count: Int(layout.treePages))
        references = Array(repeating: 0, count: Int(layout.treePages))
        freeTreePages = Int(layout.treePages)
    }

    /// A store as a pool's metadata problem names it.
    public enum Failure: Error, CustomStringConvertible {
        case io(IOError), damaged(String), full(String)
        public var description: String {
            switch self {
            case .io(let e): "metadata I/O failed: \(e)"
            case .damaged(let why): why
            case .full(let why): why
            }
        }
    }

    // MARK: superblock

    private enum Super {
        static let version: UInt64 = 1
        // slots
        static let versionSlot = 0, pageCount = 1, journalPages = 2, tail = 3, tailSequence = 4, poolHi = 5, poolLo = 6
    }

    /// A new, empty store over `area`: superblocks written, root table and journal empty.
    public static func format(area: MetaArea, layout: MetaLayout, poolId: UUID) async throws(Failure) -> PageStore {
        guard layout.pageCount <= area.pageCount else {
            throw .full("metadata area of \(area.pageCount) pages cannot hold a layout of \(layout.pageCount)")
        }
        let store = PageStore(area: area, layout: layout, poolId: poolId)
        // Root-table pages start out empty and committed, so they are written in place.
        for p in layout.rootTableStart..<layout.journalStart {
            store.pages[p] = MetaPage(kind: .rootTable, number: p)
            store.unwritten.insert(p)
        }
        try await store.checkpointNow()
        try await store.checkpointNow() // both superblock slots: no stale one from an earlier pool wins
        return store
    }

    private func superblock(sequence: UInt64) -> MetaPage {
        var page = MetaPage(kind: .superblock, number: UInt32(sequence % 2), sequence: sequence)
        page.slots[Super.versionSlot] = Super.version
        page.slots[Super.pageCount] = UInt64(layout.pageCount)
        page.slots[Super.journalPages] = UInt64(layout.journalPages)
        page.slots[Super.tail] = UInt64(head)
        page.slots[Super.tailSequence] = nextSequence
        (page.slots[Super.poolHi], page.slots[Super.poolLo]) = poolId.halves
        return page
    }

    /// Opens the store: the newest valid superblock, then every complete transaction the
    /// journal holds past its tail. Tree pages are read later, by `load`.
    public static func open(area: MetaArea, poolId: UUID) async throws(Failure) -> PageStore {
        let buffer = try alignedBuffer(pages: 2)
        do { try await area.read(page: 0, count: 2, into: buffer.pointer) } catch { throw .io(error) }
        var best: MetaPage?
        var problems: [String] = []
        for slot in 0..<2 {
            switch MetaPage.decode(buffer.pointer + slot * MetaPage.bytes, number: UInt32(slot), kind: .superblock) {
            case .success(let page):
                guard page.slots[Super.versionSlot] == Super.version else { problems.append("superblock \(slot): version \(page.slots[Super.versionSlot])"); continue }
                guard UUID(halves: (page.slots[Super.poolHi], page.slots[Super.poolLo])) == poolId else {
                    problems.append("superblock \(slot): belongs to another pool")
                    continue
                }
                if best == nil || page.sequence > best!.sequence { best = page }
            case .failure(let why):
                problems.append("superblock \(slot): \(why)")
            }
        }
        guard let sb = best else { throw .damaged("metadata area: no usable superblock (\(problems.joined(separator: "; ")))") }
        // A superblock that passed its checksum may still hold what svsp never writes.
        let (pages, journal, tail) = (sb.slots[Super.pageCount], sb.slots[Super.journalPages], sb.slots[Super.tail])
        guard pages <= UInt64(area.pageCount), journal > 0, journal <= pages,
              UInt64(MetaLayout.superblockPages + MetaLayout.rootTablePages) + journal <= pages, tail < journal
        else {
            throw .damaged("metadata area: superblock describes \(pages) pages with a journal of \(journal) (tail \(tail)), the area has \(area.pageCount)")
        }
        // Sequences only count up, a ring's length at most at a time: one this high is damage.
        guard sb.slots[Super.tailSequence] < 1 << 62 else {
            throw .damaged("metadata area: superblock's journal sequence \(sb.slots[Super.tailSequence]) is out of range")
        }
        let layout = MetaLayout(journalPages: UInt32(journal), pageCount: UInt32(pages))
        let store = PageStore(area: area, layout: layout, poolId: poolId)
        store.superblockSequence = sb.sequence
        store.head = UInt32(sb.slots[Super.tail])
        store.nextSequence = sb.slots[Super.tailSequence]
        try await store.replayJournal()
        store.mayHoldStaleRecords = true
        let tables = try alignedBuffer(pages: Int(MetaLayout.rootTablePages))
        do { try await area.read(page: layout.rootTableStart, count: Int(MetaLayout.rootTablePages), into: tables.pointer) } catch { throw .io(error) }
        for i in 0..<Int(MetaLayout.rootTablePages) {
            let n = layout.rootTableStart + UInt32(i)
            if store.pages[n] != nil { continue } // replayed from the journal: newer
            switch MetaPage.decode(tables.pointer + i * MetaPage.bytes, number: n, kind: .rootTable) {
            case .success(let page): store.pages[n] = page
            case .failure(let why): throw .damaged("metadata page \(n) (root table): \(why)")
            }
        }
        return store
    }

    // MARK: journal

    private enum Record {
        // header slots
        static let count = 0, crc = 1, last = 2, poolHi = 3, poolLo = 4, targets = 5
        static let maxPages = MetaPage.slotCount - targets
    }

    private func replayJournal() async throws(Failure) {
        let j = layout.journalPages
        var pos = head
        // Records of a transaction whose last record is not read yet: dropped (written over
        // next) if the journal ends first, so a transaction is replayed whole or not at all.
        var pending: [MetaPage] = []
        var usedSoFar: UInt32 = 0
        var sequence = nextSequence
        let header = try Self.alignedBuffer(pages: 1)
        func readRecord(at p: UInt32) async -> [MetaPage]? {
            guard p < j else { return nil }
            do { try await area.read(page: layout.journalStart + p, count: 1, into: header.pointer) } catch { return nil }
            guard case .success(let h) = MetaPage.decode(header.pointer, number: layout.journalStart + p, kind: .journalHeader),
                  h.sequence == sequence, UUID(halves: (h.slots[Record.poolHi], h.slots[Record.poolLo])) == poolId
            else { return nil }
            guard h.slots[Record.count] > 0, h.slots[Record.count] <= UInt64(Record.maxPages) else { return nil }
            let n = Int(h.slots[Record.count])
            guard p + 1 + UInt32(n) <= j else { return nil }
            guard let images = try? Self.alignedBuffer(pages: n) else { return nil }
            do { try await area.read(page: layout.journalStart + p + 1, count: n, into: images.pointer) } catch { return nil }
            guard Checksum.crc32c(UnsafeRawBufferPointer(start: images.pointer, count: n * MetaPage.bytes)) == UInt32(truncatingIfNeeded: h.slots[Record.crc]) else { return nil }
            var out: [MetaPage] = []
            for i in 0..<n {
                let target = UInt32(truncatingIfNeeded: h.slots[Record.targets + i])
                // Only root-table and tree pages are journalled: never a superblock or the journal itself.
                let journalled = target >= layout.rootTableStart && (target < layout.journalStart || target >= layout.treeStart)
                guard journalled, target < layout.pageCount, case .success(let page) = MetaPage.decode(images.pointer + i * MetaPage.bytes, number: target, kind: nil)
                else { return nil }
                out.append(page)
            }
            return out + [h] // the header last: tells whether the transaction ends here
        }
        while usedSoFar < j {
            var at = pos
            var record = await readRecord(at: at)
            var waste: UInt32 = 0
            if record == nil, pos != 0 { // the writer wraps to the ring's start when a record does not fit
                at = 0
                waste = j - pos
                record = await readRecord(at: at)
            }
            guard var pages = record else { break }
            let h = pages.removeLast()
            pending += pages
            let length = UInt32(pages.count) + 1
            usedSoFar += waste + length
            pos = (at + length) % j
            sequence += 1
            if h.slots[Record.last] != 0 {
                for page in pending { self.pages[page.number] = page; unwritten.insert(page.number) }
                pending = []
                head = pos
                used = usedSoFar
                nextSequence = sequence
            }
        }
    }

    /// Writes the transaction's pages as journal records (FUA), then publishes them.
    /// A transaction bigger than the journal is refused before anything is written.
    /// `alongside` runs under the same lock as the publication (the owner's roots change with the pages).
    func commit(_ tx: MetaTransaction, alongside: () -> Void = {}) async throws(Failure) {
        let changed = tx.changed.sorted().map { tx.pages[$0]! }
        guard !changed.isEmpty else { publish(tx, [], alongside); return }
        let recordCount = (changed.count + Record.maxPages - 1) / Record.maxPages
        let needed = UInt32(changed.count + recordCount)
        guard needed <= layout.journalPages else {
            throw .full("a metadata transaction of \(changed.count) pages does not fit the \(layout.journalPages)-page journal")
        }
        // Worst case every record wraps: make room for all of it before the first is written,
        // so a checkpoint can never fall between the records of one transaction.
        if mayHoldStaleRecords || used + needed * 2 > layout.journalPages {
            // A stale record's sequence is below its own + the ring's length: past every one.
            if mayHoldStaleRecords { nextSequence += UInt64(layout.journalPages) }
            try await checkpointNow()
            mayHoldStaleRecords = false
        }
        var bytes = 0
        var stamped: [MetaPage] = []
        for r in 0..<recordCount {
            let part = Array(changed[(r * Record.maxPages)..<min(changed.count, (r + 1) * Record.maxPages)])
            let sequence = nextSequence
            let images = part.map { p -> MetaPage in var p = p; p.sequence = sequence; return p }
            do {
                try await writeRecord(images, sequence: sequence, last: r == recordCount - 1)
            } catch {
                mayHoldStaleRecords = true
                throw error
            }
            nextSequence += 1
            stamped += images
            bytes += (images.count + 1) * MetaPage.bytes
        }
        lock.withLock { commits += 1; lastCommitBytes = bytes; lastCommitNs = DispatchTime.now().uptimeNanoseconds }
        publish(tx, stamped, alongside)
    }

    private func writeRecord(_ images: [MetaPage], sequence: UInt64, last: Bool) async throws(Failure) {
        let n = images.count
        let buffer = try Self.alignedBuffer(pages: n + 1)
        for (i, page) in images.enumerated() { page.encode(into: buffer.pointer + (i + 1) * MetaPage.bytes) }
        var at = head
        var waste: UInt32 = 0
        if at + UInt32(n) + 1 > layout.journalPages { waste = layout.journalPages - at; at = 0 }
        var h = MetaPage(kind: .journalHeader, number: layout.journalStart + at, sequence: sequence)
        h.slots[Record.count] = UInt64(n)
        h.slots[Record.crc] = UInt64(Checksum.crc32c(UnsafeRawBufferPointer(start: buffer.pointer + MetaPage.bytes, count: n * MetaPage.bytes)))
        h.slots[Record.last] = last ? 1 : 0
        (h.slots[Record.poolHi], h.slots[Record.poolLo]) = poolId.halves
        for (i, page) in images.enumerated() { h.slots[Record.targets + i] = UInt64(page.number) }
        h.encode(into: buffer.pointer)
        do { try await area.write(page: layout.journalStart + at, count: n + 1, from: buffer.pointer, fua: true) } catch { throw .io(error) }
        head = (at + UInt32(n) + 1) % layout.journalPages
        lock.withLock { used += waste + UInt32(n) + 1 } // `journalUsed` reads it from other threads
    }

    private func publish(_ tx: MetaTransaction, _ images: [MetaPage], _ alongside: () -> Void) {
        lock.withLock {
            alongside()
            for page in images { pages[page.number] = page; unwritten.insert(page.number) }
            for (n, delta) in tx.referenceDelta where n >= layout.treeStart {
                let i = Int(n - layout.treeStart)
                references[i] = UInt32(Int(references[i]) + delta)
            }
            for n in tx.freed.union(tx.dropped) {
                pages[n] = nil
                unwritten.remove(n)
                markFree(n)
            }
        }
    }

    // MARK: checkpoint

    /// Writes every page committed since the last checkpoint in place, then the superblock
    /// that moves the journal's tail past them. Caller holds `writer` (or is opening).
    func checkpointNow() async throws(Failure) {
        let dirty: [MetaPage] = lock.withLock { unwritten.sorted().compactMap { pages[$0] } }
        if !dirty.isEmpty {
            let buffer = try Self.alignedBuffer(pages: dirty.count)
            for (i, page) in dirty.enumerated() { page.encode(into: buffer.pointer + i * MetaPage.bytes) }
            var runs: [(first: Int, count: Int)] = [] // runs of consecutive pages, one write each
            var i = 0
            while i < dirty.count {
                var n = 1
                while i + n < dirty.count, dirty[i + n].number == dirty[i].number + UInt32(n) { n += 1 }
                runs.append((i, n))
                i += n
            }
            // Commits wait while a checkpoint runs: its writes go in parallel, not one by one.
            if let failed = await writeInParallel(runs.map { (dirty[$0.first].number, $0.count, buffer.pointer + $0.first * MetaPage.bytes) }) {
                throw .io(failed)
            }
            do { try await area.flush() } catch { throw .io(error) }
        }
        superblockSequence += 1
        let sb = superblock(sequence: superblockSequence)
        let buffer = try Self.alignedBuffer(pages: 1)
        sb.encode(into: buffer.pointer)
        do { try await area.write(page: sb.number, count: 1, from: buffer.pointer, fua: true) } catch { throw .io(error) }
        lock.withLock {
            for page in dirty where pages[page.number]?.sequence == page.sequence { unwritten.remove(page.number) }
            used = 0
        }
    }

    /// Writes each (first page, count, bytes), up to `checkpointWidth` at once; the first error, if any.
    private func writeInParallel(_ writes: [(page: UInt32, count: Int, bytes: UnsafeMutableRawPointer)]) async -> IOError? {
        let area = area
        let all = writes.map { (page: $0.page, count: $0.count, bytes: UnsafeRawPointerBox(pointer: $0.bytes)) }
        return await withTaskGroup(of: IOError?.self) { group -> IOError? in
            var failed: IOError?
            for (i, w) in all.enumerated() {
                if i >= Self.checkpointWidth, let done = await group.next(), let error = done { failed = failed ?? error }
                group.addTask { () -> IOError? in
                    do throws(IOError) { try await area.write(page: w.page, count: w.count, from: w.bytes.pointer, fua: false) } catch { return error }
                    return nil
                }
            }
            for await done in group { if let error = done { failed = failed ?? error } }
            return failed
        }
    }

    /// Checkpoint writes in flight at once.
    public static let checkpointWidth = 32

    /// A checkpoint, taken in turn with commits (the daemon calls it when idle and at shutdown).
    public func checkpoint() async throws(Failure) {
        await writer.acquire()
        defer { writer.release() }
        try await checkpointNow()
    }

    /// A checkpoint when the journal holds commits and none came for `idleNs`: so a
    /// restart replays little and the journal is empty when load comes. True if it took one.
    @discardableResult
    public func checkpointIfIdle(idleNs: UInt64) async throws(Failure) -> Bool {
        await writer.acquire()
        defer { writer.release() }
        let quiet = DispatchTime.now().uptimeNanoseconds &- lock.withLock { lastCommitNs } >= idleNs
        guard used > 0, quiet else { return false }
        try await checkpointNow()
        return true
    }

    /// Journal pages in use (not yet checkpointed).
    public var journalUsed: UInt32 { lock.withLock { used } }

    // MARK: pages

    /// The committed image of page `n`, if loaded.
    func committed(_ n: UInt32) -> MetaPage? { lock.withLock { pages[n] } }

    /// Runs `body` over the committed pages as one consistent view (a commit publishing
    /// meanwhile waits), so a tree walk never mixes two generations.
    func reading<R>(_ body: (CommittedPages) throws(TreeError) -> R) throws(TreeError) -> R {
        lock.lock()
        defer { lock.unlock() }
        return try body(CommittedPages(store: self))
    }

    /// Runs `body` under the lock that publications take (for state published with pages).
    func locked<R>(_ body: () -> R) -> R { lock.withLock(body) }

    /// Committed pages, read while `reading` holds the lock.
    struct CommittedPages: PageSource {
        unowned(unsafe) let store: PageStore
        func page(_ n: UInt32) -> MetaPage? { store.pages[n] }
        /// The committed number of slots pointing at tree page `n` (see `referenceCount`).
        func referenceCount(_ n: UInt32) -> Int {
            guard n >= store.layout.treeStart, n < store.layout.pageCount else { return 0 }
            return Int(store.references[Int(n - store.layout.treeStart)])
        }
    }

    /// The committed number of slots pointing at tree page `n`.
    func referenceCount(_ n: UInt32) -> Int {
        guard n >= layout.treeStart, n < layout.pageCount else { return 0 }
        return lock.withLock { Int(references[Int(n - layout.treeStart)]) }
    }

    /// Keeps a page that failed its check out of reach of `takeFreePage` while this store
    /// is open (a lost map still names it; the next open finds it damaged again).
    func holdDamaged(_ n: UInt32) {
        guard n >= layout.treeStart, n < layout.pageCount else { return }
        lock.withLock { markUsed(n) }
    }

    /// Counts one more slot pointing at tree page `n` (the tree walk at open).
    func countReference(_ n: UInt32) {
        guard n >= layout.treeStart, n < layout.pageCount else { return }
        lock.withLock { references[Int(n - layout.treeStart)] += 1 }
    }

    /// Reads tree page `n` from the area unless it is loaded, checks it and marks it in use.
    func load(_ n: UInt32, kind: MetaPage.Kind) async throws(Failure) -> MetaPage {
        guard n >= layout.treeStart, n < layout.pageCount else { throw .damaged("metadata: page number \(n) is outside the tree pages") }
        if let page = committed(n) { lock.withLock { markUsed(n) }; return page }
        let buffer = try Self.alignedBuffer(pages: 1)
        do { try await area.read(page: n, count: 1, into: buffer.pointer) } catch { throw .io(error) }
        switch MetaPage.decode(buffer.pointer, number: n, kind: kind) {
        case .success(let page):
            lock.withLock { pages[n] = page; markUsed(n) }
            return page
        case .failure(let why):
            throw .damaged("metadata page \(n): \(why)")
        }
    }

    /// Reads back every loaded page that was written in place (not those only in the
    /// journal since the last checkpoint) and names those whose image on disk is damaged.
    public func verifyOnDisk() async -> [String] {
        let (loaded, pending) = lock.withLock { (pages.keys.sorted(), unwritten) }
        var problems: [String] = []
        guard let buffer = try? Self.alignedBuffer(pages: 1) else { return ["metadata: no memory to read pages back"] }
        for n in loaded where !pending.contains(n) {
            do { try await area.read(page: n, count: 1, into: buffer.pointer) } catch {
                problems.append("metadata page \(n): cannot be read: \(error)")
                continue
            }
            if case .failure(let why) = MetaPage.decode(buffer.pointer, number: n, kind: nil) {
                // A commit may have published it meanwhile (then it is in the journal, not yet in place).
                if lock.withLock({ !unwritten.contains(n) && pages[n] != nil }) { problems.append("metadata page \(n): \(why)") }
            }
        }
        return problems
    }

    /// Takes a free tree page for a transaction (given back if it is abandoned).
    func takeFreePage() -> UInt32? {
        lock.withLock {
            guard freeTreePages > 0 else { return nil }
            while inUse[freeCursor] { freeCursor = (freeCursor + 1) % inUse.count }
            let n = layout.treeStart + UInt32(freeCursor)
            markUsed(n)
            return n
        }
    }

    func giveBack(_ n: UInt32) { lock.withLock { markFree(n) } }

    private func markUsed(_ n: UInt32) {
        let i = Int(n - layout.treeStart)
        if !inUse[i] { inUse[i] = true; freeTreePages -= 1 }
    }

    private func markFree(_ n: UInt32) {
        guard n >= layout.treeStart else { return }
        let i = Int(n - layout.treeStart)
        if inUse[i] { inUse[i] = false; freeTreePages += 1 }
    }

    static func alignedBuffer(pages: Int) throws(Failure) -> AlignedBuffer {
        do { return try AlignedBuffer(count: pages * MetaPage.bytes) } catch { throw .io(error) }
    }
}

extension UUID {
    /// The 16 bytes as two big-endian words (how page slots store a UUID).
    var halves: (UInt64, UInt64) {
        withUnsafeBytes(of: uuid) { raw in
            (UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self)),
             UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
        }
    }

    init(halves: (UInt64, UInt64)) {
        var bytes = UUID.zero.uuid
        withUnsafeMutableBytes(of: &bytes) { raw in
            raw.storeBytes(of: halves.0.bigEndian, toByteOffset: 0, as: UInt64.self)
            raw.storeBytes(of: halves.1.bigEndian, toByteOffset: 8, as: UInt64.self)
        }
        self.init(uuid: bytes)
    }
}

/// A page buffer's address handed to the tasks of one checkpoint (the buffer outlives them).
private struct UnsafeRawPointerBox: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
}
