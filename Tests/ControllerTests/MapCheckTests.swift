import Controller
import Foundation
import IOEngine
import Synchronization
import XCTest

private final class DoneFlag: Sendable {
    let value = Atomic<Bool>(false)
}

/// `pool check` walks the block maps against the space map and reads every metadata page
/// back: faults injected behind the data path's back are each named.
final class MapCheckTests: XCTestCase {
    private var dir: String!
    private var domain: Domain!

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "svsp-check-\(UUID().uuidString.prefix(6))"
        _ = try Domain.initialize(directory: dir, name: "t")
        domain = try await Domain.open(directory: dir, profiles: try ProfileCatalog(root: ProfileTests.shippedRoot))
        _ = try await domain.createPool(name: "p", arrayProfile: "file-backed", poolProfile: nil,
                                        lunPaths: [dir + "/l0.img"], createBytes: 40 << 20, force: false)
        _ = try await domain.createVDisk(name: "v1", poolName: "p", sizeBytes: 4 << 20, blockSize: 4096, thin: false)
        _ = try await domain.createVDisk(name: "v2", poolName: "p", sizeBytes: 64 << 20, blockSize: 4096, thin: true)
        let buffer = try AlignedBuffer(count: 4096)
        memset(buffer.pointer, 0x3C, 4096)
        try await domain.write(vdisk: "v2", offset: 9 << 20, length: 4096, from: buffer.pointer, fua: true)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private func leg(_ name: String) throws -> UUID { try XCTUnwrap(domain.metadata.vdisk(named: name)?.legs[0].id) }

    /// A check is safe on a live pool: PiTs taken and deleted, writes redirected and maps
    /// released meanwhile never show as problems (it compares one committed state).
    func testChecksDuringPiTChurnStayClean() async throws {
        let domain = self.domain!
        let done = DoneFlag()
        let zeroer = Task { await domain.runZeroer { _ in } } // redirects and deletes free chunks the next ones reuse
        defer { zeroer.cancel() }
        let churn = Task {
            defer { done.value.store(true, ordering: .releasing) }
            let buffer = try AlignedBuffer(count: 1 << 20)
            memset(buffer.pointer, 0x5A, 1 << 20)
            for k in 0..<25 {
                _ = try await domain.createPiT(vdisk: "v1", as: "c\(k)")
                try await domain.write(vdisk: "v1", offset: UInt64(k % 4) << 20, length: 1 << 20, from: buffer.pointer)
                try await domain.write(vdisk: "v2", offset: UInt64(k % 6) << 20, length: 1 << 20, from: buffer.pointer)
                if k >= 2 { try await domain.deletePiT(named: "c\(k - 2)") }
            }
        }
        var checks = 0
        while !done.value.load(ordering: .acquiring) {
            let report = try await domain.checkPool(name: "p")
            XCTAssertEqual(report.problems, [], "check \(checks) during PiT churn")
            checks += 1
        }
        try await churn.value
        XCTAssertGreaterThan(checks, 10)
    }

    func testACleanPoolThenADoubleReferenceALeakAndADamagedPageAreNamed() async throws {
        let clean = try await domain.checkPool(name: "p")
        XCTAssertEqual(clean.problems, [])
        XCTAssertEqual(clean.mapped, 5, "4 thick chunks and 1 thin")
        let meta = try XCTUnwrap(domain.blockMaps(ofPool: "p"))
        let v1 = try leg("v1"), v2 = try leg("v2")
        let v1First = try XCTUnwrap(try meta.lookup(map: v1, chunk: 0, limit: 1).poolChunk)
        // A map entry pointing at another vdisk's chunk without counting it (the bug a share must never be).
        try await meta.change { v throws(PageStore.Failure) in try v.map(v2, at: 2, to: [v1First..<(v1First + 1)]) }
        // Chunks taken and mapped by nothing.
        let leaked = try await meta.change { v throws(PageStore.Failure) in try v.allocate(2) }
        let found = try await domain.checkPool(name: "p")
        XCTAssertEqual(found.problems, [
            "pool chunks \(v1First)..<\(v1First + 1): referenced 2 times, counted 1 (mapped twice without a share)",
            "pool chunks \(leaked[0]): counted 1, referenced 0 times (leaked)",
        ])
        // `--repair` gives the leaked chunks back (they await zeroing); the double reference
        // is damage a count cannot repair: it stays named.
        let reclaimed = try await domain.reclaimLeakedChunks(pool: "p")
        XCTAssertEqual(reclaimed, 2)
        let pool = try XCTUnwrap(domain.metadata.pool(named: "p"))
        XCTAssertEqual(domain.zeroingExtents(of: pool), 2)
        let repaired = try await domain.checkPool(name: "p")
        XCTAssertEqual(repaired.problems, ["pool chunks \(v1First)..<\(v1First + 1): referenced 2 times, counted 1 (mapped twice without a share)"])
        // A leaf of v2's map damaged on disk (after a checkpoint wrote it in place).
        try await meta.store.checkpoint()
        let page = try XCTUnwrap(try meta.treePages(v2).last)
        let area = try XCTUnwrap(pool.metadataArea)
        let at = pool.luns[area.lun].dataStartBytes + UInt64(area.firstExtent) * pool.extentBytes + UInt64(page) * 4096 + 100
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: pool.luns[area.lun].path))
        try h.seek(toOffset: at)
        try h.write(contentsOf: Data([0xDE, 0xAD]))
        try h.close()
        let damaged = try await domain.checkPool(name: "p")
        XCTAssertTrue(damaged.problems.contains("metadata page \(page): checksum mismatch"), "\(damaged.problems)")
    }
}
