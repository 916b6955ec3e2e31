import Foundation
import XCTest

/// One source group mirrored to two destinations (`async add-task`), three daemons over
/// real TCP: each task has its own cycles, so a cut link stops only its own task, which
/// catches up alone when the link is back.
final class AsyncTasksTests: TwoSitesTestCase {
    override func setUpWithError() throws {
        try super.setUpWithError()
        try requireNBDClients()
        try startLinkedSites(linkProfile: "bandwidth: 1Gbit/s\nrtt: 1ms\npit_cycle: 1s\n")
        XCTAssertEqual(try CLI.run(["domain", "init", "--dir", dir.file("site-c"), "--name", "site-c"]).status, 0)
        try start("site-c", port: "127.0.0.1:0")
        try ok("site-c", ["pool", "create", "p", "--array-profile", "file-backed", "--lun", dir.file("site-c.img"), "--create-size", "160M"])
        try addPeer(on: "site-a", "site-c", linkProfile: "test-fast")
        try addPeer(on: "site-c", "site-a", linkProfile: "test-fast")
        try waitFor("site-a", "site-c", "the link up") { $0["outbound"] as? String == "connected" }
    }

    /// Waits until `group` at site-a has a destination PiT taken at or after `since`; its cycle count then.
    @discardableResult
    private func caughtUp(_ group: String, since: Date, seconds: Int = 30) throws -> Int {
        for _ in 0..<(seconds * 10) {
            let g = try asyncGroup("site-a", group)
            if (g["recoveryPoint"] as? Double ?? 0) >= since.timeIntervalSince1970 { return g["cycle"] as? Int ?? 0 }
            usleep(100_000)
        }
        XCTFail("\(group) did not catch up: \(try asyncGroup("site-a", group))")
        return 0
    }

    /// Two destinations, one link cut: the other task keeps its cycles and its destination
    /// equals the source; the cut one catches up alone when its peer is back. A hand-over is
    /// refused while a further task mirrors the vdisks; delete-task ends that task at both ends.
    func testTwoDestinationsAndOneLinkCutTheOtherTaskKeepsItsCycles() throws {
        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "16M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0xa1 0 4M", uri("site-a", "v")])
        try ok("site-a", ["async", "create-group", "g", "--source", "v", "--peer", "site-b"])
        let added = try ok("site-a", ["async", "add-task", "g", "--peer", "site-c"])
        XCTAssertTrue(added.contains("task 'g.site-c'"), added)
        let taken = try CLI.run(["async", "add-task", "g", "--peer", "site-c", "--dir", dir.file("site-a")])
        XCTAssertTrue(taken.status != 0 && taken.stderr.contains("--task 'site-c'"), taken.stderr)
        let begun = Date()
        try caughtUp("g", since: begun)
        try caughtUp("g.site-c", since: begun)
        let listed = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok("site-a", ["async", "status", "g", "--json"]).utf8)) as? [[String: Any]])
        XCTAssertEqual(listed.map { $0["name"] as? String ?? "" }, ["g", "g.site-c"])

        let cPort = try address("site-c")
        daemons["site-c"]?.stop(signal: SIGKILL) // the link to site-c is cut
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0xa2 6M 1M", uri("site-a", "v")])
        let written = Date()
        let before = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        try caughtUp("g", since: written)
        usleep(2_500_000)
        let cycles = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int) - before
        XCTAssertGreaterThanOrEqual(cycles, 2, "the task to site-b kept cycling while site-c was away")
        XCTAssertLessThan(try asyncGroup("site-a", "g.site-c")["recoveryPoint"] as? Double ?? 0, written.timeIntervalSince1970)
        try ok("site-b", ["vdisk", "export", "v", "--read-only"])
        XCTAssertEqual(try md5("site-b", "v"), try md5("site-a", "v"))
        let handOver = try CLI.run(["async", "transfer-production", "g", "--yes", "--dir", dir.file("site-a")])
        XCTAssertTrue(handOver.status != 0 && handOver.stderr.contains("g.site-c"), handOver.stderr)

        try start("site-c", port: cPort)
        try caughtUp("g.site-c", since: written)
        try ok("site-c", ["vdisk", "export", "v", "--read-only"])
        XCTAssertEqual(try md5("site-c", "v"), try md5("site-a", "v"), "the cut task caught up alone")

        XCTAssertTrue(try ok("site-a", ["async", "delete-task", "g", "--task", "site-c"]).contains("the destination forgot it too"))
        XCTAssertEqual(try CLI.run(["async", "status", "g.site-c", "--dir", dir.file("site-c")]).status, 1, "site-c forgot the task")
        let left = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok("site-a", ["async", "status", "g", "--json"]).utf8)) as? [[String: Any]])
        XCTAssertEqual(left.map { $0["name"] as? String ?? "" }, ["g"])
        assertPoolsClean(["site-a", "site-b", "site-c"])
    }
}
