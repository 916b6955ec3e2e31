import Controller
import Foundation
import IOEngine
import XCTest

/// A block-map page damaged on disk: found by its checksum when the pool opens. A mirror
/// leg whose map is lost fails over and is rebuilt from the other leg; a vdisk with no
/// other leg answers EIO naming the page, never wrong data.
final class DamagedMapTests: XCTestCase {
    private var dir: String!
    private var profiles: ProfileCatalog!

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "svsp-damaged-\(UUID().uuidString.prefix(6))"
        _ = try Domain.initialize(directory: dir, name: "t")
        profiles = try ProfileCatalog(root: ProfileTests.shippedRoot)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private func pattern(_ p: UnsafeMutableRawPointer, _ n: Int, _ seed: UInt64) {
        let w = p.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(n / 8) { w[i] = (UInt64(i) ^ seed) &* 0x9E37_79B9_7F4A_7C15 }
    }

    /// Overwrites two bytes of a metadata page of pool `name` on its LUN.
    private func damage(page: UInt32, of name: String, in domain: Domain) throws {
        let pool = try XCTUnwrap(domain.metadata.pool(named: name))
        let area = try XCTUnwrap(pool.metadataArea)
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: pool.luns[area.lun].path))
        try h.seek(toOffset: pool.luns[area.lun].dataStartBytes + UInt64(area.firstExtent) * pool.extentBytes + UInt64(page) * 4096 + 64)
        try h.write(contentsOf: Data([0xBA, 0xD0]))
        try h.close()
    }

    func testALostMapFailsTheLegOverAndIsRebuiltWhileASingleLegVDiskAnswersEIONamingThePage() async throws {
        let first = try await Domain.open(directory: dir, profiles: profiles)
        for (name, lun) in [("p", "l0"), ("q", "l1")] {
            _ = try await first.createPool(name: name, arrayProfile: "file-backed", poolProfile: nil,
                                           lunPaths: [dir + "/\(lun).img"], createBytes: 48 << 20, force: false)
        }
        _ = try await first.createVDisk(name: "m", poolName: "p", mirrorPools: ["q"], sizeBytes: 16 << 20, blockSize: 4096, thin: true)
        _ = try await first.createVDisk(name: "s", poolName: "q", sizeBytes: 16 << 20, blockSize: 4096, thin: true)
        let buffer = try AlignedBuffer(count: 8192)
        let offsets: [UInt64] = [0, (3 << 20) + 4096, (7 << 20) + 8192, 12 << 20] // scattered: the maps need a page
        for (i, at) in offsets.enumerated() {
            for name in ["m", "s"] {
                pattern(buffer.pointer, 8192, UInt64(i) + (name == "m" ? 100 : 200))
                try await first.write(vdisk: name, offset: at, length: 8192, from: buffer.pointer, fua: true)
            }
        }
        let q = try XCTUnwrap(first.blockMaps(ofPool: "q"))
        try await q.store.checkpoint() // the pages are on disk in place, not only in the journal
        let mLeg = try XCTUnwrap(first.metadata.vdisk(named: "m")?.legs[1].id), sLeg = try XCTUnwrap(first.metadata.vdisk(named: "s")?.legs[0].id)
        let mPage = try XCTUnwrap(try q.treePages(mLeg).first), sPage = try XCTUnwrap(try q.treePages(sLeg).first)
        try damage(page: mPage, of: "q", in: first)
        try damage(page: sPage, of: "q", in: first)

        // The restart: pool q opens without the two maps.
        let domain = try await Domain.open(directory: dir, profiles: profiles)
        XCTAssertTrue(domain.problems.contains { $0.contains("metadata page \(mPage): checksum mismatch") }, "\(domain.problems)")
        XCTAssertEqual(domain.metadata.vdisk(named: "m")?.legs[1].state, .failed, "the leg whose map is lost fails over")
        for (i, at) in offsets.enumerated() {
            try await domain.read(vdisk: "m", offset: at, length: 8192, into: buffer.pointer)
            let expected = try AlignedBuffer(count: 8192)
            pattern(expected.pointer, 8192, UInt64(i) + 100)
            XCTAssertEqual(memcmp(buffer.pointer, expected.pointer, 8192), 0, "m at \(at), from the good leg")
        }
        // Rebuilt from the other leg: the resync started at open copies into the leg's new map.
        for _ in 0..<200 where domain.metadata.vdisk(named: "m")?.legs[1].state != .inSync { try await Task.sleep(nanoseconds: 50_000_000) }
        XCTAssertEqual(domain.metadata.vdisk(named: "m")?.legs[1].state, .inSync)
        let verify = try await domain.mirrors.verify(vdisk: "m", repair: false)
        XCTAssertEqual(verify.mismatchedBlocks, 0)
        XCTAssertGreaterThan(verify.blocksCompared, 0)

        // No other leg: EIO, and the reason names the page.
        do {
            try await domain.read(vdisk: "s", offset: 0, length: 4096, into: buffer.pointer)
            XCTFail("a read through a lost map returned data")
        } catch {
            XCTAssertTrue(domain.problems.contains { $0.contains("vdisk 's'") && $0.contains("metadata page \(sPage)") }, "\(domain.problems)")
        }
        let check = try await domain.checkPool(name: "q")
        XCTAssertTrue(check.problems.contains { $0.contains("vdisk 's' leg 0") && $0.contains("metadata page \(sPage)") }, "\(check.problems)")

        // The damaged pages stay out of reach: the rebuilt leg's new map took other pages,
        // so a restart still finds s's map lost, never reading another map's page as its own.
        for name in ["x1", "x2", "x3"] { // new maps, each with a page: free pages get taken
            _ = try await domain.createVDisk(name: name, poolName: "q", sizeBytes: 4 << 20, blockSize: 4096, thin: true)
            try await domain.write(vdisk: name, offset: 1 << 20, length: 8192, from: buffer.pointer, fua: true)
        }
        try await domain.blockMaps(ofPool: "q")?.store.checkpoint()
        let restarted = try await Domain.open(directory: dir, profiles: profiles)
        XCTAssertTrue(restarted.problems.contains { $0.contains("vdisk 's'") && $0.contains("metadata page \(sPage)") }, "\(restarted.problems)")
        do {
            try await restarted.read(vdisk: "s", offset: 0, length: 4096, into: buffer.pointer)
            XCTFail("s read through a page that is not its map's")
        } catch {}

        // What the lost maps held stays counted: leaked, never handed out. No count is
        // lowered while a lost map is still there (what it references is unknown)...
        XCTAssertTrue(check.problems.contains { $0.contains("(leaked)") }, "\(check.problems)")
        do {
            _ = try await restarted.reclaimLeakedChunks(pool: "q")
            XCTFail("leaks reclaimed while a map is lost")
        } catch {
            XCTAssertTrue(error.message.contains("is lost"), error.message)
        }
        // ...once the vdisk is deleted, its lost map's entry goes, and `--repair` gives the extents back.
        try await restarted.deleteVDisk(name: "s")
        for _ in 0..<200 where !(restarted.blockMaps(ofPool: "q")?.lostMapIds.isEmpty ?? false) { try await Task.sleep(nanoseconds: 10_000_000) }
        XCTAssertEqual(restarted.blockMaps(ofPool: "q")?.lostMapIds, [])
        let reclaimed = try await restarted.reclaimLeakedChunks(pool: "q")
        XCTAssertEqual(reclaimed, 8, "4 chunks of m's old leg-1 map and 4 of s's")
        let repaired = try await restarted.checkPool(name: "q")
        XCTAssertEqual(repaired.problems, [])
        let again = try await restarted.reclaimLeakedChunks(pool: "q")
        XCTAssertEqual(again, 0)
        for (i, at) in offsets.enumerated() { // m still reads back, from either leg
            try await restarted.read(vdisk: "m", offset: at, length: 8192, into: buffer.pointer)
            let expected = try AlignedBuffer(count: 8192)
            pattern(expected.pointer, 8192, UInt64(i) + 100)
            XCTAssertEqual(memcmp(buffer.pointer, expected.pointer, 8192), 0, "m at \(at) after the repair")
        }
    }

    /// A damaged space map leaves the pool unusable until `pool check --repair` builds a
    /// new one from the block maps: then every vdisk reads back, what no map references is
    /// zeroed before reuse, and the check is clean.
    func testADamagedSpaceMapIsRebuiltFromTheMapsByRepair() async throws {
        let first = try await Domain.open(directory: dir, profiles: profiles)
        _ = try await first.createPool(name: "q", arrayProfile: "file-backed", poolProfile: nil,
                                       lunPaths: [dir + "/l1.img"], createBytes: 48 << 20, force: false)
        _ = try await first.createVDisk(name: "thick", poolName: "q", sizeBytes: 4 << 20, blockSize: 4096, thin: false)
        _ = try await first.createVDisk(name: "s", poolName: "q", sizeBytes: 16 << 20, blockSize: 4096, thin: true)
        let buffer = try AlignedBuffer(count: 8192)
        let offsets: [UInt64] = [0, (3 << 20) + 4096, (7 << 20) + 8192, 12 << 20]
        for (i, at) in offsets.enumerated() {
            pattern(buffer.pointer, 8192, UInt64(i) + 300)
            try await first.write(vdisk: "s", offset: at, length: 8192, from: buffer.pointer, fua: true)
        }
        pattern(buffer.pointer, 8192, 999)
        try await first.write(vdisk: "thick", offset: 1 << 20, length: 8192, from: buffer.pointer, fua: true)
        try await first.deleteVDisk(name: "s") // then again: its extents await zeroing, a hole in the counts
        _ = try await first.createVDisk(name: "s", poolName: "q", sizeBytes: 16 << 20, blockSize: 4096, thin: true)
        for (i, at) in offsets.enumerated() {
            pattern(buffer.pointer, 8192, UInt64(i) + 300)
            try await first.write(vdisk: "s", offset: at, length: 8192, from: buffer.pointer, fua: true)
        }
        let q = try XCTUnwrap(first.blockMaps(ofPool: "q"))
        try await q.store.checkpoint()
        let spacePage = try XCTUnwrap(try q.spaceTreePages().last, "the space map needs a page for this test")
        try damage(page: spacePage, of: "q", in: first)

        let domain = try await Domain.open(directory: dir, profiles: profiles)
        XCTAssertNil(domain.blockMaps(ofPool: "q"))
        XCTAssertTrue(domain.problems.contains { $0.contains("pool 'q': block maps unusable") && $0.contains("metadata page \(spacePage)") },
                      "\(domain.problems)")
        do {
            try await domain.read(vdisk: "s", offset: 0, length: 8192, into: buffer.pointer)
            XCTFail("a read through a pool without its space map returned data")
        } catch {}

        let did = try await domain.repairPool(name: "q")
        XCTAssertTrue(did.hasPrefix("space map rebuilt from 2 block map(s)"), did)
        XCTAssertFalse(domain.problems.contains { $0.contains("pool 'q'") }, "\(domain.problems)")
        let expected = try AlignedBuffer(count: 8192)
        for (i, at) in offsets.enumerated() {
            try await domain.read(vdisk: "s", offset: at, length: 8192, into: buffer.pointer)
            pattern(expected.pointer, 8192, UInt64(i) + 300)
            XCTAssertEqual(memcmp(buffer.pointer, expected.pointer, 8192), 0, "s at \(at) after the rebuild")
        }
        try await domain.read(vdisk: "thick", offset: 1 << 20, length: 8192, into: buffer.pointer)
        pattern(expected.pointer, 8192, 999)
        XCTAssertEqual(memcmp(buffer.pointer, expected.pointer, 8192), 0, "thick after the rebuild")
        let check = try await domain.checkPool(name: "q")
        XCTAssertEqual(check.problems, [])
        XCTAssertEqual(check.mapped, 4 + 4, "4 thick chunks and 4 thin ones")
        XCTAssertEqual(check.free, 0, "every chunk no map references waits for the zeroer")
        // A new thin write after the zeroer ran lands in a zeroed extent.
        let zeroer = Task { await domain.runZeroer { _ in } }
        defer { zeroer.cancel() }
        for _ in 0..<200 where domain.zeroingExtents(of: try XCTUnwrap(domain.metadata.pool(named: "q"))) > 0 {
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        pattern(buffer.pointer, 8192, 777)
        try await domain.write(vdisk: "s", offset: 5 << 20, length: 8192, from: buffer.pointer, fua: true)
        try await domain.read(vdisk: "s", offset: (5 << 20) + 8192, length: 8192, into: buffer.pointer)
        XCTAssertTrue(UnsafeRawBufferPointer(start: buffer.pointer, count: 8192).allSatisfy { $0 == 0 }, "the rest of a new extent reads zeros")
        let after = try await domain.checkPool(name: "q")
        XCTAssertEqual(after.problems, [])
    }
}
