import Foundation
import XCTest

/// kill -9 during PiT create, PiT delete, rollback and a redirected write: after the
/// restart the PiT exists whole or not at all, the vdisk holds every acknowledged write,
/// `pool check` is clean and no chunk stays reserved. Each operation gets 10 rounds:
/// the daemon dies at each of its crash points (`SVSP_CRASH_AT`: `_exit` right there,
/// nothing flushed or cleaned up) and, in the other rounds, at a random moment (SIGKILL
/// from the test, 0-40 ms into the command).
extension DaemonTests {
    private func verify(_ vdisk: String, seed: Int, size: String = "8M") throws -> Bool {
        try ctl(["vdisk", "verify", vdisk, "--phase", "read", "--seed", "\(seed)", "--size", size]).stdout.contains("matched the pattern")
    }

    private func write(_ vdisk: String, seed: Int, size: String = "8M") throws {
        let r = try ctl(["vdisk", "verify", vdisk, "--phase", "write", "--seed", "\(seed)", "--size", size])
        XCTAssertEqual(r.status, 0, r.stderr)
    }

    private func pitNames() throws -> Set<String> {
        let list = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok(["pit", "list", "--json"]).utf8)) as? [[String: Any]])
        return Set(list.compactMap { $0["name"] as? String })
    }

    /// Runs `args` with the daemon armed to die at `point`, or killed at a random moment
    /// when `point` is nil; then restarts it unarmed. Returns whether the command succeeded.
    @discardableResult
    private func crash(_ args: [String], at point: String?, round: Int) throws -> Bool {
        stopDaemon()
        var status: Int32 = 0
        if let point {
            try startDaemon(environment: ["SVSP_CRASH_AT": point])
            status = try ctl(args).status
            var waited = 0
            while daemon?.process.isRunning == true, waited < 200 { usleep(50_000); waited += 1 }
            if daemon?.process.isRunning == true {
                XCTFail("\(args) never reached crash point \(point) (exit status \(status))")
                stopDaemon(signal: SIGKILL)
            }
        } else {
            try startDaemon()
            let pid = try XCTUnwrap(daemon?.process.processIdentifier)
            let delay = useconds_t((round * 7919) % 40_000) // spread over 0-40 ms, the same every run
            let killer = Thread { usleep(delay); kill(pid, SIGKILL) }
            killer.start()
            status = try ctl(args).status
            daemon?.process.waitUntilExit()
        }
        daemon = nil
        try startDaemon()
        return status == 0
    }

    private func checkPools(_ pools: [String], _ what: String) throws {
        for pool in pools {
            let out = try ok(["pool", "check", pool, "--json"])
            let report = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any])
            XCTAssertEqual(report["clean"] as? Bool, true, "\(what): pool \(pool): \(out)")
            XCTAssertEqual(report["beingRedirected"] as? Int, 0, "\(what): pool \(pool) keeps reserved chunks")
        }
    }

    func testAPiTCreateCutByACrashExistsWholeOrNotAtAll() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "v", "--pool", "a", "--mirror-pool", "b", "--size", "8M"])
        let points: [String?] = ["pit-cloned", "pit-committed", nil]
        for round in 0..<10 {
            try write("v", seed: round)
            let point = points[round % points.count]
            let done = try crash(["pit", "create", "v", "--name", "r\(round)"], at: point, round: round)
            let what = "round \(round) (\(point ?? "random kill"))"
            let exists = try pitNames().contains("r\(round)")
            if point == "pit-cloned" { XCTAssertFalse(exists, "\(what): the catalog never named it") }
            if point == "pit-committed" || done { XCTAssertTrue(exists, "\(what): committed") }
            XCTAssertTrue(try verify("v", seed: round), "\(what): the vdisk lost acknowledged writes")
            if exists { // whole: its image through a snapshot is the vdisk's at the instant
                _ = try ok(["snapshot", "create", "s", "--pit", "r\(round)"])
                XCTAssertTrue(try verify("s", seed: round), "\(what): the PiT's image")
                _ = try ok(["snapshot", "delete", "s"])
                _ = try ok(["pit", "delete", "r\(round)"])
            }
            try checkPools(["a", "b"], what)
        }
    }

    func testAPiTDeleteCutByACrashLeavesNothingBehind() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "v", "--pool", "a", "--mirror-pool", "b", "--size", "8M"])
        let points: [String?] = ["pit-delete-committed", nil]
        for round in 0..<10 {
            try write("v", seed: 100 + round)
            _ = try ok(["pit", "create", "v", "--name", "d\(round)"])
            try write("v", seed: 200 + round, size: "2M") // the PiT now holds chunks of its own
            let point = points[round % points.count]
            let done = try crash(["pit", "delete", "d\(round)"], at: point, round: round)
            let what = "round \(round) (\(point ?? "random kill"))"
            let exists = try pitNames().contains("d\(round)")
            if point != nil || done { XCTAssertFalse(exists, "\(what): the delete was committed") }
            XCTAssertTrue(try verify("v", seed: 200 + round, size: "2M"), "\(what): the vdisk lost acknowledged writes")
            if exists {
                _ = try ok(["snapshot", "create", "s", "--pit", "d\(round)"])
                XCTAssertTrue(try verify("s", seed: 100 + round), "\(what): the PiT survived whole")
                _ = try ok(["snapshot", "delete", "s"])
                _ = try ok(["pit", "delete", "d\(round)"])
            }
            usleep(300_000) // background deletes of this round's maps
            try checkPools(["a", "b"], what)
        }
    }

    func testARollbackCutByACrashIsFinishedAtTheNextStart() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "v", "--pool", "a", "--mirror-pool", "b", "--size", "8M"])
        let points: [String?] = ["rollback-marked", "rollback-swapped", nil]
        for round in 0..<10 {
            try write("v", seed: 300 + round)
            _ = try ok(["pit", "create", "v", "--name", "b\(round)"])
            try write("v", seed: 400 + round)
            let point = points[round % points.count]
            let done = try crash(["pit", "rollback", "v", "--to", "b\(round)"], at: point, round: round)
            let what = "round \(round) (\(point ?? "random kill"))"
            let back = try verify("v", seed: 300 + round)
            if point != nil || done { XCTAssertTrue(back, "\(what): the rollback was committed: the next start finishes it") }
            if !back { XCTAssertTrue(try verify("v", seed: 400 + round), "\(what): neither the PiT's image nor the vdisk's") }
            XCTAssertTrue(try ok(["mirror", "verify", "v"]).contains(" 0 differ"), "\(what): the legs differ")
            XCTAssertTrue(try pitNames().contains("b\(round)"), "\(what): a rollback keeps its PiT")
            _ = try ok(["pit", "delete", "b\(round)"])
            usleep(300_000)
            try checkPools(["a", "b"], what)
        }
    }

    func testAWriteRedirectedAwayFromAPiTSurvivesACrashAtEveryStep() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "v", "--pool", "a", "--mirror-pool", "b", "--size", "8M"])
        let points: [String?] = ["redirect-reserved", "redirect-copied", nil]
        for round in 0..<10 {
            try write("v", seed: 500 + round)
            _ = try ok(["pit", "create", "v", "--name", "w\(round)"])
            let point = points[round % points.count]
            try crash(["vdisk", "verify", "v", "--phase", "write", "--seed", "\(600 + round)", "--size", "8M"], at: point, round: round)
            let what = "round \(round) (\(point ?? "random kill"))"
            _ = try ok(["snapshot", "create", "s", "--pit", "w\(round)"])
            XCTAssertTrue(try verify("s", seed: 500 + round), "\(what): a redirect changed the PiT's image")
            _ = try ok(["snapshot", "delete", "s"])
            try write("v", seed: 700 + round) // every chunk takes a write again after the restart
            XCTAssertTrue(try verify("v", seed: 700 + round), what)
            XCTAssertTrue(try ok(["mirror", "verify", "v"]).contains(" 0 differ"), "\(what): the legs differ")
            _ = try ok(["pit", "delete", "w\(round)"])
            usleep(300_000)
            try checkPools(["a", "b"], what)
        }
    }
}
