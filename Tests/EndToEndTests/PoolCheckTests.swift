import Foundation
import XCTest

/// `pool check`: the space accounting and labels of a pool, clean or each problem named
/// (maps against the space map: `PoolCheckTests` in ControllerTests).
extension DaemonTests {
    func testPoolCheckIsCleanThenNamesAMissingLUN() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "v1", "--pool", "a", "--size", "4M"])
        _ = try ok(["vdisk", "create", "v2", "--pool", "a", "--size", "4M", "--thin"])
        _ = try ok(["vdisk", "verify", "v2", "--size", "1M"]) // one thin extent mapped
        let clean = try ok(["pool", "check", "a"])
        XCTAssertTrue(clean.contains("5 mapped") && clean.hasSuffix("clean\n"), clean)
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok(["pool", "check", "a", "--json"]).utf8)) as? [String: Any])
        XCTAssertEqual(json["clean"] as? Bool, true)
        let repair = try ok(["pool", "check", "a", "--repair"])
        XCTAssertTrue(repair.hasPrefix("repair: 0 leaked extent(s) given back\n") && repair.hasSuffix("clean\n"), repair)
        stopDaemon()
        try FileManager.default.removeItem(atPath: dir.file("c.img"))
        try startDaemon()
        XCTAssertTrue(try ok(["pool", "check", "a"]).hasSuffix("clean\n"))
        let missing = try ctl(["pool", "check", "c"])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stdout.contains("c.img is missing"), missing.stdout)
        try fails(["pool", "check", "nope"], "pool 'nope' not found")
    }
}

extension DaemonTests {
    /// Pool metadata is checkpointed once quiet (and at a clean stop), so the journal a
    /// restart replays is empty; before, it held every commit since the journal last filled.
    func testQuietPoolMetadataIsCheckpointedAndAStopLeavesNoJournal() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "t", "--pool", "a", "--size", "8M", "--thin"])
        _ = try ok(["vdisk", "verify", "t", "--size", "4M"]) // four thin first writes: commits into the journal
        func journalPages() throws -> Int {
            let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok(["pool", "check", "a", "--json"]).utf8)) as? [String: Any])
            return try XCTUnwrap(json["journalPagesInUse"] as? Int)
        }
        var pages = try journalPages()
        let deadline = Date().addingTimeInterval(15)
        while pages > 0, Date() < deadline {
            Thread.sleep(forTimeInterval: 0.2)
            pages = try journalPages()
        }
        XCTAssertEqual(pages, 0, "a quiet pool's journal is checkpointed")
        _ = try ok(["vdisk", "create", "u", "--pool", "a", "--size", "4M"])
        stopDaemon()
        try startDaemon()
        XCTAssertEqual(try journalPages(), 0, "a clean stop leaves nothing to replay")
        XCTAssertTrue(try ok(["pool", "check", "a"]).hasSuffix("clean\n"))
    }
}
