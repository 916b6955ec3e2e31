import Foundation
import XCTest

/// Clients that never read their replies cannot make the server queue without bound,
/// and what they name cannot forge or flood the log.
extension NBDTests {
    private func optionHeader(_ option: UInt32, length: UInt32 = 0) -> [UInt8] {
        NBDRawClient.be(UInt64(0x4948_4156_454F_5054)) + NBDRawClient.be(option) + NBDRawClient.be(length)
    }

    /// The socket buffers hold a few MiB at most; without back-pressure the server would
    /// keep reading (and queueing replies) until the limit.
    private static let floodLimit = 96 << 20
    private static let boundedBytes = 24 << 20

    func testAClientStreamingOptionsWithoutReadingIsNotBuffered() throws {
        let client = try NBDRawClient(socket: socket)
        guard let greeting = client.receive(18), greeting[0..<8].elementsEqual("NBDMAGIC".utf8) else { return XCTFail("no greeting") }
        client.send(NBDRawClient.be(UInt32(3)))
        let accepted = client.flood(optionHeader(3), limit: Self.floodLimit) // NBD_OPT_LIST, replies never read
        XCTAssertLessThan(accepted, Self.boundedBytes, "the server stops reading options while their replies pile up")
        // Everyone else is served meanwhile.
        let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("v1"), "-c", "write -P 0x11 0 64k", "-c", "read -P 0x11 0 64k"])
        XCTAssertEqual(rc, 0, out)
    }

    func testAClientFloodingRefusedRequestsWithoutReadingIsNotBuffered() throws {
        let client = try NBDRawClient(socket: socket)
        _ = try client.handshake(export: "v1")
        // A misaligned read: refused with EINVAL, takes no slot, 28 bytes in, 16 bytes out.
        let bad = NBDRawClient.request(type: 0, cookie: 7, offset: 1, length: 512)
        let accepted = client.flood(bad, limit: Self.floodLimit)
        XCTAssertLessThan(accepted, Self.boundedBytes, "the server stops reading while refusals pile up unread")
        // The connection still works once the client reads: its replies are all there, in order.
        var answered = 0
        client.setReceiveTimeout(seconds: 2)
        while answered < accepted / 28, let reply = client.simpleReply() {
            XCTAssertEqual(reply.cookie, 7)
            answered += 1
        }
        XCTAssertEqual(answered, accepted / 28, "every request taken got its answer")
    }

    func testExportNamesAreEscapedAndTheirLogLinesRateLimited() throws {
        for i in 0..<40 {
            let client = try NBDRawClient(socket: socket)
            guard client.receive(18) != nil else { return XCTFail("no greeting") }
            client.send(NBDRawClient.be(UInt32(3)))
            let name = Array("evil\n2026-01-01 forged line \(i)\u{1b}[31m".utf8)
            let payload = NBDRawClient.be(UInt32(name.count)) + name + NBDRawClient.be(UInt16(0))
            client.send(optionHeader(7, length: UInt32(payload.count)) + payload) // NBD_OPT_GO
            guard let head = client.receive(20) else { return XCTFail("no reply") }
            XCTAssertEqual(NBDRawClient.int(head[12..<16]) as UInt32, 0x8000_0006, "NBD_REP_ERR_UNKNOWN")
        }
        usleep(200_000)
        let text = try String(contentsOfFile: log, encoding: .utf8)
        XCTAssertFalse(text.contains("\n2026-01-01 forged line"), "a client's newline never starts a log line")
        let lines = text.split(separator: "\n").filter { $0.contains("unknown or unexported export") }
        XCTAssertGreaterThan(lines.count, 0)
        XCTAssertLessThanOrEqual(lines.count, 15, "rate-limited: \(lines.count) lines for 40 attempts")
        XCTAssertTrue(lines.contains { $0.contains("evil\\x0a2026-01-01") && $0.contains("\\x1b") }, "\(lines.first ?? "")")
    }
}
