import Controller
import Foundation
import Glibc
import IOEngine
import XCTest

/// The scheduler sends chunks to the engine of the thread that dispatches them: an event
/// loop that reaps its own engine gets its I/O's completions itself, other threads use the
/// domain's engine (and its reaper thread).
final class SchedulerThreadEngineTests: XCTestCase {
    private var dir: String!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "svsp-sched-loop-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    override func tearDown() {
        EngineHandle.setOnThisThread(nil)
        try? FileManager.default.removeItem(atPath: dir)
    }

    private func scratchLUN(bytes: UInt64) throws -> LUN {
        try LUN.createFile(path: dir + "/lun.img", sizeBytes: bytes)
        return try LUN(path: dir + "/lun.img", readWrite: true)
    }

    /// Reaps `engine` on this thread, as an event loop does, until `done` (at most 20 s).
    private func reap(_ engine: EngineHandle, until done: () -> Bool) {
        var fd = pollfd(fd: engine.notifyDescriptor!, events: Int16(POLLIN), revents: 0)
        let deadline = Date().addingTimeInterval(20)
        while !done(), Date() < deadline {
            _ = poll(&fd, 1, 100)
            engine.reap()
        }
    }

    func testAThreadWithItsOwnEngineGetsItsChunksBackOnlyWhenItReaps() throws {
        let lun = try scratchLUN(bytes: 4 << 20)
        let domainEngine = try Engine(queueDepth: 32)
        let loopEngine = try Engine(queueDepth: 32, callerReaps: true)
        var profile = ArrayProfile(name: "test")
        profile.maxIOBytes = 64 << 10
        let scheduler = IOScheduler(engine: domainEngine.handle, profile: profile)
        let index = scheduler.addLUN(lun.handle)
        let data = try AlignedBuffer(count: 256 << 10)
        for i in 0..<(data.count / 8) { data.pointer.storeBytes(of: UInt64(i) &* 0x9E37_79B9_7F4A_7C15, toByteOffset: i * 8, as: UInt64.self) }

        EngineHandle.setOnThisThread(loopEngine.handle)
        let sink = OrderSink()
        try scheduler.submit(.write, lun: index, buffer: data.pointer, length: data.count, offset: 1 << 20, sink: sink, cookie: 3)
        scheduler.kick()
        XCTAssertFalse(sink.wait(1, seconds: 0.3), "the write completed without this thread reaping: it went to the domain's engine")
        reap(loopEngine.handle) { sink.result(3) != nil }
        XCTAssertEqual(sink.result(3), Int64(data.count), "the caller hears once, for the whole request (4 chunks)")
        XCTAssertEqual(loopEngine.handle.stats.completed, 4)
        XCTAssertEqual(domainEngine.handle.stats.submitted, 0)

        // Another thread (no engine of its own) reads through the domain's engine.
        let back = try AlignedBuffer(count: 256 << 10)
        let readSink = OrderSink()
        let backAddress = UInt(bitPattern: back.pointer)
        let submitted = DispatchSemaphore(value: 0)
        Thread { // a thread of its own: DispatchQueue.sync would run this on the calling thread
            try! scheduler.submit(.read, lun: index, buffer: UnsafeMutableRawPointer(bitPattern: backAddress), length: 256 << 10, offset: 1 << 20, sink: readSink, cookie: 4)
            scheduler.kick()
            submitted.signal()
        }.start()
        submitted.wait()
        XCTAssertTrue(readSink.wait(1))
        XCTAssertEqual(readSink.result(4), Int64(256 << 10))
        XCTAssertEqual(domainEngine.handle.stats.submitted, 4, "a thread without an engine of its own uses the domain's")
        XCTAssertEqual(memcmp(data.pointer, back.pointer, data.count), 0, "what the loop's engine wrote reads back byte for byte")
    }

    func testAChunkAnotherThreadsCompletionDispatchesOnTheDomainEngineIsSubmitted() throws {
        // Array depth 1: B waits behind A. A goes to this thread's engine; this thread then gives its
        // engine up (as the NBD loop does at shutdown) and reaps A, whose completion dispatches B on
        // the domain engine from a thread that is not the domain engine's reaper: nobody else
        // would submit it.
        let lun = try scratchLUN(bytes: 1 << 20)
        let domainEngine = try Engine(queueDepth: 8)
        let loopEngine = try Engine(queueDepth: 8, callerReaps: true)
        var profile = ArrayProfile(name: "test")
        profile.queueDepthPerArray = 1
        let scheduler = IOScheduler(engine: domainEngine.handle, profile: profile)
        let index = scheduler.addLUN(lun.handle)
        let data = try AlignedBuffer(count: 8192)
        let sink = OrderSink()
        EngineHandle.setOnThisThread(loopEngine.handle)
        try scheduler.submit(.write, lun: index, buffer: data.pointer, length: 4096, offset: 0, sink: sink, cookie: 1)
        try scheduler.submit(.write, lun: index, buffer: data.pointer + 4096, length: 4096, offset: 4096, sink: sink, cookie: 2)
        scheduler.kick()
        EngineHandle.setOnThisThread(nil)
        reap(loopEngine.handle) { sink.result(1) != nil }
        XCTAssertEqual(sink.result(1), 4096)
        XCTAssertTrue(sink.wait(2, seconds: 10), "B was staged on the domain engine and never submitted")
        XCTAssertEqual(sink.result(2), 4096)
        XCTAssertEqual(domainEngine.handle.stats.submitted, 1)
    }
}
