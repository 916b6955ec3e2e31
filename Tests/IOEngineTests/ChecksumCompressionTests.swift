import IOEngine
import XCTest

/// The Swift wrappers agree with the C core and report errors as IOError.
final class ChecksumCompressionTests: XCTestCase {
    func testSwiftChecksumWrappers() throws {
        let zeros = [UInt8](repeating: 0, count: 32)
        XCTAssertEqual(zeros.withUnsafeBytes { Checksum.crc32c($0) }, 0x8A91_36AA)
        XCTAssertEqual(Array("123456789".utf8).withUnsafeBytes { Checksum.crc64($0) }, 0x995D_C9BB_DF19_39FA)
        var data = [UInt8](repeating: 0xA5, count: 4 * 4096)
        var crcs = [UInt32](repeating: 0, count: 4)
        try data.withUnsafeBytes { b in try crcs.withUnsafeMutableBufferPointer { try Checksum.crc32cBlocks(b, blockSize: 4096, into: $0) } }
        data[3 * 4096 + 5] = 0
        let bad = try data.withUnsafeBytes { b in try crcs.withUnsafeBufferPointer { try Checksum.firstMismatch(b, blockSize: 4096, expected: $0) } }
        XCTAssertEqual(bad, 3)
    }

    func testCompressionWrappers() throws {
        let input = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 % 97) }
        var packed = [UInt8](repeating: 0, count: Compression.bound(input.count))
        let n = try input.withUnsafeBytes { i in try packed.withUnsafeMutableBytes { try Compression.compress(level: 3, i, into: $0) } }
        XCTAssertLessThan(n, input.count / 4)
        var out = [UInt8](repeating: 0, count: input.count)
        let m = try packed[..<n].withUnsafeBytes { p in try out.withUnsafeMutableBytes { try Compression.decompress(p, into: $0) } }
        XCTAssertEqual(m, input.count)
        XCTAssertEqual(out, input)
        packed[n / 2] ^= 0xFF
        XCTAssertThrowsError(try packed[..<n].withUnsafeBytes { p in try out.withUnsafeMutableBytes { try Compression.decompress(p, into: $0) } }) {
            XCTAssertTrue([EBADMSG, ENOSPC].contains(($0 as? IOError)?.code ?? 0), "\($0)") // garbage may also overflow the output
        }
    }
}
