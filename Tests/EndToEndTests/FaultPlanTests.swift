import Foundation
import XCTest

/// Seeded LUN faults from `serve --fault-plan`: faults loop devices cannot make.
extension DaemonTests {
    private func writePlan(_ json: String) throws -> String {
        let path = dir.file("plan.json")
        try json.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// Host writes to leg b fail while the copier's writes to it succeed: the resync
    /// must not declare b in sync over a host write it missed.
    func testAHostWriteFailingOnAResyncTargetKeepsTheTargetFailed() throws {
        let plan = try writePlan(#"{"seed": 3, "rules": [{"pool": "b", "op": "write", "class": "host", "errno": 5}]}"#)
        try startDaemon(extra: ["--fault-plan", plan])
        try makeThreePools()
        _ = try ok(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "b", "--size", "16M"])
        XCTAssertEqual(try ctl(["vdisk", "verify", "m", "--size", "1M"]).status, 0, "automatic-failover: the write succeeds on a")
        XCTAssertEqual((try mirror("m")["legs"] as? [[String: Any]])?[1]["state"] as? String, "failed")
        XCTAssertEqual(try ctl(["vdisk", "verify", "m"]).status, 0) // every region dirty: the copy walks 16 MiB
        // Slow the copy (pool a's background class) so host writes land while it runs.
        _ = try ok(["vdisk", "create", "tmp", "--pool", "a", "--mirror-pool", "c", "--size", "1M"])
        _ = try ok(["mirror", "set-rate", "tmp", "8MiB/s"])
        let resync = ResultBox()
        let copier = Thread { [state] in resync.result = try? CLI.run(["mirror", "resync", "m", "--dir", state]) }
        copier.start()
        var tries = 0
        while try mirror("m")["percent"] == nil, tries < 400 { usleep(5_000); tries += 1 }
        XCTAssertEqual(try ctl(["vdisk", "verify", "m", "--size", "4M"]).status, 0, "host writes go on during the copy")
        while !copier.isFinished { usleep(20_000) }
        let r = try XCTUnwrap(resync.result)
        XCTAssertEqual(r.status, 1, r.stdout)
        XCTAssertTrue(r.stderr.contains("failed during the resync") && r.stderr.contains("stay failed"), r.stderr)
        XCTAssertEqual((try mirror("m")["legs"] as? [[String: Any]])?[1]["state"] as? String, "failed", "b missed a host write")
        XCTAssertEqual(try ctl(["vdisk", "verify", "m", "--size", "4M"]).status, 0, "reads come from the in-sync leg")
    }

    func testABadFaultPlanIsOneClearLine() throws {
        let plan = try writePlan(#"{"rules": [{"pool": "b", "op": "wrte"}]}"#)
        let r = try CLI.run(["serve", "--dir", state, "--profiles", ServeProcess.profiles, "--fault-plan", plan], killAfterSeconds: 10)
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr.split(separator: "\n").filter { $0.hasPrefix("svsp-ctl:") }.count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("rule 1: op 'wrte'"), r.stderr)
    }
}

extension DaemonTests {
    /// A copy nobody waits for that fails is logged and shown by `mirror status`, never dropped.
    func testABackgroundResyncFailureIsReported() throws {
        let path = dir.file("plan.json")
        try #"{"rules": [{"pool": "b", "op": "write", "class": "host", "count": 1}, {"pool": "b", "op": "write", "class": "background"}]}"#
            .write(toFile: path, atomically: true, encoding: .utf8)
        try startDaemon(extra: ["--fault-plan", path])
        try makeThreePools()
        _ = try ok(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "b", "--size", "8M"])
        XCTAssertEqual(try ctl(["vdisk", "verify", "m", "--size", "1M"]).status, 0) // fails leg b once
        _ = try ok(["mirror", "resync", "m", "--background"])
        var tries = 0
        while try mirror("m")["lastBackgroundError"] == nil, tries < 200 { usleep(25_000); tries += 1 }
        let why = try XCTUnwrap(try mirror("m")["lastBackgroundError"] as? String)
        XCTAssertTrue(why.contains("background resync of 'm' failed"), why)
        XCTAssertEqual((try mirror("m")["legs"] as? [[String: Any]])?[1]["state"] as? String, "failed")
    }
}

extension DaemonTests {
    /// A LUN that stops answering: after its array profile's `io_timeout` the hung write fails
    /// with ETIMEDOUT, the mirror acknowledges from the surviving leg and fails the hung one
    /// over, the daemon answers all the while, and a resync brings the leg back equal.
    func testAHungLegTimesOutAndFailsOverWhileTheDaemonAnswers() throws {
        let fileBacked = try String(contentsOfFile: ServeProcess.profiles + "/arrays/file-backed.yaml", encoding: .utf8)
        let hangs = fileBacked.replacingOccurrences(of: "io_timeout: 30s", with: "io_timeout: 300ms")
        XCTAssertNotEqual(hangs, fileBacked, "the shipped profile names its io_timeout")
        let pool = try String(contentsOfFile: ServeProcess.profiles + "/pools/file-backed.yaml", encoding: .utf8)
        let profiles = try customProfiles(in: dir, ["arrays/hangs.yaml": hangs, "pools/hangs.yaml": pool.replacingOccurrences(of: "array: file-backed", with: "array: hangs")])
        let plan = dir.file("plan.json")
        try #"{"seed": 5, "rules": [{"pool": "b", "op": "write", "class": "host", "action": "stuck", "count": 1}]}"#
            .write(toFile: plan, atomically: true, encoding: .utf8)
        let log = dir.file("serve.log")
        daemon = try ServeProcess(state: state, extra: ["--fault-plan", plan], log: log, profiles: profiles)
        _ = try ok(["pool", "create", "a", "--array-profile", "file-backed", "--lun", dir.file("a.img"), "--create-size", "48M"])
        _ = try ok(["pool", "create", "b", "--array-profile", "hangs", "--lun", dir.file("b.img"), "--create-size", "48M"])
        _ = try ok(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "b", "--size", "16M"])

        let verify = ResultBox()
        let writer = Thread { [state] in verify.result = try? CLI.run(["vdisk", "verify", "m", "--size", "2M", "--seed", "7", "--dir", state]) }
        writer.start()
        var answers = 0
        let deadline = Date().addingTimeInterval(30)
        while !writer.isFinished {
            guard Date() < deadline else { return XCTFail("the write to the hung leg never answered: \(try String(contentsOfFile: log, encoding: .utf8))") }
            let asked = Date()
            XCTAssertEqual(try ctl(["status"]).status, 0)
            XCTAssertLessThan(Date().timeIntervalSince(asked), 5, "the daemon answers while a leg hangs")
            answers += 1
            usleep(50_000)
        }
        let r = try XCTUnwrap(verify.result)
        XCTAssertEqual(r.status, 0, "written and read back from the surviving leg: \(r.stderr)")
        XCTAssertGreaterThan(answers, 0)
        XCTAssertEqual((try mirror("m")["legs"] as? [[String: Any]])?[1]["state"] as? String, "failed", "the hung leg failed over")
        let text = try String(contentsOfFile: log, encoding: .utf8)
        XCTAssertTrue(text.contains("pool 'b': LUN \(dir.file("b.img")) did not answer a write within io_timeout 300ms (array profile hangs): declared stuck"), text)
        XCTAssertTrue(text.contains("no longer stuck"), text)

        _ = try ok(["mirror", "resync", "m"])
        XCTAssertTrue(try ok(["mirror", "verify", "m"]).contains(" 0 differ"))
        XCTAssertEqual(try ctl(["vdisk", "verify", "m", "--size", "2M", "--seed", "7", "--phase", "read"]).status, 0, "both legs hold what was written")
    }
}
