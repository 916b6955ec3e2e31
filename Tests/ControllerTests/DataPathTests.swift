import Controller
import Foundation
import IOEngine
import XCTest

/// The data API against a real domain on file LUNs: what is written is read back byte for byte.
final class DataPathTests: XCTestCase {
    private var dir: String!
    private var domain: Domain!

    override func setUp() async throws {
        dir = NSTemporaryDirectory() + "svsp-data-\(UUID().uuidString.prefix(6))"
        _ = try Domain.initialize(directory: dir, name: "t")
        let catalog = try ProfileCatalog(root: ProfileTests.shippedRoot)
        domain = try await Domain.open(directory: dir, profiles: catalog)
        _ = try await domain.createPool(name: "p", arrayProfile: "file-backed", poolProfile: nil,
                                        lunPaths: [dir + "/l0.img", dir + "/l1.img"], createBytes: 24 << 20, force: false)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private func pattern(_ p: UnsafeMutableRawPointer, _ n: Int, _ offset: UInt64, _ seed: UInt64) {
        let w = p.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(n / 8) { w[i] = ((offset + UInt64(i * 8)) ^ seed) &* 0x9E37_79B9_7F4A_7C15 }
    }

    func testConcurrentPortWritesReadBackAcrossExtentsAndLUNs() async throws {
        _ = try await domain.createVDisk(name: "v", poolName: "p", sizeBytes: 32 << 20, blockSize: 4096, thin: false)
        let port = try domain.port(for: "v")
        let depth = 32
        let pool = try BufferPool(bufferBytes: 256 << 10, count: depth)
        // 32 writes of varied sizes, several crossing 1 MiB extent boundaries (and LUNs).
        var layout: [(UInt64, Int)] = []
        var next: UInt64 = 1 << 20 - 8192
        for i in 0..<depth {
            let n = [4096, 65536, 12288, 262_144][i % 4]
            layout.append((next, n))
            next += UInt64(n) + UInt64((i % 3) * 4096)
        }
        let sink = Collect()
        for (i, (offset, n)) in layout.enumerated() {
            pattern(pool.handle.buffer(at: i).pointer, n, offset, 42)
            try port.submit(.write, offset: offset, length: n, buffer: pool.handle.buffer(at: i).pointer, fua: i % 5 == 0, sink: sink, cookie: UInt64(i))
        }
        XCTAssertTrue(sink.wait(depth))
        for i in 0..<depth { XCTAssertEqual(sink.result(UInt64(i)), Int64(layout[i].1)) }
        let expected = try AlignedBuffer(count: 256 << 10)
        for (i, (offset, n)) in layout.enumerated() {
            let back = pool.handle.buffer(at: i).pointer
            memset(back, 0, n)
            try await domain.read(vdisk: "v", offset: offset, length: n, into: back)
            pattern(expected.pointer, n, offset, 42)
            XCTAssertEqual(memcmp(back, expected.pointer, n), 0, "bytes at \(offset)+\(n)")
        }
    }

    func testThinReadsZerosUntilWrittenAndAllocatesOnlyWhatIsWritten() async throws {
        _ = try await domain.createVDisk(name: "t", poolName: "p", sizeBytes: 1 << 30, blockSize: 512, thin: true)
        let buffer = try AlignedBuffer(count: 8192)
        memset(buffer.pointer, 0xAB, 8192)
        try await domain.read(vdisk: "t", offset: 500 << 20, length: 8192, into: buffer.pointer)
        XCTAssertTrue(buffer.bytes.allSatisfy { $0 == 0 })
        pattern(buffer.pointer, 8192, 7, 7)
        let copy = Array(buffer.bytes)
        try await domain.write(vdisk: "t", offset: (3 << 20) - 4096, length: 8192, from: buffer.pointer, fua: true)
        XCTAssertEqual(domain.mappedChunks(of: try XCTUnwrap(domain.metadata.vdisk(named: "t")?.legs[0])), 2, "the write spans two extents")
        memset(buffer.pointer, 0, 8192)
        try await domain.read(vdisk: "t", offset: (3 << 20) - 4096, length: 8192, into: buffer.pointer)
        XCTAssertEqual(Array(buffer.bytes), copy)
    }

    func testZeroesTrimFlushAndBadRanges() async throws {
        _ = try await domain.createVDisk(name: "v", poolName: "p", sizeBytes: 4 << 20, blockSize: 512, thin: false)
        let buffer = try AlignedBuffer(count: 1 << 20)
        memset(buffer.pointer, 0x5A, 1 << 20)
        try await domain.write(vdisk: "v", offset: 0, length: 1 << 20, from: buffer.pointer)
        try await domain.writeZeroes(vdisk: "v", offset: 4096, length: 8192)
        try await domain.trim(vdisk: "v", offset: 65536, length: 512)
        try await domain.flush(vdisk: "v")
        try await domain.read(vdisk: "v", offset: 0, length: 1 << 20, into: buffer.pointer)
        let b = buffer.bytes
        XCTAssertEqual(b[4095], 0x5A)
        XCTAssertTrue(b[4096..<12288].allSatisfy { $0 == 0 })
        XCTAssertEqual(b[12288], 0x5A)
        XCTAssertTrue(b[65536..<66048].allSatisfy { $0 == 0 })
        XCTAssertEqual(b[66048], 0x5A)

        await assertFails("multiples of its block size") { try await self.domain.read(vdisk: "v", offset: 100, length: 512, into: buffer.pointer) }
        await assertFails("lies beyond its size") { try await self.domain.read(vdisk: "v", offset: 4 << 20, length: 512, into: buffer.pointer) }
        await assertFails("vdisk 'nope' not found") { try await self.domain.write(vdisk: "nope", offset: 0, length: 512, from: buffer.pointer) }
        // Grow, then the new range works.
        _ = try await domain.growVDisk(name: "v", sizeBytes: 6 << 20)
        try await domain.write(vdisk: "v", offset: 5 << 20, length: 4096, from: buffer.pointer)
    }

    /// A pool of 64 KiB extents (the SSD profile): a large write into a thin vdisk maps many
    /// extents in one commit and lands as few pieces as their runs allow; a thick vdisk's 32 MiB
    /// is one map run; a trim releases whole 64 KiB extents and zeroes the partial ends.
    func testSixtyFourKiBExtentsMapRunsAndReleaseOnTrim() async throws {
        _ = try await domain.createPool(name: "s", arrayProfile: "sata-ssd", poolProfile: nil,
                                        lunPaths: [dir + "/s0.img"], createBytes: 256 << 20, force: false)
        _ = try await domain.createVDisk(name: "k", poolName: "s", sizeBytes: 32 << 20, blockSize: 4096, thin: false)
        _ = try await domain.createVDisk(name: "t", poolName: "s", sizeBytes: 64 << 20, blockSize: 4096, thin: true)
        let meta = try XCTUnwrap(domain.blockMaps(ofPool: "s"))
        let k = try XCTUnwrap(domain.metadata.vdisk(named: "k")?.legs[0].id), t = try XCTUnwrap(domain.metadata.vdisk(named: "t")?.legs[0].id)
        XCTAssertEqual(try meta.mapRuns(k).count, 1, "a thick vdisk is one run")
        let buffer = try AlignedBuffer(count: 1 << 20)
        let offset: UInt64 = (5 << 20) + (12 << 10) // not extent-aligned: partial extents at both ends
        pattern(buffer.pointer, 1 << 20, offset, 99)
        try await domain.write(vdisk: "t", offset: offset, length: 1 << 20, from: buffer.pointer, fua: true)
        XCTAssertEqual(domain.mappedChunks(of: try XCTUnwrap(domain.metadata.vdisk(named: "t")?.legs[0])), 17)
        let back = try AlignedBuffer(count: (1 << 20) + (128 << 10))
        try await domain.read(vdisk: "t", offset: offset - (64 << 10), length: (1 << 20) + (128 << 10), into: back.pointer)
        XCTAssertTrue(back.bytes[0..<(64 << 10)].allSatisfy { $0 == 0 }, "the rest of a new extent reads as zeros")
        XCTAssertEqual(memcmp(back.pointer + (64 << 10), buffer.pointer, 1 << 20), 0)
        XCTAssertTrue(back.bytes[((64 << 10) + (1 << 20))...].allSatisfy { $0 == 0 })
        // Trim 5 MiB+64k .. 6 MiB-64k: the 14 extents wholly inside are released, the write's ends stay.
        try await domain.trim(vdisk: "t", offset: (5 << 20) + (64 << 10), length: (1 << 20) - (128 << 10))
        XCTAssertEqual(domain.mappedChunks(of: try XCTUnwrap(domain.metadata.vdisk(named: "t")?.legs[0])), 3)
        try await domain.read(vdisk: "t", offset: offset, length: 1 << 20, into: back.pointer)
        let zeroStart = 52 << 10, zeroEnd = (1 << 20) - (76 << 10) // the trimmed range, in the buffer
        XCTAssertEqual(memcmp(back.pointer, buffer.pointer, zeroStart), 0)
        XCTAssertTrue(back.bytes[zeroStart..<zeroEnd].allSatisfy { $0 == 0 })
        XCTAssertEqual(memcmp(back.pointer + zeroEnd, buffer.pointer + zeroEnd, (1 << 20) - zeroEnd), 0)
        XCTAssertNotNil(try meta.mapRuns(t).first { $0.1 != nil })
        let report = try await domain.checkPool(name: "s")
        XCTAssertEqual(report.problems, [])
        XCTAssertEqual(report.mapped, 512 + 3)
        XCTAssertEqual(report.beingZeroed, 14, "released extents wait for the zeroer")
    }

    private func assertFails(_ text: String, _ body: () async throws -> Void, line: UInt = #line) async {
        do {
            try await body()
            XCTFail("expected failure containing '\(text)'", line: line)
        } catch {
            XCTAssertTrue("\(error)".contains(text), "\(error)", line: line)
        }
    }
}

private final class Collect: CompletionSink, @unchecked Sendable {
    private let lock = NSLock()
    private var results: [UInt64: Int64] = [:]
    private let arrived = DispatchSemaphore(value: 0)
    override func ioCompleted(cookie: UInt64, result: Int64) {
        lock.lock(); results[cookie] = result; lock.unlock()
        arrived.signal()
    }
    func wait(_ n: Int) -> Bool { (0..<n).allSatisfy { _ in arrived.wait(timeout: .now() + 20) == .success } }
    func result(_ c: UInt64) -> Int64? { lock.lock(); defer { lock.unlock() }; return results[c] }
}
