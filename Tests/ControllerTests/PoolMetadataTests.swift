import Controller
import Foundation
import IOEngine
import XCTest

/// A pool's metadata area on a real file (O_DIRECT through the engine), reopened as a
/// restarted daemon would open it.
final class MetaFixture {
    let path: String
    let engine: Engine
    var lun: LUN
    let poolId = UUID()
    let pages: UInt32

    init(_ name: String, pages: UInt32, fileBytes: UInt64? = nil) throws {
        path = NSTemporaryDirectory() + "svsp-meta-\(name)-\(UUID().uuidString.prefix(6)).img"
        self.pages = pages
        try LUN.createFile(path: path, sizeBytes: fileBytes ?? UInt64(pages) * 4096)
        engine = try Engine(queueDepth: 64)
        lun = try LUN(path: path, readWrite: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    var area: MetaArea { MetaArea(lun: lun.handle, engine: engine.handle, startBytes: 0, pageCount: pages) }

    /// Overwrites bytes of the file (a fault the tests inject), outside the engine.
    func scribble(atByte offset: UInt64, _ bytes: [UInt8]) throws {
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try h.seek(toOffset: offset)
        try h.write(contentsOf: Data(bytes))
        try h.close()
    }

    func readPage(_ n: UInt32) throws -> Data {
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(n) * 4096)
        return try h.read(upToCount: 4096) ?? Data()
    }
}

extension PoolMetadata {
    /// Every chunk of a map, as (vdisk chunk -> pool chunk or nil).
    func entries(_ id: UUID, _ count: UInt64) throws -> [UInt64?] {
        var out: [UInt64?] = []
        var i: UInt64 = 0
        while i < count {
            let (p, n) = try lookup(map: id, chunk: i, limit: count - i)
            for k in 0..<n { out.append(p.map { $0 + k }) }
            i += n
        }
        return out
    }
}

final class PoolMetadataTests: XCTestCase {
    /// `journalPages`: a journal smaller than the pool's own (tests of what does not fit it).
    private func formatted(_ f: MetaFixture, chunks: UInt64, reserved: UInt64 = 0, journalPages: UInt32? = nil) async throws -> PoolMetadata {
        let sized = MetaLayout.sized(forChunks: Int(chunks))
        let layout = journalPages.map { MetaLayout(journalPages: $0, pageCount: sized.pageCount - sized.journalPages + $0) } ?? sized
        XCTAssertLessThanOrEqual(layout.pageCount, f.pages)
        return try await PoolMetadata.format(area: f.area, layout: layout, poolId: f.poolId, chunkCount: chunks,
                                             reserved: reserved > 0 ? [0..<reserved] : [])
    }

    private func entries(_ meta: PoolMetadata, _ id: UUID, _ count: UInt64) throws -> [UInt64?] { try meta.entries(id, count) }

    func testMappingsSurviveReopenFromTheJournalAndAfterACheckpoint() async throws {
        let f = try MetaFixture("reopen", pages: MetaLayout.sized(forChunks: 4096).pageCount)
        let meta = try await formatted(f, chunks: 4096, reserved: 16)
        let map = UUID()
        let placed = try await meta.change { v throws(PageStore.Failure) -> [Range<UInt64>] in
            try v.createMap(map, chunks: 100)
            let runs = try v.allocate(10)
            try v.map(map, at: 40, to: runs)
            return runs
        }
        XCTAssertEqual(placed, [16..<26])
        let expected: [UInt64?] = (0..<100).map { (40..<50).contains($0) ? 16 + UInt64($0 - 40) : nil }
        XCTAssertEqual(try entries(meta, map, 100), expected)
        XCTAssertEqual(meta.freeChunks, 4096 - 16 - 10)

        // Not checkpointed: the journal alone carries the change.
        let replayed = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        XCTAssertEqual(try entries(replayed, map, 100), expected)
        XCTAssertEqual(replayed.freeChunks, 4096 - 16 - 10)
        try await replayed.store.checkpoint()
        let checkpointed = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        XCTAssertEqual(try entries(checkpointed, map, 100), expected)
        XCTAssertEqual(checkpointed.store.journalUsed, 0)
    }

    /// The first writes after a PiT change a map page per redirect: a journal of a few
    /// hundred pages filled every few commits, and each checkpoint stalled the commits
    /// behind it (`benchmarks/pit-cost`). A large pool's journal takes 1/16 page per chunk.
    func testALargePoolsJournalHoldsManyCommitsAndASmallPoolsStaysSmall() {
        XCTAssertEqual(MetaLayout.sized(forChunks: 103_424).journalPages, 4096) // 6.3 GiB of 64 KiB extents
        XCTAssertEqual(MetaLayout.sized(forChunks: 16_384).journalPages, 1024)
        XCTAssertEqual(MetaLayout.sized(forChunks: 64).journalPages, 64)
        XCTAssertEqual(MetaLayout.sized(forChunks: 100_000_000).journalPages, 16_384)
    }

    /// A checkpoint writes its pages in parallel: pages of many leaves, scattered, all
    /// land in place (the reopened area has no journal left to replay them from).
    func testACheckpointOfScatteredPagesWritesEveryOneInPlace() async throws {
        let f = try MetaFixture("scattered", pages: MetaLayout.sized(forChunks: 300_000).pageCount)
        let meta = try await formatted(f, chunks: 300_000)
        let map = UUID()
        try await meta.change { v throws(PageStore.Failure) in try v.createMap(map, chunks: 300_000) }
        var expected = [UInt64?](repeating: nil, count: 300_000)
        for batch in 0..<8 {
            // One chunk in every 600th: a leaf page each, so runs of one page, many of them.
            let placed = try await meta.change { v throws(PageStore.Failure) -> [(UInt64, UInt64)] in
                var out: [(UInt64, UInt64)] = []
                for i in stride(from: UInt64(batch * 75), to: 300_000, by: 600) {
                    let run = try v.allocate(1)
                    try v.map(map, at: i, to: run)
                    out.append((i, run[0].lowerBound))
                }
                return out
            }
            for (i, c) in placed { expected[Int(i)] = c }
        }
        // A first checkpoint whose every 5th in-place write fails: it throws, and the
        // journal (not yet released) still carries every change.
        let treeStart = meta.store.layout.treeStart
        let writes = WriteCounter()
        meta.store.area.failWrites { page, _ in page >= treeStart && writes.next() % 5 == 4 }
        do {
            try await meta.store.checkpoint()
            XCTFail("a checkpoint with failed writes succeeded")
        } catch {}
        XCTAssertGreaterThan(writes.count, 2 * PageStore.checkpointWidth, "more runs than are written at once")
        meta.store.area.failWrites(when: nil)
        let replayed = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        XCTAssertGreaterThan(replayed.store.journalUsed, 0)
        XCTAssertEqual(try entries(replayed, map, 300_000), expected)

        try await replayed.store.checkpoint()
        let reopened = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        XCTAssertEqual(reopened.store.journalUsed, 0)
        XCTAssertEqual(try entries(reopened, map, 300_000), expected)
    }

    func testATornJournalRecordIsDroppedWholeAndTheCommitBeforeItKept() async throws {
        let f = try MetaFixture("torn", pages: MetaLayout.sized(forChunks: 4096).pageCount)
        let meta = try await formatted(f, chunks: 4096)
        let a = UUID(), b = UUID()
        try await meta.change { v throws(PageStore.Failure) in try v.createMap(a, chunks: 8); try v.map(a, at: 0, to: try v.allocate(8)) }
        let usedBefore = meta.store.journalUsed
        try await meta.change { v throws(PageStore.Failure) in try v.createMap(b, chunks: 8); try v.map(b, at: 0, to: try v.allocate(8)) }
        // Damage the second record's last image page, as a crash in the middle of its write would.
        let layout = meta.store.layout
        let lastImage = layout.journalStart + meta.store.journalUsed - 1
        XCTAssertGreaterThan(meta.store.journalUsed, usedBefore)
        try f.scribble(atByte: UInt64(lastImage) * 4096 + 100, [0xFF, 0xEE])
        let reopened = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        XCTAssertTrue(reopened.hasMap(a))
        XCTAssertFalse(reopened.hasMap(b), "a transaction whose record is torn must not be applied")
        XCTAssertEqual(try entries(reopened, a, 8), (0..<8).map { Optional(UInt64($0)) })
        XCTAssertEqual(reopened.freeChunks, 4096 - 8)
        // And the journal goes on from there.
        try await reopened.change { v throws(PageStore.Failure) in try v.createMap(b, chunks: 4); try v.map(b, at: 0, to: try v.allocate(4)) }
        let again = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        XCTAssertEqual(try entries(again, b, 4), (8..<12).map { Optional(UInt64($0)) })
    }

    func testADamagedMapPageSetsTheMapAsideAndADamagedSpaceMapRefusesThePoolNamingThePage() async throws {
        let f = try MetaFixture("damaged", pages: MetaLayout.sized(forChunks: 100_000).pageCount)
        let meta = try await formatted(f, chunks: 100_000)
        let map = UUID(), other = UUID()
        // Scattered single chunks: the maps (and the space map) need leaf pages.
        try await meta.change { v throws(PageStore.Failure) in
            try v.createMap(map, chunks: 50_000)
            try v.createMap(other, chunks: 10)
            for i in stride(from: UInt64(0), to: 50_000, by: 997) { try v.map(map, at: i, to: try v.allocate(1)) }
            try v.map(other, at: 0, to: try v.allocate(10))
            _ = try v.allocate(1) // a hole in the space map's runs: it needs a leaf
            try v.map(other, at: 5, to: try v.allocate(1))
        }
        try await meta.store.checkpoint()
        let victim = try XCTUnwrap(try meta.treePages(map).last)
        try f.scribble(atByte: UInt64(victim) * 4096 + 2000, [0x55])
        let reopened = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        XCTAssertEqual(reopened.lostReason(map), "metadata page \(victim): checksum mismatch")
        XCTAssertFalse(reopened.hasMap(map))
        XCTAssertThrowsError(try reopened.lookup(map: map, chunk: 0, limit: 1)) {
            XCTAssertEqual("\($0)", "block map unusable: metadata page \(victim): checksum mismatch")
        }
        XCTAssertNil(reopened.lostReason(other))
        XCTAssertNotNil(try reopened.lookup(map: other, chunk: 0, limit: 1).poolChunk, "the other map is intact")
        let freeBefore = meta.freeChunks
        XCTAssertEqual(reopened.freeChunks, freeBefore, "what the lost map held stays counted")

        // The space map's own page: the pool cannot be used at all.
        let spacePage = try XCTUnwrap(try reopened.spaceTreePages().last)
        try f.scribble(atByte: UInt64(spacePage) * 4096 + 100, [0x66])
        do {
            _ = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
            XCTFail("a damaged space map was accepted")
        } catch {
            XCTAssertEqual("\(error)", "metadata page \(spacePage): checksum mismatch")
        }
    }

    func testChunkTreeAgreesWithAPlainArrayUnderRandomEdits() async throws {
        let f = try MetaFixture("model", pages: MetaLayout.sized(forChunks: 600_000).pageCount)
        let meta = try await formatted(f, chunks: 600_000)
        let map = UUID()
        let count: UInt64 = 300_000 // height 3: runs at every level
        try await meta.change { v throws(PageStore.Failure) in try v.createMap(map, chunks: count) }
        var model = [UInt64?](repeating: nil, count: Int(count))
        var rng = SystemRandomNumberGenerator()
        for round in 0..<60 {
            let start = UInt64.random(in: 0..<count, using: &rng)
            let length = [1, 7, 508, 600, 5000, 258_064][round % 6]
            let end = min(count, start + UInt64(length))
            let unmap = round % 5 == 4
            let runs = try await meta.change { v throws(PageStore.Failure) -> [Range<UInt64>] in
                // What earlier rounds released is zeroed (as the zeroer would) and reused.
                for r in try v.awaitingZeroing(limit: .max) { try v.markZeroed(r) }
                if unmap { try v.unmap(map, start..<end); return [] }
                let runs = try v.allocate(end - start)
                try v.map(map, at: start, to: runs)
                return runs
            }
            var at = Int(start)
            if unmap { for i in Int(start)..<Int(end) { model[i] = nil } }
            for r in runs { for p in r { model[at] = p; at += 1 } }
        }
        XCTAssertEqual(try entries(meta, map, count), model)
        let reopened = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        XCTAssertEqual(try entries(reopened, map, count), model)
        // Every chunk the map holds counts 1 in the space map; every other is free or awaiting zeroing.
        let held = Set(model.compactMap { $0 })
        for (range, value) in try reopened.spaceRuns() {
            for c in range { XCTAssertEqual(value == 1, held.contains(c), "chunk \(c) has count \(value)") }
        }
    }

    func testConcurrentChangesShareCommitsAndAFailedOneLeavesNoTrace() async throws {
        let f = try MetaFixture("group", pages: MetaLayout.sized(forChunks: 1000).pageCount)
        let meta = try await formatted(f, chunks: 1000)
        let map = UUID()
        try await meta.change { v throws(PageStore.Failure) in try v.createMap(map, chunks: 1000) }
        let before = meta.store.commits
        let outcomes = await withTaskGroup(of: Bool.self) { group in
            for i in 0..<64 {
                group.addTask {
                    do {
                        try await meta.change { v throws(PageStore.Failure) in
                            // One asks for more than the pool holds: refused alone.
                            try v.map(map, at: UInt64(i) * 10, to: try v.allocate(i == 13 ? 5000 : 3))
                        }
                        return true
                    } catch {
                        return false
                    }
                }
            }
            var ok = 0
            for await o in group where o { ok += 1 }
            return ok
        }
        XCTAssertEqual(outcomes, 63)
        XCTAssertLessThan(meta.store.commits - before, 64, "concurrent changes should share commits")
        let got = try entries(meta, map, 1000)
        var seen = Set<UInt64>()
        for i in 0..<64 where i != 13 {
            for k in 0..<3 {
                let c = try XCTUnwrap(got[i * 10 + k])
                XCTAssertTrue(seen.insert(c).inserted, "pool chunk \(c) mapped twice")
            }
            XCTAssertNil(got[i * 10 + 3])
        }
        XCTAssertNil(got[130])
        XCTAssertEqual(meta.freeChunks, 1000 - 63 * 3)
    }

    /// A change of a group that frees a page an earlier change of the group took, and then
    /// fails: the page is the earlier change's again, never handed to a later change (the
    /// thin torture lost acknowledged writes to that: two trees shared a page).
    func testAPageFreedByARolledBackChangeStaysWithTheChangeThatTookIt() async throws {
        let f = try MetaFixture("rollback", pages: MetaLayout.sized(forChunks: 4096).pageCount)
        let meta = try await formatted(f, chunks: 4096)
        let map = UUID()
        try await meta.change { v throws(PageStore.Failure) in try v.createMap(map, chunks: 2000) }
        // A: one extent in the second leaf's range: that leaf becomes a page.
        func a(_ v: inout VolumeTransaction) throws(PageStore.Failure) { try v.map(map, at: 600, to: [100..<101]) }
        // B: the whole second leaf as one run (the page is freed), then a failure.
        func b(_ v: inout VolumeTransaction) throws(PageStore.Failure) {
            try v.map(map, at: 508, to: [1000..<1508])
            _ = try v.allocate(1_000_000)
        }
        // C: another leaf becomes a page: it must not get A's.
        func c(_ v: inout VolumeTransaction) throws(PageStore.Failure) { try v.map(map, at: 1500, to: [200..<201]) }
        let outcomes = await meta.changeTogether([a, b, c])
        XCTAssertNil(outcomes[0])
        XCTAssertNotNil(outcomes[1])
        XCTAssertNil(outcomes[2])
        for m in [meta, try await PoolMetadata.open(area: f.area, poolId: f.poolId)] {
            XCTAssertEqual(try m.lookup(map: map, chunk: 600, limit: 1).poolChunk, 100)
            XCTAssertNil(try m.lookup(map: map, chunk: 601, limit: 1).poolChunk, "B left no trace")
            XCTAssertEqual(try m.lookup(map: map, chunk: 1500, limit: 1).poolChunk, 200)
            let pages = try m.treePages(map)
            XCTAssertEqual(pages.count, Set(pages).count, "a page used twice in one tree")
        }
    }

    func testReleasedChunksWaitForZeroingBeforeReuse() async throws {
        let f = try MetaFixture("release", pages: MetaLayout.sized(forChunks: 100).pageCount)
        let meta = try await formatted(f, chunks: 100)
        let a = UUID()
        try await meta.change { v throws(PageStore.Failure) in try v.createMap(a, chunks: 100); try v.map(a, at: 0, to: try v.allocate(100)) }
        XCTAssertEqual(meta.freeChunks, 0)
        try await meta.change { v throws(PageStore.Failure) in try v.deleteMap(a) }
        XCTAssertFalse(meta.hasMap(a))
        XCTAssertEqual(meta.freeChunks, 0, "released chunks are not free until zeroed")
        do {
            try await meta.change { v throws(PageStore.Failure) in _ = try v.allocate(1) }
            XCTFail("allocated a chunk awaiting zeroing")
        } catch {
            XCTAssertEqual("\(error)", "the pool is full: 0 free chunk(s), 1 needed")
        }
        let waiting = try await meta.change { v throws(PageStore.Failure) in try v.awaitingZeroing(limit: 1000) }
        XCTAssertEqual(waiting, [0..<100])
        try await meta.change { v throws(PageStore.Failure) in try v.markZeroed(0..<60) }
        let reopened = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        XCTAssertEqual(reopened.freeChunks, 60)
        XCTAssertEqual(try reopened.spaceRuns().map(\.0), [0..<60, 60..<100])
    }

    /// The scale the volume layer is for: an 8 TiB pool of 64 KiB chunks on a sparse file.
    /// A commit costs the pages it changes: a 4 TiB vdisk costs at most twice a 1 GiB one,
    /// counted in journal bytes, thick (created whole) and thin (10 000 random first writes).
    func testCommitCostDoesNotGrowWithTheVDisk() async throws {
        let chunkBytes: UInt64 = 64 << 10
        let chunks = (8 << 40) / chunkBytes
        let layout = MetaLayout.sized(forChunks: Int(chunks))
        let f = try MetaFixture("scale", pages: layout.pageCount)
        let meta = try await formatted(f, chunks: chunks, reserved: UInt64(layout.bytes) / chunkBytes + 1)

        func thickCost(_ bytes: UInt64) async throws -> Int {
            let n = bytes / chunkBytes, id = UUID()
            try await meta.change { v throws(PageStore.Failure) in try v.createMap(id, chunks: n); try v.map(id, at: 0, to: try v.allocate(n)) }
            XCTAssertEqual(try meta.lookup(map: id, chunk: 0, limit: n).count, n, "a thick vdisk is one run")
            return meta.store.lastCommitBytes
        }
        func thinCost(_ bytes: UInt64, writes: Int) async throws -> Double {
            let n = bytes / chunkBytes, id = UUID()
            try await meta.change { v throws(PageStore.Failure) in try v.createMap(id, chunks: n) }
            var targets = Set<UInt64>()
            var rng = SystemRandomNumberGenerator()
            while targets.count < writes { targets.insert(UInt64.random(in: 0..<n, using: &rng)) }
            let start = meta.store.area.bytesWritten, commits = meta.store.commits
            var journal = 0
            for t in targets {
                try await meta.change { v throws(PageStore.Failure) in try v.map(id, at: t, to: try v.allocate(1)) }
                journal += meta.store.lastCommitBytes
            }
            XCTAssertEqual(meta.store.commits - commits, writes)
            print("thin \(bytes): journal \(journal / writes) bytes per first write, \(Double(meta.store.area.bytesWritten - start) / Double(writes)) with checkpoints")
            return Double(meta.store.area.bytesWritten - start) / Double(writes)
        }
        let thickSmall = try await thickCost(1 << 30), thickLarge = try await thickCost(4 << 40)
        let thinSmall = try await thinCost(1 << 30, writes: 10_000), thinLarge = try await thinCost(4 << 40, writes: 10_000)
        print("metadata bytes per commit: thick 1 GiB \(thickSmall), 4 TiB \(thickLarge); thin first write 1 GiB \(thinSmall), 4 TiB \(thinLarge)")
        XCTAssertLessThanOrEqual(thickLarge, 2 * thickSmall)
        XCTAssertLessThanOrEqual(thinLarge, 2 * thinSmall)
    }

    /// A commit of two journal records whose second write fails is abandoned; its first
    /// record is on disk under the sequence number that comes next. The next commit must
    /// not continue from there: replay would take the abandoned record as part of it, and
    /// a reopened pool would hold edits that were never acknowledged.
    func testARecordOfAFailedCommitIsNeverReplayed() async throws {
        let f = try MetaFixture("failed-record", pages: MetaLayout.sized(forChunks: 600_000).pageCount)
        let meta = try await formatted(f, chunks: 600_000)
        let map = UUID()
        let leaves: UInt64 = 700 // one entry per 508-entry leaf: 700 leaf pages, two records
        try await meta.change { v throws(PageStore.Failure) in
            try v.createMap(map, chunks: 600_000)
            for k in 0..<leaves { try v.map(map, at: k * 508, to: try v.allocate(1)) }
        }
        let layout = meta.store.layout
        final class JournalWrites: @unchecked Sendable {
            let lock = NSLock()
            var seen = 0
        }
        let writes = JournalWrites()
        meta.store.area.failWrites { page, _ in
            guard page >= layout.journalStart, page < layout.treeStart else { return false }
            return writes.lock.withLock { writes.seen += 1; return writes.seen == 2 } // the second record fails
        }
        do {
            // Every leaf edited again: the first record lands, the second fails.
            try await meta.change { v throws(PageStore.Failure) in
                for k in 0..<leaves { try v.map(map, at: k * 508 + 1, to: try v.allocate(1)) }
            }
            XCTFail("the commit should have failed")
        } catch {
            XCTAssertTrue("\(error)".contains("metadata I/O failed"), "\(error)")
        }
        XCTAssertEqual(writes.lock.withLock { writes.seen }, 2)
        meta.store.area.failWrites(when: nil)
        // A small commit afterwards (the last leaf, which the first record did not hold).
        try await meta.change { v throws(PageStore.Failure) in try v.map(map, at: (leaves - 1) * 508 + 2, to: try v.allocate(1)) }
        let free = meta.freeChunks
        for m in [meta, try await PoolMetadata.open(area: f.area, poolId: f.poolId)] {
            for k in 0..<leaves {
                XCTAssertNotNil(try m.lookup(map: map, chunk: k * 508, limit: 1).poolChunk)
                let abandoned = try m.lookup(map: map, chunk: k * 508 + 1, limit: 1).poolChunk
                XCTAssertNil(abandoned, "leaf \(k): an edit of the failed commit came back")
                if abandoned != nil { break }
            }
            XCTAssertNotNil(try m.lookup(map: map, chunk: (leaves - 1) * 508 + 2, limit: 1).poolChunk)
            XCTAssertEqual(m.freeChunks, free)
        }
    }

    /// Two maps on interleaved pool chunks: releasing one leaves every space-map leaf
    /// alternating, more pages than the journal holds. In one transaction that is refused;
    /// a step at a time (how the domain deletes a map) it goes through, and the other map
    /// keeps every entry.
    func testAMapTooLargeToReleaseInOneCommitIsReleasedInSteps() async throws {
        let f = try MetaFixture("steps", pages: MetaLayout.sized(forChunks: 300_000).pageCount)
        let meta = try await formatted(f, chunks: 300_000, journalPages: 512)
        let (a, b) = (UUID(), UUID())
        try await meta.change { v throws(PageStore.Failure) in
            try v.createMap(a, chunks: 150_000)
            try v.createMap(b, chunks: 150_000)
        }
        for part in stride(from: UInt64(0), to: 150_000, by: 50_000) {
            try await meta.change { v throws(PageStore.Failure) in
                for i in part..<(part + 50_000) {
                    try v.map(a, at: i, to: try v.allocate(1)) // pool chunk 2i
                    try v.map(b, at: i, to: try v.allocate(1)) // pool chunk 2i+1
                }
            }
        }
        do {
            try await meta.change { v throws(PageStore.Failure) in try v.deleteMap(a) }
            XCTFail("releasing the map in one commit should not fit the journal")
        } catch {
            XCTAssertTrue("\(error)".contains("does not fit the"), "\(error)")
        }
        XCTAssertTrue(meta.hasMap(a))
        var steps = 0
        while try await !meta.change({ v throws(PageStore.Failure) -> Bool in try v.deleteMapStep(a, pageBudget: meta.stepPageBudget) }) {
            steps += 1
        }
        XCTAssertGreaterThan(steps, 1)
        for m in [meta, try await PoolMetadata.open(area: f.area, poolId: f.poolId)] {
            XCTAssertFalse(m.hasMap(a))
            XCTAssertEqual(try m.awaitingZeroing(limit: .max).reduce(0) { $0 + $1.count }, 150_000)
            for i in stride(from: UInt64(0), to: 150_000, by: 7919) {
                XCTAssertEqual(try m.lookup(map: b, chunk: i, limit: 1).poolChunk, 2 * i + 1)
            }
        }
    }

    func testATransactionTooLargeForTheJournalIsRefusedAndChangesNothing() async throws {
        let f = try MetaFixture("big", pages: MetaLayout.sized(forChunks: 600_000).pageCount)
        let meta = try await formatted(f, chunks: 600_000, journalPages: 512)
        let map = UUID()
        try await meta.change { v throws(PageStore.Failure) in try v.createMap(map, chunks: 600_000) }
        let free = meta.freeChunks
        do {
            // Every other chunk: one leaf per 508 chunks, far more pages than the journal holds.
            try await meta.change { v throws(PageStore.Failure) in
                for i in stride(from: UInt64(0), to: 600_000, by: 2) { try v.map(map, at: i, to: try v.allocate(1)) }
            }
            XCTFail("an oversized transaction was committed")
        } catch {
            XCTAssertTrue("\(error)".contains("does not fit the"), "\(error)")
        }
        XCTAssertEqual(meta.freeChunks, free)
        XCTAssertNil(try meta.lookup(map: map, chunk: 0, limit: 1).poolChunk)
        let reopened = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        XCTAssertEqual(reopened.freeChunks, free)
    }
}

/// Counts the calls of a fault hook (it runs on the engine's tasks).
final class WriteCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var calls = 0
    var count: Int { lock.withLock { calls } }
    /// The number of calls before this one.
    func next() -> Int { lock.withLock { calls += 1; return calls - 1 } }
}
