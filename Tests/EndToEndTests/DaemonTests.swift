import Foundation
import XCTest

/// A running `svsp-ctl serve` and the commands that talk to it.
final class DaemonTests: XCTestCase {
    static let profiles = ServeProcess.profiles

    var dir: TempDir!
    var state: String { dir.file("state") }
    var daemon: ServeProcess?

    override func setUpWithError() throws {
        dir = TempDir()
        let r = try CLI.run(["domain", "init", "--dir", state, "--name", "site-a"])
        XCTAssertEqual(r.status, 0, r.stderr)
    }

    override func tearDown() {
        daemon?.stop()
        dir = nil // XCTest keeps test cases alive to the end: remove the LUN files now
    }

    func startDaemon(extra: [String] = [], profiles: String = ServeProcess.profiles, environment: [String: String] = [:]) throws {
        daemon = try ServeProcess(state: state, extra: extra, profiles: profiles, environment: environment)
    }

    func stopDaemon(signal: Int32 = SIGTERM) {
        daemon?.stop(signal: signal)
        daemon = nil
    }

    func ctl(_ args: [String]) throws -> CLI.Result {
        try CLI.run(args + ["--dir", state])
    }

    func ok(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try ctl(args)
        XCTAssertEqual(r.status, 0, "\(args): \(r.stderr)", file: file, line: line)
        return r.stdout
    }

    func fails(_ args: [String], _ expected: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try ctl(args)
        XCTAssertEqual(r.status, 1, "\(args) should fail", file: file, line: line)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "one line: \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stderr.hasPrefix("svsp-ctl: ") && r.stderr.contains(expected), "\(args): \(r.stderr)", file: file, line: line)
    }

    func statusJSON() throws -> [String: Any] {
        let out = try ok(["status", "--json"])
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any])
    }

    /// The vdisk names a status answer lists.
    func vdiskNames(_ status: [String: Any]) -> Set<String> {
        Set((status["vdisks"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String })
    }

    /// Where the setup record of `generation` lives on a copy (file-backed pools: 4 MiB reserve).
    func setupSlotOffset(generation: Int) -> Int {
        let slotBytes = ((4 << 20) - (64 << 10)) / 2 / 4096 * 4096
        return (64 << 10) + (generation % 2) * slotBytes
    }

    func makeThreePools() throws {
        for p in ["a", "b", "c"] {
            _ = try ok(["pool", "create", p, "--array-profile", "file-backed", "--lun", dir.file("\(p).img"), "--create-size", "48M"])
        }
    }

    func testCommandsWithoutADaemonSayWhy() throws {
        try fails(["status"], "daemon not running for \(state)")
        // A socket file left by a dead daemon is reported as stale.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let path = state + "/mgmt.sock"
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        close(fd)
        try fails(["status"], "stale socket")
        // The daemon replaces the stale file.
        try startDaemon()
        XCTAssertTrue(try ok(["status"]).contains("domain site-a"))
    }

    func testSecondServeIsRefused() throws {
        try startDaemon()
        let r = try CLI.run(["serve", "--dir", state, "--profiles", Self.profiles])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("is already being served"), r.stderr)
    }

    func testPoolsVDisksAndBadInput() throws {
        try startDaemon()
        try makeThreePools()
        try fails(["pool", "create", "a", "--array-profile", "file-backed", "--lun", dir.file("x.img"), "--create-size", "48M"], "pool 'a' already exists")
        try fails(["pool", "create", "t", "--array-profile", "file-backed", "--lun", dir.file("tiny.img"), "--create-size", "4M"], "smaller than its metadata reserve plus one extent")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.file("tiny.img")), "nothing half-created")
        try fails(["pool", "create", "n", "--array-profile", "nosuch", "--lun", dir.file("y.img"), "--create-size", "48M"], "array profile 'nosuch' not found")
        try fails(["pool", "create", "d", "--array-profile", "file-backed", "--lun", dir.file("a.img")], "already belongs to a pool")

        XCTAssertTrue(try ok(["vdisk", "create", "v1", "--pool", "a", "--size", "16M"]).contains("thick"))
        try fails(["vdisk", "create", "v1", "--pool", "b", "--size", "16M"], "vdisk 'v1' already exists")
        try fails(["vdisk", "create", "v2", "--pool", "a", "--size", "1000"], "multiple of the block size")
        try fails(["vdisk", "create", "v2", "--pool", "zz", "--size", "1M"], "pool 'zz' not found")
        try fails(["vdisk", "create", "huge", "--pool", "a", "--size", "1G"], "free extents")
        try fails(["pool", "delete", "a"], "used by vdisk(s) v1")
        try fails(["vdisk", "show", "nope"], "vdisk 'nope' not found")
        _ = try ok(["vdisk", "create", "thin1", "--pool", "b", "--size", "1G", "--thin"])
        XCTAssertTrue(try ok(["vdisk", "grow", "v1", "--size", "24M"]).contains("24M"))
        try fails(["vdisk", "grow", "v1", "--size", "8M"], "cannot shrink")

        let verify = try ok(["vdisk", "verify", "v1"])
        XCTAssertTrue(verify.contains("verified"), verify)
        XCTAssertTrue(try ok(["vdisk", "verify", "thin1", "--size", "4M"]).contains("verified"))
        let list = try ok(["vdisk", "list", "--json"])
        let vdisks = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(list.utf8)) as? [[String: Any]])
        XCTAssertEqual(vdisks.first { $0["name"] as? String == "thin1" }?["allocatedBytes"] as? Int, 4 << 20, "thin: only written extents allocated")
        _ = try ok(["vdisk", "delete", "thin1"])
        _ = try ok(["pool", "delete", "c"])
        XCTAssertEqual(try statusJSON()["health"] as? String, "normal")
    }

    func testLUNsOfAnotherDomainOrWithAFileSystemAreRefusedUnlessForced() throws {
        try startDaemon()
        _ = try ok(["pool", "create", "a", "--array-profile", "file-backed", "--lun", dir.file("a.img"), "--create-size", "48M"])
        stopDaemon()
        // A second domain must not take domain 1's LUN.
        let other = dir.file("other")
        XCTAssertEqual(try CLI.run(["domain", "init", "--dir", other, "--name", "site-b"]).status, 0)
        let second = try ServeProcess(state: other)
        defer { second.stop() }
        let foreign = try CLI.run(["pool", "create", "x", "--array-profile", "file-backed", "--lun", dir.file("a.img"), "--dir", other])
        XCTAssertEqual(foreign.status, 1)
        XCTAssertTrue(foreign.stderr.contains("belongs to another domain"), foreign.stderr)
        // A file system signature is refused too; --force takes it.
        var bytes = [UInt8](repeating: 0, count: 48 << 20)
        bytes[1080] = 0x53; bytes[1081] = 0xEF
        try Data(bytes).write(to: URL(fileURLWithPath: dir.file("fs.img")))
        let fs = try CLI.run(["pool", "create", "f", "--array-profile", "file-backed", "--lun", dir.file("fs.img"), "--dir", other])
        XCTAssertEqual(fs.status, 1)
        XCTAssertTrue(fs.stderr.contains("holds an ext2/3/4 file system"), fs.stderr)
        let forced = try CLI.run(["pool", "create", "f", "--array-profile", "file-backed", "--lun", dir.file("fs.img"), "--force", "--dir", other])
        XCTAssertEqual(forced.status, 0, forced.stderr)
    }

    func testRestartFindsEverythingAsItWas() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["domain", "setup-vdisk", "create", "--pool", "a", "--pool", "b", "--pool", "c"])
        _ = try ok(["vdisk", "create", "v1", "--pool", "a", "--size", "8M"])
        _ = try ok(["vdisk", "verify", "v1"])
        let before = try ok(["status", "--json"])
        stopDaemon()
        XCTAssertFalse(FileManager.default.fileExists(atPath: state + "/mgmt.sock"), "clean shutdown removes the socket")
        try startDaemon()
        XCTAssertEqual(try ok(["status", "--json"]), before)
    }

    func testSIGTERMLetsTheRunningCommandFinishAndAnswer() throws {
        try startDaemon()
        _ = try ok(["pool", "create", "a", "--array-profile", "file-backed", "--lun", dir.file("a.img"), "--create-size", "600M"])
        _ = try ok(["vdisk", "create", "v1", "--pool", "a", "--size", "512M"])
        // A verify of 512 MiB writes and reads for a second or more: stop the daemon during it.
        final class Box: @unchecked Sendable { var result: CLI.Result? }
        let box = Box()
        let state = self.state
        let worker = Thread { box.result = try? CLI.run(["vdisk", "verify", "v1", "--dir", state]) }
        worker.start()
        usleep(300_000)
        XCTAssertFalse(worker.isFinished, "the verify must still be running when the signal comes")
        stopDaemon()
        while !worker.isFinished { usleep(10_000) }
        let r = try XCTUnwrap(box.result)
        XCTAssertEqual(r.status, 0, "the command running at SIGTERM still answers: \(r.stderr)")
        XCTAssertTrue(r.stdout.contains("1048576 blocks of 512 bytes verified"), r.stdout)
    }

    func testSIGKILLDuringCommandsLeavesACommittedGeneration() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["domain", "setup-vdisk", "create", "--pool", "a", "--pool", "b", "--pool", "c"])
        var lastSeen: [String] = []
        for round in 0..<6 {
            // Fire create/delete commands and kill the daemon while they run.
            let acked = AckLog()
            let state = self.state
            let worker = Thread {
                for i in 0..<20 {
                    let name = "r\(round)v\(i)"
                    if (try? CLI.run(["vdisk", "create", name, "--pool", ["a", "b", "c"][i % 3], "--size", "1M", "--dir", state]))?.status == 0 {
                        acked.created(name)
                    }
                    if i % 2 == 1 {
                        let victim = "r\(round)v\(i - 1)"
                        acked.attemptedDelete(victim)
                        if (try? CLI.run(["vdisk", "delete", victim, "--dir", state]))?.status == 0 { acked.deleted(victim) }
                    }
                }
            }
            worker.start()
            usleep(useconds_t(150_000 + round * 40_000))
            stopDaemon(signal: SIGKILL)
            while !worker.isFinished { usleep(10_000) }
            try startDaemon()
            let status = try statusJSON()
            // A kill between the copies' writes may leave one copy a generation behind: the
            // majority's generation wins and that copy is reported and rewritten. Nothing else.
            let problems = status["problems"] as? [String] ?? []
            XCTAssertTrue(problems.allSatisfy { $0.contains("setup vdisk copy") && $0.contains("stale") && $0.hasSuffix("rewritten") },
                          "round \(round): \(problems)")
            let names = (status["vdisks"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
            XCTAssertEqual(Set(names).count, names.count, "no duplicate records")
            for n in lastSeen { XCTAssertTrue(names.contains(n), "round \(round): lost \(n) from an earlier round") }
            for n in acked.mustExist { XCTAssertTrue(names.contains(n), "round \(round): acknowledged create of \(n) lost") }
            for n in acked.mustBeGone { XCTAssertFalse(names.contains(n), "round \(round): acknowledged delete of \(n) undone") }
            lastSeen = names
        }
    }

    func testCorruptSetupCopyIsDetectedOutvotedAndRewritten() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["domain", "setup-vdisk", "create", "--pool", "a", "--pool", "b", "--pool", "c"])
        _ = try ok(["vdisk", "create", "keep", "--pool", "b", "--size", "4M"])
        let generation = try statusJSON()["generation"] as? Int ?? -1
        stopDaemon()
        // Damage the newest record on pool b's copy: its slot is at 64k + (generation % 2) * slot size.
        let slot = setupSlotOffset(generation: generation)
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: dir.file("b.img")))
        try handle.seek(toOffset: UInt64(slot + 4096 + 10))
        handle.write(Data([0xde, 0xad, 0xbe, 0xef]))
        try handle.close()

        try startDaemon()
        let status = try statusJSON()
        XCTAssertEqual(status["generation"] as? Int, generation, "the majority's generation wins")
        XCTAssertEqual(status["health"] as? String, "degraded")
        let problems = status["problems"] as? [String] ?? []
        XCTAssertTrue(problems.contains { $0.contains("pool 'b'") && $0.contains("checksum mismatch") && $0.contains("rewritten") }, "\(problems)")
        XCTAssertTrue(try ok(["vdisk", "list"]).contains("keep"))
        // After the rewrite every copy agrees again.
        stopDaemon()
        try startDaemon()
        XCTAssertEqual(try statusJSON()["health"] as? String, "normal")
    }

    func testPrometheusMetricsCountVDiskAndLUNIO() throws {
        let port = 20000 + Int(getpid() % 20000)
        try startDaemon(extra: ["--metrics-listen", "127.0.0.1:\(port)"])
        _ = try ok(["pool", "create", "a", "--array-profile", "file-backed", "--lun", dir.file("a.img"), "--create-size", "48M"])
        _ = try ok(["vdisk", "create", "v1", "--pool", "a", "--size", "4M"])
        _ = try ok(["vdisk", "verify", "v1"])
        let text = try httpGet(port: port, path: "/metrics")
        XCTAssertTrue(text.contains("svsp_vdisk_io_total{vdisk=\"v1\",op=\"write\"} 4"), text)
        XCTAssertTrue(text.contains("svsp_vdisk_io_bytes_total{vdisk=\"v1\",op=\"read\"} 4194304"), text)
        XCTAssertTrue(text.contains("svsp_lun_io_latency_seconds_bucket{pool=\"a\""), text)
        // 44 extents after the 4 MiB reserve: 4 for v1, 1 for the pool's metadata area.
        XCTAssertTrue(text.contains("svsp_pool_free_bytes{pool=\"a\"} \(Double(39 << 20))"), text)
        XCTAssertTrue(text.contains("svsp_pool_stuck_luns{pool=\"a\"} 0"), text)
    }

    func mirror(_ name: String) throws -> [String: Any] {
        try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok(["mirror", "status", name, "--json"]).utf8)) as? [String: Any])
    }

    func legDataAreas(_ a: String, _ b: String, bytes: Int) throws -> Bool {
        let fa = try FileHandle(forReadingFrom: URL(fileURLWithPath: a)), fb = try FileHandle(forReadingFrom: URL(fileURLWithPath: b))
        try fa.seek(toOffset: 4 << 20); try fb.seek(toOffset: 4 << 20)
        return fa.readData(ofLength: bytes) == fb.readData(ofLength: bytes)
    }

    func testHotRegionsCostNoBitmapWrites() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "b", "--size", "16M"])
        _ = try ok(["vdisk", "verify", "m", "--size", "2M"])
        let first = try mirror("m")
        XCTAssertEqual(first["dirtyRegionCount"] as? Int, 2, "2 MiB written = 2 regions of 1 MiB")
        let writes = first["bitmapWrites"] as? Int ?? -1
        for _ in 0..<3 { _ = try ok(["vdisk", "verify", "m", "--size", "2M"]) }
        XCTAssertEqual(try mirror("m")["bitmapWrites"] as? Int, writes, "rewriting hot regions costs no bitmap I/O")
        // Idle regions are cleared lazily once every leg is in sync.
        var tries = 0
        while try mirror("m")["dirtyRegionCount"] as? Int != 0, tries < 100 { usleep(50_000); tries += 1 }
        XCTAssertEqual(try mirror("m")["dirtyRegionCount"] as? Int, 0)
    }

    func testSIGKILLDuringWritesResyncsOnlyDirtyRegions() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "b", "--size", "32M"])
        _ = try ok(["vdisk", "verify", "m"])
        var tries = 0
        while try mirror("m")["dirtyRegionCount"] as? Int != 0, tries < 100 { usleep(50_000); tries += 1 }
        // Heavy writes into the first 8 MiB, and the daemon killed in the middle.
        let state = self.state
        let writer = Thread { for _ in 0..<50 { _ = try? CLI.run(["vdisk", "verify", "m", "--size", "8M", "--dir", state]) } }
        writer.start()
        usleep(300_000)
        stopDaemon(signal: SIGKILL)
        while !writer.isFinished { usleep(10_000) }
        try startDaemon()
        let recovery = try XCTUnwrap(try mirror("m")["lastStartupResync"] as? [String: Any], "startup resynchronized the mirror")
        let regions = recovery["regions"] as? Int ?? -1
        XCTAssertGreaterThan(regions, 0)
        XCTAssertLessThanOrEqual(regions, 8, "only regions written before the kill, never the whole 32")
        XCTAssertEqual(recovery["regionsTotal"] as? Int, 32)
        XCTAssertEqual(try mirror("m")["state"] as? String, "normal")
        XCTAssertTrue(try legDataAreas(dir.file("a.img"), dir.file("b.img"), bytes: 32 << 20), "legs identical after recovery")
        _ = try ok(["vdisk", "verify", "m"])
    }

    func testCopyRateCanChangeWhileTheCopyRuns() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "g", "--pool", "a", "--size", "32M"])
        _ = try ok(["vdisk", "verify", "g"])
        // Cap the background class of both pools first, then add a leg: the copy crawls.
        _ = try ok(["vdisk", "create", "tmp", "--pool", "a", "--mirror-pool", "b", "--size", "1M"])
        _ = try ok(["mirror", "set-rate", "tmp", "4MiB/s"])
        _ = try ok(["mirror", "add-leg", "g", "--pool", "b"])
        usleep(1_500_000)
        let crawling = try mirror("g")
        XCTAssertEqual(crawling["state"] as? String, "snap-sync")
        let percent = crawling["percent"] as? Double ?? 100
        XCTAssertLessThan(percent, 60, "capped at 4 MiB/s, 32 MiB cannot be half done after 1.5 s")
        XCTAssertLessThan(crawling["rateMiBPerSecond"] as? Double ?? 100, 8)
        // Lift the cap on the running copy: it finishes without a restart.
        _ = try ok(["mirror", "set-rate", "tmp", "none"])
        var tries = 0
        while try mirror("g")["state"] as? String != "normal", tries < 100 { usleep(50_000); tries += 1 }
        XCTAssertEqual(try mirror("g")["state"] as? String, "normal")
        XCTAssertTrue(try ok(["mirror", "verify", "g"]).contains(" 0 differ"), "the legs hold the same blocks")
    }

    /// add-leg's first copy does not read the new leg (it reads as zeros) and skips the
    /// source's zero blocks: the new leg still ends up byte for byte the source, written
    /// blocks and zeros alike, and a write during the copy reaches both.
    func testAddLegsFirstCopySkipsZerosYetTheNewLegEqualsTheSource() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "t", "--pool", "a", "--size", "40M"])
        _ = try ok(["vdisk", "verify", "t", "--size", "3M", "--phase", "write"]) // the rest stays zeros
        _ = try ok(["mirror", "add-leg", "t", "--pool", "b"])
        _ = try ok(["vdisk", "verify", "t", "--size", "1M", "--phase", "write"]) // during (or after) the copy
        var tries = 0
        while try mirror("t")["state"] as? String != "normal", tries < 200 { usleep(50_000); tries += 1 }
        XCTAssertEqual(try mirror("t")["state"] as? String, "normal")
        XCTAssertTrue(try ok(["mirror", "verify", "t"]).contains(" 0 differ"), "the legs hold the same blocks")
        // Both pools put the vdisk's extents right after their reserve: compare the LUNs themselves.
        XCTAssertTrue(try legDataAreas(dir.file("a.img"), dir.file("b.img"), bytes: 40 << 20), "leg data areas differ")
    }

    func testAnInterruptedCopyResumesWhereItStopped() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "g", "--pool", "a", "--size", "32M"])
        _ = try ok(["vdisk", "verify", "g"])
        _ = try ok(["vdisk", "create", "tmp", "--pool", "a", "--mirror-pool", "b", "--size", "1M"])
        _ = try ok(["mirror", "set-rate", "tmp", "8MiB/s"])
        _ = try ok(["mirror", "add-leg", "g", "--pool", "b"])
        usleep(1_500_000)
        XCTAssertEqual(try mirror("g")["state"] as? String, "snap-sync")
        stopDaemon(signal: SIGKILL) // mid-copy
        try startDaemon()           // no rate cap now: the startup resync finishes the copy
        let recovery = try XCTUnwrap(try mirror("g")["lastStartupResync"] as? [String: Any])
        let regions = recovery["regions"] as? Int ?? -1
        XCTAssertGreaterThan(regions, 0)
        XCTAssertLessThan(regions, 32, "regions copied before the kill are not walked again")
        XCTAssertEqual(try mirror("g")["state"] as? String, "normal")
        XCTAssertTrue(try ok(["mirror", "verify", "g"]).contains(" 0 differ"))
    }

    func testMissingLUNFileLeavesTheDomainDegraded() throws {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["vdisk", "create", "v1", "--pool", "a", "--size", "4M"])
        stopDaemon()
        try FileManager.default.removeItem(atPath: dir.file("c.img"))
        try startDaemon()
        let status = try statusJSON()
        XCTAssertEqual(status["health"] as? String, "degraded")
        let problems = status["problems"] as? [String] ?? []
        XCTAssertTrue(problems.contains { $0.contains("pool 'c'") && $0.contains("c.img") }, "\(problems)")
        let human = try ok(["status"])
        XCTAssertTrue(human.contains("health: degraded"), human)
        XCTAssertTrue(try ok(["vdisk", "verify", "v1"]).contains("verified"), "the other pools keep working")
    }
}

/// What the daemon acknowledged while it was being killed.
private final class AckLog: @unchecked Sendable {
    private let lock = NSLock()
    private var created: Set<String> = []
    private var deleteAttempted: Set<String> = []
    private var deletedSet: Set<String> = []
    func created(_ n: String) { lock.lock(); created.insert(n); lock.unlock() }
    func attemptedDelete(_ n: String) { lock.lock(); deleteAttempted.insert(n); lock.unlock() }
    func deleted(_ n: String) { lock.lock(); deletedSet.insert(n); lock.unlock() }
    var mustExist: Set<String> { lock.lock(); defer { lock.unlock() }; return created.subtracting(deleteAttempted) }
    var mustBeGone: Set<String> { lock.lock(); defer { lock.unlock() }; return deletedSet }
}
