import Foundation
import XCTest

/// `pool check`: the space accounting and labels of a pool, clean or each problem named.
extension DaemonTests {
    func testPoolCheckIsCleanThenNamesADoubleMappingAndAMissingLUN() throws {
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
        // Map v2's extent 1 onto v1's first extent, behind the daemon's back (domain.json holds the catalog).
        let path = state + "/domain.json"
        var root = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
        var vdisks = try XCTUnwrap(root["vdisks"] as? [[String: Any]])
        let v1First = try XCTUnwrap(((vdisks[0]["legs"] as? [[String: Any]])?[0]["extents"] as? [Any])?[0])
        var legs = try XCTUnwrap(vdisks[1]["legs"] as? [[String: Any]])
        var extents = try XCTUnwrap(legs[0]["extents"] as? [Any])
        extents[1] = v1First
        legs[0]["extents"] = extents
        vdisks[1]["legs"] = legs
        root["vdisks"] = vdisks
        try JSONSerialization.data(withJSONObject: root).write(to: URL(fileURLWithPath: path))
        try FileManager.default.removeItem(atPath: dir.file("c.img"))
        try startDaemon()
        let r = try ctl(["pool", "check", "a"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.hasPrefix("svsp-ctl: pool 'a' check found 1 problem(s)"), r.stderr)
        XCTAssertTrue(r.stdout.contains("mapped twice: by vdisk 'v1' leg 0 extent 0 and by vdisk 'v2' leg 0 extent 1"), r.stdout)
        let missing = try ctl(["pool", "check", "c"])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stdout.contains("c.img is missing"), missing.stdout)
        try fails(["pool", "check", "nope"], "pool 'nope' not found")
    }
}
