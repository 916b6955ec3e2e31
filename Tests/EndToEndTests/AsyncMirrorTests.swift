import Foundation
import XCTest

/// Two daemons over real TCP: an async mirror group ships a vdisk to a peer in cycles.
/// After each cycle the destination's last complete PiT equals the source's PiT of the
/// same name, byte for byte (md5 of both read through read-only snapshots with nbdcopy);
/// the initial copy sends only allocated extents; the destination vdisk cannot be
/// exported while it is fed; deleting the group keeps the vdisks and PiTs on both sides.
final class AsyncMirrorTests: TwoSitesTestCase {
    override func setUpWithError() throws {
        try super.setUpWithError()
        try requireNBDClients()
        try startLinkedSites(linkProfile: "bandwidth: 1Gbit/s\nrtt: 1ms\npit_cycle: 1s\ncompression: 1\n")
    }

    func testCyclesMakeTheDestinationEqualToASourcePiTByteForByte() throws {
        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "48M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        _ = try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x5a 40M 1M", uri("site-a", "v")])
        let before = try XCTUnwrap(try status("site-a")["pools"] as? [[String: Any]])
        XCTAssertNotNil(before.first)
        try ok("site-a", ["async", "create-group", "g", "--source", "v", "--peer", "site-b"])

        // The initial copy: allocated extents only (4 of 48), and the images agree.
        var pit = try nextCycle(after: 0)
        XCTAssertEqual(try asyncGroup("site-b", "g")["confirmedPiT"] as? String, pit, "the destination's last complete PiT is the source's")
        XCTAssertEqual(try pitMD5("site-b", pit), try pitMD5("site-a", pit), "cycle \(pit)")
        XCTAssertEqual(try pitMD5("site-b", pit), try md5("site-a", "v"), "nothing was written since: the live source too")
        let shown = try XCTUnwrap((try status("site-a")["asyncGroups"] as? [[String: Any]])?.first)
        XCTAssertEqual(shown["confirmedPiT"] as? String, pit)
        XCTAssertNotNil(shown["recoveryPointAgeSeconds"] as? Double, "status shows the recovery point's age")
        XCTAssertTrue(try ok("site-b", ["status"]).contains("destination"), "status lists the group at the destination")
        let progress = try XCTUnwrap(try asyncGroup("site-a", "g")["progress"] as? [String: Any])
        XCTAssertLessThanOrEqual(progress["dataBytes"] as? Int ?? .max, 4 << 20, "only allocated extents travel: \(progress)")
        let view = try asyncGroup("site-a", "g")
        XCTAssertGreaterThan(view["throughputBytesPerSecond"] as? Double ?? 0, 0, "the link throughput is shown")
        XCTAssertGreaterThan(view["compressionRatio"] as? Double ?? 0, 10, "patterned blocks compress (compression: 1)")

        // Writes (one block three times), then the next cycles: still equal, and only the
        // 4 KiB blocks that changed travel, each once (not their 1 MiB extents).
        let cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        let sentBefore = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        _ = try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x33 1M 8k", "-c", "write -P 0x44 20M 4k", "-c", "write -P 0x45 20M 4k",
                                         "-c", "write -P 0x46 20M 4k", uri("site-a", "v")])
        try ok("site-a", ["async", "continue-task", "g"])
        pit = try nextCycle(after: cycle)
        XCTAssertEqual(try pitMD5("site-b", pit), try pitMD5("site-a", pit), "cycle \(pit)")
        XCTAssertEqual(try pitMD5("site-b", pit), try md5("site-a", "v"))
        let sentAfter = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        XCTAssertEqual(sentAfter - sentBefore, 3 * 4096, "three distinct blocks changed")

        // The destination vdisk is not exported while fed; the source's vdisk cannot be deleted from under the group.
        let export = try CLI.run(["vdisk", "export", "v", "--dir", dir.file("site-b")])
        XCTAssertTrue(export.status == 1 && export.stderr.contains("fed by async group 'g'"), export.stderr)
        try ok("site-a", ["vdisk", "unexport", "v"])
        let delete = try CLI.run(["vdisk", "delete", "v", "--dir", dir.file("site-a")])
        XCTAssertTrue(delete.status == 1 && delete.stderr.contains("async group 'g'"), delete.stderr)
        try ok("site-a", ["vdisk", "export", "v", "--read-only"])
        // A second group onto an existing destination is refused without --dest-existing.
        try ok("site-a", ["vdisk", "create", "w", "--pool", "p", "--size", "48M", "--thin"])
        let again = try CLI.run(["async", "create-group", "g2", "--source", "w", "--peer", "site-b", "--dest", "v", "--dir", dir.file("site-a")])
        XCTAssertTrue(again.status == 1 && again.stderr.contains("already exists at the destination"), again.stderr)

        // Deleting the group: both sides forget it; vdisks and the last PiT stay.
        try ok("site-a", ["async", "delete-group", "g"])
        for site in ["site-a", "site-b"] {
            XCTAssertTrue(try ok(site, ["async", "status"]).contains("no async groups"))
            XCTAssertTrue(try ok(site, ["pit", "list"]).contains(pit), site)
        }
        try ok("site-b", ["vdisk", "export", "v", "--read-only"])
        XCTAssertEqual(try md5("site-b", "v"), try md5("site-a", "v"))
    }

    func testACycleCutByEitherSideGoingAwayResumesOrRestartsAndTheDestinationStaysConsistent() throws {
        // A slow link (8 MiB/s) so the initial copy of 24 MiB is still running when the kill comes.
        let (sourcePort, destPort) = try relink("bandwidth: 64Mbit/s\nrtt: 1ms\npit_cycle: 1s\n")
        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "32M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        _ = try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x21 0 24M", uri("site-a", "v")])
        try ok("site-a", ["async", "create-group", "g", "--source", "v", "--peer", "site-b"])
        usleep(1_200_000)
        // The destination dies mid-apply: no cycle is complete there, and it says so. The
        // source goes on from the last answered block once it is back, not from the start.
        try restart("site-b", kill: SIGKILL, port: destPort)
        XCTAssertNil(try asyncGroup("site-b", "g")["confirmedPiT"] as? String, "no cycle was complete at the destination")
        var pit = try nextCycle(after: 0)
        XCTAssertEqual(try pitMD5("site-b", pit), try pitMD5("site-a", pit))
        XCTAssertEqual(try pitMD5("site-b", pit), try md5("site-a", "v"))
        let shipped = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        XCTAssertLessThan(shipped, 27 << 20, "resumed from the last answered block: \(shipped) bytes read for 24 MiB")
        XCTAssertTrue(log("site-a").contains("resumed at"), log("site-a"))

        // Then the source dies mid-cycle: after its restart the cycle starts over with the
        // PiT it took (held), and both sides end equal.
        let cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        _ = try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x37 4M 16M", uri("site-a", "v")])
        try ok("site-a", ["async", "continue-task", "g"])
        usleep(1_800_000)
        try restart("site-a", kill: SIGKILL, port: sourcePort)
        pit = try nextCycle(after: cycle)
        XCTAssertEqual(try pitMD5("site-b", pit), try pitMD5("site-a", pit))
        XCTAssertEqual(try pitMD5("site-b", pit), try md5("site-a", "v"))
        for pool in ["site-a", "site-b"] {
            let check = try CLI.run(["pool", "check", "p", "--dir", dir.file(pool)])
            XCTAssertEqual(check.status, 0, "\(pool): \(check.stdout) \(check.stderr)")
        }
    }

    /// A `blocks` frame whose crc32c does not match its data (sent inside a real TLS-PSK
    /// session by `openssl s_client` posing as the source) is refused and logged, and
    /// nothing of it is written: the next real cycle still leaves the images equal.
    func testABlocksFrameWithABadCrcIsRefusedAndNothingOfItIsWritten() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl") else { throw XCTSkip("needs /usr/bin/openssl") }
        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "16M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        _ = try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 1M", uri("site-a", "v")])
        try ok("site-a", ["async", "create-group", "g", "--source", "v", "--peer", "site-b"])
        let first = try nextCycle(after: 0)
        let cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)

        let script = """
        import struct, sys, uuid, json
        def frame(kind, payload): return struct.pack(">IHHII", 0x53565250, 1, kind, len(payload), 0) + payload
        name = b"site-a"
        hello = frame(1, struct.pack(">HH", 1, 1) + uuid.UUID(sys.argv[1]).bytes + bytes([len(name)]) + name)
        begin = frame(6, struct.pack(">Q", 1) + json.dumps({"op": "cycle-begin", "group": "g", "cycle": 99, "pit": "x"}).encode())
        data = b"\\xee" * 4096
        blocks = frame(8, struct.pack(">QQHHQII", 2, 99, 0, 0, 0, 1, 4096) + struct.pack(">I", 0x12345678) + struct.pack(">I", 4096) + data)
        sys.stdout.buffer.write(hello + begin + blocks)
        """
        try script.write(toFile: dir.file("frames.py"), atomically: true, encoding: .utf8)
        let keyHex = Array("0123456789abcdef0123456789abcdef".utf8).map { String(format: "%02x", $0) }.joined()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "(python3 \(dir.file("frames.py")) \(try domainId("site-a")); sleep 2) | timeout 10 openssl s_client -connect \(try address("site-b")) "
            + "-tls1_2 -cipher ECDHE-PSK-CHACHA20-POLY1305 -psk \(keyHex) -psk_identity svsp/site-a/\(try domainId("site-a")) -quiet -no_ign_eof"]
        p.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        p.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try p.run()
        p.waitUntilExit()
        for _ in 0..<30 where !log("site-b").contains("fails its crc32c") { usleep(100_000) }
        XCTAssertTrue(log("site-b").contains("blocks refused") && log("site-b").contains("fails its crc32c"), log("site-b"))
        XCTAssertEqual(try asyncGroup("site-b", "g")["confirmedPiT"] as? String, first, "no cycle was made of it")

        // The next real cycle does not rewrite offset 0 (unchanged at the source): had the
        // bad block landed there, the images would now differ.
        _ = try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x22 8M 4k", uri("site-a", "v")])
        try ok("site-a", ["async", "continue-task", "g"])
        let next = try nextCycle(after: cycle)
        XCTAssertEqual(try pitMD5("site-b", next), try pitMD5("site-a", next))
    }

    /// A destination vdisk is exported read-only while it is fed, and hosts read its last
    /// complete PiT: polled while a 12 MiB cycle is applied over a 16 Mbit/s link, every
    /// read of the export is the previous PiT's image or (once the cycle completed) the new
    /// one's, never the mix being applied; a host connected before the cycle completed reads
    /// the old image to the end of its connection; read-write is refused.
    func testAFedDestinationIsExportedReadOnlyAsItsLastCompletePiT() throws {
        try relink("bandwidth: 16Mbit/s\nrtt: 1ms\npit_cycle: 1s\n")
        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "16M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x31 0 4M", uri("site-a", "v")])
        try ok("site-a", ["async", "create-group", "g", "--source", "v", "--peer", "site-b"])
        let first = try nextCycle(after: 0, since: Date())
        let readWrite = try CLI.run(["vdisk", "export", "v", "--dir", dir.file("site-b")])
        XCTAssertTrue(readWrite.status != 0 && readWrite.stderr.contains("--read-only"), readWrite.stderr)
        try ok("site-b", ["vdisk", "export", "v", "--read-only"])
        let old = try md5("site-b", "v")
        XCTAssertEqual(old, try pitMD5("site-b", first), "the export reads as the last complete PiT")

        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x32 2M 12M", uri("site-a", "v")])
        let written = Date()
        let cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        // A host connected before the cycle completes reads its old image to the end.
        let host = Process(), hostOut = Pipe()
        host.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-io")
        host.arguments = ["-r", "-f", "raw", "-c", "read -P 0x31 2M 64k", "-c", "sleep 15000", "-c", "read -P 0x31 2M 64k", uri("site-b", "v")]
        host.standardOutput = hostOut
        try host.run()
        try ok("site-a", ["async", "continue-task", "g"])
        var reads = 0, sawOld = 0
        var images = Set<String>()
        // Until the destination completes a PiT taken after the writes (one taken before them,
        // queued meanwhile, may complete first: it reads as the old image).
        while (try asyncGroup("site-b", "g")["recoveryPoint"] as? Double ?? 0) < written.timeIntervalSince1970 && reads < 200 {
            let image = try md5("site-b", "v")
            images.insert(image)
            if image == old { sawOld += 1 }
            reads += 1
            usleep(100_000)
        }
        let newest = try nextCycle(after: cycle, since: written)
        let new = try md5("site-b", "v")
        XCTAssertEqual(new, try pitMD5("site-a", newest), "after the cycle the export reads as the new PiT")
        XCTAssertGreaterThanOrEqual(sawOld, 3, "reads while the cycle was applied: \(reads)")
        XCTAssertTrue(images.isSubset(of: [old, new]), "every read was one complete PiT's image: \(images.count) distinct images")
        XCTAssertTrue(host.isRunning, "the host's connection outlasted the cycle")
        let hostSaw = String(decoding: hostOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        host.waitUntilExit()
        XCTAssertEqual(hostSaw.components(separatedBy: "read 65536/65536 bytes").count, 3, hostSaw)
        XCTAssertFalse(hostSaw.contains("verification failed"), "a connection reads one image to its end: \(hostSaw)")
    }

    /// The source site is lost in the middle of a cycle (SIGKILL, part of the cycle applied
    /// at the destination). `async failover` prints its plan and does nothing without
    /// --yes; with it the destination vdisk is the last complete PiT's image, byte for byte
    /// (the partial cycle gone), exported read-write and writable; the PiT stays.
    func testFailoverAfterTheSourceIsLostMidCycleGivesTheLastCompletePiTWritable() throws {
        let (sourcePort, _) = try relink("bandwidth: 16Mbit/s\nrtt: 1ms\npit_cycle: 1s\n")
        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "16M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x41 0 4M", uri("site-a", "v")])
        try ok("site-a", ["async", "create-group", "g", "--source", "v", "--peer", "site-b"])
        let first = try nextCycle(after: 0, since: Date())
        let image = try pitMD5("site-a", first)

        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x42 2M 12M", uri("site-a", "v")])
        try ok("site-a", ["async", "continue-task", "g"])
        var midCycle = false
        for _ in 0..<100 {
            let p = try asyncGroup("site-a", "g")["progress"] as? [String: Any] ?? [:]
            if let sent = p["bytesSent"] as? Int, let total = p["bytesToSend"] as? Int, sent >= 2 << 20, sent + (2 << 20) < total {
                midCycle = true
                break
            }
            usleep(100_000)
        }
        XCTAssertTrue(midCycle, "a cycle was being applied")
        daemons["site-a"]?.stop(signal: SIGKILL) // the source site is lost
        // The last complete PiT: `first`, or one taken after it before the writes (same image).
        let last = try XCTUnwrap(try asyncGroup("site-b", "g")["confirmedPiT"] as? String)
        XCTAssertEqual(try pitMD5("site-b", last), image)

        let plan = try ok("site-b", ["async", "failover", "g"])
        XCTAssertTrue(plan.contains("nothing was done") && plan.contains(last) && plan.contains("read-write"), plan)
        XCTAssertEqual(try asyncGroup("site-b", "g")["confirmedPiT"] as? String, last, "without --yes nothing changed")
        let done = try ok("site-b", ["async", "failover", "g", "--yes"])
        XCTAssertTrue(done.hasPrefix("done:"), done)
        XCTAssertEqual(try asyncGroup("site-b", "g")["state"] as? String, "detached")
        XCTAssertEqual(try md5("site-b", "v"), image, "the destination is the last complete PiT, without the cut cycle's blocks")
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x43 0 64k", "-c", "read -P 0x43 0 64k", uri("site-b", "v")])
        XCTAssertTrue(try ok("site-b", ["pit", "list"]).contains(last), "the PiT stays")
        let check = try CLI.run(["pool", "check", "p", "--dir", dir.file("site-b")])
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)

        // The old source is back: its cycles are refused (nothing lands on production), and
        // `async recover` at site-b mirrors back to it from the common PiT, rolling back its
        // 12 MiB written since; only site-b's 64 KiB travel.
        try start("site-a", port: sourcePort)
        try waitFor("site-a", "site-b", "the link up again") { $0["outbound"] as? String == "connected" }
        usleep(2_500_000)
        let refused = try asyncGroup("site-a", "g")
        XCTAssertTrue((refused["lastError"] as? String ?? "").contains("detached"), "\(refused)")
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "read -P 0x43 0 64k", uri("site-b", "v")])
        let recoverPlan = try ok("site-b", ["async", "recover", "g"])
        XCTAssertTrue(recoverPlan.contains("nothing was done") && recoverPlan.contains("back to the common PiT \(last)") && !recoverPlan.contains("discarding 0 B"),
                      recoverPlan)
        XCTAssertEqual(try asyncGroup("site-a", "g")["role"] as? String, "source", "the plan changed nothing")
        XCTAssertTrue(try ok("site-b", ["async", "recover", "g", "--yes"]).hasPrefix("done:"))
        XCTAssertEqual(try asyncGroup("site-a", "g")["role"] as? String, "destination")
        let back = try nextCycle(after: try XCTUnwrap(try asyncGroup("site-b", "g")["cycle"] as? Int), since: Date(), source: "site-b")
        XCTAssertEqual(try pitMD5("site-a", back), try pitMD5("site-b", back))
        XCTAssertEqual(try pitMD5("site-a", back), try md5("site-b", "v"), "the old source now holds production's image")
        let shipped = try XCTUnwrap((try asyncGroup("site-b", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        XCTAssertEqual(shipped, 64 << 10, "only what changed at site-b since the common PiT travelled")
        XCTAssertEqual(try md5("site-a", "v"), try md5("site-b", "v"), "site-a's hosts read the last complete PiT, read-only")
        assertPoolsClean()
    }

    /// A planned hand-over, both sites up: the plan changes nothing; with --yes host writes
    /// are held, a last cycle ships, the roles swap, and the peer exports the vdisk
    /// read-write holding every write acknowledged before (no acknowledged write lost);
    /// then the new source's writes reach the old one.
    func testTransferProductionSwapsTheRolesWithNoAcknowledgedWriteLost() throws {
        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "16M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x51 0 4M", uri("site-a", "v")])
        try ok("site-a", ["async", "create-group", "g", "--source", "v", "--peer", "site-b"])
        _ = try nextCycle(after: 0, since: Date())
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x52 6M 1M", uri("site-a", "v")]) // acknowledged, not shipped yet
        let production = try md5("site-a", "v")
        let plan = try ok("site-a", ["async", "transfer-production", "g"])
        XCTAssertTrue(plan.contains("nothing was done") && plan.contains("peer 'site-b'"), plan)
        XCTAssertEqual(try asyncGroup("site-a", "g")["role"] as? String, "source")
        let done = try ok("site-a", ["async", "transfer-production", "g", "--yes"])
        XCTAssertTrue(done.hasPrefix("done:") && done.contains("host writes were held for"), done)
        XCTAssertEqual(try asyncGroup("site-a", "g")["role"] as? String, "destination")
        XCTAssertEqual(try asyncGroup("site-b", "g")["role"] as? String, "source")
        XCTAssertEqual(try md5("site-b", "v"), production, "the new production site holds every acknowledged write")
        XCTAssertEqual(try md5("site-a", "v"), production, "the old one serves the same image, read-only")
        let refused = try CLI.run(["vdisk", "export", "v", "--dir", dir.file("site-a")])
        XCTAssertNotEqual(refused.status, 0, "no read-write export at the new destination")

        let cycle = try XCTUnwrap(try asyncGroup("site-b", "g")["cycle"] as? Int)
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x53 8M 64k", uri("site-b", "v")])
        let back = try nextCycle(after: cycle, since: Date(), source: "site-b")
        XCTAssertEqual(try pitMD5("site-a", back), try md5("site-b", "v"))
        XCTAssertEqual(try md5("site-a", "v"), try md5("site-b", "v"))
    }
}
