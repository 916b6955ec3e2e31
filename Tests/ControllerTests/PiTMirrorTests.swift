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

/// A PiT taken while a host write that fails a leg is in flight: the write must record
/// the leg failure (a catalog change) before it can finish, and the PiT waits for it to
/// finish; so the PiT must not hold the catalog lock while it waits (it did: a deadlock
/// that `scripts/torture --scenario pit --fault leg-fail` found as a `pit create` that never returned).
final class PiTDuringLegFailureTests: XCTestCase {
    private var dir: String!
    private let size = 2 << 20

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "svsp-pitf-\(UUID().uuidString.prefix(6))"
        _ = try Domain.initialize(directory: dir, name: "t")
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    /// Set when a task finished (a deadlocked one never sets it).
    private final class Finished: @unchecked Sendable {
        private let lock = NSLock()
        private var value: Error?? = nil
        func set(_ e: Error?) { lock.withLock { value = .some(e) } }
        var outcome: Error?? { lock.withLock { value } }
    }

    private func mirror() async throws -> Domain {
        // Every host write to pool q fails: the first one fails leg q.
        let plan = try JSONDecoder().decode(FaultPlan.self, from: Data(#"{"rules":[{"pool":"q","op":"write","class":"host"}]}"#.utf8))
        let domain = try await Domain.open(directory: dir, profiles: try ProfileCatalog(root: ProfileTests.shippedRoot), faultPlan: plan)
        for (pool, lun) in [("p", "p.img"), ("q", "q.img")] {
            _ = try await domain.createPool(name: pool, arrayProfile: "file-backed", poolProfile: nil,
                                            lunPaths: [dir + "/" + lun], createBytes: 64 << 20, force: false)
        }
        _ = try await domain.createVDisk(name: "m", poolName: "p", mirrorPools: ["q"], sizeBytes: UInt64(size), blockSize: 4096, thin: false)
        return domain
    }

    private func waitFor(_ f: Finished, _ what: String) async throws {
        for _ in 0..<200 where f.outcome == nil { try await Task.sleep(nanoseconds: 50_000_000) }
        guard let outcome = f.outcome else { return XCTFail("\(what) did not finish within 10 s (deadlock)") }
        if let error = outcome { XCTFail("\(what): \(error)") }
    }

    /// The PiT asks first, then the write fails its leg: the PiT's drain must let the
    /// write record the failure.
    func testAWriteFailingALegWhileAPiTDrainsFinishesAndSoDoesThePiT() async throws {
        let domain = try await mirror()
        let data = try AlignedBuffer(count: 4096)
        memset(data.pointer, 0x5A, 4096)
        let pitDone = Finished(), writeDone = Finished()
        await domain.mutation.acquire() // a command in progress holds the catalog
        Task {
            do { _ = try await domain.createPiT(vdisk: "m", as: "p1"); pitDone.set(nil) } catch { pitDone.set(error) }
        }
        try await Task.sleep(nanoseconds: 100_000_000)
        nonisolated(unsafe) let bytes = data.pointer
        Task {
            do { try await domain.write(vdisk: "m", offset: 0, length: 4096, from: bytes); writeDone.set(nil) } catch { writeDone.set(error) }
        }
        try await Task.sleep(nanoseconds: 100_000_000)
        domain.mutation.release()
        try await waitFor(pitDone, "pit create")
        try await waitFor(writeDone, "the host write")
        let back = try AlignedBuffer(count: 4096)
        try await domain.read(vdisk: "m", offset: 0, length: 4096, into: back.pointer)
        XCTAssertEqual(memcmp(back.pointer, data.pointer, 4096), 0)
    }

    /// The write fails its leg first (its failure waits for the catalog), then the PiT:
    /// the PiT's instant comes after the write landed, so it holds the in-sync leg only,
    /// with the write in it.
    func testAPiTWaitsForAWriteThatFailedALegAndLeavesThatLegOut() async throws {
        let domain = try await mirror()
        let data = try AlignedBuffer(count: 4096), back = try AlignedBuffer(count: 4096)
        memset(data.pointer, 0xA5, 4096)
        let pitDone = Finished(), writeDone = Finished()
        await domain.mutation.acquire()
        nonisolated(unsafe) let bytes = data.pointer
        Task {
            do { try await domain.write(vdisk: "m", offset: 8192, length: 4096, from: bytes); writeDone.set(nil) } catch { writeDone.set(error) }
        }
        try await Task.sleep(nanoseconds: 100_000_000)
        Task {
            do { _ = try await domain.createPiT(vdisk: "m", as: "p2"); pitDone.set(nil) } catch { pitDone.set(error) }
        }
        try await Task.sleep(nanoseconds: 100_000_000)
        domain.mutation.release()
        try await waitFor(writeDone, "the host write")
        try await waitFor(pitDone, "pit create")
        let pit = try XCTUnwrap(domain.metadata.pit(named: "p2"))
        let legs = try XCTUnwrap(domain.metadata.vdisk(named: "m")?.legs)
        XCTAssertEqual(pit.maps.map(\.legId), [legs[0].id], "the leg that failed before the instant is not in the PiT")
        try await domain.readPiT(named: "p2", leg: legs[0].id, offset: 8192, length: 4096, into: back.pointer)
        XCTAssertEqual(memcmp(back.pointer, data.pointer, 4096), 0, "the write acknowledged before the instant is in the PiT")
    }

    /// A rollback and a split of one vdisk at once: the rollback asks for the catalog
    /// first, the split closes the gate meanwhile. Both take the gate before the catalog
    /// now; the rollback took them the other way round and the two waited forever.
    func testARollbackAndASplitOfOneVDiskAtOnceBothFinish() async throws {
        let domain = try await mirror()
        _ = try await domain.createPiT(vdisk: "m", as: "r1")
        let rollbackDone = Finished(), splitDone = Finished()
        await domain.mutation.acquire() // a command in progress holds the catalog
        Task {
            do { try await domain.rollback(vdisk: "m", to: "r1"); rollbackDone.set(nil) } catch { rollbackDone.set(error) }
        }
        try await Task.sleep(nanoseconds: 100_000_000)
        Task {
            do { try await domain.mirrors.split(vdisk: "m", leg: 1, as: "m2"); splitDone.set(nil) } catch { splitDone.set(error) }
        }
        try await Task.sleep(nanoseconds: 100_000_000)
        domain.mutation.release()
        try await waitFor(rollbackDone, "the rollback")
        try await waitFor(splitDone, "the split")
        XCTAssertNotNil(domain.metadata.vdisk(named: "m2"))
    }
}
