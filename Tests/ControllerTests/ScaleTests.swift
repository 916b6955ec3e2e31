import Controller
import Foundation
import IOEngine
import XCTest

/// The volume layer at the scale it is for, through the domain and its data path: a pool
/// on a sparse 8 TiB LUN file (64 KiB extents, the SSD profile). Costs are counted in
/// metadata bytes written, never in time: a 4 TiB vdisk costs at most twice a 1 GiB one.
final class ScaleTests: XCTestCase {
    private var dir: String!

    override func setUp() { dir = NSTemporaryDirectory() + "svsp-scale-\(UUID().uuidString.prefix(6))" }
    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func testAFourTiBVDiskCostsNoMoreThanTwiceAOneGiBVDisk() async throws {
        _ = try Domain.initialize(directory: dir, name: "scale")
        let lun = dir + "/big.img"
        XCTAssertTrue(FileManager.default.createFile(atPath: lun, contents: nil))
        XCTAssertEqual(truncate(lun, off_t(8) << 40), 0, "a sparse 8 TiB file")
        let domain = try await Domain.open(directory: dir, profiles: try ProfileCatalog(root: ProfileTests.shippedRoot))
        _ = try await domain.createPool(name: "big", arrayProfile: "sata-ssd", poolProfile: nil, lunPaths: [lun], createBytes: nil, force: false)
        // A LUN svsp did not create starts out being zeroed; a sparse file's holes need no writes.
        let zeroer = Task { await domain.runZeroer { _ in } }
        defer { zeroer.cancel() }
        let pool = try XCTUnwrap(domain.metadata.pool(named: "big"))
        for _ in 0..<600 where domain.zeroingExtents(of: pool) > 0 { try await Task.sleep(nanoseconds: 100_000_000) }
        XCTAssertEqual(domain.zeroingExtents(of: pool), 0)
        let meta = try XCTUnwrap(domain.blockMaps(ofPool: "big"))

        func thick(_ name: String, _ bytes: UInt64) async throws -> Int {
            _ = try await domain.createVDisk(name: name, poolName: "big", sizeBytes: bytes, blockSize: 4096, thin: false)
            return meta.store.lastCommitBytes
        }
        func thinFirstWrites(_ name: String, _ bytes: UInt64, writes: Int) async throws -> Double {
            _ = try await domain.createVDisk(name: name, poolName: "big", sizeBytes: bytes, blockSize: 4096, thin: true)
            let buffer = try AlignedBuffer(count: 4096)
            memset(buffer.pointer, 0x5C, 4096)
            var chunks = Set<UInt64>()
            var rng = SystemRandomNumberGenerator()
            while chunks.count < writes { chunks.insert(UInt64.random(in: 0..<(bytes >> 16), using: &rng)) }
            let before = meta.store.area.bytesWritten
            for c in chunks { try await domain.write(vdisk: name, offset: c << 16, length: 4096, from: buffer.pointer, fua: true) }
            let v = try XCTUnwrap(domain.metadata.vdisk(named: name))
            XCTAssertEqual(domain.mappedChunks(of: v.legs[0]), UInt64(writes), "one extent mapped per first write")
            // A few read back.
            for c in chunks.prefix(5) {
                memset(buffer.pointer, 0, 4096)
                try await domain.read(vdisk: name, offset: c << 16, length: 4096, into: buffer.pointer)
                XCTAssertTrue(buffer.bytes.allSatisfy { $0 == 0x5C })
            }
            return Double(meta.store.area.bytesWritten - before) / Double(writes)
        }
        let thickSmall = try await thick("k1", 1 << 30), thickLarge = try await thick("k4", 4 << 40)
        let thinSmall = try await thinFirstWrites("t1", 1 << 30, writes: 10_000)
        let thinLarge = try await thinFirstWrites("t4", 4 << 40, writes: 10_000)
        print("domain scale: thick create 1 GiB \(thickSmall) B, 4 TiB \(thickLarge) B; thin first write 1 GiB \(thinSmall) B, 4 TiB \(thinLarge) B (journal + checkpoints)")
        XCTAssertLessThanOrEqual(thickLarge, 2 * thickSmall)
        XCTAssertLessThanOrEqual(thinLarge, 2 * thinSmall)
        // The catalog holds no extent lists: its record stays small whatever the vdisks' sizes.
        let record = try FileManager.default.attributesOfItem(atPath: dir + "/domain.json")[.size] as? Int ?? .max
        XCTAssertLessThan(record, 16 << 10, "the catalog record is \(record) bytes")
        let check = try await domain.checkPool(name: "big")
        XCTAssertEqual(check.problems, [])
    }
}
