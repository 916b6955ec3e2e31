import Foundation
import XCTest

/// The setup vdisk's majority counts its configured copies, not the ones that opened.
extension DaemonTests {
    private func setupWithThreeCopies() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["domain", "setup-vdisk", "create", "--pool", "a", "--pool", "b", "--pool", "c"])
        _ = try ok(["vdisk", "create", "v1", "--pool", "a", "--size", "4M"])
        _ = try ok(["vdisk", "verify", "v1", "--phase", "write", "--seed", "9"])
    }

    func testTwoOfThreeSetupCopiesMissingOpensReadOnlyUntilTheyReturn() throws {
        try setupWithThreeCopies()
        let generation = try statusJSON()["generation"] as? Int ?? -1
        stopDaemon()
        for p in ["b", "c"] { try FileManager.default.moveItem(atPath: dir.file("\(p).img"), toPath: dir.file("\(p).away")) }
        try startDaemon()
        let status = try statusJSON()
        XCTAssertEqual(status["health"] as? String, "read-only")
        let why = try XCTUnwrap(status["readOnly"] as? String)
        XCTAssertTrue(why.contains("only 1 of 3") && why.contains("b, c") && why.contains("no change will be committed"), why)
        XCTAssertTrue(try ok(["status"]).contains("health: read-only"))
        // No change is accepted: the one copy left could be stale.
        try fails(["vdisk", "create", "v2", "--pool", "a", "--size", "4M"], "read-only")
        try fails(["vdisk", "delete", "v1"], "read-only")
        XCTAssertEqual(try statusJSON()["generation"] as? Int, generation)
        // Reads go on; writes are refused (the one copy's extent maps may be stale).
        XCTAssertTrue(try ok(["vdisk", "verify", "v1", "--phase", "read", "--seed", "9"]).contains("matched the pattern"))
        let write = try ctl(["vdisk", "verify", "v1"])
        XCTAssertEqual(write.status, 1)
        XCTAssertTrue(write.stderr.contains("Read-only") || write.stderr.contains("read-only"), write.stderr)
        // The copies come back: the next change finds the majority again and commits.
        for p in ["b", "c"] { try FileManager.default.moveItem(atPath: dir.file("\(p).away"), toPath: dir.file("\(p).img")) }
        _ = try ok(["vdisk", "create", "v2", "--pool", "a", "--size", "4M"])
        let after = try statusJSON()
        XCTAssertEqual(after["health"] as? String, "normal", "\(after["problems"] ?? "")")
        XCTAssertNil(after["readOnly"] as? String)
        stopDaemon()
        try startDaemon()
        XCTAssertEqual(vdiskNames(try statusJSON()), ["v1", "v2"])
    }

    func testOneOfThreeSetupCopiesMissingStillCommitsAtTwoOfThree() throws {
        try setupWithThreeCopies()
        stopDaemon()
        try FileManager.default.moveItem(atPath: dir.file("c.img"), toPath: dir.file("c.away"))
        try startDaemon()
        let status = try statusJSON()
        XCTAssertEqual(status["health"] as? String, "degraded")
        XCTAssertTrue((status["problems"] as? [String] ?? []).contains { $0.contains("pool 'c'") && $0.contains("missing") })
        _ = try ok(["vdisk", "create", "v2", "--pool", "a", "--size", "4M"])
        // The copy that missed the change comes back stale and is outvoted, then rewritten.
        stopDaemon()
        try FileManager.default.moveItem(atPath: dir.file("c.away"), toPath: dir.file("c.img"))
        try startDaemon()
        let back = try statusJSON()
        XCTAssertTrue((back["problems"] as? [String] ?? []).contains { $0.contains("pool 'c'") && $0.contains("stale") && $0.contains("rewritten") })
        XCTAssertEqual(vdiskNames(back), ["v1", "v2"])
    }

    /// A committed generation on two copies wins even when only one of them is readable
    /// beside a stale one (the old rule took the newest generation two copies shared).
    func testACommittedGenerationIsNeverLostToAStaleCopy() throws {
        try setupWithThreeCopies()
        stopDaemon()
        // c misses the next commit (kept away), which still commits on a and b.
        try FileManager.default.moveItem(atPath: dir.file("c.img"), toPath: dir.file("c.away"))
        try startDaemon()
        _ = try ok(["vdisk", "create", "v2", "--pool", "a", "--size", "4M"])
        stopDaemon()
        // Now b is gone and stale c is back: a (new) and c (old) are a majority of readable copies.
        try FileManager.default.moveItem(atPath: dir.file("c.away"), toPath: dir.file("c.img"))
        try FileManager.default.moveItem(atPath: dir.file("b.img"), toPath: dir.file("b.away"))
        try startDaemon()
        XCTAssertEqual(vdiskNames(try statusJSON()), ["v1", "v2"], "the acknowledged create of v2 survives")
    }
}
