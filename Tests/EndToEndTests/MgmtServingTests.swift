import Foundation
import XCTest

/// The management socket and the metrics endpoint never block on an idle or slow client.
extension DaemonTests {
    private func connectUnix(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw CLIError("cannot connect to \(path)") }
        return fd
    }

    /// Seconds until the peer closes `fd` (reads and discards), or nil after `limit` seconds.
    private func secondsUntilClosed(_ fd: Int32, limit: Double) -> Double? {
        let start = Date()
        var buffer = [UInt8](repeating: 0, count: 4096)
        while Date().timeIntervalSince(start) < limit {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, 200) > 0 {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n <= 0 { return Date().timeIntervalSince(start) }
            }
        }
        return nil
    }

    /// `svsp-ctl status` bounded by `timeout` (the old daemon hung here forever).
    private func boundedStatus() -> (Int32, String) {
        shell(["timeout", "10", CLI.binary, "status", "--dir", state])
    }

    func testAnIdleManagementClientDelaysNoOtherAndIsDropped() throws {
        try startDaemon()
        let idle = try connectUnix(state + "/mgmt.sock")
        defer { close(idle) }
        let slow = try connectUnix(state + "/mgmt.sock")
        defer { close(slow) }
        _ = "{\"command\":".withCString { write(slow, $0, strlen($0)) } // half a request, then nothing
        let started = Date()
        let (rc, out) = boundedStatus()
        XCTAssertEqual(rc, 0, "status must answer while other clients sit idle: \(out)")
        XCTAssertLessThan(Date().timeIntervalSince(started), 5)
        XCTAssertTrue(out.contains("health: normal"), out)
        // The read deadline (10 s) drops both.
        let closedAfter = try XCTUnwrap(secondsUntilClosed(idle, limit: 20), "an idle client is dropped")
        XCTAssertGreaterThan(closedAfter, 5)
        XCTAssertNotNil(secondsUntilClosed(slow, limit: 5), "a client that never finishes its request is dropped")
    }

    func testAnOversizedManagementRequestIsDroppedAndTheDaemonGoesOn() throws {
        try startDaemon()
        let fd = try connectUnix(state + "/mgmt.sock")
        defer { close(fd) }
        let chunk = [UInt8](repeating: UInt8(ascii: "x"), count: 256 << 10)
        var sent = 0
        for _ in 0..<8 { // 2 MiB without a newline: over the 1 MiB bound
            let n = chunk.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }
            sent += n
        }
        XCTAssertNotNil(secondsUntilClosed(fd, limit: 5), "dropped after \(sent) bytes")
        XCTAssertEqual(boundedStatus().0, 0)
    }

    func testAnIdleMetricsClientDelaysNoScrape() throws {
        let port = 21000 + Int(getpid() % 20000)
        try startDaemon(extra: ["--metrics-listen", "127.0.0.1:\(port)"])
        let idle = try connectLoopback(port: port)
        defer { close(idle) }
        let scraped = DataBox()
        let scraper = Thread { scraped.text = (try? httpGet(port: port, path: "/metrics")) ?? "" }
        scraper.start()
        for _ in 0..<100 where !scraper.isFinished { usleep(50_000) }
        XCTAssertTrue(scraper.isFinished, "a scrape must not wait for an idle client")
        XCTAssertTrue(scraped.text.hasPrefix("HTTP/1.1 200") && scraped.text.contains("text/plain; version=0.0.4"), scraped.text)
        XCTAssertNotNil(secondsUntilClosed(idle, limit: 20), "an idle metrics client is dropped")
    }

    func testTheCLIGivesUpOnAHungDaemonWithAClearMessage() throws {
        try startDaemon()
        let pid = try XCTUnwrap(daemon?.process.processIdentifier)
        kill(pid, SIGSTOP)
        defer { kill(pid, SIGCONT) }
        let r = try CLI.run(["status", "--dir", state], environment: ["SVSP_TIMEOUT": "1"], killAfterSeconds: 20)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("did not answer within 1 s") && r.stderr.contains("SVSP_TIMEOUT"), r.stderr)
        kill(pid, SIGCONT)
        let bad = try CLI.run(["status", "--dir", state], environment: ["SVSP_TIMEOUT": "soon"])
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains("SVSP_TIMEOUT 'soon'"), bad.stderr)
    }
}

private final class DataBox: @unchecked Sendable { var text = "" }
