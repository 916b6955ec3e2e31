import Foundation
import IOEngine
import XCTest

/// Patterned writes read back byte for byte through the AIO engine.
final class RoundTripTests: XCTestCase {
    func testRoundTripsAtManyQueueDepthsAndSizes() throws {
        let dir = TempDir()
        let path = dir.file("lun.img")
        let lunBytes: UInt64 = 64 << 20
        try LUN.createFile(path: path, sizeBytes: lunBytes)
        let lun = try LUN(path: path, readWrite: true)
        let sizes = [4096, 8192, 65536, 4096 * 3, 1 << 20, 512 * 1024]
        for (round, depth) in [1, 2, 8, 32, 128].enumerated() {
            let engine = try Engine(queueDepth: depth)
            let pool = try BufferPool(bufferBytes: 1 << 20, count: depth)
            var layout: [(offset: UInt64, length: Int)] = []
            var next: UInt64 = 0
            for i in 0..<depth {
                let length = sizes[(i + round) % sizes.count]
                layout.append((next, length))
                next += UInt64(length)
            }
            XCTAssertLessThanOrEqual(next, lunBytes)
            let seed = UInt64(round) &* 0x1234_5678_9ABC
            let writes = CollectingSink()
            for (i, io) in layout.enumerated() {
                let buf = pool.handle.buffer(at: i)
                fillPattern(UnsafeMutableRawBufferPointer(start: buf.pointer, count: io.length), offset: io.offset, seed: seed)
                try engine.handle.prepWrite(lun: lun.handle, buffer: buf.pointer, length: io.length, offset: io.offset,
                                            fua: i % 2 == 0, sink: writes, cookie: UInt64(i))
            }
            engine.handle.submit()
            XCTAssertEqual(writes.wait(for: depth), depth, "QD\(depth): every write completes")
            for (i, io) in layout.enumerated() { XCTAssertEqual(writes.result(UInt64(i)), Int64(io.length)) }

            let reads = CollectingSink()
            for (i, io) in layout.enumerated() {
                memset(pool.handle.buffer(at: i).pointer, 0, io.length)
                try engine.handle.prepRead(lun: lun.handle, buffer: pool.handle.buffer(at: i).pointer, length: io.length,
                                           offset: io.offset, sink: reads, cookie: UInt64(i))
            }
            engine.handle.submit()
            XCTAssertEqual(reads.wait(for: depth), depth)
            var expected = [UInt8](repeating: 0, count: 1 << 20)
            for (i, io) in layout.enumerated() {
                XCTAssertEqual(reads.result(UInt64(i)), Int64(io.length))
                expected.withUnsafeMutableBytes { fillPattern(UnsafeMutableRawBufferPointer(rebasing: $0[..<io.length]), offset: io.offset, seed: seed) }
                let got = UnsafeRawBufferPointer(start: pool.handle.buffer(at: i).pointer, count: io.length)
                XCTAssertTrue(expected.withUnsafeBytes { memcmp($0.baseAddress!, got.baseAddress!, io.length) == 0 },
                              "QD\(depth): bytes at \(io.offset) (+\(io.length)) differ from what was written")
            }
        }
    }

    func testAsyncAPIRoundTripAndFlush() async throws {
        let dir = TempDir()
        let path = dir.file("lun.img")
        try LUN.createFile(path: path, sizeBytes: 4 << 20)
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 4)
        let buffer = try AlignedBuffer(count: 8192)
        fillPattern(buffer.bytes, offset: 40960, seed: 7)
        let copy = Array(buffer.bytes)
        let written = try await engine.handle.write(lun: lun.handle, from: buffer.pointer, length: 8192, offset: 40960, fua: true)
        XCTAssertEqual(written, 8192)
        try await engine.handle.flush(lun: lun.handle)
        memset(buffer.pointer, 0, 8192)
        let read = try await engine.handle.read(lun: lun.handle, into: buffer.pointer, length: 8192, offset: 40960)
        XCTAssertEqual(read, 8192)
        XCTAssertEqual(Array(buffer.bytes), copy)
        // Independently of the engine: the file holds the bytes.
        let onDisk = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        try onDisk.seek(toOffset: 40960)
        XCTAssertEqual([UInt8](onDisk.readData(ofLength: 8192)), copy)
    }

    func testLUNProbeOfAFile() throws {
        let dir = TempDir()
        let path = dir.file("probe.img")
        try LUN.createFile(path: path, sizeBytes: 8 << 20)
        let lun = try LUN(path: path, readWrite: false)
        XCTAssertEqual(lun.info.sizeBytes, 8 << 20)
        XCTAssertFalse(lun.info.isBlockDevice)
        XCTAssertTrue(lun.info.readOnly)
        XCTAssertEqual(lun.info.alignment % 4096, 0)
        XCTAssertThrowsError(try LUN(path: dir.file("missing.img"), readWrite: false).info) { error in
            XCTAssertEqual((error as? IOError)?.code, ENOENT)
            XCTAssertTrue("\(error)".contains("missing.img"))
        }
    }
}
