@testable import Controller
import Foundation
import XCTest

/// The replication frame codec: every message round-trips, a frame arriving in pieces
/// asks for exactly what it lacks, and every malformed header or field is refused with
/// a reason naming it (before any payload-sized buffer exists).
final class ReplicationProtocolTests: XCTestCase {
    private let messages: [ReplicationMessage] = [
        .hello(versions: 1...3, domainId: UUID(), domainName: "site-a"),
        .welcome(version: 1, domainId: UUID(), domainName: "dr.site_b"),
        .refuse(code: .unknownPeer, reason: "unknown peer 'x'"),
        .refuse(code: .other, reason: ""),
        .ping(nonce: 0xDEAD_BEEF_0123_4567),
        .pong(nonce: 7),
    ]

    private func decode(_ bytes: [UInt8], version: UInt16? = nil) throws -> ReplicationFrame.Decoded {
        try bytes.withUnsafeBytes { b throws(ReplicationFrame.Malformed) in try ReplicationFrame.decode(b, version: version) }
    }

    private func refused(_ bytes: [UInt8], _ expected: String, version: UInt16? = nil, file: StaticString = #filePath, line: UInt = #line) {
        do {
            let d = try decode(bytes, version: version)
            XCTFail("accepted: \(d)", file: file, line: line)
        } catch let m as ReplicationFrame.Malformed {
            XCTAssertTrue(m.reason.contains(expected), "\(m.reason) should say \(expected)", file: file, line: line)
        } catch { XCTFail("\(error)", file: file, line: line) }
    }

    private func header(type: UInt16, length: UInt32, magic: UInt32 = ReplicationFrame.magic, version: UInt16 = 1, reserved: UInt32 = 0) -> [UInt8] {
        var w = WireWriter()
        w.u32(magic)
        w.u16(version)
        w.u16(type)
        w.u32(length)
        w.u32(reserved)
        return w.bytes
    }

    func testEveryMessageRoundTripsAndPartialFramesAskForWhatTheyLack() throws {
        for m in messages {
            let bytes = ReplicationFrame.encode(m)
            XCTAssertEqual(try decode(bytes), .frame(m, bytes: bytes.count))
            XCTAssertEqual(try decode(bytes + [0x53, 0x56]), .frame(m, bytes: bytes.count), "bytes after a frame are the next frame's")
            for cut in 0..<bytes.count {
                XCTAssertEqual(try decode(Array(bytes.prefix(cut))), .needMore(cut < 16 ? 16 : bytes.count), "\(m) cut at \(cut)")
            }
        }
        let v2 = ReplicationFrame.encode(.ping(nonce: 1), version: 2)
        XCTAssertEqual(try decode(v2, version: 2), .frame(.ping(nonce: 1), bytes: v2.count))
    }

    func testMalformedHeadersAreRefusedNamingTheField() {
        refused(header(type: 4, length: 8, magic: 0x4E42_444D), "bad magic")
        refused(header(type: 4, length: 8, version: 2), "version 2 before negotiation")
        refused(ReplicationFrame.encode(.ping(nonce: 1)), "negotiated 3", version: 3)
        refused(header(type: 99, length: 8), "unknown frame type 99")
        refused(header(type: 4, length: 8, reserved: 1), "reserved")
        refused(header(type: 1, length: 0xFFFF_FFFF), "over its limit")
        refused(header(type: 4, length: 4), "under its minimum")
    }

    func testMalformedFieldsAreRefusedNamingTheField() {
        func frame(_ type: UInt16, _ payload: [UInt8]) -> [UInt8] { header(type: type, length: UInt32(payload.count)) + payload }
        var id = WireWriter()
        id.uuid(UUID())
        refused(frame(1, [0, 2, 0, 1] + id.bytes + [1, 0x61]), "not a range of versions")
        refused(frame(1, [0, 0, 0, 1] + id.bytes + [1, 0x61]), "not a range of versions")
        refused(frame(1, [0, 1, 0, 1] + id.bytes + [0, 0x61]), "domain name of 0 bytes")
        refused(frame(1, [0, 1, 0, 1] + id.bytes + [2, 0x61]), "truncated")
        refused(frame(1, [0, 1, 0, 1] + id.bytes + [1, 0x2F]), "characters other than")
        refused(frame(1, [0, 1, 0, 1] + id.bytes + [2, 0xC3, 0x28]), "not UTF-8")
        refused(frame(1, [0, 1, 0, 1] + id.bytes + [1, 0x61, 0x62]), "byte(s) after its fields")
        refused(frame(2, [0, 0] + id.bytes + [1, 0x61]), "version 0")
        refused(frame(3, [0, 1, 0, 9, 0x61]), "truncated: reason")
    }
}
