import Foundation
import XCTest

/// A bad network between the sites, from a fault plan's `link_rules` at the destination:
/// received bytes corrupted below TLS, the connection dropped, reads held back. Every
/// cycle still arrives whole (TLS refuses a corrupted record, the link reconnects and the
/// cycle resumes), the destination equals the source PiT byte for byte, pools are clean.
final class LinkFaultTests: TwoSitesTestCase {
    /// Links the sites (1 Gbit/s, 1 s cycles), restarts site-b under the fault plan `json`,
    /// writes 12 MiB into a 48M thin vdisk `v` at site-a and creates group `g` of it; returns
    /// the PiT of its initial copy (task paused).
    private func initialCopy(underPlan json: String) throws -> String {
        try requireNBDClients()
        try startLinkedSites(linkProfile: "bandwidth: 1Gbit/s\nrtt: 1ms\npit_cycle: 1s\n")
        let plan = dir.file("link-plan.json")
        try json.write(toFile: plan, atomically: true, encoding: .utf8)
        try restart("site-b", kill: SIGTERM, port: try address("site-b"), extra: ["--fault-plan", plan])
        try waitFor("site-a", "site-b", "the link up again") { $0["outbound"] as? String == "connected" }

        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "48M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        _ = try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 6M", "-c", "write -P 0x5a 30M 6M", uri("site-a", "v")])
        try ok("site-a", ["async", "create-group", "g", "--source", "v", "--peer", "site-b"])
        return try nextCycle(after: 0, seconds: 120)
    }

    func testACorruptDroppingAndSlowLinkStillDeliversEveryCycleWhole() throws {
        var pit = try initialCopy(underPlan: #"""
        {"seed": 9, "link_rules": [
          {"action": "corrupt", "after_bytes": 200000, "probability": 0.05, "count": 3},
          {"action": "drop", "after_bytes": 1000000, "probability": 0.05, "count": 2},
          {"action": "delay", "delay_ms": 300, "probability": 0.02, "count": 4}]}
        """#)
        XCTAssertEqual(try pitMD5("site-b", pit), try pitMD5("site-a", pit), "the initial copy, through the faults")

        let cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        _ = try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x33 1M 4M", "-c", "write -P 0x44 40M 2M", uri("site-a", "v")])
        try ok("site-a", ["async", "continue-task", "g"])
        pit = try nextCycle(after: cycle, seconds: 120)
        XCTAssertEqual(try pitMD5("site-b", pit), try pitMD5("site-a", pit), "a later cycle, through the faults")
        XCTAssertEqual(try pitMD5("site-b", pit), try md5("site-a", "v"))

        let text = log("site-b")
        XCTAssertTrue(text.contains("fault plan: flipped bit"), text)
        XCTAssertTrue(text.contains("dropped after"), text)
        XCTAssertTrue(text.contains("held 300 ms"), text)
        XCTAssertTrue(log("site-a").contains("resumed at"), "a cut cycle resumes where the destination had it: \(log("site-a"))")
        assertPoolsClean()
    }

    /// A reorder across reconnects: the apply of a frame the destination took on a connection
    /// that is then cut waits (as behind a slow disk) while the source reconnects, resends and
    /// goes on; the same blocks are rewritten at the source and shipped in the next cycle.
    /// The old connection's frame must never be applied after that (the new connection waits
    /// for it; what the old one still queued is dropped): every destination PiT equals the
    /// source's, and so does a later one that does not rewrite those blocks.
    func testFramesOfACutConnectionAreNeverAppliedAfterTheNewConnectionsFrames() throws {
        var pit = try initialCopy(underPlan: #"{"seed": 5, "link_rules": [{"action": "reorder", "after_bytes": 3000000, "count": 1, "delay_ms": 9000}]}"#)
        XCTAssertEqual(try pitMD5("site-b", pit), try pitMD5("site-a", pit), "the initial copy, through the cut")
        XCTAssertTrue(log("site-b").contains("held 9000 ms behind the reconnect"), log("site-b"))

        // The blocks the held frames carry, rewritten and shipped (the frames may still wait).
        var cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        _ = try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 6M", "-c", "write -P 0x78 30M 6M", uri("site-a", "v")])
        try ok("site-a", ["async", "continue-task", "g"])
        pit = try nextCycle(after: cycle, seconds: 120)
        XCTAssertEqual(try pitMD5("site-b", pit), try pitMD5("site-a", pit), "the rewrite")

        // Past the hold: a cycle that leaves those blocks alone still finds them as the source has them.
        sleep(10)
        cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        _ = try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x99 44M 64k", uri("site-a", "v")])
        try ok("site-a", ["async", "continue-task", "g"])
        pit = try nextCycle(after: cycle, seconds: 120)
        XCTAssertEqual(try pitMD5("site-b", pit), try pitMD5("site-a", pit), "no frame of the cut connection applied late")
        XCTAssertEqual(try pitMD5("site-b", pit), try md5("site-a", "v"))
        assertPoolsClean()
    }
}
