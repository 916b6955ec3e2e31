import Foundation
import XCTest

/// Split brain and `async merge`, between two daemons over real TCP: after a fail over
/// both sides are written; once they reconnect nothing is shipped until an admin picks the
/// side that wins, and then the chosen side wins exactly, shipping only its difference.
final class AsyncMergeTests: TwoSitesTestCase {
    override func setUpWithError() throws {
        try super.setUpWithError()
        try requireNBDClients()
        try startLinkedSites(linkProfile: "bandwidth: 1Gbit/s\nrtt: 1ms\npit_cycle: 1s\n")
    }

    /// site-b fails over while site-a goes on as the source; both write. site-a's next cycle
    /// is refused (split brain: state `split-brain`, site-b unchanged). A merge onto a side
    /// that changed is refused without --rollback; `merge --from site-a --rollback`, run at
    /// site-b, makes site-b exactly site-a's image again (site-b's write gone), shipping
    /// only site-a's 1 MiB written since the common PiT.
    func testASplitBrainShipsNothingUntilAMergeAndTheChosenSideWins() throws {
        try mirroredVDisk(pattern: 0x61)
        try splitBrain(failingOver: "site-b", source: "site-a", writes: [("site-a", "write -P 0x62 6M 1M"), ("site-b", "write -P 0x63 10M 512k")])
        let base = try XCTUnwrap(try asyncGroup("site-b", "g")["confirmedPiT"] as? String) // the common PiT
        XCTAssertTrue((try asyncGroup("site-a", "g")["lastError"] as? String ?? "").contains("async merge g --from"))
        let production = try md5("site-b", "v")
        usleep(2_000_000)
        XCTAssertEqual(try md5("site-b", "v"), production, "nothing was shipped onto site-b")
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "read -P 0x63 10M 512k", "-c", "read -P 0x61 0 4M", uri("site-b", "v")])

        let unchosen = try CLI.run(["async", "merge", "g", "--from", "site-c", "--dir", dir.file("site-b")])
        XCTAssertTrue(unchosen.status != 0 && unchosen.stderr.contains("--from 'site-c'"), unchosen.stderr)
        let unrolled = try CLI.run(["async", "merge", "g", "--from", "site-a", "--yes", "--dir", dir.file("site-b")])
        XCTAssertTrue(unrolled.status != 0 && unrolled.stderr.contains("changed since the common PiT \(base)") && unrolled.stderr.contains("--rollback"),
                      unrolled.stderr)
        let plan = try ok("site-b", ["async", "merge", "g", "--from", "site-a", "--rollback"])
        XCTAssertTrue(plan.contains("nothing was done") && plan.contains("discarding"), plan)
        XCTAssertEqual(try md5("site-b", "v"), production, "the plan changed nothing")
        let sentBefore = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        XCTAssertTrue(try ok("site-b", ["async", "merge", "g", "--from", "site-a", "--rollback", "--yes"]).hasPrefix("done:"))

        let cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        let newest = try nextCycle(after: cycle)
        XCTAssertNotEqual(try asyncGroup("site-a", "g")["state"] as? String, "split-brain")
        XCTAssertEqual(try asyncGroup("site-b", "g")["role"] as? String, "destination")
        XCTAssertEqual(try pitMD5("site-b", newest), try pitMD5("site-a", newest))
        XCTAssertEqual(try md5("site-b", "v"), try md5("site-a", "v"), "site-b reads (read-only) exactly site-a's image")
        try run("/usr/bin/qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x62 6M 1M", "-c", "read -P 0 10M 512k", uri("site-b", "v")])
        let shipped = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        XCTAssertEqual(shipped - sentBefore, 1 << 20, "only site-a's writes since the common PiT travelled")
        assertPoolsClean()
    }

    /// A merge run at the old source, both ways: first the failed-over site-b wins (site-a
    /// rolls back and becomes its destination; site-b's write reaches site-a, site-a's is
    /// gone), then site-a fails over in turn and site-b, the source, wins (`--from here`).
    func testAMergeRunAtTheSourceGoesEitherWay() throws {
        try mirroredVDisk(pattern: 0x71)

        // Round 1: site-b fails over; both write; at site-a, site-b wins.
        try splitBrain(failingOver: "site-b", source: "site-a", writes: [("site-a", "write -P 0x72 6M 1M"), ("site-b", "write -P 0x73 10M 512k")])
        XCTAssertTrue(try ok("site-a", ["async", "merge", "g", "--from", "site-b", "--rollback", "--yes"]).hasPrefix("done:"))
        XCTAssertEqual(try asyncGroup("site-a", "g")["role"] as? String, "destination")
        let first = try nextCycle(after: try XCTUnwrap(try asyncGroup("site-b", "g")["cycle"] as? Int), source: "site-b")
        XCTAssertEqual(try pitMD5("site-a", first), try md5("site-b", "v"))
        XCTAssertEqual(try md5("site-a", "v"), try md5("site-b", "v"))
        try run("/usr/bin/qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x73 10M 512k", "-c", "read -P 0 6M 1M", uri("site-a", "v")])

        // Round 2: site-a fails over; both write; at site-b, the source, site-b wins.
        try splitBrain(failingOver: "site-a", source: "site-b", writes: [("site-a", "write -P 0x74 2M 256k"), ("site-b", "write -P 0x75 12M 256k")])
        XCTAssertTrue(try ok("site-b", ["async", "merge", "g", "--from", "here", "--rollback", "--yes"]).hasPrefix("done:"))
        let second = try nextCycle(after: try XCTUnwrap(try asyncGroup("site-b", "g")["cycle"] as? Int), source: "site-b")
        XCTAssertEqual(try pitMD5("site-a", second), try md5("site-b", "v"))
        XCTAssertEqual(try md5("site-a", "v"), try md5("site-b", "v"))
        try run("/usr/bin/qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x75 12M 256k", "-c", "read -P 0x71 2M 256k", uri("site-a", "v")])
        assertPoolsClean()
    }

    /// `split-task` at the source: a write acknowledged before it reaches the peer, both
    /// sides part identical (both detached, the source exported again); a merge restarts
    /// mirroring shipping only what was written since; `detach-task` at the source ends the
    /// task on both sides, and a detached task cannot merely be continued.
    func testASplitPartsIdenticalSidesAndAMergeRestartsMirroringFromThere() throws {
        try mirroredVDisk(pattern: 0x81)
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x82 6M 1M", uri("site-a", "v")]) // not shipped: the task is paused
        let plan = try ok("site-a", ["async", "split-task", "g"])
        XCTAssertTrue(plan.contains("nothing was done"), plan)
        XCTAssertEqual(try asyncGroup("site-b", "g")["state"] as? String, "normal")
        let done = try ok("site-a", ["async", "split-task", "g", "--yes"])
        XCTAssertTrue(done.hasPrefix("done:") && done.contains("held for"), done)
        XCTAssertEqual(try asyncGroup("site-a", "g")["state"] as? String, "detached")
        XCTAssertEqual(try asyncGroup("site-b", "g")["state"] as? String, "detached")
        try ok("site-b", ["vdisk", "export", "v"]) // writable now
        XCTAssertEqual(try md5("site-b", "v"), try md5("site-a", "v"), "the sides parted identical")
        let continued = try CLI.run(["async", "continue-task", "g", "--dir", dir.file("site-a")])
        XCTAssertTrue(continued.status != 0 && continued.stderr.contains("async merge"), continued.stderr)

        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x83 8M 1M", uri("site-a", "v")])
        let sentBefore = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        XCTAssertTrue(try ok("site-a", ["async", "merge", "g", "--from", "here", "--yes"]).hasPrefix("done:"), "site-b unchanged: no rollback needed")
        let cycle = try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int)
        _ = try nextCycle(after: cycle)
        XCTAssertEqual(try md5("site-b", "v"), try md5("site-a", "v"))
        let sent = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        XCTAssertEqual(sent - sentBefore, 1 << 20, "only the write made after the split travelled")

        XCTAssertTrue(try ok("site-a", ["async", "detach-task", "g", "--yes"]).hasPrefix("done:"))
        XCTAssertEqual(try asyncGroup("site-a", "g")["state"] as? String, "detached")
        XCTAssertEqual(try asyncGroup("site-b", "g")["state"] as? String, "detached")
        try ok("site-b", ["vdisk", "unexport", "v"])
        try ok("site-b", ["vdisk", "export", "v"])
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x84 12M 64k", "-c", "read -P 0x83 8M 1M", uri("site-b", "v")])
    }

    /// A fail over cut by a SIGKILL after the rollback (`SVSP_CRASH_AT`), and a recover
    /// whose reverse at the old source is cut the same way: each restart finishes the
    /// operation (logged), running the command again completes it, and the sides end equal.
    func testAFailoverAndARecoverCutBySIGKILLAreFinishedAtRestart() throws {
        try mirroredVDisk(pattern: 0x91)
        let ports = (a: try address("site-a"), b: try address("site-b"))

        try restart("site-b", kill: SIGTERM, port: ports.b, environment: ["SVSP_CRASH_AT": "async-detach-rolled-back"])
        try waitFor("site-a", "site-b", "the link up") { $0["outbound"] as? String == "connected" }
        XCTAssertNotEqual(try CLI.run(["async", "failover", "g", "--yes", "--dir", dir.file("site-b")]).status, 0, "the daemon died mid-command")
        try restart("site-b", kill: SIGKILL, port: ports.b)
        XCTAssertTrue(log("site-b").contains("the detach a crash cut short is finished"), log("site-b"))
        XCTAssertEqual(try asyncGroup("site-b", "g")["state"] as? String, "detached")
        XCTAssertTrue(try ok("site-b", ["async", "failover", "g", "--yes"]).contains("already detached"))
        XCTAssertEqual(try md5("site-b", "v"), try md5("site-a", "v"), "site-b is the last complete PiT")

        try ok("site-a", ["async", "continue-task", "g"])
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x92 6M 1M", uri("site-a", "v")])
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x93 10M 512k", uri("site-b", "v")])
        try restart("site-a", kill: SIGTERM, port: ports.a, environment: ["SVSP_CRASH_AT": "async-reverse-rolled-back"])
        try waitFor("site-b", "site-a", "the link up") { $0["outbound"] as? String == "connected" }
        XCTAssertNotEqual(try CLI.run(["async", "recover", "g", "--yes", "--dir", dir.file("site-b")]).status, 0, "site-a died mid-reverse")
        try restart("site-a", kill: SIGKILL, port: ports.a)
        XCTAssertTrue(log("site-a").contains("the reverse a crash cut short is finished"), log("site-a"))
        XCTAssertEqual(try asyncGroup("site-a", "g")["role"] as? String, "destination")
        try waitFor("site-b", "site-a", "the link up") { $0["outbound"] as? String == "connected" }
        XCTAssertTrue(try ok("site-b", ["async", "recover", "g", "--yes"]).hasPrefix("done:"), "run again, it completes")
        _ = try nextCycle(after: try XCTUnwrap(try asyncGroup("site-b", "g")["cycle"] as? Int), source: "site-b")
        try ok("site-a", ["vdisk", "export", "v", "--read-only"])
        XCTAssertEqual(try md5("site-a", "v"), try md5("site-b", "v"))
        try run("/usr/bin/qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x93 10M 512k", "-c", "read -P 0 6M 1M", uri("site-a", "v")])
        assertPoolsClean()
    }

    /// A split cut by a SIGKILL of the source right after it committed its own detach
    /// (`SVSP_CRASH_AT=async-source-detached`), before the peer heard of it: the peer stays
    /// fed meanwhile, and the restarted source asks it for its detach; both end detached
    /// and identical. A detach-task at the source while the peer is away is owed the same way.
    func testASplitCutBySIGKILLIsFinishedWhenTheSourceIsBack() throws {
        try mirroredVDisk(pattern: 0xc1)
        let ports = (a: try address("site-a"), b: try address("site-b"))
        try restart("site-a", kill: SIGTERM, port: ports.a, environment: ["SVSP_CRASH_AT": "async-source-detached"])
        try waitFor("site-a", "site-b", "the link up") { $0["outbound"] as? String == "connected" }
        XCTAssertNotEqual(try CLI.run(["async", "split-task", "g", "--yes", "--dir", dir.file("site-a")]).status, 0, "the daemon died mid-split")
        XCTAssertEqual(try asyncGroup("site-b", "g")["state"] as? String, "normal", "the peer did not hear of it")
        try restart("site-a", kill: SIGKILL, port: ports.a)
        XCTAssertEqual(try waitForState("site-b", "detached"), "detached", "the restarted source had the peer detach")
        XCTAssertEqual(try asyncGroup("site-a", "g")["state"] as? String, "detached")
        XCTAssertTrue(log("site-a").contains("peer 'site-b' detached its side"), log("site-a"))
        try ok("site-a", ["vdisk", "export", "v"]) // the crash came during the hold: hosts get it back by hand
        try ok("site-b", ["vdisk", "export", "v"])
        XCTAssertEqual(try md5("site-b", "v"), try md5("site-a", "v"))

        // detach-task at the source with the peer away: owed, then done when it is back.
        try ok("site-a", ["async", "merge", "g", "--from", "here", "--yes"])
        _ = try nextCycle(after: try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int))
        daemons["site-b"]?.stop(signal: SIGKILL)
        let owed = try ok("site-a", ["async", "detach-task", "g", "--yes"])
        XCTAssertTrue(owed.contains("asked to detach when the link is back"), owed)
        XCTAssertEqual(try asyncGroup("site-a", "g")["peerDetachOwed"] as? Bool, true)
        try start("site-b", port: ports.b)
        XCTAssertEqual(try waitForState("site-b", "detached"), "detached")
        assertPoolsClean()
    }

    /// A merge cut by a SIGKILL of the losing side after its rollback
    /// (`SVSP_CRASH_AT=async-rejoin-rolled-back`): after the restart it is still detached, at
    /// the common PiT; the merge run again completes and the chosen side wins exactly.
    func testAMergeCutBySIGKILLCompletesWhenRunAgain() throws {
        try mirroredVDisk(pattern: 0xd1)
        try splitBrain(failingOver: "site-b", source: "site-a", writes: [("site-a", "write -P 0xd2 6M 1M"), ("site-b", "write -P 0xd3 10M 512k")])
        let port = try address("site-b")
        try restart("site-b", kill: SIGTERM, port: port, environment: ["SVSP_CRASH_AT": "async-rejoin-rolled-back"])
        try waitFor("site-b", "site-a", "the link up") { $0["outbound"] as? String == "connected" }
        XCTAssertNotEqual(try CLI.run(["async", "merge", "g", "--from", "site-a", "--rollback", "--yes", "--dir", dir.file("site-b")]).status, 0)
        try restart("site-b", kill: SIGKILL, port: port)
        XCTAssertEqual(try asyncGroup("site-b", "g")["state"] as? String, "detached")
        try waitFor("site-b", "site-a", "the link up") { $0["outbound"] as? String == "connected" }
        XCTAssertTrue(try ok("site-b", ["async", "merge", "g", "--from", "site-a", "--rollback", "--yes"]).hasPrefix("done:"))
        _ = try nextCycle(after: try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int))
        try ok("site-b", ["vdisk", "export", "v", "--read-only"]) // the crash took its export away
        XCTAssertEqual(try md5("site-b", "v"), try md5("site-a", "v"))
        try run("/usr/bin/qemu-io", ["-r", "-f", "raw", "-c", "read -P 0 10M 512k", "-c", "read -P 0xd2 6M 1M", uri("site-b", "v")])
        assertPoolsClean()
    }

    /// A split brain whose common PiT was deleted at site-b: a merge is refused naming
    /// --full; with it site-b is wiped (its own write gone) and takes everything site-a has
    /// allocated (5 MiB of extents), and reads exactly as site-a.
    func testAMergeWithoutACommonPiTNeedsFullAndCopiesEverything() throws {
        try mirroredVDisk(pattern: 0xb1)
        try splitBrain(failingOver: "site-b", source: "site-a", writes: [("site-a", "write -P 0xb2 6M 1M"), ("site-b", "write -P 0xb3 10M 512k")])
        let common = try XCTUnwrap(try asyncGroup("site-b", "g")["confirmedPiT"] as? String)
        try ok("site-b", ["pit", "delete", common])
        let refused = try CLI.run(["async", "merge", "g", "--from", "site-a", "--rollback", "--yes", "--dir", dir.file("site-b")])
        XCTAssertTrue(refused.status != 0 && refused.stderr.contains("--full"), refused.stderr)
        let plan = try ok("site-b", ["async", "merge", "g", "--from", "site-a", "--full"])
        XCTAssertTrue(plan.contains("nothing was done") && plan.contains("wiped"), plan)
        let sentBefore = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        XCTAssertTrue(try ok("site-b", ["async", "merge", "g", "--from", "site-a", "--full", "--yes"]).hasPrefix("done:"))
        _ = try nextCycle(after: try XCTUnwrap(try asyncGroup("site-a", "g")["cycle"] as? Int))
        XCTAssertEqual(try md5("site-b", "v"), try md5("site-a", "v"), "site-b reads (read-only) exactly site-a's image")
        try run("/usr/bin/qemu-io", ["-r", "-f", "raw", "-c", "read -P 0 10M 512k", "-c", "read -P 0xb2 6M 1M", uri("site-b", "v")])
        let sent = try XCTUnwrap((try asyncGroup("site-a", "g")["progress"] as? [String: Any])?["dataBytes"] as? Int)
        XCTAssertEqual(sent - sentBefore, 5 << 20, "everything site-a has allocated travelled, once")
        assertPoolsClean()
    }

    /// The source's task (paused) continues, `destination` fails over (exported read-write),
    /// `writes` are made, and the source goes to `split-brain` at its next cycle.
    private func splitBrain(failingOver destination: String, source: String, writes: [(site: String, command: String)]) throws {
        try ok(source, ["async", "continue-task", "g"])
        try ok(destination, ["async", "failover", "g", "--yes"])
        for w in writes { try run("/usr/bin/qemu-io", ["-f", "raw", "-c", w.command, uri(w.site, "v")]) }
        XCTAssertEqual(try waitForState(source, "split-brain"), "split-brain")
    }

    /// Polls group g's state at `site` until it is `wanted` (10 s at most); the last seen.
    private func waitForState(_ site: String, _ wanted: String) throws -> String {
        var state = ""
        for _ in 0..<100 where state != wanted {
            usleep(100_000)
            state = try asyncGroup(site, "g")["state"] as? String ?? ""
        }
        return state
    }
}
