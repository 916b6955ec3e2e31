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
