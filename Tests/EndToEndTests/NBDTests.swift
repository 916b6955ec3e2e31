import Foundation
import XCTest

/// The NBD front end with real clients (nbdinfo, qemu-io, nbdcopy, qemu-img, fio's nbd engine).
final class NBDTests: XCTestCase {
    var dir: TempDir!
    var state: String { dir.file("state") }
    var socket: String { state + "/nbd.sock" }
    var daemon: ServeProcess?
    var log: String { dir.file("serve.log") }

    private func tool(_ name: String) -> Bool { shell(["sh", "-c", "command -v \(name)"]).0 == 0 }

    override func setUpWithError() throws {
        for t in ["nbdinfo", "qemu-io", "nbdcopy", "qemu-img"] where !tool(t) {
            throw XCTSkip("NBD tests skipped: \(t) not installed (Debian: qemu-utils, libnbd-bin)")
        }
        dir = TempDir()
        XCTAssertEqual(try CLI.run(["domain", "init", "--dir", state, "--name", "n"]).status, 0)
        daemon = try ServeProcess(state: state, log: log)
        for pool in ["a", "b"] {
            _ = try ok(["pool", "create", pool, "--array-profile", "file-backed", "--lun", dir.file("\(pool).img"), "--create-size", "100M"])
        }
        _ = try ok(["vdisk", "create", "v1", "--pool", "a", "--size", "64M"])
        _ = try ok(["vdisk", "create", "m1", "--pool", "a", "--mirror-pool", "b", "--size", "16M"])
        _ = try ok(["vdisk", "export", "v1"])
        _ = try ok(["vdisk", "export", "m1"])
    }

    override func tearDown() {
        daemon?.stop()
        dir = nil // XCTest keeps test cases alive to the end: remove the LUN files now
    }

    func restart(extra: [String] = []) throws {
        daemon?.stop()
        daemon = try ServeProcess(state: state, extra: extra, log: log)
    }

    func json(_ args: [String]) throws -> [String: Any] {
        try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok(args + ["--json"]).utf8)) as? [String: Any])
    }

    private func exportCounters(_ name: String) throws -> [String: Any] {
        let nbd = try XCTUnwrap(try json(["status"])["nbd"] as? [String: Any])
        let exports = try XCTUnwrap(nbd["exports"] as? [[String: Any]])
        let e = try XCTUnwrap(exports.first { $0["name"] as? String == name }, "\(exports)")
        return try XCTUnwrap(e["counters"] as? [String: Any])
    }

    func ok(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try CLI.run(args + ["--dir", state])
        XCTAssertEqual(r.status, 0, "\(args): \(r.stderr)", file: file, line: line)
        return r.stdout
    }

    func uri(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(socket)" }

    func testListAndQemuIOOnPlainAndMirroredVDisks() throws {
        let (status, list) = shell(["timeout", "20", "nbdinfo", "--list", "nbd+unix:///?socket=\(socket)"])
        XCTAssertEqual(status, 0)
        XCTAssertTrue(list.contains("export=\"v1\"") && list.contains("67108864"), list)
        XCTAssertTrue(list.contains("export=\"m1\"") && list.contains("16777216"), list)
        for export in ["v1", "m1"] {
            let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri(export), "-c", "write -P 0xab 0 1M",
                                   "-c", "read -P 0xab 0 1M", "-c", "write -z 65536 8192", "-c", "read -P 0 65536 8192", "-c", "flush"])
            XCTAssertEqual(rc, 0, out)
            XCTAssertFalse(out.contains("Pattern verification failed"), out)
        }
        XCTAssertTrue(try ok(["mirror", "verify", "m1"]).contains(" 0 differ"))
        // By default the NBD event loop reaps the LUN I/O it starts (one wake-up per request): the
        // 1 MiB writes and reads above went through its engine (16 chunks of 64 KiB at least, per leg).
        let nbd = try XCTUnwrap(try json(["status"])["nbd"] as? [String: Any])
        XCTAssertGreaterThanOrEqual(try XCTUnwrap(nbd["completedOnLoop"] as? Int), 4, "NBD I/O did not complete on the event loop")
        XCTAssertTrue(try ok(["status"]).contains("completions reaped on the event loop"))
    }

    func testNBDCopyInAndOutComparesEqual() throws {
        let source = dir.file("random.bin"), back = dir.file("back.bin")
        var bytes = [UInt8](repeating: 0, count: 64 << 20)
        var x: UInt64 = 0x1234_5678
        for i in stride(from: 0, to: bytes.count, by: 8) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            withUnsafeBytes(of: x) { for j in 0..<8 { bytes[i + j] = $0[j] } }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: source))
        XCTAssertEqual(shell(["timeout", "60", "nbdcopy", source, uri("v1")]).0, 0)
        XCTAssertEqual(shell(["timeout", "60", "nbdcopy", uri("v1"), back]).0, 0)
        XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: back)) == Data(bytes), "what went in comes back out")
        let converted = dir.file("converted.raw")
        XCTAssertEqual(shell(["timeout", "60", "qemu-img", "convert", "-O", "raw", uri("v1"), converted]).0, 0)
        XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: converted)) == Data(bytes))
    }

    func testFioVerifyOnAMirrorLeavesIdenticalLegs() throws {
        let (hasEngine, _) = shell(["sh", "-c", "fio --enghelp=nbd >/dev/null 2>&1"])
        guard hasEngine == 0 else { throw XCTSkip("fio has no nbd engine here") }
        // Two connections at once (multi-conn), each on its own half, QD32 each.
        let (rc, out) = shell(["timeout", "120", "fio", "--name=v", "--ioengine=nbd", "--uri=\(uri("m1"))", "--rw=randwrite", "--bs=4k",
                               "--iodepth=32", "--numjobs=2", "--size=8M", "--offset_increment=8M", "--verify=crc32c",
                               "--do_verify=1", "--verify_state_save=0", "--output-format=terse"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertTrue(try ok(["mirror", "verify", "m1"]).contains(" 0 differ"), "both legs hold the same bytes")
    }

    func testMalformedHandshakesAreDroppedAndOthersUnaffected() throws {
        // A client that sends garbage instead of option magic is disconnected.
        let garbage = try NBDRawClient(socket: socket)
        let greeting = try XCTUnwrap(garbage.receive(18))
        XCTAssertEqual(Array(greeting[0..<8]), Array("NBDMAGIC".utf8))
        garbage.send([0, 0, 0, 3])
        garbage.send([UInt8](repeating: 0x41, count: 16))
        XCTAssertTrue(garbage.isClosedByServer(), "bad option magic: the server closes the connection")
        // An unknown export is an error reply, not a crash; normal clients keep working.
        let (bad, _) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("nope"), "-c", "read 0 512"])
        XCTAssertNotEqual(bad, 0)
        let (good, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("v1"), "-c", "read 0 4096"])
        XCTAssertEqual(good, 0, out)
        XCTAssertTrue(try ok(["status"]).contains("health: normal"))
    }

    func testExportsPersistReadOnlyRefusesWritesAndUnexportDropsClients() throws {
        _ = try ok(["vdisk", "create", "t1", "--pool", "b", "--size", "16M", "--thin"])
        let list = { shell(["timeout", "20", "nbdinfo", "--list", "nbd+unix:///?socket=\(self.socket)"]).1 }
        XCTAssertFalse(list().contains("export=\"t1\""), "a vdisk is not served until it is exported")
        XCTAssertNotEqual(shell(["timeout", "20", "qemu-io", "-r", "-f", "raw", uri("t1"), "-c", "read 0 512"]).0, 0)

        _ = try ok(["vdisk", "export", "t1", "--read-only"])
        let client = try NBDRawClient(socket: socket)
        XCTAssertEqual(try client.handshake(export: "t1"), 16 << 20)
        client.send(NBDRawClient.request(type: 1, cookie: 1, offset: 0, length: 4096) + [UInt8](repeating: 0xee, count: 4096))
        XCTAssertEqual(client.simpleReply()?.error, 1, "a write to a read-only export is EPERM")
        for (type, cookie) in [(UInt16(4), UInt64(2)), (6, 3)] { // trim, write zeroes
            client.send(NBDRawClient.request(type: type, cookie: cookie, offset: 0, length: 4096))
            let r = client.simpleReply()
            XCTAssertEqual(r?.error, 1)
            XCTAssertEqual(r?.cookie, cookie)
        }
        client.send(NBDRawClient.request(type: 0, cookie: 4, offset: 0, length: 4096))
        let read = client.simpleReply(dataBytes: 4096)
        XCTAssertEqual(read?.error, 0)
        XCTAssertEqual(read?.data, [UInt8](repeating: 0, count: 4096), "the refused write changed nothing")

        // Exports persist across a restart, with their mode.
        try restart()
        XCTAssertEqual(try json(["vdisk", "show", "t1"])["export"] as? String, "read-only")
        XCTAssertTrue(list().contains("export=\"t1\""))

        // Changing the mode closes the clients that negotiated the old one.
        let reader = try NBDRawClient(socket: socket)
        _ = try reader.handshake(export: "t1")
        XCTAssertTrue(try ok(["vdisk", "export", "t1"]).contains("1 connection(s) closed"))
        XCTAssertTrue(reader.isClosedByServer())
        let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("t1"), "-c", "write -P 0x3c 0 64k", "-c", "read -P 0x3c 0 64k"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertFalse(out.contains("Pattern verification failed"), out)

        let refused = try CLI.run(["vdisk", "delete", "t1", "--dir", state])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertEqual(refused.stderr, "svsp-ctl: vdisk 't1' is exported over NBD (read-write); run `svsp-ctl vdisk unexport t1` first\n")
        _ = try ok(["vdisk", "unexport", "t1"])
        XCTAssertFalse(list().contains("export=\"t1\""))
        _ = try ok(["vdisk", "delete", "t1"])
    }

    func testTCPListenerServesTheSameExports() throws {
        try restart(extra: ["--nbd-listen", "127.0.0.1:0"])
        let nbd = try XCTUnwrap(try json(["status"])["nbd"] as? [String: Any])
        let tcp = try XCTUnwrap(nbd["tcp"] as? String)
        XCTAssertTrue(tcp.hasPrefix("127.0.0.1:") && !tcp.hasSuffix(":0"), tcp)
        let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", "nbd://\(tcp)/v1", "-c", "write -P 0x5a 1M 1M"])
        XCTAssertEqual(rc, 0, out)
        let (rc2, out2) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("v1"), "-c", "read -P 0x5a 1M 1M"])
        XCTAssertEqual(rc2, 0, out2)
        XCTAssertFalse(out2.contains("Pattern verification failed"), out2)

        daemon?.stop()
        let bad = try CLI.run(["serve", "--dir", state, "--profiles", ServeProcess.profiles, "--nbd-listen", "127.0.0.1:99999"])
        XCTAssertEqual(bad.status, 1)
        XCTAssertEqual(bad.stderr.split(separator: "\n").last.map(String.init),
                       "svsp-ctl: --nbd-listen '127.0.0.1:99999': expected PORT or HOST:PORT (port 0..65535)")
    }

    func testConnectionsBeyondTheLimitAreTurnedAwayAndIdleOnesTimeOut() throws {
        // With completions left to the domain engine's reaper thread, polling before it sleeps, so the
        // requests below run through that path too (every other test here reaps on the NBD event loop;
        // PollingTests checks that polling happens and keeps data intact).
        try restart(extra: ["--nbd-max-connections", "2", "--nbd-completions", "thread", "--reap-poll-us", "50"])
        // One connection that never negotiates, one that does: the limit is reached.
        let idle = try NBDRawClient(socket: socket)
        let connectedAt = Date()
        let second = try NBDRawClient(socket: socket)
        XCTAssertEqual(try second.handshake(export: "m1"), 16 << 20)
        for _ in 0..<2 {
            let over = try NBDRawClient(socket: socket)
            XCTAssertTrue(over.isClosedByServer(), "a third connection is closed before the greeting")
        }
        // The admitted connection still works.
        let pattern = [UInt8](repeating: 0x6d, count: 4096)
        second.send(NBDRawClient.request(type: 1, cookie: 7, offset: 8192, length: 4096) + pattern)
        XCTAssertEqual(second.simpleReply()?.error, 0)
        second.send(NBDRawClient.request(type: 0, cookie: 8, offset: 8192, length: 4096))
        let read = try XCTUnwrap(second.simpleReply(dataBytes: 4096))
        XCTAssertEqual(read.cookie, 8)
        XCTAssertEqual(read.data, pattern)

        let nbd = try XCTUnwrap(try json(["status"])["nbd"] as? [String: Any])
        XCTAssertEqual(nbd["maxConnections"] as? Int, 2)
        XCTAssertEqual(nbd["turnedAway"] as? Int, 2)
        XCTAssertTrue(try ok(["status"]).contains("at most 2 connections (2 turned away)"))
        XCTAssertNil(nbd["completedOnLoop"], "--nbd-completions thread: nothing is reaped on the event loop")
        XCTAssertTrue(try ok(["status"]).contains("completions reaped by the engine's thread"))
        var logText = try String(contentsOfFile: log, encoding: .utf8)
        XCTAssertEqual(logText.components(separatedBy: "connections open, closing new ones").count - 1, 1, "logged once: \(logText)")

        // The idle one is closed once the negotiation time is up, which frees its place.
        idle.setReceiveTimeout(seconds: 30)
        XCTAssertNotNil(idle.receive(18), "the greeting")
        XCTAssertTrue(idle.isClosedByServer())
        let waited = Date().timeIntervalSince(connectedAt)
        XCTAssertTrue(waited > 9 && waited < 20, "closed after \(waited) s")
        logText = try String(contentsOfFile: log, encoding: .utf8)
        XCTAssertTrue(logText.contains("no export chosen within 10 s"), logText)
        let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("m1"), "-c", "read -P 0x6d 8192 4096"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertFalse(out.contains("Pattern verification failed"), out)
        _ = second

        daemon?.stop()
        let bad = try CLI.run(["serve", "--dir", state, "--profiles", ServeProcess.profiles, "--nbd-max-connections", "0"])
        XCTAssertEqual(bad.status, 1)
        XCTAssertEqual(bad.stderr, "svsp-ctl: --nbd-max-connections 0: must be at least 1\n", "refused before anything starts")
        let badPoll = try CLI.run(["serve", "--dir", state, "--profiles", ServeProcess.profiles, "--reap-poll-us", "20000"])
        XCTAssertEqual(badPoll.status, 1)
        XCTAssertEqual(badPoll.stderr, "svsp-ctl: --reap-poll-us 20000: must be 0 to 10000 (microseconds)\n")
        let badReaper = try CLI.run(["serve", "--dir", state, "--profiles", ServeProcess.profiles, "--nbd-completions", "fast"])
        XCTAssertNotEqual(badReaper.status, 0)
        XCTAssertEqual(badReaper.stderr.split(separator: "\n").first,
                       "Error: The value 'fast' is invalid for '--nbd-completions <nbd-completions>'. Please provide one of 'loop' and 'thread'.")
    }

    func testStructuredRepliesAndBlockStatusMapAThinVDisk() throws {
        _ = try ok(["vdisk", "create", "t2", "--pool", "b", "--size", "16M", "--thin"])
        _ = try ok(["vdisk", "export", "t2"])
        let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("t2"), "-c", "write -P 0x77 4M 1M", "-c", "read -P 0x77 4M 1M"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertFalse(out.contains("Pattern verification failed"), out)
        let (irc, info) = shell(["timeout", "20", "nbdinfo", uri("t2")])
        XCTAssertEqual(irc, 0, info)
        XCTAssertTrue(info.contains("structured"), info)
        XCTAssertTrue(info.contains("base:allocation"), info)
        let map = mapRows("t2")
        XCTAssertEqual(map.status, 0, map.text)
        XCTAssertEqual(map.rows, ["0 4194304 3", "4194304 1048576 0", "5242880 11534336 3"], map.text)
        // A thick vdisk is data from end to end.
        let (_, thick) = shell(["timeout", "20", "nbdinfo", "--map", uri("v1")])
        XCTAssertEqual(thick.split(separator: "\n").count, 1, thick)
        XCTAssertTrue(thick.contains("67108864    0"), thick)
    }

    private func allocatedBytes(_ vdisk: String) throws -> Int {
        let list = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok(["vdisk", "list", "--json"]).utf8)) as? [[String: Any]])
        return try XCTUnwrap(list.first { $0["name"] as? String == vdisk }?["allocatedBytes"] as? Int)
    }

    /// `nbdinfo --map` of an export: its exit status, each row's first three fields, the raw text.
    private func mapRows(_ export: String) -> (status: Int32, rows: [String], text: String) {
        let (status, map) = shell(["timeout", "20", "nbdinfo", "--map", uri(export)])
        return (status, map.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true).prefix(3).joined(separator: " ") }, map)
    }

    func testTrimOfAThinVDiskFreesWholeExtentsAndZeroesTheRest() throws {
        // File-backed pools have 1 MiB extents.
        _ = try ok(["vdisk", "create", "t3", "--pool", "b", "--size", "16M", "--thin"])
        _ = try ok(["vdisk", "create", "tm", "--pool", "a", "--mirror-pool", "b", "--size", "8M", "--thin"])
        for v in ["t3", "tm"] { _ = try ok(["vdisk", "export", v]) }
        var (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("t3"), "-c", "write -P 0x5c 0 16M"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertEqual(try allocatedBytes("t3"), 16 << 20)
        // 1.5 MiB .. 6.5 MiB: extents 2-5 are freed, the half extents at both ends zeroed.
        (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("t3"), "-c", "discard 1536k 5M"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertEqual(try allocatedBytes("t3"), 12 << 20)
        XCTAssertEqual(mapRows("t3").rows, ["0 2097152 0", "2097152 4194304 3", "6291456 10485760 0"])
        (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("t3"), "-c", "read -P 0x5c 0 1536k", "-c", "read -P 0 1536k 5M",
                           "-c", "read -P 0x5c 6656k 9728k"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertFalse(out.contains("Pattern verification failed"), out)
        // A freed extent is allocated again by the next write into it.
        (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("t3"), "-c", "write -P 0x3a 3M 64k", "-c", "read -P 0x3a 3M 64k",
                           "-c", "read -P 0 3136k 960k"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertFalse(out.contains("Pattern verification failed"), out)
        XCTAssertEqual(try allocatedBytes("t3"), 13 << 20)

        // A thin mirror frees the extents on both legs, which still agree.
        (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("tm"), "-c", "write -P 0x44 0 8M", "-c", "discard 1M 3M",
                           "-c", "read -P 0 1M 3M", "-c", "read -P 0x44 4M 4M"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertFalse(out.contains("Pattern verification failed"), out)
        XCTAssertEqual(try allocatedBytes("tm"), 5 << 20)
        XCTAssertTrue(try ok(["mirror", "verify", "tm"]).contains(" 0 differ"))

        // A thick vdisk keeps its extents: a trim writes zeroes.
        (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("v1"), "-c", "write -P 0x19 0 4M", "-c", "discard 0 4M",
                           "-c", "read -P 0 0 4M"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertFalse(out.contains("Pattern verification failed"), out)
        XCTAssertEqual(try allocatedBytes("v1"), 64 << 20)
    }

    func testTrimsAndWritesOnTwoThinVDisksSharingAPoolKeepEveryByte() throws {
        // Two thin vdisks in pool b free and allocate extents concurrently, each with a
        // round of requests in flight at once: writes, whole-extent trims (freed) and half
        // trims (zeroed). A round's requests touch different extents and the next round
        // starts once all are answered, so the end state is known exactly.
        let extents = 24, rounds = 6, half = 512 << 10
        struct Model { var halves: [UInt8]; var allocated: [Bool] }
        final class Outcome: @unchecked Sendable { var models: [String: Model] = [:]; var errors: [String] = []; let lock = NSLock() }
        let outcome = Outcome()
        for name in ["t1", "t2"] {
            _ = try ok(["vdisk", "create", name, "--pool", "b", "--size", "\(extents)M", "--thin"])
            _ = try ok(["vdisk", "export", name])
        }
        let workers = ["t1", "t2"].enumerated().map { n, name in
            Thread { [socket] in
                var m = Model(halves: Array(repeating: 0, count: extents * 2), allocated: Array(repeating: false, count: extents))
                func fail(_ why: String) { outcome.lock.withLock { outcome.errors.append("\(name): \(why)") } }
                guard let c = try? NBDRawClient(socket: socket), (try? c.handshake(export: name)) != nil else { return fail("no connection") }
                for round in 0..<rounds {
                    var batch: [UInt8] = []
                    for i in 0..<extents {
                        let p = UInt8(1 + (round * 37 + i * 5 + n * 101) % 250)
                        let at = UInt64(i) << 20, cookie = UInt64(round * 100 + i)
                        // Each extent steps through the four in turn, so a freed extent is next half
                        // trimmed (nothing there) and then half written (allocated anew: the rest must read 0).
                        switch (i + round + 2 * n) % 4 {
                        case 0: // write the whole extent
                            batch += NBDRawClient.request(type: 1, cookie: cookie, offset: at, length: 1 << 20) + [UInt8](repeating: p, count: 1 << 20)
                            (m.halves[2 * i], m.halves[2 * i + 1], m.allocated[i]) = (p, p, true)
                        case 1: // trim it whole: freed
                            batch += NBDRawClient.request(type: 4, cookie: cookie, offset: at, length: 1 << 20)
                            (m.halves[2 * i], m.halves[2 * i + 1], m.allocated[i]) = (0, 0, false)
                        case 2: // trim its first half: zeroed
                            batch += NBDRawClient.request(type: 4, cookie: cookie, offset: at, length: UInt32(half))
                            m.halves[2 * i] = 0
                        default: // write its second half
                            batch += NBDRawClient.request(type: 1, cookie: cookie, offset: at + UInt64(half), length: UInt32(half))
                                + [UInt8](repeating: p, count: half)
                            (m.halves[2 * i + 1], m.allocated[i]) = (p, true)
                        }
                    }
                    c.send(batch)
                    var answered: Set<UInt64> = []
                    for _ in 0..<extents {
                        guard let reply = c.simpleReply() else { return fail("round \(round): connection closed") }
                        if reply.error != 0 { fail("round \(round) cookie \(reply.cookie): error \(reply.error)") }
                        answered.insert(reply.cookie)
                    }
                    if answered.count != extents { fail("round \(round): \(answered.count) distinct replies") }
                }
                outcome.lock.withLock { outcome.models[name] = m }
            }
        }
        workers.forEach { $0.start() }
        while workers.contains(where: { !$0.isFinished }) { usleep(20_000) }
        XCTAssertEqual(outcome.errors, [])
        for name in ["t1", "t2"] {
            let m = try XCTUnwrap(outcome.models[name], name)
            let reads = (0..<(extents * 2)).flatMap { h in ["-c", "read -P \(m.halves[h]) \(h * 512)k 512k"] }
            let (rc, out) = shell(["timeout", "60", "qemu-io", "-f", "raw", uri(name)] + reads)
            XCTAssertEqual(rc, 0, out)
            XCTAssertFalse(out.contains("Pattern verification failed"), "\(name): \(out)")
            XCTAssertEqual(out.components(separatedBy: "read 524288/524288").count - 1, extents * 2, out)
            XCTAssertEqual(try allocatedBytes(name), m.allocated.filter { $0 }.count << 20, name)
        }
    }

    func testPipelinedWriteTrimReadOnOneExtentAllAnswered() throws {
        // Requests racing on one extent while it is freed: all are answered, the read sees
        // either the pattern or zeroes (nothing else), and the daemon goes on.
        _ = try ok(["vdisk", "create", "t4", "--pool", "b", "--size", "4M", "--thin"])
        _ = try ok(["vdisk", "export", "t4"])
        let c = try NBDRawClient(socket: socket)
        _ = try c.handshake(export: "t4")
        for round in 0..<20 {
            let pattern = [UInt8](repeating: UInt8(round + 1), count: 1 << 20)
            let base = UInt64(round % 4) << 20
            c.send(NBDRawClient.request(type: 1, cookie: 1, offset: base, length: 1 << 20) + pattern
                + NBDRawClient.request(type: 4, cookie: 2, offset: base, length: 1 << 20)
                + NBDRawClient.request(type: 0, cookie: 3, offset: base, length: 1 << 20))
            var seen: Set<UInt64> = []
            for _ in 0..<3 {
                // Replies come in completion order; only the read carries data.
                guard let head = c.receive(16) else { return XCTFail("round \(round): connection closed") }
                let error: UInt32 = NBDRawClient.int(head[4..<8]), cookie: UInt64 = NBDRawClient.int(head[8..<16])
                XCTAssertEqual(error, 0, "round \(round) cookie \(cookie)")
                if cookie == 3 {
                    let data = try XCTUnwrap(c.receive(1 << 20))
                    let first = data[0]
                    XCTAssertTrue(first == 0 || first == UInt8(round + 1), "round \(round): read \(first)")
                    XCTAssertTrue(data.allSatisfy { $0 == first }, "round \(round): a torn read")
                }
                seen.insert(cookie)
            }
            XCTAssertEqual(seen, [1, 2, 3])
        }
        let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("v1"), "-c", "write -P 0x61 0 64k", "-c", "read -P 0x61 0 64k"])
        XCTAssertEqual(rc, 0, out)

        // On a thin mirror, a write right behind a trim of its extent waits for its dirty bit
        // while the trim frees the extent: it must allocate anew, not fail the legs.
        _ = try ok(["vdisk", "create", "tm4", "--pool", "a", "--mirror-pool", "b", "--size", "4M", "--thin"])
        _ = try ok(["vdisk", "export", "tm4"])
        let m = try NBDRawClient(socket: socket)
        _ = try m.handshake(export: "tm4")
        for round in 0..<20 {
            let base = UInt64(round % 4) << 20
            m.send(NBDRawClient.request(type: 1, cookie: 9, offset: base, length: 4096) + [UInt8](repeating: 0x70, count: 4096))
            XCTAssertEqual(m.simpleReply()?.error, 0)
            let pattern = [UInt8](repeating: UInt8(round + 1), count: 64 << 10)
            m.send(NBDRawClient.request(type: 4, cookie: 1, offset: base, length: 1 << 20)
                + NBDRawClient.request(type: 1, cookie: 2, offset: base, length: 64 << 10) + pattern)
            let replies = [m.simpleReply(), m.simpleReply()]
            XCTAssertEqual(replies.map { $0?.error }, [0, 0], "round \(round)")
        }
        let status = try json(["mirror", "status", "tm4"])
        XCTAssertEqual(status["state"] as? String, "normal", "\(status)")
        XCTAssertTrue(try ok(["mirror", "verify", "tm4"]).contains(" 0 differ"))
    }

    func testMalformedRequestsGetProtocolErrorsAndOthersUnaffected() throws {
        let c = try NBDRawClient(socket: socket)
        XCTAssertEqual(try c.handshake(export: "v1"), 64 << 20)
        let cases: [(String, [UInt8], UInt32)] = [
            ("misaligned read", NBDRawClient.request(type: 0, cookie: 10, offset: 100, length: 512), 22),
            ("zero-length read", NBDRawClient.request(type: 0, cookie: 11, offset: 0, length: 0), 22),
            ("read past the end", NBDRawClient.request(type: 0, cookie: 12, offset: 64 << 20, length: 4096), 22),
            ("read above the maximum", NBDRawClient.request(type: 0, cookie: 13, offset: 0, length: 2 << 20), 22),
            ("unknown command", NBDRawClient.request(type: 99, cookie: 14, offset: 0, length: 0), 22),
            ("write past the end", NBDRawClient.request(type: 1, cookie: 15, offset: (64 << 20) - 512, length: 4096)
                + [UInt8](repeating: 1, count: 4096), 28),
            ("misaligned write", NBDRawClient.request(type: 1, cookie: 16, offset: 7, length: 512)
                + [UInt8](repeating: 1, count: 512), 22),
            ("write above the maximum block size", NBDRawClient.request(type: 1, cookie: 17, offset: 0, length: 2 << 20)
                + [UInt8](repeating: 1, count: 2 << 20), 22),
        ]
        for (what, bytes, expected) in cases {
            c.send(bytes)
            let r = c.simpleReply()
            XCTAssertEqual(r?.error, expected, what)
            XCTAssertEqual(r?.cookie, UInt64(bytes[8..<16].reduce(0) { $0 << 8 | UInt64($1) }), what)
        }
        // The connection still works, also with a header split across two sends.
        let pattern = (0..<8192).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let header = NBDRawClient.request(type: 1, cookie: 20, offset: 1 << 20, length: 8192)
        c.send(Array(header[0..<11]))
        usleep(50_000)
        c.send(Array(header[11...]) + Array(pattern[0..<3000]))
        usleep(50_000)
        c.send(Array(pattern[3000...]))
        XCTAssertEqual(c.simpleReply()?.error, 0)
        c.send(NBDRawClient.request(type: 0, cookie: 21, offset: 1 << 20, length: 8192))
        XCTAssertEqual(c.simpleReply(dataBytes: 8192)?.data, pattern, "written bytes read back")
        c.send(NBDRawClient.request(type: 3, cookie: 22, offset: 0, length: 0))
        XCTAssertEqual(c.simpleReply()?.error, 0, "flush")
        c.send(NBDRawClient.request(type: 3, cookie: 24, offset: UInt64.max, length: 4096))
        XCTAssertEqual(c.simpleReply()?.cookie, 24, "a flush with nonsense fields is still just a flush")
        // Bad magic: the stream cannot be trusted any more, so the server disconnects.
        c.send(NBDRawClient.request(type: 0, cookie: 23, offset: 0, length: 512, magic: 0xDEAD_BEEF))
        XCTAssertTrue(c.isClosedByServer())

        // A write beyond what the protocol lets a client expect (32 MiB): disconnected, nothing buffered.
        let big = try NBDRawClient(socket: socket)
        _ = try big.handshake(export: "v1")
        big.send(NBDRawClient.request(type: 1, cookie: 30, offset: 0, length: 64 << 20))
        XCTAssertTrue(big.isClosedByServer())
        // A client that goes away in the middle of a write's payload.
        do {
            let half = try NBDRawClient(socket: socket)
            _ = try half.handshake(export: "v1")
            half.send(NBDRawClient.request(type: 1, cookie: 40, offset: 0, length: 65536) + [UInt8](repeating: 9, count: 1000))
        }
        usleep(100_000)

        let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("v1"), "-c", "read -P 0 0 4096", "-c", "read 1M 8192"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertFalse(out.contains("Pattern verification failed"), "the half-sent write was never applied: \(out)")
        XCTAssertEqual(try json(["status"])["health"] as? String, "normal")
        XCTAssertEqual(try exportCounters("v1")["refused"] as? Int, 10, "8 refused requests, the bad magic and the oversized write")
        let logText = try String(contentsOfFile: log, encoding: .utf8)
        XCTAssertEqual(logText.components(separatedBy: "refused a request").count - 1, 1, "refusals on one connection are logged once: \(logText)")
        XCTAssertTrue(logText.contains("bad request magic 0xdeadbeef"), logText)
        XCTAssertTrue(logText.contains("disconnected in the middle of a request"), logText)
    }

    func testStatusAndMetricsCountNBDTraffic() throws {
        let port = 20000 + Int((getpid() + 7) % 20000)
        try restart(extra: ["--metrics-listen", "127.0.0.1:\(port)"])
        let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("m1"), "-c", "write -P 0x11 0 1M", "-c", "read -P 0x11 0 1M"])
        XCTAssertEqual(rc, 0, out)
        let counters = try exportCounters("m1")
        XCTAssertEqual(counters["bytesWritten"] as? Int, 1 << 20)
        XCTAssertGreaterThanOrEqual(counters["bytesRead"] as? Int ?? 0, 1 << 20)
        XCTAssertEqual(counters["errors"] as? Int, 0)
        // A live connection is listed with its own counters.
        let client = try NBDRawClient(socket: socket)
        _ = try client.handshake(export: "m1")
        client.send(NBDRawClient.request(type: 0, cookie: 1, offset: 0, length: 4096))
        XCTAssertEqual(client.simpleReply(dataBytes: 4096)?.data, [UInt8](repeating: 0x11, count: 4096))
        var live: [[String: Any]] = []
        for _ in 0..<40 { // qemu-io's connection may still be closing
            let nbd = try XCTUnwrap(try json(["status"])["nbd"] as? [String: Any])
            live = try XCTUnwrap(nbd["connections"] as? [[String: Any]])
            if live.count == 1 { break }
            usleep(50_000)
        }
        XCTAssertEqual(live.count, 1, "\(live)")
        XCTAssertEqual(live.first?["export"] as? String, "m1")
        XCTAssertEqual((live.first?["counters"] as? [String: Any])?["reads"] as? Int, 1)
        XCTAssertTrue(try ok(["status"]).contains("CONN"), "the table lists live connections")
        let text = try httpGet(port: port, path: "/metrics")
        XCTAssertTrue(text.contains("svsp_nbd_written_bytes_total{export=\"m1\"} 1048576"), text)
        XCTAssertTrue(text.contains("svsp_nbd_connections_count{export=\"m1\"} 1"), text)
        // The live connection has its own series, gone once it closes.
        let id = try XCTUnwrap(live.first?["id"] as? Int)
        XCTAssertTrue(text.contains("svsp_nbd_connection_reads_total{connection=\"\(id)\",export=\"m1\",peer=\"unix\"} 1"), text)
        XCTAssertTrue(text.contains("svsp_nbd_connection_read_bytes_total{connection=\"\(id)\",export=\"m1\",peer=\"unix\"} 4096"), text)
        XCTAssertTrue(text.contains("svsp_nbd_connection_in_flight_count{connection=\"\(id)\",export=\"m1\",peer=\"unix\"} 0"), text)
        client.send(NBDRawClient.request(type: 2, cookie: 2, offset: 0, length: 0)) // DISC
        XCTAssertTrue(client.isClosedByServer())
        var after = text
        for _ in 0..<40 where after.contains("connection=\"\(id)\"") {
            usleep(50_000)
            after = try httpGet(port: port, path: "/metrics")
        }
        XCTAssertFalse(after.contains("connection=\"\(id)\""), after)
        XCTAssertTrue(after.contains("svsp_nbd_reads_total{export=\"m1\"}"), "per-export totals stay")
    }

    func testPipelinedRequestsBeyondTheSlotsLongZeroingAndDisconnectAfterReplies() throws {
        // Over TCP: loopback's large socket buffers let one read loop deliver more input
        // after the connection has parked some (it must be appended, not replace it).
        try restart(extra: ["--nbd-listen", "127.0.0.1:0"])
        let tcp = try XCTUnwrap((try json(["status"])["nbd"] as? [String: Any])?["tcp"] as? String)
        let c = try NBDRawClient(tcpPort: Int(tcp.split(separator: ":").last!)!)
        _ = try c.handshake(export: "v1")
        // 384 writes of 64 KiB sent in one go: three times the connection's 32 slots, so
        // the server parks input and stops reading; every one must be answered.
        var stream: [UInt8] = []
        for i in 0..<384 {
            stream += NBDRawClient.request(type: 1, cookie: UInt64(1000 + i), offset: UInt64(i) << 16, length: 65536)
            stream += [UInt8](repeating: UInt8(truncatingIfNeeded: i + 1), count: 65536)
        }
        let bytes = stream
        let sender = Thread { c.send(bytes) } // the server may not read it all before we read replies
        sender.start()
        var cookies = Set<UInt64>()
        for _ in 0..<384 {
            let r = try XCTUnwrap(c.simpleReply())
            XCTAssertEqual(r.error, 0)
            cookies.insert(r.cookie)
        }
        XCTAssertEqual(cookies, Set((0..<384).map { UInt64(1000 + $0) }))
        for i in [0, 31, 32, 63, 200, 383] {
            c.send(NBDRawClient.request(type: 0, cookie: UInt64(i), offset: UInt64(i) << 16, length: 65536))
            XCTAssertEqual(c.simpleReply(dataBytes: 65536)?.data, [UInt8](repeating: UInt8(truncatingIfNeeded: i + 1), count: 65536),
                           "write \(i)")
        }
        // WRITE_ZEROES of 40 MiB (runs in 4 MiB pieces), then requests and DISC sent
        // together: the replies all arrive before the server closes. (384 x 64 KiB = 24 MiB.)
        c.send(NBDRawClient.request(type: 6, cookie: 2000, offset: 0, length: 40 << 20))
        XCTAssertEqual(c.simpleReply()?.error, 0)
        var tail: [UInt8] = []
        for i in 0..<8 {
            tail += NBDRawClient.request(type: 1, cookie: UInt64(3000 + i), offset: (48 << 20) + (UInt64(i) << 12), length: 4096)
            tail += [UInt8](repeating: 0xd0, count: 4096)
        }
        for i in 0..<16 { // 16 MiB of read replies still queued when DISC arrives
            tail += NBDRawClient.request(type: 0, cookie: UInt64(4000 + i), offset: UInt64(i) << 20, length: 1 << 20)
        }
        tail += NBDRawClient.request(type: 2, cookie: 3999, offset: 0, length: 0)
        c.send(tail)
        var answered = Set<UInt64>()
        for _ in 0..<24 {
            guard let head = c.receive(16) else { break }
            let cookie: UInt64 = NBDRawClient.int(head[8..<16])
            XCTAssertEqual(NBDRawClient.int(head[4..<8]) as UInt32, 0)
            if cookie >= 4000 { XCTAssertNotNil(c.receive(1 << 20), "read \(cookie)'s data") }
            answered.insert(cookie)
        }
        XCTAssertEqual(answered.count, 24, "every request before DISC is answered in full")
        XCTAssertTrue(c.isClosedByServer())
        let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("v1"), "-c", "read -P 0 0 1M", "-c", "read -P 0 39M 1M",
                               "-c", "read -P 0xd0 48M 32k"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertFalse(out.contains("Pattern verification failed"), out)
    }
}
