import Foundation
import IOEngine
import XCTest

/// Bad requests are errors, never crashes; faults surface with their errno.
final class ErrorPathTests: XCTestCase {
    private var dir: TempDir!
    private var path: String!

    override func setUpWithError() throws {
        dir = TempDir()
        path = dir.file("lun.img")
        try LUN.createFile(path: path, sizeBytes: 4 << 20)
    }

    override func tearDown() { dir = nil } // the LUN file goes now, not at process exit

    private func prepError(_ body: () throws -> Void) -> IOError? {
        do { try body(); return nil } catch { return error as? IOError }
    }

    func testMisalignedBufferOffsetOrLengthIsEINVAL() throws {
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 8)
        let buffer = try AlignedBuffer(count: 16384)
        let sink = CollectingSink()
        let e = engine.handle, l = lun.handle
        XCTAssertEqual(prepError { try e.prepWrite(lun: l, buffer: buffer.pointer + 1, length: 4096, offset: 0, sink: sink, cookie: 1) }?.code, EINVAL)
        XCTAssertEqual(prepError { try e.prepWrite(lun: l, buffer: buffer.pointer, length: 4096, offset: 100, sink: sink, cookie: 2) }?.code, EINVAL)
        XCTAssertEqual(prepError { try e.prepRead(lun: l, buffer: buffer.pointer, length: 1000, offset: 0, sink: sink, cookie: 3) }?.code, EINVAL)
        XCTAssertEqual(prepError { try e.prepRead(lun: l, buffer: buffer.pointer, length: 0, offset: 0, sink: sink, cookie: 4) }?.code, EINVAL)
        let error = prepError { try e.prepWrite(lun: l, buffer: buffer.pointer, length: 4096, offset: 100, sink: sink, cookie: 2) }
        XCTAssertTrue("\(error!)".contains("offset 100"), "\(error!)")
        // The engine still works afterwards, and no callback came for the refused requests.
        try e.prepWrite(lun: l, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 9)
        e.submit()
        XCTAssertEqual(sink.wait(for: 1), 1)
        XCTAssertEqual(sink.result(9), 4096)
        XCTAssertEqual(sink.count, 1)
    }

    func testReadPastEndIsERANGE() throws {
        let lun = try LUN(path: path, readWrite: false)
        let engine = try Engine(queueDepth: 2)
        let buffer = try AlignedBuffer(count: 8192)
        let sink = CollectingSink()
        let end = lun.info.sizeBytes
        XCTAssertEqual(prepError { try engine.handle.prepRead(lun: lun.handle, buffer: buffer.pointer, length: 8192, offset: end - 4096, sink: sink, cookie: 1) }?.code, ERANGE)
        XCTAssertEqual(prepError { try engine.handle.prepRead(lun: lun.handle, buffer: buffer.pointer, length: 4096, offset: end, sink: sink, cookie: 2) }?.code, ERANGE)
        XCTAssertEqual(prepError { try engine.handle.prepWrite(lun: lun.handle, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 3) }?.code, EBADF, "read-only LUN refuses writes")
    }

    func testQueueFullIsEBUSYNotACrash() throws {
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 2)
        let buffer = try AlignedBuffer(count: 4096)
        let sink = CollectingSink()
        try engine.handle.prepRead(lun: lun.handle, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 1)
        try engine.handle.prepRead(lun: lun.handle, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 2)
        XCTAssertEqual(prepError { try engine.handle.prepRead(lun: lun.handle, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 3) }?.code, EBUSY)
        engine.handle.submit()
        XCTAssertEqual(sink.wait(for: 2), 2)
    }

    func testShutdownWithIOInFlightDeliversEveryCompletion() throws {
        let lun = try LUN(path: path, readWrite: true)
        let pool = try BufferPool(bufferBytes: 16384, count: 128)
        let sink = CollectingSink()
        do {
            let engine = try Engine(queueDepth: 128)
            for i in 0..<128 {
                let buf = pool.handle.buffer(at: i)
                if i % 2 == 0 {
                    try engine.handle.prepWrite(lun: lun.handle, buffer: buf.pointer, length: 16384, offset: UInt64(i) * 16384, sink: sink, cookie: UInt64(i))
                } else {
                    try engine.handle.prepRead(lun: lun.handle, buffer: buf.pointer, length: 16384, offset: UInt64(i) * 16384, sink: sink, cookie: UInt64(i))
                }
                if i == 63 { engine.handle.submit() } // half submitted, half still staged at shutdown
            }
            // `engine` ends here: its deinit must drain all 128.
        }
        XCTAssertEqual(sink.count, 128, "every accepted request completes before the engine is gone")
        for i in 0..<128 { XCTAssertEqual(sink.result(UInt64(i)), 16384) }
    }

    func testWriteToReadOnlyLoopDeviceFailsWithErrnoAndEngineKeepsWorking() throws {
        let backing = dir.file("loop-backing.img")
        try LUN.createFile(path: backing, sizeBytes: 16 << 20)
        let (device, reason) = attachLoopDevice(backing)
        guard let device else { throw XCTSkip("loop device test skipped: \(reason)") }
        defer { shell(["blockdev", "--setrw", device]); shell(["losetup", "-d", device]) }

        let loop = try LUN(path: device, readWrite: true)
        XCTAssertTrue(loop.info.isBlockDevice)
        XCTAssertEqual(loop.info.sizeBytes, 16 << 20)
        let other = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 8)
        let buffer = try AlignedBuffer(count: 4096)
        fillPattern(buffer.bytes, offset: 0, seed: 3)
        let sink = CollectingSink()
        try engine.handle.prepWrite(lun: loop.handle, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 1)
        engine.handle.submit()
        XCTAssertEqual(sink.wait(for: 1), 1)
        XCTAssertEqual(sink.result(1), 4096, "writable before --setro")

        XCTAssertEqual(shell(["blockdev", "--setro", device]).0, 0)
        try engine.handle.prepWrite(lun: loop.handle, buffer: buffer.pointer, length: 4096, offset: 8192, sink: sink, cookie: 2)
        try engine.handle.prepWrite(lun: other.handle, buffer: buffer.pointer, length: 4096, offset: 8192, sink: sink, cookie: 3)
        engine.handle.submit()
        XCTAssertEqual(sink.wait(for: 2), 2)
        let failed = try XCTUnwrap(sink.result(2))
        XCTAssertLessThan(failed, 0, "a write to a read-only device must fail")
        XCTAssertTrue([EPERM, EIO, EROFS, EACCES].contains(Int32(-failed)), "errno \(-failed)")
        XCTAssertEqual(sink.result(3), 4096, "the other LUN keeps working on the same engine")
        // Reads of the read-only device still work and hold the first write.
        let readBack = try AlignedBuffer(count: 4096)
        try engine.handle.prepRead(lun: loop.handle, buffer: readBack.pointer, length: 4096, offset: 0, sink: sink, cookie: 4)
        engine.handle.submit()
        XCTAssertEqual(sink.wait(for: 1), 1)
        XCTAssertEqual(sink.result(4), 4096)
        XCTAssertEqual(Array(readBack.bytes), Array(buffer.bytes))
    }
}
