@testable import Controller
import Foundation
import IOEngine
import Synchronization
import XCTest

/// A group PiT is one instant for every member: a writer on A and a writer on B whose
/// every write carries the sequence number of the last write acknowledged on A (a
/// database's data file and log), group PiTs taken during the stream; in every PiT, no
/// B write refers to an A write that is missing.
final class VDGConsistencyTests: XCTestCase {
    private var dir: String!
    private let block = 4096
    private let writes = 1200

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "svsp-vdg-\(UUID().uuidString.prefix(6))"
        _ = try Domain.initialize(directory: dir, name: "t")
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func testNoPiTHoldsAWriteOnBThatDependsOnAnAWriteItLacks() async throws {
        let domain = try await Domain.open(directory: dir, profiles: try ProfileCatalog(root: ProfileTests.shippedRoot))
        for (pool, lun) in [("p", "p.img"), ("q", "q.img")] {
            _ = try await domain.createPool(name: pool, arrayProfile: "sata-ssd", poolProfile: nil,
                                            lunPaths: [dir + "/" + lun], createBytes: 112 << 20, force: false)
        }
        let size = UInt64((writes + 1) * block)
        _ = try await domain.createVDisk(name: "data", poolName: "p", sizeBytes: size, blockSize: block, thin: false)
        _ = try await domain.createVDisk(name: "log", poolName: "q", sizeBytes: size, blockSize: block, thin: true)
        _ = try await domain.createVDG(name: "db", members: ["data", "log"])
        let lastOnData = Box(), block = block, writes = writes
        let dataWriter = Task {
            let buffer = try AlignedBuffer(count: block)
            for n in 1...writes {
                let words = buffer.pointer.assumingMemoryBound(to: UInt64.self)
                for i in 0..<(block / 8) { words[i] = UInt64(n) }
                try await domain.write(vdisk: "data", offset: UInt64(n * block), length: block, from: buffer.pointer)
                lastOnData.value.store(n, ordering: .releasing) // acknowledged
            }
        }
        let logWriter = Task {
            let buffer = try AlignedBuffer(count: block)
            for m in 1...writes {
                let refers = lastOnData.value.load(ordering: .acquiring)
                let words = buffer.pointer.assumingMemoryBound(to: UInt64.self)
                for i in stride(from: 0, to: block / 8, by: 2) { words[i] = UInt64(m); words[i + 1] = UInt64(refers) }
                try await domain.write(vdisk: "log", offset: UInt64(m * block), length: block, from: buffer.pointer)
            }
        }
        var groupPiTs: [String] = []
        var longestHoldNs: UInt64 = 0
        for k in 0..<8 {
            try await Task.sleep(nanoseconds: 40_000_000)
            let made = try await domain.createGroupPiT(vdg: "db", as: "g\(k)")
            XCTAssertEqual(made.pits.map(\.name), ["g\(k).data", "g\(k).log"])
            longestHoldNs = max(longestHoldNs, made.holdNs)
            groupPiTs.append("g\(k)")
        }
        try await dataWriter.value
        try await logWriter.value
        print("VDG: longest hold for the switch \(String(format: "%.3f", Double(longestHoldNs) / 1e6)) ms over \(groupPiTs.count) group PiTs")
        let image = try AlignedBuffer(count: Int(size))
        var midStream = 0
        for g in groupPiTs {
            try await domain.readPiT(named: "\(g).data", offset: 0, length: Int(size), into: image.pointer)
            let data = image.pointer.assumingMemoryBound(to: UInt64.self)
            var present = Set<Int>()
            for n in 1...writes where data[n * block / 8] == UInt64(n) { present.insert(n) }
            try await domain.readPiT(named: "\(g).log", offset: 0, length: Int(size), into: image.pointer)
            let log = image.pointer.assumingMemoryBound(to: UInt64.self)
            var logged = 0
            for m in 1...writes where log[m * block / 8] == UInt64(m) {
                logged += 1
                let refers = Int(log[m * block / 8 + 1])
                if refers > 0, !present.contains(refers) {
                    XCTFail("group PiT \(g): log write \(m) refers to data write \(refers), which the PiT lacks")
                }
            }
            print("group PiT \(g): \(present.count) data writes, \(logged) log writes")
            if logged > 0, logged < writes, !present.isEmpty, present.count < writes { midStream += 1 }
        }
        XCTAssertGreaterThan(midStream, 2, "the group PiTs must fall inside the stream to test anything")
        // The members stay writable and their PiTs removable as one.
        try await domain.deletePiT(named: "g0")
        XCTAssertNil(domain.metadata.pit(named: "g0.data"))
        XCTAssertNil(domain.metadata.pit(named: "g0.log"))
    }
}

private final class Box: Sendable {
    let value = Atomic<Int>(0)
}
