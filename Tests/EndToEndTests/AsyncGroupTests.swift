import Foundation
import XCTest

/// Async groups of several vdisks and long outages, between two daemons over real TCP.
/// A VDG's members travel as one: every PiT the destination completes is one cut of a
/// dependent-writes stream (a database's data file and log) across both members. A
/// destination gone for longer than the retention allows: the source suspends the group
/// (host writes go on), then catches up with one coalesced difference.
final class AsyncGroupTests: TwoSitesTestCase {
    private let dependentWrites = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("scripts/dependent-writes").path

    override func setUpWithError() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy"), FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-io"),
              FileManager.default.isExecutableFile(atPath: "/usr/bin/python3")
        else { throw XCTSkip("needs nbdcopy (libnbd-bin), qemu-io (qemu-utils) and python3") }
        try super.setUpWithError()
        try startLinkedSites(linkProfile: "bandwidth: 1Gbit/s\nrtt: 1ms\npit_cycle: 1s\nretention: 3\n")
    }

    private func python(_ args: [String]) throws -> (status: Int32, out: String) {
        let p = Process(), out = Pipe()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        p.arguments = [dependentWrites] + args
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Read-only snapshots at site-b of the member PiTs of its group PiT `pit` (nil when
    /// the PiT is already gone: the next cycle retired it).
    private func keep(_ pit: String) -> (data: String, log: String)? {
        let tag = pit.replacingOccurrences(of: ".", with: "-")
        let data = "k-\(tag)-0", log = "k-\(tag)-1"
        guard (try? CLI.run(["snapshot", "create", data, "--pit", pit + ".0", "--dir", dir.file("site-b")]))?.status == 0 else { return nil }
        guard (try? CLI.run(["snapshot", "create", log, "--pit", pit + ".1", "--dir", dir.file("site-b")]))?.status == 0 else {
            _ = try? CLI.run(["snapshot", "delete", data, "--dir", dir.file("site-b")])
            return nil
        }
        return (data, log)
    }

    /// `scripts/dependent-writes check` of two site-b snapshots: "data k log j".
    private func cut(_ pair: (data: String, log: String), file: StaticString = #filePath, line: UInt = #line) throws -> Int {
        try ok("site-b", ["vdisk", "export", pair.data, "--read-only"])
        try ok("site-b", ["vdisk", "export", pair.log, "--read-only"])
        let r = try python(["check", "--socket", dir.file("site-b") + "/nbd.sock", "--data", pair.data, "--log", pair.log])
        XCTAssertEqual(r.status, 0, "\(pair): \(r.out)", file: file, line: line)
        return Int(r.out.split(separator: " ").dropFirst().first ?? "") ?? -1
    }

    func testAVDGTravelsAsOneAndEveryDestinationPiTIsOneCutOfTheDependentWrites() throws {
        for v in ["data", "log"] {
            try ok("site-a", ["vdisk", "create", v, "--pool", "p", "--size", "16M", "--thin"])
            try ok("site-a", ["vdisk", "export", v])
        }
        try ok("site-a", ["vdg", "create", "db", "--vdisk", "data", "--vdisk", "log"])
        // Bad sources and destination lists are refused, naming what is wrong.
        let both = try CLI.run(["async", "create-group", "g", "--source", "data", "--source-vdg", "db", "--peer", "site-b", "--dir", dir.file("site-a")])
        XCTAssertTrue(both.status != 0 && both.stderr.contains("exactly one of"), both.stderr)
        let one = try CLI.run(["async", "create-group", "g", "--source-vdg", "db", "--peer", "site-b", "--dest", "x", "--dir", dir.file("site-a")])
        XCTAssertTrue(one.status != 0 && one.stderr.contains("--dest is given 1 time(s) for 2 source vdisk(s)"), one.stderr)
        try ok("site-a", ["async", "create-group", "g", "--source-vdg", "db", "--peer", "site-b", "--dest", "data-dr", "--dest", "log-dr"])
        let members = try XCTUnwrap(try asyncGroup("site-b", "g")["members"] as? [[String: String]])
        XCTAssertEqual(members.map { $0["vdisk"] }, ["data-dr", "log-dr"], "the destination made one vdisk per member, in order")

        // The stream runs for 8 s while cycles complete every second; each PiT the
        // destination completes meanwhile is kept (a snapshot of each member's PiT).
        let writer = try Stream(script: dependentWrites, socket: dir.file("site-a") + "/nbd.sock", seconds: 8, rate: 300)
        var kept: [(data: String, log: String)] = []
        var seen = Set<String>()
        while writer.process.isRunning {
            if let pit = try asyncGroup("site-b", "g")["confirmedPiT"] as? String, seen.insert(pit).inserted, let pair = keep(pit) {
                kept.append(pair)
            }
            usleep(100_000)
        }
        let written = writer.written()
        XCTAssertEqual(writer.process.terminationStatus, 0)
        XCTAssertGreaterThan(written, 500, "the stream ran")
        let last = try nextCycle(after: 0, since: Date())
        let final = try XCTUnwrap(keep(last), "the newest PiT is there to keep")

        // Every kept PiT is one cut of the stream, several of them mid-stream; the newest holds it all.
        var midStream = 0
        for pair in kept {
            let k = try cut(pair)
            if k > 0 && k < written { midStream += 1 }
        }
        XCTAssertGreaterThanOrEqual(midStream, 3, "PiTs completed during the stream: \(kept.count), mid-stream \(midStream)")
        XCTAssertEqual(try cut(final), written, "the newest PiT holds every write")
        for i in 0..<2 {
            XCTAssertEqual(try pitMD5("site-b", "\(last).\(i)"), try pitMD5("site-a", "\(last).\(i)"), "member \(i) of \(last)")
        }
        let shown = try ok("site-a", ["async", "status"])
        XCTAssertTrue(shown.contains("vdg db (2)"), shown)
    }

    func testALongOutageSuspendsTheGroupAndOneCoalescedDifferenceCatchesUp() throws {
        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "32M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 2M", uri("site-a", "v")])
        // --wait follows the initial copy (progress lines on stderr) and returns once it is complete.
        let created = try CLI.run(["async", "create-group", "g", "--source", "v", "--peer", "site-b", "--wait", "--dir", dir.file("site-a")],
                                  environment: ["SVSP_PROGRESS": "plain", "SVSP_PROGRESS_INTERVAL": "0"])
        XCTAssertEqual(created.status, 0, created.stderr)
        XCTAssertTrue(created.stdout.hasSuffix("async group 'g': initial copy complete at the destination\n"), created.stdout)
        XCTAssertNotNil(try asyncGroup("site-a", "g")["confirmedPiT"] as? String, "--wait returned before the first PiT was confirmed")
        let first = try nextCycle(after: 0, since: Date())
        XCTAssertEqual(try pitMD5("site-b", first), try pitMD5("site-a", first))
        let cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        let sentBefore = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)

        // The destination goes away. Cycle PiTs pile up to the retention (3: the confirmed
        // one and two waiting), then the group is suspended; host writes go on meanwhile.
        let port = try address("site-b")
        daemons["site-b"]?.stop(signal: SIGKILL)
        try ok("site-a", ["async", "continue-task", "g"])
        var distinct = Set<Int>() // 4 KiB blocks changed during the outage
        var n = 0
        for _ in 0..<100 where try asyncGroup("site-a", "g")["state"] as? String != "suspended" {
            // A hot block rewritten every time, and a new one each time.
            try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P \(n % 200 + 20) 4M 4k", "-c", "write -P 0x77 \(8 + n)M 4k", uri("site-a", "v")])
            distinct.formUnion([1024, (8 + n) * 256])
            n += 1
            usleep(300_000)
        }
        let suspended = try asyncGroup("site-a", "g")
        XCTAssertEqual(suspended["state"] as? String, "suspended", "\(suspended)")
        XCTAssertTrue((suspended["lastError"] as? String ?? "").contains("retention"), "\(suspended)")
        XCTAssertEqual((suspended["pendingPiTs"] as? [String])?.count, 2, "\(suspended)")
        XCTAssertTrue(log("site-a").contains("suspended"), log("site-a"))
        // Suspended: no new PiTs, and host writes are served as before.
        let pitsWhileSuspended = try ok("site-a", ["pit", "list"])
        for i in 0..<5 {
            try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x55 \(20 + i)M 8k", uri("site-a", "v")])
            distinct.formUnion([(20 + i) * 256, (20 + i) * 256 + 1])
            usleep(400_000)
        }
        XCTAssertEqual(try ok("site-a", ["pit", "list"]), pitsWhileSuspended, "no PiT is taken while suspended")
        let written = Date()

        // The destination is back: one coalesced difference, the group normal again, and
        // the destination equals the source's newest PiT (the live vdisk: nothing since).
        try start("site-b", port: port)
        _ = try nextCycle(after: cycle, since: written)
        let caughtUp = try asyncGroup("site-a", "g")
        XCTAssertEqual(caughtUp["state"] as? String, "paused", "normal, then paused by the test: \(caughtUp)")
        let pit = try XCTUnwrap(caughtUp["confirmedPiT"] as? String)
        XCTAssertEqual(try pitMD5("site-b", pit), try pitMD5("site-a", pit))
        XCTAssertEqual(try pitMD5("site-b", pit), try md5("site-a", "v"))
        XCTAssertTrue(log("site-a").contains("catches up with one coalesced difference (2 waiting PiT(s) dropped)"), log("site-a"))
        let sent = try XCTUnwrap((caughtUp["progress"] as? [String: Any])?["dataBytes"] as? Int) - sentBefore
        XCTAssertLessThanOrEqual(Double(sent), Double(distinct.count * 4096) * 1.05, "bytes sent \(sent) for \(distinct.count) distinct changed blocks")
        XCTAssertGreaterThanOrEqual(sent, distinct.count * 4096, "every changed block travelled")
        XCTAssertFalse(try ok("site-a", ["pit", "list"]).contains("async-\(cycle + 1) "), "the waiting PiTs are gone")
    }

    /// The destination's daemon is killed twice in the middle of applying cycles (a slow
    /// link, so cycles are long) while the stream runs. Polled all along, whatever PiT the
    /// destination names as complete is one cut of the stream; afterwards it reaches the end.
    func testTheDestinationIsOneCutOfTheStreamAtEveryMomentThroughKillsMidApply() throws {
        let (_, destPort) = try relink("bandwidth: 16Mbit/s\nrtt: 1ms\npit_cycle: 1s\nretention: 3\n")
        for v in ["data", "log"] {
            try ok("site-a", ["vdisk", "create", v, "--pool", "p", "--size", "16M", "--thin"])
            try ok("site-a", ["vdisk", "export", v])
        }
        try ok("site-a", ["vdg", "create", "db", "--vdisk", "data", "--vdisk", "log"])
        try ok("site-a", ["async", "create-group", "g", "--source-vdg", "db", "--peer", "site-b"])

        // 16 s of writes: the second kill (at 10 s at the latest) has 6 s of polls to land in,
        // each slow (a snapshot made, exported and read); 12 s once left it none on a loaded run.
        let writer = try Stream(script: dependentWrites, socket: dir.file("site-a") + "/nbd.sock", seconds: 16, rate: 250)
        let started = Date()
        var kills = 0, checked = 0
        var seen = Set<String>()
        while writer.process.isRunning {
            let t = Date().timeIntervalSince(started)
            let shipping = try asyncGroup("site-a", "g")["progress"] as? [String: Any] ?? [:]
            let sent = shipping["bytesSent"] as? Int ?? 0, total = shipping["bytesToSend"] as? Int ?? 0
            let midCycle = sent > 0 && sent + (512 << 10) < total
            // Mid-cycle when one is seen (each poll takes a while: the second kill goes at 10 s regardless).
            if (kills == 0 && t > 3 && midCycle) || (kills == 1 && ((t > 7 && midCycle) || t > 10)) {
                try restart("site-b", kill: SIGKILL, port: destPort)
                kills += 1
            }
            // Whatever the destination calls complete is one cut of the stream.
            if let pit = try asyncGroup("site-b", "g")["confirmedPiT"] as? String, let pair = keep(pit) {
                if seen.insert(pit).inserted { checked += 1 }
                _ = try cut(pair)
                for s in [pair.data, pair.log] {
                    try ok("site-b", ["vdisk", "unexport", s])
                    try ok("site-b", ["snapshot", "delete", s])
                }
            }
            usleep(200_000)
        }
        XCTAssertEqual(kills, 2)
        XCTAssertGreaterThanOrEqual(checked, 3, "distinct complete PiTs read during the stream")
        XCTAssertTrue(log("site-a").contains("resumed at"), "a kill cut a cycle mid-apply:\n\(log("site-a"))")
        let written = writer.written()
        let last = try nextCycle(after: 0, since: Date(), seconds: 60)
        XCTAssertEqual(try cut(try XCTUnwrap(keep(last))), written, "the newest PiT holds every write")
    }

    /// The destination's pool LUN (a loop device) turns read-only in the middle of the
    /// stream: its writes fail, so cycles fail and the source says why, while every PiT
    /// the destination calls complete (polled) stays one cut of the stream and readable.
    /// Writable again: the cycles go on and the destination reaches the end. Root only.
    func testTheDestinationPoolTurningReadOnlyFailsCyclesWithoutHarmAndTheyResumeAfter() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root for a loop device") }
        let file = dir.file("q.img")
        XCTAssertTrue(FileManager.default.createFile(atPath: file, contents: nil))
        truncate(file, 96 << 20)
        let (status, loop) = shell(["losetup", "--find", "--show", "--direct-io=on", file])
        guard status == 0, loop.hasPrefix("/dev/loop") else { throw XCTSkip("losetup failed") }
        defer {
            shell(["blockdev", "--setrw", loop])
            daemons["site-b"]?.stop()
            shell(["losetup", "-d", loop])
        }
        try ok("site-b", ["pool", "create", "q", "--array-profile", "file-backed", "--lun", loop])
        for v in ["data", "log"] {
            try ok("site-a", ["vdisk", "create", v, "--pool", "p", "--size", "16M", "--thin"])
            try ok("site-a", ["vdisk", "export", v])
        }
        try ok("site-a", ["vdg", "create", "db", "--vdisk", "data", "--vdisk", "log"])
        try ok("site-a", ["async", "create-group", "g", "--source-vdg", "db", "--peer", "site-b", "--dest-pool", "q"])

        let writer = try Stream(script: dependentWrites, socket: dir.file("site-a") + "/nbd.sock", seconds: 12, rate: 250)
        let started = Date()
        var readOnly = false, sawFailure = false, checked = 0
        while writer.process.isRunning {
            let t = Date().timeIntervalSince(started)
            if !readOnly && t > 3 {
                XCTAssertEqual(shell(["blockdev", "--setro", loop]).0, 0)
                readOnly = true
            }
            if readOnly && t > 8 && shell(["blockdev", "--getro", loop]).1 == "1" {
                XCTAssertEqual(shell(["blockdev", "--setrw", loop]).0, 0)
            }
            let g = try asyncGroup("site-a", "g")
            if readOnly, t <= 8, g["state"] as? String == "degraded", g["lastError"] is String { sawFailure = true }
            if let pit = try asyncGroup("site-b", "g")["confirmedPiT"] as? String, let pair = keep(pit) {
                _ = try cut(pair)
                checked += 1
                for s in [pair.data, pair.log] {
                    try ok("site-b", ["vdisk", "unexport", s])
                    try ok("site-b", ["snapshot", "delete", s])
                }
            }
            usleep(200_000)
        }
        XCTAssertTrue(sawFailure, "the source reported the failing cycles: \(log("site-a"))")
        // Each poll makes, exports and reads snapshots: on a loaded machine 12 s hold few.
        XCTAssertGreaterThanOrEqual(checked, 3, "complete PiTs read during the stream")
        let written = writer.written()
        let last = try nextCycle(after: 0, since: Date(), seconds: 60)
        XCTAssertEqual(try cut(try XCTUnwrap(keep(last))), written, "the newest PiT holds every write")
        XCTAssertEqual(try asyncGroup("site-a", "g")["lastError"] as? String, nil)
    }
}

/// `scripts/dependent-writes write` on the data and log vdisks of site-a, in the background.
private struct Stream {
    let process = Process()
    private let out = Pipe()

    init(script: String, socket: String, seconds: Int, rate: Int) throws {
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = [script, "write", "--socket", socket, "--data", "data", "--log", "log", "--seconds", String(seconds), "--rate", String(rate)]
        process.standardOutput = out
        try process.run()
    }

    /// Waits for the end; the number of the last data write (0 if it failed).
    func written() -> Int {
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return Int(text.trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
    }
}
