import Foundation
import XCTest

/// Sync mirrors on loop devices with a real daemon: leg failure with `blockdev --setro`,
/// resync, verify, compared byte for byte on the LUNs themselves.
final class MirrorTests: XCTestCase {

    var dir: TempDir!
    var state: String { dir.file("state") }
    var daemon: ServeProcess?
    var loops: [String] = []

    override func setUpWithError() throws {
        guard getuid() == 0 else { throw XCTSkip("mirror tests skipped: need root for loop devices") }
        dir = TempDir()
        XCTAssertEqual(try CLI.run(["domain", "init", "--dir", state, "--name", "m"]).status, 0)
        for name in ["a", "b", "c"] {
            let file = dir.file("\(name).img")
            XCTAssertTrue(FileManager.default.createFile(atPath: file, contents: nil))
            truncate(file, 64 << 20)
            let (status, dev) = shell(["losetup", "--find", "--show", "--direct-io=on", file])
            guard status == 0, dev.hasPrefix("/dev/loop") else { throw XCTSkip("mirror tests skipped: losetup failed") }
            loops.append(dev)
        }
        try startDaemon()
        for (i, name) in ["a", "b", "c"].enumerated() {
            _ = try ok(["pool", "create", name, "--array-profile", "file-backed", "--lun", loops[i]])
        }
    }

    override func tearDown() {
        daemon?.stop()
        for l in loops { shell(["blockdev", "--setrw", l]); shell(["losetup", "-d", l]) }
        dir = nil // XCTest keeps test cases alive to the end: remove the LUN files now
    }

    func startDaemon() throws {
        daemon = try ServeProcess(state: state)
    }

    func ok(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try CLI.run(args + ["--dir", state])
        XCTAssertEqual(r.status, 0, "\(args): \(r.stderr)", file: file, line: line)
        return r.stdout
    }

    func mirrorState(_ name: String) throws -> [String: Any] {
        let out = try ok(["mirror", "status", name, "--json"])
        return try XCTUnwrap(JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any])
    }

    /// The data areas of two LUNs (same extents, since both pools allocate from extent 0), compared directly.
    func assertLegsIdentical(_ a: String, _ b: String, bytes: Int, file: StaticString = #filePath, line: UInt = #line) throws {
        let reserve = 4 << 20 // file-backed pool profile: metadata_reserve 4M, extent 1M
        let fa = try FileHandle(forReadingFrom: URL(fileURLWithPath: a)), fb = try FileHandle(forReadingFrom: URL(fileURLWithPath: b))
        try fa.seek(toOffset: UInt64(reserve)); try fb.seek(toOffset: UInt64(reserve))
        let da = fa.readData(ofLength: bytes), db = fb.readData(ofLength: bytes)
        XCTAssertEqual(da.count, bytes, file: file, line: line)
        XCTAssertTrue(da == db, "leg data areas differ", file: file, line: line)
    }

    func testLegFailureUnderWritesThenResyncMakesLegsIdentical() throws {
        _ = try ok(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "b", "--size", "24M"])
        _ = try ok(["vdisk", "verify", "m"])
        // A workload of verified writes while leg b's device turns read-only.
        let state = self.state
        let failures = Counter()
        let worker = Thread {
            for _ in 0..<6 {
                let r = try? CLI.run(["vdisk", "verify", "m", "--size", "8M", "--dir", state])
                if r?.status != 0 { failures.add() }
            }
        }
        worker.start()
        usleep(100_000)
        XCTAssertEqual(shell(["blockdev", "--setro", loops[1]]).0, 0)
        while !worker.isFinished { usleep(10_000) }
        XCTAssertEqual(failures.value, 0, "automatic-failover: host writes keep succeeding")
        let st = try mirrorState("m")
        XCTAssertEqual(st["state"] as? String, "partial")
        XCTAssertEqual((st["legs"] as? [[String: Any]])?[1]["state"] as? String, "failed")

        XCTAssertEqual(shell(["blockdev", "--setrw", loops[1]]).0, 0)
        let resync = try ok(["mirror", "resync", "m", "--json"])
        let report = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(resync.utf8)) as? [String: Any])
        XCTAssertGreaterThan(report["copiedBlocks"] as? Int ?? 0, 0)
        XCTAssertEqual(try mirrorState("m")["state"] as? String, "normal")
        try assertLegsIdentical(loops[0], loops[1], bytes: 24 << 20)
        XCTAssertTrue(try ok(["mirror", "verify", "m"]).contains(" 0 differ"))
        _ = try ok(["vdisk", "verify", "m"]) // and it all reads back
    }

    func testSynchronousAlwaysFailsTheWriteCleanly() throws {
        _ = try ok(["vdisk", "create", "s", "--pool", "a", "--mirror-pool", "c", "--size", "8M", "--mode", "synchronous-always"])
        _ = try ok(["vdisk", "verify", "s"])
        XCTAssertEqual(shell(["blockdev", "--setro", loops[2]]).0, 0)
        let r = try CLI.run(["vdisk", "verify", "s", "--dir", state])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.hasPrefix("svsp-ctl: vdisk 's'"), r.stderr)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1)
        XCTAssertEqual(shell(["blockdev", "--setrw", loops[2]]).0, 0)
        _ = try ok(["mirror", "resync", "s"])
        try assertLegsIdentical(loops[0], loops[2], bytes: 8 << 20)
    }

    func testVerifyFindsAndRepairsACorruptedBlock() throws {
        _ = try ok(["vdisk", "create", "v", "--pool", "a", "--mirror-pool", "b", "--size", "8M"])
        _ = try ok(["vdisk", "verify", "v", "--phase", "write", "--seed", "5"])
        // Corrupt one block directly on leg b's device, behind the daemon's back.
        let fd = open(loops[1], O_WRONLY)
        var junk = [UInt8](repeating: 0xEE, count: 512)
        _ = pwrite(fd, &junk, 512, off_t((4 << 20) + 3 * 4096 + 512))
        fsync(fd)
        close(fd)
        XCTAssertTrue(try ok(["mirror", "verify", "v"]).contains(" 1 differ"))
        // Reads that hit the block are served by the in-sync leg preferred for reads (leg 0, intact).
        XCTAssertTrue(try ok(["vdisk", "verify", "v", "--phase", "read", "--seed", "5"]).contains("matched the pattern"))
        XCTAssertTrue(try ok(["mirror", "verify", "v", "--repair"]).contains("1 repaired"))
        XCTAssertTrue(try ok(["vdisk", "verify", "v", "--phase", "read", "--seed", "5"]).contains("matched the pattern"))
        XCTAssertTrue(try ok(["mirror", "verify", "v"]).contains(" 0 differ"))
        try assertLegsIdentical(loops[0], loops[1], bytes: 8 << 20)
    }

    func testAddLegUnderAWorkloadEndsWithIdenticalLegs() throws {
        _ = try ok(["vdisk", "create", "g", "--pool", "a", "--size", "16M"])
        _ = try ok(["vdisk", "verify", "g"])
        let state = self.state
        let failures = Counter()
        let worker = Thread {
            for _ in 0..<8 where (try? CLI.run(["vdisk", "verify", "g", "--size", "4M", "--dir", state]))?.status != 0 { failures.add() }
        }
        worker.start()
        usleep(50_000)
        XCTAssertTrue(try ok(["mirror", "add-leg", "g", "--pool", "b"]).contains("copying"))
        while !worker.isFinished { usleep(10_000) }
        var tries = 0
        while try mirrorState("g")["state"] as? String != "normal", tries < 400 { usleep(25_000); tries += 1 }
        XCTAssertEqual(try mirrorState("g")["state"] as? String, "normal")
        XCTAssertEqual(failures.value, 0)
        try assertLegsIdentical(loops[0], loops[1], bytes: 16 << 20)
        XCTAssertTrue(try ok(["mirror", "verify", "g"]).contains(" 0 differ"))
    }

    func testSplitGivesAnIndependentVDiskAsOfTheSplit() throws {
        _ = try ok(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "b", "--size", "8M"])
        _ = try ok(["vdisk", "verify", "m"])
        let reserve: UInt64 = 4 << 20
        let before = try FileHandle(forReadingFrom: URL(fileURLWithPath: loops[0]))
        try before.seek(toOffset: reserve)
        let asOfSplit = before.readData(ofLength: 8 << 20)
        XCTAssertTrue(try ok(["mirror", "split", "m", "--leg", "1", "--as", "m-copy"]).contains("split off"))
        _ = try ok(["vdisk", "verify", "m"]) // new data on m only
        let copy = try FileHandle(forReadingFrom: URL(fileURLWithPath: loops[1]))
        try copy.seek(toOffset: reserve)
        XCTAssertTrue(copy.readData(ofLength: 8 << 20) == asOfSplit, "the split leg holds the data as of the split")
        let now = try FileHandle(forReadingFrom: URL(fileURLWithPath: loops[0]))
        try now.seek(toOffset: reserve)
        XCTAssertFalse(now.readData(ofLength: 8 << 20) == asOfSplit, "the mirror moved on")
        XCTAssertTrue(try ok(["vdisk", "list"]).contains("m-copy"))
        XCTAssertTrue(try ok(["vdisk", "verify", "m-copy"]).contains("verified"), "the split vdisk is usable")
        let remove = try CLI.run(["mirror", "remove-leg", "m", "--leg", "0", "--dir", state])
        XCTAssertEqual(remove.status, 1, "the only leg cannot go")
    }

    func testLegBackAfterAFewWritesResyncsOnlyDirtyRegions() throws {
        _ = try ok(["vdisk", "create", "d", "--pool", "a", "--mirror-pool", "b", "--size", "24M"])
        _ = try ok(["vdisk", "verify", "d"])
        var tries = 0
        while try mirrorState("d")["dirtyRegionCount"] as? Int != 0, tries < 100 { usleep(50_000); tries += 1 }
        XCTAssertEqual(shell(["blockdev", "--setro", loops[1]]).0, 0)
        _ = try ok(["vdisk", "verify", "d", "--size", "2M"]) // a few writes while leg b is away
        XCTAssertEqual(try mirrorState("d")["state"] as? String, "partial")
        XCTAssertEqual(shell(["blockdev", "--setrw", loops[1]]).0, 0)
        let out = try ok(["mirror", "resync", "d", "--json"])
        let report = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Any])
        XCTAssertEqual(report["regions"] as? Int, 2, "only the 2 dirty regions of 24 are walked")
        XCTAssertEqual(report["regionsTotal"] as? Int, 24)
        try assertLegsIdentical(loops[0], loops[1], bytes: 24 << 20)
    }

    func testAReadErrorIsServedFromTheOtherLegAndTheBadLegRewritten() throws {
        // Leg 0 (pool b) is read first; its device starts failing reads when its backing file shrinks.
        _ = try ok(["vdisk", "create", "r", "--pool", "b", "--mirror-pool", "a", "--size", "8M"])
        _ = try ok(["vdisk", "verify", "r", "--phase", "write", "--seed", "99"])
        XCTAssertEqual(truncate(dir.file("b.img"), 6 << 20), 0) // data area 4M..12M: the last 6 MiB of it now read short
        let r = try ok(["vdisk", "verify", "r", "--phase", "read", "--seed", "99"])
        XCTAssertTrue(r.contains("matched the pattern"), r)
        XCTAssertEqual((try mirrorState("r")["legs"] as? [[String: Any]])?[0]["state"] as? String, "in-sync",
                       "the rewrite of the bad range succeeded, the leg stays in sync")
        try assertLegsIdentical(loops[1], loops[0], bytes: 8 << 20)
    }

    /// Compares one 1 MiB extent's data on two LUNs.
    private func extent(_ lun: String, _ index: Int) throws -> Data {
        let f = try FileHandle(forReadingFrom: URL(fileURLWithPath: lun))
        try f.seek(toOffset: UInt64((4 + index) << 20)) // after the 4 MiB metadata reserve
        return f.readData(ofLength: 1 << 20)
    }

    func testNewThinExtentsAreZeroedOnEveryLegAndAFailedLegGetsThemByResync() throws {
        // Leave another vdisk's data in pool b's extents, then give them to a thin mirror.
        _ = try ok(["vdisk", "create", "old", "--pool", "b", "--size", "8M"])
        _ = try ok(["vdisk", "verify", "old"])
        _ = try ok(["vdisk", "delete", "old"])
        _ = try ok(["vdisk", "create", "tm", "--pool", "a", "--mirror-pool", "b", "--size", "8M", "--thin"])
        _ = try ok(["vdisk", "export", "tm"])
        let uri = "nbd+unix:///tm?socket=\(state)/nbd.sock"
        var (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri, "-c", "write -P 0x6b 0 64k"])
        XCTAssertEqual(rc, 0, out)
        // Extent 0 on both legs: the 64 KiB written, zeroes after (not the old vdisk's data).
        var expected = Data(repeating: 0x6b, count: 64 << 10) + Data(repeating: 0, count: (1 << 20) - (64 << 10))
        XCTAssertEqual(try extent(loops[0], 0), expected)
        XCTAssertEqual(try extent(loops[1], 0), expected)

        // Leg b's device turns read-only: its pool cannot commit the new chunk's mapping, so
        // the leg fails (automatic-failover) and the host write succeeds on leg a.
        XCTAssertEqual(shell(["blockdev", "--setro", loops[1]]).0, 0)
        (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri, "-c", "write -P 0x2e 4M 64k", "-c", "read -P 0x2e 4M 64k",
                           "-c", "read -P 0 4160k 960k"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertFalse(out.contains("Pattern verification failed"), out)
        XCTAssertEqual((try mirrorState("tm")["legs"] as? [[String: Any]])?[1]["state"] as? String, "failed")
        // Both pools hand out their lowest free extent: the vdisk's extent 4 is LUN extent 1 on
        // leg a; leg b has none yet (the old vdisk's data there was zeroed when it was deleted).
        XCTAssertEqual(try extent(loops[1], 1), Data(repeating: 0, count: 1 << 20), "freed space on leg b is zeros")
        XCTAssertNotEqual(try extent(loops[1], 1), try extent(loops[0], 1))

        // Resync maps leg b's chunk and copies the whole new extent, not just the region written.
        XCTAssertEqual(shell(["blockdev", "--setrw", loops[1]]).0, 0)
        _ = try ok(["mirror", "resync", "tm"])
        XCTAssertEqual(try mirrorState("tm")["state"] as? String, "normal")
        expected = Data(repeating: 0x2e, count: 64 << 10) + Data(repeating: 0, count: (1 << 20) - (64 << 10))
        XCTAssertEqual(try extent(loops[0], 1), expected)
        XCTAssertEqual(try extent(loops[1], 1), expected)
        XCTAssertTrue(try ok(["mirror", "verify", "tm"]).contains(" 0 differ"))
    }

    func testResyncWithoutAnInSyncLegCopiesNothing() throws {
        _ = try ok(["vdisk", "create", "x", "--pool", "b", "--mirror-pool", "c", "--size", "4M"])
        XCTAssertEqual(shell(["blockdev", "--setro", loops[1]]).0, 0)
        XCTAssertEqual(shell(["blockdev", "--setro", loops[2]]).0, 0)
        _ = try? CLI.run(["vdisk", "verify", "x", "--dir", state]) // both legs fail
        XCTAssertEqual(try mirrorState("x")["state"] as? String, "failed")
        let r = try CLI.run(["mirror", "resync", "x", "--dir", state])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("no in-sync leg to copy from; nothing copied"), r.stderr)
    }
}

final class Counter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add() { lock.lock(); n += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return n }
}
