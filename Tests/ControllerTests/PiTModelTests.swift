@testable import Controller
import Foundation
import IOEngine
import XCTest

/// PiTs, snapshots and rollbacks against an in-memory model: seeded sequences of writes,
/// trims, PiT create/delete/rollback and snapshot create/write/delete on a thin vdisk
/// and a thick 2-leg mirror (64 KiB extents, so writes land in shared and private chunks
/// alike), every image checked byte for byte after every step (each mirror leg, each
/// PiT through each leg's map, each snapshot) and again after restarts; `pool check`
/// clean at the end. SVSP_PIT_STEPS sets the step count (200 by default), SVSP_PIT_SEED
/// the first seed.
final class PiTModelTests: XCTestCase {
    private var dir: String!
    private let size = 1 << 20
    private let block = 4096

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "svsp-pit-\(UUID().uuidString.prefix(6))"
        _ = try Domain.initialize(directory: dir, name: "t")
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private func open() async throws -> Domain {
        try await Domain.open(directory: dir, profiles: try ProfileCatalog(root: ProfileTests.shippedRoot))
    }

    func testPiTsSnapshotsAndRollbacksMatchTheModel() async throws {
        let steps = Int(ProcessInfo.processInfo.environment["SVSP_PIT_STEPS"] ?? "") ?? 200
        let seed = UInt64(ProcessInfo.processInfo.environment["SVSP_PIT_SEED"] ?? "") ?? 20_261_127
        try await run(seed: seed, steps: steps)
    }

    private func run(seed: UInt64, steps: Int) async throws {
        var rng = Seeded(state: seed)
        var domain = try await open()
        for (pool, lun) in [("p", "p.img"), ("q", "q.img")] {
            _ = try await domain.createPool(name: pool, arrayProfile: "sata-ssd", poolProfile: nil,
                                            lunPaths: [dir + "/" + lun], createBytes: 112 << 20, force: false)
        }
        _ = try await domain.createVDisk(name: "a", poolName: "p", sizeBytes: UInt64(size), blockSize: block, thin: true)
        _ = try await domain.createVDisk(name: "m", poolName: "p", mirrorPools: ["q"], sizeBytes: UInt64(size), blockSize: block, thin: false)
        // The model: every image by name (vdisks, PiTs, snapshots), and which vdisk each PiT is of.
        // The zeroer runs as in the daemon: redirects and deletes free chunks that later ones reuse.
        var zeroer = startZeroer(domain)
        var images: [String: [UInt8]] = ["a": Array(repeating: 0, count: size), "m": Array(repeating: 0, count: size)]
        var pits: [(name: String, vdisk: String)] = []
        var snapshots: [(name: String, writable: Bool)] = []
        var made = 0
        var counts: [String: Int] = [:]
        let buffer = try AlignedBuffer(count: size)

        func writableTargets() -> [String] { ["a", "m"] + snapshots.filter(\.writable).map(\.name) }

        for step in 0..<steps {
            let roll = Int.random(in: 0..<100, using: &rng)
            var what = ""
            if step % 40 == 39 { // a restart at least every 40 steps besides the random ones
                try await settle(domain)
                await stop(zeroer, domain)
                domain = try await open()
                zeroer = startZeroer(domain)
                what = "restart"
            } else if roll < 45 {
                let targets = writableTargets()
                let name = targets[Int.random(in: 0..<targets.count, using: &rng)]
                let first = Int.random(in: 0..<(size / block), using: &rng)
                let count = min(Int.random(in: 1...48, using: &rng), size / block - first)
                let offset = first * block, length = count * block
                let words = buffer.pointer.assumingMemoryBound(to: UInt64.self)
                for i in 0..<(length / 8) { words[i] = rng.next() }
                try await domain.write(vdisk: name, offset: UInt64(offset), length: length, from: buffer.pointer)
                images[name]!.replaceSubrange(offset..<(offset + length), with: UnsafeRawBufferPointer(start: buffer.pointer, count: length))
                what = "write \(name) \(offset)+\(length)"
            } else if roll < 53 {
                let name = ["a", "m"][Int.random(in: 0..<2, using: &rng)]
                let first = Int.random(in: 0..<(size / block), using: &rng)
                let count = min(Int.random(in: 1...64, using: &rng), size / block - first)
                try await domain.trim(vdisk: name, offset: UInt64(first * block), length: count * block)
                images[name]!.replaceSubrange((first * block)..<((first + count) * block), with: repeatElement(0, count: count * block))
                what = "trim \(name) \(first * block)+\(count * block)"
            } else if roll < 65, pits.count < 6 {
                let vdisk = ["a", "m"][Int.random(in: 0..<2, using: &rng)]
                made += 1
                let name = "\(vdisk)-pit\(made)"
                _ = try await domain.createPiT(vdisk: vdisk, as: name)
                pits.append((name, vdisk))
                images[name] = images[vdisk]
                what = "pit create \(name)"
            } else if roll < 73, !pits.isEmpty {
                let (name, _) = pits.remove(at: Int.random(in: 0..<pits.count, using: &rng))
                try await domain.deletePiT(named: name)
                images[name] = nil
                what = "pit delete \(name)"
            } else if roll < 80, !pits.isEmpty {
                let (name, vdisk) = pits[Int.random(in: 0..<pits.count, using: &rng)]
                try await domain.rollback(vdisk: vdisk, to: name)
                images[vdisk] = images[name]
                what = "rollback \(vdisk) to \(name)"
            } else if roll < 88, !pits.isEmpty, snapshots.count < 3 {
                let (pit, _) = pits[Int.random(in: 0..<pits.count, using: &rng)]
                made += 1
                let name = "snap\(made)", writable = Bool.random(using: &rng)
                _ = try await domain.createSnapshot(name: name, of: pit, writable: writable)
                snapshots.append((name, writable))
                images[name] = images[pit]
                what = "snapshot create \(name) of \(pit)\(writable ? " writable" : "")"
            } else if roll < 93, !snapshots.isEmpty {
                let (name, _) = snapshots.remove(at: Int.random(in: 0..<snapshots.count, using: &rng))
                try await domain.deleteVDisk(name: name)
                images[name] = nil
                what = "snapshot delete \(name)"
            } else if step % 3 == 0 {
                try await settle(domain)
                await stop(zeroer, domain)
                domain = try await open()
                zeroer = startZeroer(domain)
                what = "restart"
            } else {
                continue
            }
            counts[String(what.split(separator: " ").prefix(what.hasPrefix("pit") || what.hasPrefix("snapshot") ? 2 : 1).joined(separator: " ")), default: 0] += 1
            try await check(domain, images, pits: pits.map(\.name), snapshots: snapshots.map(\.name), after: "step \(step) (seed \(seed)): \(what)")
        }
        print("PiT model, seed \(seed), \(steps) steps: " + counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        try await settle(domain)
        await stop(zeroer, domain)
        domain = try await open()
        defer { zeroer.cancel() }
        zeroer = startZeroer(domain)
        try await check(domain, images, pits: pits.map(\.name), snapshots: snapshots.map(\.name), after: "the final restart (seed \(seed))")
        for pool in ["p", "q"] {
            let report = try await domain.checkPool(name: pool)
            XCTAssertTrue(report.clean, "pool \(pool): \(report.problems)")
        }
    }

    /// Every image against the model: each leg of each vdisk, each PiT through each of its
    /// legs' maps, each snapshot.
    private func check(_ domain: Domain, _ images: [String: [UInt8]], pits: [String], snapshots: [String], after: String) async throws {
        let buffer = try AlignedBuffer(count: size)
        func compare(_ name: String, _ how: String) {
            let got = UnsafeRawBufferPointer(start: buffer.pointer, count: size)
            let want = images[name]!
            guard want.withUnsafeBytes({ memcmp($0.baseAddress!, buffer.pointer, size) }) != 0 else { return }
            if let i = (0..<size).first(where: { got[$0] != want[$0] }) {
                XCTFail("after \(after): \(how) differs from the model at byte \(i) (block \(i / block)): \(got[i]) != \(want[i])")
            }
        }
        for name in ["a", "m"] {
            let v = try XCTUnwrap(domain.metadata.vdisk(named: name))
            for leg in v.legs {
                try await domain.legIO(.read, vdisk: name, leg: leg.id, offset: 0, length: size, buffer: buffer.pointer)
                compare(name, "vdisk \(name) leg in pool \(domain.metadata.pool(id: leg.poolId)!.name)")
            }
        }
        for name in pits {
            let pit = try XCTUnwrap(domain.metadata.pit(named: name))
            XCTAssertTrue(pit.maps.allSatisfy(\.complete), name)
            for map in pit.maps {
                try await domain.readPiT(named: name, leg: map.legId, offset: 0, length: size, into: buffer.pointer)
                compare(name, "PiT \(name) in pool \(domain.metadata.pool(id: map.poolId)!.name)")
            }
        }
        // pit diff against the live vdisk: every byte that differs lies in a range it names.
        for name in pits {
            let pit = try XCTUnwrap(domain.metadata.pit(named: name))
            let vdisk = try XCTUnwrap(domain.metadata.vdisks.first { $0.id == pit.vdiskId }).name
            let d = try domain.differences(from: name, to: nil)
            var covered = [Bool](repeating: false, count: size / block)
            for r in d.ranges { for b in Int(r.offset) / block..<Int(r.offset + r.length) / block { covered[b] = true } }
            let (a, b) = (images[name]!, images[vdisk]!)
            a.withUnsafeBytes { pa in
                b.withUnsafeBytes { pb in
                    if let k = (0..<(size / block)).first(where: { !covered[$0] && memcmp(pa.baseAddress! + $0 * block, pb.baseAddress! + $0 * block, block) != 0 }) {
                        XCTFail("after \(after): PiT \(name) and vdisk \(vdisk) differ in block \(k), outside every range pit diff names")
                    }
                }
            }
        }
        for name in snapshots {
            try await domain.read(vdisk: name, offset: 0, length: size, into: buffer.pointer)
            compare(name, "snapshot \(name)")
        }
        XCTAssertEqual(Set(domain.metadata.pitList.map(\.name)), Set(pits), after)
    }

    private func startZeroer(_ domain: Domain) -> Task<Void, Never> { Task { await domain.runZeroer { _ in } } }

    /// Stops a zeroer (it finishes its batch first), so nothing of the old open writes after a restart.
    private func stop(_ zeroer: Task<Void, Never>, _ domain: Domain) async {
        zeroer.cancel()
        domain.zeroingWork.signal()
        await zeroer.value
    }

    /// Waits until the background deletes are done (every map a PiT or leg names, no
    /// other), so a new open of the same folder is a clean restart.
    private func settle(_ domain: Domain) async throws {
        for _ in 0..<500 {
            let m = domain.metadata
            let busy = m.pools.contains { pool in
                let named = Set(m.vdisks.flatMap(\.legs).filter { $0.poolId == pool.id }.map(\.id)).union(m.pitMapIds(in: pool.id))
                return domain.poolMeta(pool.id).map { !Set($0.mapIds).isSubset(of: named) } ?? false
            }
            if !busy { return }
            try await Task.sleep(nanoseconds: 10_000_000)
        }
        XCTFail("background deletes did not finish")
    }
}
