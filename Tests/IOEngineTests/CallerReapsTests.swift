import Foundation
import Glibc
import IOEngine
import Synchronization
import XCTest

/// An engine its owner reaps (`Engine(callerReaps:)`, the NBD event loop's): no reaper
/// thread, completions run on the thread that calls `reap()` when the notify descriptor
/// is readable, and destroy delivers what is still in flight.
private func thisThread() -> UInt { UInt(pthread_self()) }

final class CallerReapsTests: XCTestCase {
    /// Records the thread each completion ran on.
    private final class ThreadRecordingSink: CompletionSink, @unchecked Sendable {
        private let lock = NSLock()
        private(set) var results: [UInt64: Int64] = [:]
        private(set) var threads: Set<UInt> = []
        override func ioCompleted(cookie: UInt64, result: Int64) {
            lock.lock()
            results[cookie] = result
            threads.insert(thisThread())
            lock.unlock()
        }
        var count: Int { lock.lock(); defer { lock.unlock() }; return results.count }
    }

    /// A file LUN of `bytes` in `dir`, opened read-write.
    private func scratchLUN(_ dir: TempDir, bytes: Int) throws -> LUN {
        let path = dir.file("lun.img")
        try LUN.createFile(path: path, sizeBytes: UInt64(bytes))
        return try LUN(path: path, readWrite: true)
    }

    private func waitReadable(_ fd: Int32, milliseconds: Int32) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, milliseconds) == 1
    }

    /// Reaps until `sink` has `count` completions, only when the notify descriptor says so, as
    /// an event loop does: a completion that does not signal it (or a reap that leaves work
    /// without signalling again) fails here.
    private func reapUntil(_ engine: EngineHandle, _ sink: ThreadRecordingSink, count: Int,
                           file: StaticString = #filePath, line: UInt = #line) {
        let fd = engine.notifyDescriptor!
        while sink.count < count {
            guard waitReadable(fd, milliseconds: 10_000) else {
                XCTFail("the notify descriptor stayed quiet with \(sink.count) of \(count) completions delivered",
                        file: file, line: line)
                return
            }
            var counter: UInt64 = 0
            _ = read(fd, &counter, 8) // as NIO's pipe channel does before the loop reaps
            engine.reap()
        }
    }

    func testMoreCompletionsThanOneReapTakesAreSignalledAgain() throws {
        // 256 writes in flight at once: far more than one reap handles (16 rounds of 2), and
        // they may all complete before the first read of the eventfd takes every signal.
        let dir = TempDir()
        let lun = try scratchLUN(dir, bytes: 4 << 20)
        let engine = try Engine(queueDepth: 256, callerReaps: true)
        let buffer = try AlignedBuffer(count: 256 * 4096)
        let sink = ThreadRecordingSink()
        for i in 0..<256 {
            try engine.handle.prepWrite(lun: lun.handle, buffer: buffer.pointer + i * 4096, length: 4096,
                                        offset: UInt64(i) * 4096, sink: sink, cookie: UInt64(i))
        }
        engine.handle.submit()
        usleep(100_000) // let them all complete first
        reapUntil(engine.handle, sink, count: 256)
        XCTAssertEqual(sink.count, 256)
        XCTAssertEqual(Set(sink.results.values), [4096])
    }

    func testWritesAndReadsCompleteOnTheReapingThreadWithTheDataIntact() throws {
        let dir = TempDir()
        let lun = try scratchLUN(dir, bytes: 4 << 20)
        let engine = try Engine(queueDepth: 16, callerReaps: true)
        XCTAssertNotNil(engine.handle.notifyDescriptor)
        let blocks = 64, depth = 8
        let pool = try BufferPool(bufferBytes: 4096, count: depth)
        let me = thisThread()

        let writes = ThreadRecordingSink()
        for first in stride(from: 0, to: blocks, by: depth) {
            for i in first..<first + depth {
                let buf = pool.handle.buffer(at: i - first)
                fillPattern(UnsafeMutableRawBufferPointer(start: buf.pointer, count: 4096), offset: UInt64(i) * 4096, seed: 11)
                try engine.handle.prepWrite(lun: lun.handle, buffer: buf.pointer, length: 4096, offset: UInt64(i) * 4096,
                                            sink: writes, cookie: UInt64(i))
            }
            engine.handle.submit()
            reapUntil(engine.handle, writes, count: first + depth)
        }
        XCTAssertEqual(writes.count, blocks)
        XCTAssertEqual(Set(writes.results.values), [4096])
        XCTAssertEqual(writes.threads, [me], "completions ran on another thread than the one reaping")

        let reads = ThreadRecordingSink()
        var expected = [UInt8](repeating: 0, count: 4096)
        for i in 0..<blocks {
            let buf = pool.handle.buffer(at: 0)
            memset(buf.pointer, 0, 4096)
            try engine.handle.prepRead(lun: lun.handle, buffer: buf.pointer, length: 4096, offset: UInt64(i) * 4096,
                                       sink: reads, cookie: UInt64(i))
            engine.handle.submit()
            reapUntil(engine.handle, reads, count: i + 1)
            expected.withUnsafeMutableBytes { fillPattern($0, offset: UInt64(i) * 4096, seed: 11) }
            XCTAssertTrue(expected.withUnsafeBytes { memcmp($0.baseAddress!, buf.pointer, 4096) == 0 },
                          "block \(i) read back differs from what was written")
        }
        XCTAssertEqual(reads.threads, [me])
    }

    func testNothingCompletesUntilTheOwnerReaps() throws {
        let dir = TempDir()
        let lun = try scratchLUN(dir, bytes: 1 << 20)
        let engine = try Engine(queueDepth: 4, callerReaps: true)
        let buffer = try AlignedBuffer(count: 4096)
        let sink = ThreadRecordingSink()
        try engine.handle.prepWrite(lun: lun.handle, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 1)
        engine.handle.submit()
        // The write finishes in the kernel and signals the descriptor; no thread of the engine's runs its callback.
        XCTAssertTrue(waitReadable(engine.handle.notifyDescriptor!, milliseconds: 10_000), "the notify descriptor never became readable")
        usleep(50_000)
        XCTAssertEqual(sink.count, 0, "a completion ran without the owner reaping: the engine has a reaper of its own")
        reapUntil(engine.handle, sink, count: 1)
        XCTAssertEqual(sink.results[1], 4096)
    }

    func testDestroyDeliversWhatIsInFlightOnTheDestroyingThread() throws {
        let dir = TempDir()
        let lun = try scratchLUN(dir, bytes: 1 << 20)
        let buffer = try AlignedBuffer(count: 16 * 4096)
        let sink = ThreadRecordingSink()
        do {
            let engine = try Engine(queueDepth: 16, callerReaps: true)
            for i in 0..<16 {
                try engine.handle.prepWrite(lun: lun.handle, buffer: buffer.pointer + i * 4096, length: 4096,
                                            offset: UInt64(i) * 4096, sink: sink, cookie: UInt64(i))
            }
            engine.handle.submit()
            _ = consume engine
        }
        XCTAssertEqual(sink.count, 16, "destroy returned before every accepted request completed")
        XCTAssertEqual(sink.threads, [thisThread()])
    }

    func testAnEngineWithAReaperThreadHasNoNotifyDescriptorAndIsNotReapedByCallers() throws {
        let engine = try Engine(queueDepth: 4)
        XCTAssertNil(engine.handle.notifyDescriptor)
        XCTAssertEqual(engine.handle.reap().delivered, 0)
    }

    func testAThreadsEngineIsWhereItsIOGoes() throws {
        let domainEngine = try Engine(queueDepth: 4)
        let loopEngine = try Engine(queueDepth: 4, callerReaps: true)
        XCTAssertNil(EngineHandle.onThisThread)
        XCTAssertEqual(domainEngine.handle.forThisThread, domainEngine.handle)
        EngineHandle.setOnThisThread(loopEngine.handle)
        XCTAssertEqual(domainEngine.handle.forThisThread, loopEngine.handle)
        // Other threads keep their own choice.
        let other = Mutex<EngineHandle?>(loopEngine.handle)
        let done = DispatchSemaphore(value: 0)
        Thread { other.withLock { $0 = EngineHandle.onThisThread }; done.signal() }.start()
        done.wait()
        XCTAssertNil(other.withLock { $0 })
        EngineHandle.setOnThisThread(nil)
        XCTAssertEqual(domainEngine.handle.forThisThread, domainEngine.handle)
    }
}
