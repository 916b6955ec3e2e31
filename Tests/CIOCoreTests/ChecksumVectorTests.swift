import CIOCore
import XCTest

/// CIOCore's ISA-L wrappers against published vectors (RFC 3720 B.4, CRC-64/XZ check value).
final class ChecksumVectorTests: XCTestCase {
    private func crc32c(_ bytes: [UInt8], seed: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { cio_crc32c($0.baseAddress, UInt64($0.count), seed) }
    }

    func testCRC32CMatchesRFC3720Vectors() {
        XCTAssertEqual(crc32c([UInt8](repeating: 0, count: 32)), 0x8A91_36AA)
        XCTAssertEqual(crc32c([UInt8](repeating: 0xFF, count: 32)), 0x62A8_AB43)
        XCTAssertEqual(crc32c((0..<32).map { UInt8($0) }), 0x46DD_794E)
        XCTAssertEqual(crc32c((0..<32).reversed().map { UInt8($0) }), 0x113F_DB5C)
        XCTAssertEqual(crc32c(Array("123456789".utf8)), 0xE306_9283)
    }

    func testCRC32CContinuesFromSeed() {
        let data = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let whole = crc32c(data)
        let first = crc32c(Array(data[..<377]))
        XCTAssertEqual(crc32c(Array(data[377...]), seed: first), whole)
    }

    func testCRC64MatchesXZCheckValue() {
        let check = Array("123456789".utf8).withUnsafeBytes { cio_crc64($0.baseAddress, UInt64($0.count), 0) }
        XCTAssertEqual(check, 0x995D_C9BB_DF19_39FA)
        let data = (0..<4096).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let whole = data.withUnsafeBytes { cio_crc64($0.baseAddress, 4096, 0) }
        let a = data.withUnsafeBytes { cio_crc64($0.baseAddress, 1000, 0) }
        let b = data.withUnsafeBytes { cio_crc64($0.baseAddress! + 1000, 3096, a) }
        XCTAssertEqual(b, whole)
    }

    func testBlockCRCsAndVerifyFindFirstMismatch() {
        var data = [UInt8](repeating: 0, count: 8 * 512)
        for i in data.indices { data[i] = UInt8(truncatingIfNeeded: i * 13 + 5) }
        var crcs = [UInt32](repeating: 0, count: 8)
        let rc = data.withUnsafeBytes { b in crcs.withUnsafeMutableBufferPointer { cio_crc32c_blocks(b.baseAddress, 4096, 512, $0.baseAddress) } }
        XCTAssertEqual(rc, 0)
        for i in 0..<8 { XCTAssertEqual(crcs[i], crc32c(Array(data[i * 512..<(i + 1) * 512]))) }

        var bad: UInt64 = 0
        data.withUnsafeBytes { XCTAssertEqual(cio_crc32c_verify($0.baseAddress, 4096, 512, crcs, &bad), 0) }
        XCTAssertEqual(bad, UInt64.max)
        data[5 * 512 + 17] ^= 0x40
        data[6 * 512] ^= 0x01
        data.withUnsafeBytes { XCTAssertEqual(cio_crc32c_verify($0.baseAddress, 4096, 512, crcs, &bad), 0) }
        XCTAssertEqual(bad, 5)
        // A length that is not a multiple of the block size is refused, not truncated.
        data.withUnsafeBytes { XCTAssertEqual(cio_crc32c_verify($0.baseAddress, 4000, 512, crcs, &bad), -EINVAL) }
    }
}
