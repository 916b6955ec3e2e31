import Foundation
import IOEngine
import XCTest

/// The reaper's polling before it sleeps (`pollMaxMicroseconds`, `serve --reap-poll-us`):
/// with a budget, QD1 completions are found by polling the ring and the data is intact;
/// without one the reaper never polls.
final class PollingTests: XCTestCase {
    /// 200 QD1 writes then reads of 4 KiB, one at a time; returns the engine's poll counters.
    private func runQD1(pollMicroseconds: Int) throws -> (hit: UInt64, missed: UInt64) {
        let dir = TempDir()
        let path = dir.file("lun.img")
        try LUN.createFile(path: path, sizeBytes: 4 << 20)
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 8, pollMaxMicroseconds: pollMicroseconds)
        let pool = try BufferPool(bufferBytes: 4096, count: 1)
        let buf = pool.handle.buffer(at: 0)
        let count = 200
        for i in 0..<count {
            fillPattern(UnsafeMutableRawBufferPointer(start: buf.pointer, count: 4096), offset: UInt64(i) * 4096, seed: 7)
            let sink = CollectingSink()
            try engine.handle.prepWrite(lun: lun.handle, buffer: buf.pointer, length: 4096, offset: UInt64(i) * 4096,
                                        sink: sink, cookie: 0)
            engine.handle.submit()
            XCTAssertEqual(sink.wait(for: 1), 1)
            XCTAssertEqual(sink.result(0), 4096)
        }
        var expected = [UInt8](repeating: 0, count: 4096)
        for i in 0..<count {
            memset(buf.pointer, 0, 4096)
            let sink = CollectingSink()
            try engine.handle.prepRead(lun: lun.handle, buffer: buf.pointer, length: 4096, offset: UInt64(i) * 4096,
                                       sink: sink, cookie: 0)
            engine.handle.submit()
            XCTAssertEqual(sink.wait(for: 1), 1)
            expected.withUnsafeMutableBytes { fillPattern($0, offset: UInt64(i) * 4096, seed: 7) }
            XCTAssertTrue(expected.withUnsafeBytes { memcmp($0.baseAddress!, buf.pointer, 4096) == 0 },
                          "block \(i) read back differs from what was written")
        }
        let stats = engine.handle.stats
        return (stats.polls_hit, stats.polls_missed)
    }

    func testWithABudgetQD1CompletionsAreFoundByPollingAndTheDataIsIntact() throws {
        // 5 ms: far longer than a 4 KiB O_DIRECT I/O on the disks this runs on, so most waits end
        // polling; a quarter leaves room for a busy machine.
        let polls = try runQD1(pollMicroseconds: 5000)
        XCTAssertGreaterThan(polls.hit, 100, "of 400 QD1 I/Os, polling found the completion of only \(polls.hit)")
    }

    func testWithoutABudgetTheReaperNeverPolls() throws {
        let polls = try runQD1(pollMicroseconds: 0)
        XCTAssertEqual(polls.hit + polls.missed, 0, "the reaper polled \(polls.hit + polls.missed) times with polling off")
    }
}
