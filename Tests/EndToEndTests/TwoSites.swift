import Foundation
import XCTest

/// Two domains (site-a, site-b), each served by its own daemon accepting replication
/// connections on a free loopback port: the base of the peer-link and async tests.
class TwoSitesTestCase: XCTestCase {
    var dir: TempDir!
    var daemons: [String: ServeProcess] = [:]

    /// Starts both daemons (with `profiles`, default the shipped ones); with `link`, each in
    /// its end's network namespace, listening on its address there.
    func startSites(profiles: String = ServeProcess.profiles, link: ShapedLink? = nil) throws {
        for (i, site) in ["site-a", "site-b"].enumerated() {
            let r = try CLI.run(["domain", "init", "--dir", dir.file(site), "--name", site])
            XCTAssertEqual(r.status, 0, r.stderr)
            let listen = link.map { (i == 0 ? $0.addresses.0 : $0.addresses.1) + ":7790" } ?? "127.0.0.1:0"
            daemons[site] = try ServeProcess(state: dir.file(site), extra: ["--repl-listen", listen], log: dir.file(site + ".log"),
                                             profiles: profiles, netns: link.map { i == 0 ? $0.names.0 : $0.names.1 })
        }
        try "0123456789abcdef0123456789abcdef\n".write(toFile: dir.file("secret"), atomically: true, encoding: .utf8)
    }

    /// Both daemons with link profile `test-fast` (YAML text), a 160 MiB file pool `p` each,
    /// each the other's peer, and the link up.
    func startLinkedSites(linkProfile: String) throws {
        try startSites(profiles: try customProfiles(in: dir, ["links/test-fast.yaml": linkProfile]))
        for site in ["site-a", "site-b"] {
            try ok(site, ["pool", "create", "p", "--array-profile", "file-backed", "--lun", dir.file(site + ".img"), "--create-size", "160M"])
        }
        try addPeer(on: "site-a", "site-b", linkProfile: "test-fast")
        try addPeer(on: "site-b", "site-a", linkProfile: "test-fast")
        try waitFor("site-a", "site-b", "the link up") { $0["outbound"] as? String == "connected" }
    }

    override func setUpWithError() throws { dir = TempDir() }

    /// Skips the test unless the NBD clients the async tests read and write with are here.
    func requireNBDClients() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/nbdcopy"), FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-io") else {
            throw XCTSkip("needs nbdcopy (libnbd-bin) and qemu-io (qemu-utils)")
        }
    }

    /// A 16 MiB thin vdisk `v` at site-a, exported, its first 4 MiB written with `pattern`,
    /// in async group `g` to site-b; returns once the initial copy completed (the task then
    /// paused, see `nextCycle`), with the PiT it made.
    @discardableResult
    func mirroredVDisk(pattern: UInt8) throws -> String {
        try ok("site-a", ["vdisk", "create", "v", "--pool", "p", "--size", "16M", "--thin"])
        try ok("site-a", ["vdisk", "export", "v"])
        try run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P \(pattern) 0 4M", uri("site-a", "v")])
        try ok("site-a", ["async", "create-group", "g", "--source", "v", "--peer", "site-b"])
        return try nextCycle(after: 0)
    }

    /// `pool check p` is clean at each of `sites`.
    func assertPoolsClean(_ sites: [String] = ["site-a", "site-b"], file: StaticString = #filePath, line: UInt = #line) {
        for site in sites {
            let c = try? CLI.run(["pool", "check", "p", "--dir", dir.file(site)])
            XCTAssertEqual(c?.status, 0, "\(site): " + (c.map { $0.stdout + $0.stderr } ?? "pool check did not run"), file: file, line: line)
        }
    }

    override func tearDown() {
        for d in daemons.values { d.stop() }
        dir = nil
    }

    @discardableResult
    func ok(_ site: String, _ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try CLI.run(args + ["--dir", dir.file(site)])
        XCTAssertEqual(r.status, 0, "\(site) \(args): \(r.stderr)", file: file, line: line)
        return r.stdout
    }

    func json(_ site: String, _ args: [String]) throws -> [String: Any] {
        try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok(site, args + ["--json"]).utf8)) as? [String: Any])
    }

    func status(_ site: String) throws -> [String: Any] { try json(site, ["status"]) }
    func address(_ site: String) throws -> String { try XCTUnwrap(status(site)["replicationListen"] as? String) }
    func domainId(_ site: String) throws -> String { try XCTUnwrap(status(site)["domainId"] as? String) }

    func addPeer(on site: String, _ peer: String, secret: String = "secret", linkProfile: String = "wan-100m-20ms", extra: [String] = []) throws {
        try ok(site, ["peer", "add", peer, "--address", try address(peer), "--secret-file", dir.file(secret),
                      "--link-profile", linkProfile] + extra)
    }

    /// `site`'s view of its link to `peer` (`peer show --json`).
    func link(_ site: String, _ peer: String) throws -> [String: Any] {
        try json(site, ["peer", "show", peer])["link"] as? [String: Any] ?? [:]
    }

    /// Polls until `condition` holds on `site`'s link to `peer` (10 s at most).
    func waitFor(_ site: String, _ peer: String, _ what: String, file: StaticString = #filePath, line: UInt = #line,
                 _ condition: ([String: Any]) -> Bool) throws {
        for _ in 0..<100 {
            if condition(try link(site, peer)) { return }
            usleep(100_000)
        }
        XCTFail("\(site) -> \(peer): \(what); link: \(try link(site, peer))", file: file, line: line)
    }

    func log(_ site: String) -> String { (try? String(contentsOfFile: dir.file(site + ".log"), encoding: .utf8)) ?? "" }

    /// md5 of export `export` at `site`, read with nbdcopy.
    func md5(_ site: String, _ export: String) throws -> String {
        let p = Process(), out = Pipe()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "nbdcopy 'nbd+unix:///\(export)?socket=\(dir.file(site))/nbd.sock' - | md5sum"]
        p.standardOutput = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return String(decoding: data, as: UTF8.self).split(separator: " ").first.map(String.init) ?? ""
    }

    /// md5 of PiT `pit` at `site`, read through a read-only snapshot made for it.
    func pitMD5(_ site: String, _ pit: String) throws -> String {
        let snap = "chk-\(UUID().uuidString.prefix(6))"
        try ok(site, ["snapshot", "create", snap, "--pit", pit])
        try ok(site, ["vdisk", "export", snap, "--read-only"])
        defer {
            _ = try? CLI.run(["vdisk", "unexport", snap, "--dir", dir.file(site)])
            _ = try? CLI.run(["snapshot", "delete", snap, "--dir", dir.file(site)])
        }
        return try md5(site, snap)
    }

    /// `async status NAME --json` at `site`.
    func asyncGroup(_ site: String, _ name: String) throws -> [String: Any] {
        let all = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok(site, ["async", "status", name, "--json"]).utf8)) as? [[String: Any]])
        return try XCTUnwrap(all.first)
    }

    /// Runs `tool`, which must succeed; its standard output.
    @discardableResult
    func run(_ tool: String, _ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let p = Process(), out = Pipe()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = args
        p.standardOutput = out
        p.standardError = FileHandle(forWritingAtPath: "/dev/null")
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0, "\(tool) \(args)", file: file, line: line)
        return String(decoding: data, as: UTF8.self)
    }

    func uri(_ site: String, _ export: String) -> String { "nbd+unix:///\(export)?socket=\(dir.file(site))/nbd.sock" }

    /// Waits for a cycle after `after` of group `group` to complete at both sides, taken
    /// at the source no earlier than `since` (by default: the call; a PiT queued before
    /// may complete first, without the writes just made), pauses the task, returns its PiT.
    func nextCycle(after: Int, group: String = "g", since: Date? = Date(), seconds: Int = 30, source: String = "site-a", file: StaticString = #filePath,
                   line: UInt = #line) throws -> String {
        for _ in 0..<(seconds * 10) {
            let g = try asyncGroup(source, group)
            if let cycle = g["cycle"] as? Int, cycle > after, let pit = g["confirmedPiT"] as? String,
               since.map({ (g["recoveryPoint"] as? Double ?? 0) >= $0.timeIntervalSince1970 }) ?? true
            {
                try ok(source, ["async", "pause-task", group])
                usleep(1_500_000) // the cycle in flight (if any) finishes
                return try asyncGroup(source, group)["confirmedPiT"] as? String ?? pit
            }
            usleep(100_000)
        }
        XCTFail("no cycle after \(after) completed: \(try asyncGroup(source, group))", file: file, line: line)
        return ""
    }

    /// Writes link profile `test-fast` anew and restarts both daemons (same ports) to load it;
    /// returns their replication addresses.
    @discardableResult
    func relink(_ profile: String) throws -> (source: String, destination: String) {
        try profile.write(toFile: dir.file("profiles") + "/links/test-fast.yaml", atomically: true, encoding: .utf8)
        let ports = (source: try address("site-a"), destination: try address("site-b"))
        try restart("site-a", kill: SIGTERM, port: ports.source)
        try restart("site-b", kill: SIGTERM, port: ports.destination)
        try waitFor("site-a", "site-b", "the link up again") { $0["outbound"] as? String == "connected" }
        return ports
    }

    /// Restarts `site`'s daemon (after a SIGKILL or not) on the port it listened on.
    func restart(_ site: String, kill signal: Int32, port: String, environment: [String: String] = [:], extra: [String] = []) throws {
        daemons[site]?.stop(signal: signal)
        try start(site, port: port, environment: environment, extra: extra)
    }

    func start(_ site: String, port: String, environment: [String: String] = [:], extra: [String] = []) throws {
        daemons[site] = try ServeProcess(state: dir.file(site), extra: ["--repl-listen", port] + extra, log: dir.file(site + ".log"),
                                         profiles: dir.file("profiles"), environment: environment)
    }
}
