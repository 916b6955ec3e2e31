@testable import Controller
import Foundation
import IOEngine
import XCTest

/// Block maps that share pages (a map cloned for a PiT): random edits of the original and
/// its clones against plain arrays, and after every commit the two invariants that keep
/// data safe: each page's reference count is the number of slots pointing at it, and each
/// pool chunk's count is the number of references to it (a shared page counted once).
final class SharedMapTests: XCTestCase {
    /// The map against its model, naming the first entry that differs (not the whole arrays).
    private func checkMap(_ meta: PoolMetadata, _ id: UUID, _ model: [UInt64?], _ what: String,
                          file: StaticString = #filePath, line: UInt = #line) throws {
        let got = try meta.entries(id, UInt64(model.count))
        if let i = got.indices.first(where: { got[$0] != model[$0] }) {
            XCTFail("\(what): entry \(i) is \(String(describing: got[i])), expected \(String(describing: model[i]))", file: file, line: line)
        }
    }

    /// `differences` against the models: exactly the entries where they differ.
    private func checkDifferences(_ meta: PoolMetadata, _ a: UUID, _ b: UUID, _ ma: [UInt64?], _ mb: [UInt64?], _ what: String,
                                  file: StaticString = #filePath, line: UInt = #line) throws {
        var expected: [Range<UInt64>] = []
        for i in ma.indices where ma[i] != mb[i] {
            if let last = expected.last, last.upperBound == UInt64(i) { expected[expected.count - 1] = last.lowerBound..<UInt64(i + 1) } else {
                expected.append(UInt64(i)..<UInt64(i + 1))
            }
        }
        XCTAssertEqual(try meta.differences(a, b).runs, expected, what, file: file, line: line)
    }

    /// A PiT of a 64 Mi-chunk map (4 TiB of 64 KiB chunks) with three chunks written since:
    /// the difference is those three, found by reading a handful of pages.
    func testDifferencesCostThePathsToWhatChangedNotTheMapSize() async throws {
        let chunks: UInt64 = 1 << 26
        let layout = MetaLayout.sized(forChunks: Int(chunks))
        let f = try MetaFixture("diff", pages: layout.pageCount)
        let meta = try await PoolMetadata.format(area: f.area, layout: layout, poolId: f.poolId, chunkCount: chunks, reserved: [])
        let live = UUID(), pit = UUID()
        try await meta.change { v throws(PageStore.Failure) in
            try v.createMap(live, chunks: chunks - 16)
            try v.map(live, at: 0, to: try v.allocate(chunks - 16)) // thick: one run
            try v.cloneMap(live, as: pit)
        }
        try await meta.change { v throws(PageStore.Failure) in
            for at: UInt64 in [7, 40_000_000, chunks - 17] {
                for r in try v.awaitingZeroing(limit: .max) { try v.markZeroed(r) }
                try v.unmap(live, at..<(at + 1))
            }
        }
        try await meta.change { v throws(PageStore.Failure) in
            for r in try v.awaitingZeroing(limit: .max) { try v.markZeroed(r) }
            for at: UInt64 in [7, 40_000_000, chunks - 17] { try v.map(live, at: at, to: try v.allocate(1)) }
        }
        let (runs, pagesRead) = try meta.differences(pit, live)
        XCTAssertEqual(runs, [7..<8, 40_000_000..<40_000_001, (chunks - 17)..<(chunks - 16)])
        XCTAssertLessThanOrEqual(pagesRead, 12, "three paths of a height-3 tree, not \(chunks / 508) leaves")
    }

    /// Page reference counts against the slots that point at pages, walking every tree.
    private func checkPageReferences(_ meta: PoolMetadata, file: StaticString = #filePath, line: UInt = #line) throws {
        var pointing: [UInt32: Int] = [:]
        var visited = Set<UInt32>()
        let ids = meta.mapIds + [PoolMetadata.spaceMapId]
        try meta.store.reading { pages throws(TreeError) in
            for id in ids {
                let tree = try meta.tree(id)
                var stack: [(UInt64, Int)] = [(tree.root, tree.height)]
                while let (slot, level) = stack.popLast() {
                    guard level > 0, let n = ChunkTree.childPage(slot) else { continue }
                    pointing[n, default: 0] += 1
                    guard visited.insert(n).inserted, level > 1, let page = pages.page(n) else { continue }
                    for s in page.slots { stack.append((s, level - 1)) }
                }
            }
        }
        for (n, count) in pointing {
            XCTAssertEqual(meta.store.referenceCount(n), count, "metadata page \(n)", file: file, line: line)
        }
    }

    /// Space-map counts against the references the maps hold.
    private func checkChunkCounts(_ meta: PoolMetadata, file: StaticString = #filePath, line: UInt = #line) throws {
        var events: [(at: UInt64, delta: Int)] = []
        for (_, r) in try meta.references(ofMaps: meta.mapIds) {
            events.append((r.lowerBound, 1))
            events.append((r.upperBound, -1))
        }
        let refs = PoolMetadata.referenceRuns(events, chunkCount: meta.chunkCount)
        var r = 0
        for (range, value) in try meta.spaceRuns() {
            var c = range.lowerBound
            while c < range.upperBound {
                while refs[r].0.upperBound <= c { r += 1 }
                let piece = c..<min(range.upperBound, refs[r].0.upperBound)
                let counted = value >= 1 && value < PoolMetadata.SpaceValue.awaitingZeroing ? Int(value) : 0
                XCTAssertEqual(counted, refs[r].1, "pool chunks \(piece): space map \(value)", file: file, line: line)
                c = piece.upperBound
            }
        }
    }

    func testClonedMapsShareTheirPagesAndAnEditCopiesOnlyItsPath() async throws {
        for seed: UInt64 in [1, 2] { try await clonesAndEdits(seed: seed) }
    }

    private func clonesAndEdits(seed: UInt64) async throws {
        let chunks: UInt64 = 200_000
        let f = try MetaFixture("shared", pages: MetaLayout.sized(forChunks: Int(chunks)).pageCount)
        let meta = try await PoolMetadata.format(area: f.area, layout: MetaLayout.sized(forChunks: Int(chunks)), poolId: f.poolId,
                                                 chunkCount: chunks, reserved: [])
        let count: UInt64 = 60_000 // height 2: leaves under one interior page
        let live = UUID()
        var models: [UUID: [UInt64?]] = [live: [UInt64?](repeating: nil, count: Int(count))]
        try await meta.change { v throws(PageStore.Failure) in
            try v.createMap(live, chunks: count)
            // Scattered single chunks and a long run: leaf pages and run slots.
            for i in stride(from: UInt64(0), to: count, by: 97) { try v.map(live, at: i, to: try v.allocate(1)) }
            try v.map(live, at: 30_000, to: try v.allocate(5_000))
        }
        models[live] = try meta.entries(live, count)
        var rng = Seeded(state: seed)
        var clones: [UUID] = []
        for round in 0..<40 {
            let op = round % 8
            if op == 0 || op == 5, clones.count < 4 { // a PiT: no page copied
                let source = ([live] + clones).randomElement(using: &rng)!, id = UUID()
                let pagesBefore = meta.store.freeTreePages
                try await meta.change { v throws(PageStore.Failure) in try v.cloneMap(source, as: id) }
                XCTAssertEqual(meta.store.freeTreePages, pagesBefore, "a clone takes no page")
                models[id] = models[source]
                clones.append(id)
            } else if op == 7, !clones.isEmpty { // a PiT deleted, a step at a time
                let id = clones.remove(at: Int.random(in: 0..<clones.count, using: &rng))
                while try await !meta.change({ v throws(PageStore.Failure) -> Bool in try v.deleteMapStep(id, pageBudget: 64) }) {}
                models[id] = nil
            } else { // a write (new chunks) or a trim, into the live map or a clone
                let id = ([live] + clones).randomElement(using: &rng)!
                let start = UInt64.random(in: 0..<count, using: &rng)
                let end = min(count, start + [1, 3, 508, 2_000][round % 4])
                let trim = round % 3 == 2
                let runs = try await meta.change { v throws(PageStore.Failure) -> [Range<UInt64>] in
                    for r in try v.awaitingZeroing(limit: .max) { try v.markZeroed(r) } // the zeroer's part
                    if trim { try v.unmap(id, start..<end); return [] }
                    let runs = try v.allocate(end - start)
                    try v.map(id, at: start, to: runs)
                    return runs
                }
                if trim { for i in Int(start)..<Int(end) { models[id]![i] = nil } }
                var at = Int(start)
                for r in runs { for p in r { models[id]![at] = p; at += 1 } }
            }
            for (id, model) in models { try checkMap(meta, id, model, "seed \(seed) round \(round): map \(id == live ? "live" : "clone")") }
            for clone in clones { try checkDifferences(meta, clone, live, models[clone]!, models[live]!, "seed \(seed) round \(round)") }
            try checkPageReferences(meta)
            try checkChunkCounts(meta)
        }
        // A restart derives the page counts from the trees: the same maps, counts and references.
        let reopened = try await PoolMetadata.open(area: f.area, poolId: f.poolId)
        for (id, model) in models { try checkMap(reopened, id, model, "after reopen") }
        try checkPageReferences(reopened)
        try checkChunkCounts(reopened)
        // Everything deleted: every chunk released, every tree page but the space map's free.
        for id in reopened.mapIds {
            while try await !reopened.change({ v throws(PageStore.Failure) -> Bool in try v.deleteMapStep(id, pageBudget: 64) }) {}
        }
        XCTAssertEqual(try reopened.spaceRuns().filter { $0.1 >= 1 && $0.1 < PoolMetadata.SpaceValue.awaitingZeroing }.count, 0)
        XCTAssertEqual(Int(reopened.store.layout.treePages) - reopened.store.freeTreePages, try reopened.spaceTreePages().count)
    }
}
