import Foundation
import XCTest

/// What a crash or a failed copy leaves must be reconciled, never forgotten: the add-leg
/// commit, the bitmap's geometry, a failed startup resync, a write that reached one leg.
extension DaemonTests {
    private func pattern(_ vdisk: String, _ phase: String, seed: Int, size: String) throws -> CLI.Result {
        try ctl(["vdisk", "verify", vdisk, "--phase", phase, "--seed", "\(seed)", "--size", size])
    }

    /// Overwrites `count` bytes of a LUN file at `offset` behind the daemon's back.
    private func scribble(_ file: String, at offset: Int, count: Int = 4096) {
        let fd = open(file, O_WRONLY)
        var junk = [UInt8](repeating: 0xEE, count: count)
        _ = pwrite(fd, &junk, count, off_t(offset))
        fsync(fd)
        close(fd)
    }

    private func waitForNormal(_ name: String) throws {
        var tries = 0
        while try mirror(name)["state"] as? String != "normal", tries < 200 { usleep(50_000); tries += 1 }
    }

    /// A record of the previous format (extent lists in the catalog, no block maps) as the
    /// add-leg commit left it, edited into domain.json while the daemon is down: the start
    /// converts it (maps made from the lists, every byte kept) and copies the new leg whole.
    func testAFormat2RecordCutAfterTheAddLegCommitIsConvertedAndCopiedWhole() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "g", "--pool", "a", "--size", "16M"])
        XCTAssertEqual(try pattern("g", "write", seed: 3, size: "16M").status, 0)
        stopDaemon()
        let path = state + "/domain.json"
        var root = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
        root["format"] = 2
        // Format 2 had no metadata areas: the extents (the first 16 of LUN 0) are listed instead.
        var pools = try XCTUnwrap(root["pools"] as? [[String: Any]])
        for i in pools.indices { pools[i]["metadataArea"] = nil }
        root["pools"] = pools
        let b = try XCTUnwrap(pools.first { $0["name"] as? String == "b" })
        var vdisks = try XCTUnwrap(root["vdisks"] as? [[String: Any]])
        var legs = try XCTUnwrap(vdisks[0]["legs"] as? [[String: Any]])
        legs[0]["extents"] = (0..<16).map { ["lun": 0, "extent": $0] }
        legs.append(["id": UUID().uuidString, "poolId": try XCTUnwrap(b["id"]), "state": "copying", "copyAll": true,
                     "extents": (0..<16).map { ["lun": 0, "extent": $0] }])
        vdisks[0]["legs"] = legs
        root["vdisks"] = vdisks
        try JSONSerialization.data(withJSONObject: root).write(to: URL(fileURLWithPath: path))
        try startDaemon()
        try waitForNormal("g")
        XCTAssertTrue(try ok(["mirror", "verify", "g"]).contains(" 0 differ"), "the new leg got every block")
        XCTAssertTrue(try legDataAreas(dir.file("a.img"), dir.file("b.img"), bytes: 16 << 20))
        XCTAssertEqual(try pattern("g", "read", seed: 3, size: "16M").status, 0, "every byte kept by the conversion")
        let converted = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
        XCTAssertEqual(converted["format"] as? Int, 3)
        XCTAssertFalse(String(decoding: try Data(contentsOf: URL(fileURLWithPath: path)), as: UTF8.self).contains("\"extents\""))
        for pool in ["a", "b", "c"] { XCTAssertTrue(try ok(["pool", "check", pool]).hasSuffix("clean\n")) }
    }

    /// The same with a real crash at that point (the daemon exits right after the commit).
    func testAnAddLegCutByACrashIsCopiedWholeAtTheNextStart() throws {
        try startDaemon(environment: ["SVSP_CRASH_AT": "add-leg-committed"])
        try makeThreePools()
        _ = try ok(["vdisk", "create", "g", "--pool", "a", "--size", "16M"])
        XCTAssertEqual(try pattern("g", "write", seed: 4, size: "16M").status, 0)
        let r = try ctl(["mirror", "add-leg", "g", "--pool", "b"])
        guard r.status == 1 else { return XCTFail("the daemon must die at the crash point") }
        daemon?.process.waitUntilExit()
        XCTAssertEqual(daemon?.process.terminationStatus, 137)
        daemon = nil
        try startDaemon()
        try waitForNormal("g")
        XCTAssertTrue(try ok(["mirror", "verify", "g"]).contains(" 0 differ"))
        XCTAssertTrue(try legDataAreas(dir.file("a.img"), dir.file("b.img"), bytes: 16 << 20))
    }

    /// Bits written with 4 MiB regions still name 4 MiB regions after the profile says 1 MiB.
    func testTheBitmapKeepsItsRegionSizeWhenTheProfileChanges() throws {
        let pool = try String(contentsOfFile: ServeProcess.profiles + "/pools/file-backed.yaml", encoding: .utf8)
        let profiles = try customProfiles(in: dir, ["pools/file-backed.yaml": pool.replacingOccurrences(of: "dirty_region_size: 1M", with: "dirty_region_size: 4M")])
        try startDaemon(profiles: profiles)
        try makeThreePools()
        _ = try ok(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "b", "--size", "32M"])
        XCTAssertEqual(try pattern("m", "write", seed: 5, size: "8M").status, 0)
        stopDaemon(signal: SIGKILL) // regions 0 and 1 (of 4 MiB) are dirty
        // A write that reached leg a but not leg b before the crash, at 5 MiB (region 1).
        scribble(dir.file("b.img"), at: (4 << 20) + (5 << 20))
        _ = try customProfiles(in: dir, [:]) // the shipped profile again: 1 MiB regions
        try startDaemon(profiles: profiles)
        try waitForNormal("m")
        XCTAssertTrue(try ok(["mirror", "verify", "m"]).contains(" 0 differ"), "the startup resync covered 0..8M")
        XCTAssertEqual(try pattern("m", "read", seed: 5, size: "8M").status, 0)
    }

    /// A startup resync that fails leaves its regions dirty until a copy succeeds.
    func testAFailedStartupResyncKeepsItsRegionsDirty() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "b", "--size", "16M"])
        XCTAssertEqual(try pattern("m", "write", seed: 6, size: "4M").status, 0)
        stopDaemon(signal: SIGKILL)
        scribble(dir.file("b.img"), at: (4 << 20) + (2 << 20)) // legs differ in a dirty region
        try FileManager.default.moveItem(atPath: dir.file("b.img"), toPath: dir.file("b.away"))
        try startDaemon() // leg b's LUN is missing: the startup resync fails
        usleep(3_000_000) // idle clean-up runs every second: it must leave those regions
        XCTAssertGreaterThan(try mirror("m")["dirtyRegionCount"] as? Int ?? 0, 0)
        stopDaemon()
        try FileManager.default.moveItem(atPath: dir.file("b.away"), toPath: dir.file("b.img"))
        try startDaemon()
        try waitForNormal("m")
        XCTAssertTrue(try ok(["mirror", "verify", "m"]).contains(" 0 differ"))
        XCTAssertEqual(try pattern("m", "read", seed: 6, size: "4M").status, 0)
    }

    /// Schedulers of 8 requests, and leg s's pool throttled: a burst of 1 MiB writes fills
    /// its queue (EBUSY) while leg a takes them. (Before, such a write reached one leg and
    /// failed; its regions were pinned dirty until reconciled.)
    func testWritesThatOverflowALegsSchedulerWaitForRoomAndReachEveryLeg() throws {
        let array = try String(contentsOfFile: ServeProcess.profiles + "/arrays/file-backed.yaml", encoding: .utf8)
        let pool = try String(contentsOfFile: ServeProcess.profiles + "/pools/file-backed.yaml", encoding: .utf8)
        let profiles = try customProfiles(in: dir, [
            // 4 KiB pieces at 5000 IOPS: a burst of 1 MiB writes fills its 1024 scheduler slots.
            "arrays/tiny-io.yaml": array.replacingOccurrences(of: "max_io_size: 1M", with: "max_io_size: 4k")
                .replacingOccurrences(of: "optimal_io_size: 64k", with: "optimal_io_size: 4k")
                .replacingOccurrences(of: "iops_limit: none", with: "iops_limit: 5000"),
            "pools/tiny-io.yaml": pool.replacingOccurrences(of: "array: file-backed", with: "array: tiny-io")
                .replacingOccurrences(of: "leg_retry_interval: 10s", with: "leg_retry_interval: 1s"),
            "pools/file-backed.yaml": pool.replacingOccurrences(of: "leg_retry_interval: 10s", with: "leg_retry_interval: 1s"),
        ])
        try startDaemon(profiles: profiles, environment: ["SVSP_SCHEDULER_CAPACITY": "8"])
        _ = try ok(["pool", "create", "a", "--array-profile", "file-backed", "--lun", dir.file("a.img"), "--create-size", "48M"])
        _ = try ok(["pool", "create", "s", "--array-profile", "tiny-io", "--lun", dir.file("s.img"), "--create-size", "48M"])
        _ = try ok(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "s", "--size", "32M"])
        _ = try ok(["vdisk", "export", "m"])
        let client = try NBDRawClient(socket: state + "/nbd.sock")
        _ = try client.handshake(export: "m")
        let payload = [UInt8](repeating: 0xA7, count: 1 << 20)
        for i in 0..<24 {
            client.send(NBDRawClient.request(type: 1, cookie: UInt64(i), offset: UInt64(i) << 20, length: 1 << 20) + payload)
        }
        // A full scheduler parks the pieces and sends them when completions make room: every
        // write is acknowledged, none reached only some legs.
        client.setReceiveTimeout(seconds: 60)
        for _ in 0..<24 {
            let reply = try XCTUnwrap(client.simpleReply(), "a reply for every write")
            XCTAssertEqual(reply.error, 0, "write \(reply.cookie)")
        }
        let st = try mirror("m")
        XCTAssertEqual(st["state"] as? String, "normal")
        XCTAssertEqual(st["partialWrites"] as? Int, 0, "no write reached only some legs")
        XCTAssertTrue(try ok(["mirror", "verify", "m"]).contains(" 0 differ"), "the legs agree in every region")
    }
}
