import Foundation
import XCTest

/// Two domains, two daemons, real TCP on loopback: the replication link between peers.
/// It comes up both ways with the same secret and pins each side's domain id; a wrong
/// secret, an unknown peer and a wrong domain id are refused in the handshake, each
/// logged once and shown by `peer show` on the side that can tell; garbage and malformed
/// frames (sent inside a real TLS-PSK session by `openssl s_client`) are refused and
/// logged while the good link stays up.
final class PeerLinkTests: TwoSitesTestCase {
    override func setUpWithError() throws {
        try super.setUpWithError()
        try startSites()
        try "fedcba9876543210fedcba9876543210\n".write(toFile: dir.file("other-secret"), atomically: true, encoding: .utf8)
    }

    private func lines(_ site: String, containing text: String) -> Int {
        log(site).split(separator: "\n").filter { $0.contains(text) }.count
    }

    func testPeersConnectBothWaysWithTheSameSecretAndPinEachOthersDomainId() throws {
        try addPeer(on: "site-a", "site-b")
        try addPeer(on: "site-b", "site-a")
        for (site, peer) in [("site-a", "site-b"), ("site-b", "site-a")] {
            try waitFor(site, peer, "connected with a round trip measured") {
                $0["outbound"] as? String == "connected" && $0["version"] as? Int == 1 && $0["rttMs"] != nil && $0["inbound"] as? Int == 1
            }
            let shown = try json(site, ["peer", "show", peer])
            XCTAssertEqual(shown["domainId"] as? String, try domainId(peer), "\(site) pinned \(peer)'s id at first contact")
            XCTAssertTrue(log(site).contains("peer '\(peer)' connected (to "), log(site))
        }
        let status = try ok("site-a", ["status"])
        XCTAssertTrue(status.contains("site-b") && status.contains("connected"), status)
        // The secret lives in the state folder, owner-only; the catalog never holds it.
        let kept = dir.file("site-a") + "/peers/site-b.secret"
        let mode = try XCTUnwrap(FileManager.default.attributesOfItem(atPath: kept)[.posixPermissions] as? Int)
        XCTAssertEqual(mode & 0o077, 0, "the kept secret is readable by its owner only")
        XCTAssertFalse(try ok("site-a", ["peer", "list", "--json"]).contains("0123456789abcdef"))
        // A removed peer's links close on both sides.
        try ok("site-b", ["peer", "remove", "site-a"])
        try waitFor("site-a", "site-b", "down after the peer removed it") { $0["outbound"] as? String != "connected" && $0["inbound"] as? Int == 0 }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.file("site-b") + "/peers/site-a.secret"))
    }

    func testUnknownPeerWrongSecretAndWrongDomainIdAreRefusedAndLoggedOnce() throws {
        // Unknown peer: site-b has not added site-a.
        try addPeer(on: "site-a", "site-b")
        try waitFor("site-a", "site-b", "refused by the unknown side") { ($0["detail"] as? String ?? "").contains("refused the handshake") }
        usleep(3_500_000) // a few reconnects (1 s, 2 s backoff): still one line each
        XCTAssertEqual(lines("site-b", containing: "unknown peer"), 1, log("site-b"))
        XCTAssertEqual(lines("site-a", containing: "refused the handshake"), 1, log("site-a"))

        // Wrong secret: both sides can tell, and say so.
        try addPeer(on: "site-b", "site-a", secret: "other-secret")
        for (site, peer) in [("site-a", "site-b"), ("site-b", "site-a")] {
            try waitFor(site, peer, "refused: secrets differ") { ($0["detail"] as? String ?? "").contains("secrets differ") }
            XCTAssertNil(try json(site, ["peer", "show", peer])["domainId"], "\(site) learned nothing from a refused peer")
        }
        usleep(3_000_000)
        for site in ["site-a", "site-b"] {
            let n = lines(site, containing: "secrets differ")
            XCTAssertTrue((1...2).contains(n), "one line per direction, not one per attempt: \(n)\n\(log(site))")
        }

        // Wrong domain id: site-b pins an id that is not site-a's.
        try ok("site-b", ["peer", "remove", "site-a"])
        try addPeer(on: "site-b", "site-a", extra: ["--domain-id", UUID().uuidString])
        try waitFor("site-b", "site-a", "refused: wrong domain id") { ($0["detail"] as? String ?? "").contains("wrong domain id") }
        try waitFor("site-b", "site-a", "site-a's own attempts refused too") { _ in self.lines("site-b", containing: "refused domain 'site-a': wrong domain id") == 1 }
        try waitFor("site-a", "site-b", "site-a told it was refused") { $0["outbound"] as? String != "connected" }

        // Put right: the link comes up, the refusals stay in the log only.
        try ok("site-b", ["peer", "remove", "site-a"])
        try addPeer(on: "site-b", "site-a")
        try waitFor("site-a", "site-b", "connected once both agree") { $0["outbound"] as? String == "connected" }
        try waitFor("site-b", "site-a", "connected once both agree") { $0["outbound"] as? String == "connected" }
        XCTAssertTrue(try ok("site-a", ["peer", "list"]).contains("connected"))
    }

    func testGarbageAndMalformedFramesAreRefusedWhileTheGoodLinkStaysUp() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl") else { throw XCTSkip("needs /usr/bin/openssl (Debian's openssl)") }
        try addPeer(on: "site-a", "site-b")
        try addPeer(on: "site-b", "site-a")
        try waitFor("site-a", "site-b", "connected") { $0["outbound"] as? String == "connected" && $0["inbound"] as? Int == 1 }
        let made = try XCTUnwrap(link("site-a", "site-b")["connections"] as? Int)
        let target = try address("site-a")
        let colon = try XCTUnwrap(target.lastIndex(of: ":"))
        let port = try XCTUnwrap(UInt16(target[target.index(after: colon)...]))

        // Not TLS at all.
        let raw = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        sa.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(raw, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        XCTAssertEqual(connected, 0)
        let junk = Array("GET / HTTP/1.0\r\n\r\n".utf8) + [UInt8](repeating: 0x16, count: 200)
        _ = junk.withUnsafeBytes { send(raw, $0.baseAddress, $0.count, 0) }
        var buf = [UInt8](repeating: 0, count: 512)
        _ = recv(raw, &buf, buf.count, 0)
        close(raw)

        // Inside a real TLS-PSK session with site-b's identity and key: a bad length, a
        // truncated frame, a bad magic.
        let keyHex = Array("0123456789abcdef0123456789abcdef".utf8).map { String(format: "%02x", $0) }.joined()
        let identity = "svsp/site-b/\(try domainId("site-b"))"
        func header(_ magic: UInt32, _ type: UInt16, _ length: UInt32) -> [UInt8] {
            var b: [UInt8] = []
            for v in [UInt64(magic) << 32 | UInt64(1) << 16 | UInt64(type), UInt64(length) << 32] { withUnsafeBytes(of: v.bigEndian) { b += $0 } }
            return b
        }
        let cases: [(bytes: [UInt8], logged: String)] = [
            (header(0x5356_5250, 1, 1 << 30), "length 1073741824 over its limit"),
            (header(0x5356_5250, 4, 8) + [1, 2, 3, 4], "truncated: the connection closed inside a frame"),
            (header(0x1234_5678, 4, 8) + [UInt8](repeating: 0, count: 8), "bad magic"),
        ]
        for c in cases {
            let input = dir.file("frame.bin")
            _ = FileManager.default.createFile(atPath: input, contents: Data(c.bytes))
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/bin/sh")
            p.arguments = ["-c", "(cat \(input); sleep 1) | timeout 10 openssl s_client -connect 127.0.0.1:\(port) -tls1_2 "
                + "-cipher ECDHE-PSK-CHACHA20-POLY1305 -psk \(keyHex) -psk_identity \(identity) -quiet -no_ign_eof"]
            p.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
            p.standardError = FileHandle(forWritingAtPath: "/dev/null")
            try p.run()
            p.waitUntilExit()
            for _ in 0..<50 where !log("site-a").contains(c.logged) { usleep(100_000) }
            XCTAssertTrue(log("site-a").contains("malformed frame") && log("site-a").contains(c.logged), "\(c.logged):\n\(log("site-a"))")
        }
        XCTAssertTrue(log("site-a").contains("not an svsp replication client"), log("site-a"))
        // The good link never dropped, and both daemons still answer.
        XCTAssertEqual(try link("site-a", "site-b")["outbound"] as? String, "connected")
        XCTAssertEqual(try link("site-a", "site-b")["connections"] as? Int, made, "site-a's own link was not disturbed")
        XCTAssertEqual(try link("site-b", "site-a")["outbound"] as? String, "connected")
    }

    func testBadPeerArgumentsAreRefusedWithOneLineNamingWhatIsWrong() throws {
        try "short\n".write(toFile: dir.file("short"), atomically: true, encoding: .utf8)
        let good = ["--address", "127.0.0.1:7790", "--secret-file", dir.file("secret"), "--link-profile", "wan-100m-20ms"]
        let cases: [([String], String)] = [
            (["peer", "add", "site-b", "--address", "nohost", "--secret-file", dir.file("secret"), "--link-profile", "wan-100m-20ms"], "expected HOST:PORT"),
            (["peer", "add", "site-b", "--address", "127.0.0.1:70000", "--secret-file", dir.file("secret"), "--link-profile", "wan-100m-20ms"], "port 1..65535"),
            (["peer", "add", "site-b", "--address", "127.0.0.1:7790", "--secret-file", dir.file("short"), "--link-profile", "wan-100m-20ms"], "at least 16"),
            (["peer", "add", "site-b", "--address", "127.0.0.1:7790", "--secret-file", dir.file("missing"), "--link-profile", "wan-100m-20ms"], "cannot read it"),
            (["peer", "add", "site-b", "--address", "127.0.0.1:7790", "--secret-file", dir.file("secret"), "--link-profile", "carrier-pigeon"], "link profile 'carrier-pigeon' not found"),
            (["peer", "add", "site-a"] + good, "this domain's own name"),
            (["peer", "add", "bad/name"] + good, "peer name 'bad/name'"),
            (["peer", "add", "site-b", "--domain-id", "not-a-uuid"] + good, "is not a UUID"),
            (["peer", "remove", "nobody"], "peer 'nobody' not found"),
            (["peer", "show", "nobody"], "peer 'nobody' not found"),
        ]
        for (args, expected) in cases {
            let r = try CLI.run(args + ["--dir", dir.file("site-a")])
            XCTAssertEqual(r.status, 1, "\(args) should fail")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "one line: \(r.stderr)")
            XCTAssertTrue(r.stderr.contains(expected), "\(args): \(r.stderr)")
        }
        try ok("site-a", ["peer", "add", "site-b"] + good)
        let again = try CLI.run(["peer", "add", "site-b"] + good + ["--dir", dir.file("site-a")])
        XCTAssertTrue(again.status == 1 && again.stderr.contains("already exists"), again.stderr)
        XCTAssertEqual((try JSONSerialization.jsonObject(with: Data(try ok("site-a", ["peer", "list", "--json"]).utf8)) as? [Any])?.count, 1)
        daemons["site-b"]?.stop()
        let r = try CLI.run(["serve", "--dir", dir.file("site-b"), "--repl-listen", "localhost"])
        XCTAssertTrue(r.status != 0 && r.stderr.contains("--repl-listen 'localhost'"), r.stderr)
    }
}
