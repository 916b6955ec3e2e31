@testable import Controller
import Foundation
import IOEngine
import XCTest

/// Retention: with `pit_retention: 3` in the pool profile, each new PiT retires standard
/// PiTs before user PiTs and older before newer, never one a mirror task holds; when
/// every candidate is held the new PiT is refused, saying why. Survivors keep their images.
final class PiTRetentionTests: XCTestCase {
    private var dir: String!

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "svsp-ret-\(UUID().uuidString.prefix(6))"
        _ = try Domain.initialize(directory: dir, name: "t")
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    func testStandardBeforeUserOlderBeforeNewerNeverAHeldOne() async throws {
        let profiles = dir + "/profiles"
        try FileManager.default.copyItem(atPath: ProfileTests.shippedRoot, toPath: profiles)
        let pool = profiles + "/pools/sata-ssd.yaml"
        try (try String(contentsOfFile: pool, encoding: .utf8) + "pit_retention: 3\n").write(toFile: pool, atomically: true, encoding: .utf8)
        let domain = try await Domain.open(directory: dir, profiles: try ProfileCatalog(root: profiles))
        _ = try await domain.createPool(name: "p", arrayProfile: "sata-ssd", poolProfile: nil, lunPaths: [dir + "/p.img"],
                                        createBytes: 112 << 20, force: false)
        _ = try await domain.createVDisk(name: "v", poolName: "p", sizeBytes: 1 << 20, blockSize: 4096, thin: false)
        let buffer = try AlignedBuffer(count: 4096)
        var marks: [String: UInt8] = [:]
        func take(_ name: String, _ kind: PiTKind = .user) async throws -> [String] {
            let mark = UInt8(marks.count + 1)
            memset(buffer.pointer, Int32(mark), 4096)
            try await domain.write(vdisk: "v", offset: 0, length: 4096, from: buffer.pointer)
            marks[name] = mark
            return try await domain.createPiT(vdisk: "v", as: name, kind: kind).retired
        }
        func names() -> [String] { domain.metadata.pitList.map(\.name) }

        do { let r = try await take("u1"); XCTAssertEqual(r, []) }
        do { let r = try await take("s1", .standard); XCTAssertEqual(r, []) }
        do { let r = try await take("u2"); XCTAssertEqual(r, []) }
        do { let r = try await take("u3"); XCTAssertEqual(r, ["s1"], "a standard PiT goes first") }
        do { let r = try await take("u4"); XCTAssertEqual(r, ["u1"], "then the oldest user PiT") }
        try await domain.holdPiT(named: "u2", for: "task-x")
        do { let r = try await take("u5"); XCTAssertEqual(r, ["u3"], "a held PiT stays") }
        XCTAssertEqual(names(), ["u2", "u4", "u5"])
        try await domain.holdPiT(named: "u4", for: "task-x")
        try await domain.holdPiT(named: "u5", for: "task-y")
        do {
            _ = try await take("u6")
            XCTFail("every candidate is held: the PiT must be refused")
        } catch {
            XCTAssertTrue("\(error)".contains("held by mirror tasks"), "\(error)")
        }
        do {
            try await domain.deletePiT(named: "u2")
            XCTFail("a held PiT cannot be deleted")
        } catch {
            XCTAssertTrue("\(error)".contains("held by mirror task 'task-x'"), "\(error)")
        }
        XCTAssertEqual(names(), ["u2", "u4", "u5"])
        for name in names() {
            try await domain.readPiT(named: name, offset: 0, length: 4096, into: buffer.pointer)
            XCTAssertEqual(buffer.bytes.first, marks[name], "PiT \(name) keeps its image")
        }
        for _ in 0..<100 where domain.blockMaps(ofPool: "p")!.mapIds.count > 4 { try await Task.sleep(nanoseconds: 10_000_000) }
        let report = try await domain.checkPool(name: "p")
        XCTAssertTrue(report.clean, "\(report.problems)")
        XCTAssertEqual(report.heldBack, 0, "retired PiTs' maps are released")
    }
}
