import CIOCore
import XCTest

final class CompressionTests: XCTestCase {
    /// Compressible but not trivial: text-like runs with a pseudo-random tail.
    private func sample(_ count: Int) -> [UInt8] {
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        return (0..<count).map { i in
            if i % 1024 < 700 { return UInt8(ascii: "a") + UInt8(i % 26) }
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return UInt8(truncatingIfNeeded: state)
        }
    }

    private func compress(_ input: [UInt8], level: Int32) -> (Int32, [UInt8]) {
        var out = [UInt8](repeating: 0, count: Int(cio_compress_bound(UInt64(input.count))))
        var outLen: UInt64 = 0
        let rc = input.withUnsafeBytes { i in
            out.withUnsafeMutableBytes { cio_compress(level, i.baseAddress, UInt64(i.count), $0.baseAddress, UInt64($0.count), &outLen) }
        }
        return (rc, Array(out[..<Int(outLen)]))
    }

    private func decompress(_ input: [UInt8], capacity: Int) -> (Int32, [UInt8]) {
        var out = [UInt8](repeating: 0, count: capacity)
        var outLen: UInt64 = 0
        let rc = input.withUnsafeBytes { i in
            out.withUnsafeMutableBytes { cio_decompress(i.baseAddress, UInt64(i.count), $0.baseAddress, UInt64($0.count), &outLen) }
        }
        return (rc, Array(out[..<Int(outLen)]))
    }

    func testRoundTripAtEveryLevel() {
        let input = sample(256 * 1024)
        for level in Int32(0)...3 {
            let (rc, packed) = compress(input, level: level)
            XCTAssertEqual(rc, 0, "level \(level)")
            if level > 0 { XCTAssertLessThan(packed.count, input.count, "level \(level) should shrink text") }
            let (drc, unpacked) = decompress(packed, capacity: input.count)
            XCTAssertEqual(drc, 0, "level \(level)")
            XCTAssertEqual(unpacked, input, "level \(level)")
        }
    }

    func testCorruptStreamIsAnError() {
        let input = sample(64 * 1024)
        let (_, packed) = compress(input, level: 1)
        var corrupt = packed
        corrupt[packed.count / 2] ^= 0x5A
        XCTAssertEqual(decompress(corrupt, capacity: input.count).0, -EBADMSG)
        // A flipped byte in the trailer (CRC32) must be caught too.
        var badTrailer = packed
        badTrailer[packed.count - 6] ^= 0x01
        XCTAssertEqual(decompress(badTrailer, capacity: input.count).0, -EBADMSG)
        XCTAssertEqual(decompress(Array(packed[..<(packed.count / 2)]), capacity: input.count).0, -EBADMSG)
        XCTAssertEqual(decompress([1, 2, 3, 4, 5, 6, 7, 8], capacity: 100).0, -EBADMSG)
    }

    func testBadArgumentsAreErrors() {
        XCTAssertEqual(compress([1, 2, 3], level: 4).0, -EINVAL)
        let input = sample(64 * 1024)
        let (_, packed) = compress(input, level: 2)
        XCTAssertEqual(decompress(packed, capacity: 1000).0, -ENOSPC)
        var tiny = [UInt8](repeating: 0, count: 10)
        var outLen: UInt64 = 0
        let rc = input.withUnsafeBytes { i in tiny.withUnsafeMutableBytes { cio_compress(0, i.baseAddress, UInt64(i.count), $0.baseAddress, 10, &outLen) } }
        XCTAssertEqual(rc, -ENOSPC)
    }
}
