import Foundation
import XCTest

/// The async mirror over a shaped WAN link (two network namespaces, veth, `tc tbf` at
/// 100 Mbit/s): the link is cut in the middle of a cycle for longer than the link's
/// silence timeout, so both sides drop the connection. While it is down the destination
/// still reads as its last complete PiT (polled); when it is back the cycle resumes from
/// the last answered block, and the destination reaches the source's newest PiT.
final class AsyncLinkTests: TwoSitesTestCase {
    private var link: ShapedLink?

    override func setUpWithError() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy"), FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-io") else {
            throw XCTSkip("needs nbdcopy (libnbd-bin) and qemu-io (qemu-utils)")
        }
        var why = ""
        guard let link = ShapedLink(rate: "100mbit", why: &why) else { throw XCTSkip(why) }
        self.link = link
        try super.setUpWithError()
        try startSites(profiles: try customProfiles(in: dir, ["links/test-wan.yaml": "bandwidth: 100Mbit/s\nrtt: 1ms\npit_cycle: 1s\n"]),
                       link: link)
        for site in ["site-a", "site-b"] {
            try ok(site, ["pool", "create", "p", "--array-profile", "file-backed", "--lun", dir.file(site + ".img"), "--create-size", "200M"])
        }
        try addPeer(on: "site-a", "site-b", linkProfile: "test-wan")
        try addPeer(on: "site-b", "site-a", linkProfile: "test-wan")
        try waitFor("site-a", "site-b", "the link up") { $0["outbound"] as? String == "connected" }
    }

    override func tearDown() {
        super.tearDown()
        link?.remove()
    }

    private func write(_ command: String) {
        XCTAssertTrue(ShapedLink.run(["qemu-io", "-f", "raw", "-c", command, "nbd+unix:///v?socket=\(dir.file("site-a"))/nbd.sock"]), command)
    }

    /// The next confirmed cycle after `after` (the task paused there), its PiT.
    private func confirmed(after: Int, seconds: Int) throws -> String {
        for _ in 0..<(seconds * 10) {
            let g = try asyncGroup("site-a", "g")
            if let c = g["cycle"] as? Int, c > after, g["confirmedPiT"] is String {
                try ok("site-a", ["async", "pause-task", "g"])
                usleep(1_500_000)
                return try XCTUnwrap(try asyncGroup("site-a", "g")["confirmedPiT"] as? String)
            }
            usleep(100_000)
        }
        XCTFail("no cycle after \(after) within \(seconds) s: \(try asyncGroup("site-a", "g"))")
        return ""
    }

    func testALinkCutMidCycleResumesAndTheDestinationAlwaysEqualsASourcePiT() throws {
        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "64M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        write("write -P 0x61 0 8M")
        try ok("site-a", ["async", "create-group", "g", "--source", "v", "--peer", "site-b"])
        let first = try confirmed(after: 0, seconds: 20)
        let image = try pitMD5("site-b", first)
        XCTAssertEqual(image, try pitMD5("site-a", first))
        let cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        let before = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)

        // 40 MiB more (about 3.4 s at 100 Mbit/s); cut the link a second into the cycle,
        // for longer than the 15 s silence timeout, polling the destination meanwhile.
        write("write -P 0x62 16M 40M")
        try ok("site-a", ["async", "continue-task", "g"])
        usleep(1_000_000)
        link?.cut(true)
        let cutAt = Date()
        var polls = 0
        while Date().timeIntervalSince(cutAt) < 18 {
            let g = try asyncGroup("site-b", "g")
            XCTAssertEqual(g["confirmedPiT"] as? String, first, "the destination's last complete PiT during the outage")
            XCTAssertEqual(try pitMD5("site-b", first), image, "the destination reads as its last complete PiT")
            polls += 1
            usleep(2_000_000)
        }
        XCTAssertGreaterThan(polls, 3)
        link?.cut(false)
        let newest = try confirmed(after: cycle, seconds: 60)
        XCTAssertEqual(try pitMD5("site-b", newest), try pitMD5("site-a", newest), "the destination reached the source's newest PiT")
        XCTAssertEqual(try pitMD5("site-b", newest), try md5("site-a", "v"))
        XCTAssertTrue(log("site-a").contains("resumed at"), "the cycle resumed from the last answered block:\n\(log("site-a"))")
        let after = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        XCTAssertLessThan(after - before, 44 << 20, "40 MiB changed; a restarted cycle would have read it again (\(after - before) bytes)")
    }
}
