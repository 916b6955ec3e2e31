@testable import Controller
import Foundation
import IOEngine
import XCTest

/// PiTs on a sync mirror: every leg's map shares the same way; a leg that fails misses
/// the writes, and the resync that catches it up redirects its copies away from the
/// PiT's extents too, so the PiT reads the same through either leg; a split keeps the
/// PiT on the mirror (and its snapshots work).
final class PiTMirrorTests: XCTestCase {
    private var dir: String!
    private let size = 2 << 20

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "svsp-pitm-\(UUID().uuidString.prefix(6))"
        _ = try Domain.initialize(directory: dir, name: "t")
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private func fill(_ buffer: borrowing AlignedBuffer, seed: UInt64, count: Int) {
        let w = buffer.pointer.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(count / 8) { w[i] = (UInt64(i) ^ seed) &* 0x9E37_79B9_7F4A_7C15 }
    }

    func testAPiTSurvivesALegFailureTheResyncAndASplit() async throws {
        let domain = try await Domain.open(directory: dir, profiles: try ProfileCatalog(root: ProfileTests.shippedRoot))
        for (pool, lun) in [("p", "p.img"), ("q", "q.img")] {
            _ = try await domain.createPool(name: pool, arrayProfile: "sata-ssd", poolProfile: nil,
                                            lunPaths: [dir + "/" + lun], createBytes: 112 << 20, force: false)
        }
        _ = try await domain.createVDisk(name: "m", poolName: "p", mirrorPools: ["q"], sizeBytes: UInt64(size), blockSize: 4096, thin: false)
        let a = try AlignedBuffer(count: size), b = try AlignedBuffer(count: size), back = try AlignedBuffer(count: size)
        fill(a, seed: 1, count: size)
        try await domain.write(vdisk: "m", offset: 0, length: size, from: a.pointer)
        _ = try await domain.createPiT(vdisk: "m", as: "before")
        let legs = try XCTUnwrap(domain.metadata.vdisk(named: "m")?.legs)
        try await domain.markLegsFailed(vdisk: "m", legs: [legs[1].id])
        // Writes while leg q is failed: 4 KiB into some extents, whole extents into others.
        fill(b, seed: 2, count: size)
        var expected = Array(UnsafeRawBufferPointer(start: a.pointer, count: size))
        for (offset, length) in [(4096, 4096), (200_704, 65536), (1 << 20, 131_072), (size - 8192, 8192)] {
            try await domain.write(vdisk: "m", offset: UInt64(offset), length: length, from: b.pointer + offset)
            expected.replaceSubrange(offset..<(offset + length), with: UnsafeRawBufferPointer(start: b.pointer + offset, count: length))
        }
        _ = try await domain.mirrors.resync(vdisk: "m")
        XCTAssertEqual(domain.metadata.vdisk(named: "m")?.mirrorState, "normal")
        for leg in legs {
            try await domain.legIO(.read, vdisk: "m", leg: leg.id, offset: 0, length: size, buffer: back.pointer)
            XCTAssertEqual(memcmp(back.pointer, expected, size), 0, "leg in pool \(domain.metadata.pool(id: leg.poolId)!.name) after the resync")
            try await domain.readPiT(named: "before", leg: leg.id, offset: 0, length: size, into: back.pointer)
            XCTAssertEqual(memcmp(back.pointer, a.pointer, size), 0, "the PiT through leg in pool \(domain.metadata.pool(id: leg.poolId)!.name)")
        }
        // A split: the PiT stays with the mirror's remaining leg, and a snapshot of it reads the PiT's image.
        try await domain.mirrors.split(vdisk: "m", leg: 1, as: "m2")
        XCTAssertNotNil(domain.metadata.pit(named: "before"))
        _ = try await domain.createSnapshot(name: "s", of: "before", writable: false)
        try await domain.read(vdisk: "s", offset: 0, length: size, into: back.pointer)
        XCTAssertEqual(memcmp(back.pointer, a.pointer, size), 0, "the snapshot after the split")
        try await domain.read(vdisk: "m2", offset: 0, length: size, into: back.pointer)
        XCTAssertEqual(memcmp(back.pointer, expected, size), 0, "the split-off leg")
        do {
            try await domain.write(vdisk: "s", offset: 0, length: 4096, from: b.pointer)
            XCTFail("a read-only snapshot took a write")
        } catch {
            XCTAssertEqual(error.code, EROFS)
        }
        for pool in ["p", "q"] {
            let report = try await domain.checkPool(name: pool)
            XCTAssertTrue(report.clean, "pool \(pool): \(report.problems)")
        }
    }

    /// A PiT taken while a leg is failed holds the in-sync leg only; a rollback to it
    /// gives the other leg the PiT's image by copying it whole from the rolled-back leg.
    func testARollbackToAPiTTakenWhileALegWasFailedCopiesThatLegAfresh() async throws {
        let domain = try await Domain.open(directory: dir, profiles: try ProfileCatalog(root: ProfileTests.shippedRoot))
        for (pool, lun) in [("p", "p.img"), ("q", "q.img")] {
            _ = try await domain.createPool(name: pool, arrayProfile: "sata-ssd", poolProfile: nil,
                                            lunPaths: [dir + "/" + lun], createBytes: 112 << 20, force: false)
        }
        _ = try await domain.createVDisk(name: "m", poolName: "p", mirrorPools: ["q"], sizeBytes: UInt64(size), blockSize: 4096, thin: true)
        let a = try AlignedBuffer(count: size), b = try AlignedBuffer(count: size), back = try AlignedBuffer(count: size)
        fill(a, seed: 3, count: size)
        fill(b, seed: 4, count: size)
        try await domain.write(vdisk: "m", offset: 0, length: size, from: a.pointer)
        let legs = try XCTUnwrap(domain.metadata.vdisk(named: "m")?.legs)
        try await domain.markLegsFailed(vdisk: "m", legs: [legs[1].id])
        _ = try await domain.createPiT(vdisk: "m", as: "one-leg")
        XCTAssertEqual(domain.metadata.pit(named: "one-leg")?.maps.map(\.legId), [legs[0].id], "only the in-sync leg")
        _ = try await domain.mirrors.resync(vdisk: "m")
        try await domain.write(vdisk: "m", offset: 0, length: size, from: b.pointer)
        try await domain.rollback(vdisk: "m", to: "one-leg")
        for _ in 0..<500 where domain.metadata.vdisk(named: "m")?.mirrorState != "normal" { try await Task.sleep(nanoseconds: 10_000_000) }
        XCTAssertEqual(domain.metadata.vdisk(named: "m")?.mirrorState, "normal", "the leg the PiT lacked was copied")
        for leg in legs {
            try await domain.legIO(.read, vdisk: "m", leg: leg.id, offset: 0, length: size, buffer: back.pointer)
            XCTAssertEqual(memcmp(back.pointer, a.pointer, size), 0, "leg in pool \(domain.metadata.pool(id: leg.poolId)!.name) after the rollback")
        }
    }
}
