import Foundation
import XCTest

/// Setup records that pass their checksums but could not have been written by svsp:
/// a length past every bound, a LUN index past the pool's LUNs. Each is a damaged copy,
/// outvoted and rewritten, never a crash or a misrouted I/O.
extension DaemonTests {
    /// CRC-32C (Castagnoli), bit by bit: tests need no ISA-L for a few records.
    private static func crc32c(_ bytes: [UInt8]) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for b in bytes {
            crc ^= UInt32(b)
            for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
        }
        return ~crc
    }

    private static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

    /// A record as svsp writes it: header (magic, generation, length, payload crc, header crc) and payload.
    private func writeRecord(pool: String, generation: Int, payload: [UInt8], claimedLength: UInt64? = nil) throws {
        var header = Array("SVSPMETA".utf8) + Self.le(UInt64(generation)) + Self.le(claimedLength ?? UInt64(payload.count))
            + Self.le(Self.crc32c(payload))
        header += Self.le(Self.crc32c(header))
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: dir.file("\(pool).img")))
        try h.seek(toOffset: UInt64(setupSlotOffset(generation: generation)))
        h.write(Data(header + [UInt8](repeating: 0, count: 4096 - header.count) + payload))
        try h.close()
    }

    /// The committed payload of `generation` on `pool`'s copy.
    private func readPayload(pool: String, generation: Int) throws -> [UInt8] {
        let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: dir.file("\(pool).img")))
        defer { try? h.close() }
        try h.seek(toOffset: UInt64(setupSlotOffset(generation: generation)))
        let header = [UInt8](h.readData(ofLength: 4096))
        let length = header[16..<24].enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        return [UInt8](h.readData(ofLength: length))
    }

    private func setupThreeCopiesAndStop() throws -> Int {
        try startDaemon()
        try makeThreePools()
        _ = try ok(["domain", "setup-vdisk", "create", "--pool", "a", "--pool", "b", "--pool", "c"])
        _ = try ok(["vdisk", "create", "v1", "--pool", "a", "--size", "4M"])
        let generation = try statusJSON()["generation"] as? Int ?? -1
        stopDaemon()
        return generation
    }

    func testASetupRecordWithAnImpossibleLengthIsADamagedCopy() throws {
        let generation = try setupThreeCopiesAndStop()
        try writeRecord(pool: "b", generation: generation + 1, payload: [], claimedLength: 0xFFFF_FFFF_FFFF_F000)
        try startDaemon() // the old code trapped converting the length
        let status = try statusJSON()
        XCTAssertEqual(status["generation"] as? Int, generation)
        XCTAssertTrue(try ok(["vdisk", "verify", "v1"]).contains("verified"))
    }

    func testASetupRecordNamingALUNThePoolLacksIsADamagedCopy() throws {
        let generation = try setupThreeCopiesAndStop()
        var root = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(readPayload(pool: "a", generation: generation))) as? [String: Any])
        var vdisks = try XCTUnwrap(root["vdisks"] as? [[String: Any]])
        var legs = try XCTUnwrap(vdisks[0]["legs"] as? [[String: Any]])
        legs[0]["extents"] = (0..<4).map { ["lun": 99, "extent": $0] }
        vdisks[0]["legs"] = legs
        root["vdisks"] = vdisks
        root["generation"] = generation + 1
        let forged = [UInt8](try JSONSerialization.data(withJSONObject: root))
        for pool in ["b", "c"] { try writeRecord(pool: pool, generation: generation + 1, payload: forged) }
        try startDaemon()
        let status = try statusJSON()
        XCTAssertEqual(status["generation"] as? Int, generation, "the forged generation is not trusted")
        let problems = status["problems"] as? [String] ?? []
        XCTAssertTrue(problems.contains { $0.contains("ignored") && $0.contains("b, c") && $0.contains("extent 99/0 is outside") }, "\(problems)")
        XCTAssertTrue(try ok(["vdisk", "verify", "v1"]).contains("verified"), "I/O goes to the real extents")
    }
}
