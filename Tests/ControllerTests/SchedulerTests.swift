import Controller
import Foundation
import IOEngine
import XCTest

/// Collects scheduler completions in order.
final class OrderSink: CompletionSink, @unchecked Sendable {
    private let lock = NSLock()
    private(set) var order: [UInt64] = []
    private var results: [UInt64: Int64] = [:]
    private let arrived = DispatchSemaphore(value: 0)

    override func ioCompleted(cookie: UInt64, result: Int64) {
        lock.lock(); order.append(cookie); results[cookie] = result; lock.unlock()
        arrived.signal()
    }

    func wait(_ n: Int, seconds: Double = 20) -> Bool {
        (0..<n).allSatisfy { _ in arrived.wait(timeout: .now() + seconds) == .success }
    }
    func result(_ c: UInt64) -> Int64? { lock.lock(); defer { lock.unlock() }; return results[c] }
    var completionOrder: [UInt64] { lock.lock(); defer { lock.unlock() }; return order }
}

/// The scheduler against a real file LUN: queue limits, token buckets (injected clock), priority, splitting.
final class SchedulerTests: XCTestCase {
    private var dir: String!
    private var path: String!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "svsp-sched-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        path = dir + "/lun.img"
        try LUN.createFile(path: path, sizeBytes: 16 << 20)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private func profile(lunDepth: Int = 32, arrayDepth: Int = 256, maxIO: UInt64 = 1 << 20, iops: Int? = nil) -> ArrayProfile {
        var p = ArrayProfile(name: "test")
        p.queueDepthPerLUN = lunDepth
        p.queueDepthPerArray = arrayDepth
        p.maxIOBytes = maxIO
        p.iopsLimit = iops
        return p
    }

    func testLargeWriteIsSplitAtMaxIOAndReadsBackByteForByte() throws {
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 32)
        let scheduler = IOScheduler(engine: engine.handle, profile: profile(maxIO: 256 << 10))
        let index = scheduler.addLUN(lun.handle)
        let data = try AlignedBuffer(count: 4 << 20)
        for i in 0..<(data.count / 8) { data.pointer.storeBytes(of: UInt64(i) &* 0x9E37_79B9_7F4A_7C15, toByteOffset: i * 8, as: UInt64.self) }
        let sink = OrderSink()
        try scheduler.submit(.write, lun: index, buffer: data.pointer, length: 4 << 20, offset: 1 << 20, sink: sink, cookie: 7)
        scheduler.kick()
        XCTAssertTrue(sink.wait(1))
        XCTAssertEqual(sink.result(7), 4 << 20, "the caller hears once, for the whole request")
        XCTAssertEqual(scheduler.currentStats.chunks, 16, "4 MiB at max_io_size 256k is 16 writes")
        XCTAssertEqual(engine.handle.stats.submitted, 16)

        let back = try AlignedBuffer(count: 4 << 20)
        let n = try syncRead(engine.handle, lun.handle, back, offset: 1 << 20)
        XCTAssertEqual(n, 4 << 20)
        XCTAssertEqual(memcmp(data.pointer, back.pointer, 4 << 20), 0, "every byte of the split write is where it belongs")
    }

    private func syncRead(_ engine: EngineHandle, _ lun: LUNHandle, _ buffer: borrowing AlignedBuffer, offset: UInt64) throws -> Int64 {
        let sink = OrderSink()
        try engine.prepRead(lun: lun, buffer: buffer.pointer, length: buffer.count, offset: offset, sink: sink, cookie: 1)
        engine.submit()
        XCTAssertTrue(sink.wait(1))
        return sink.result(1) ?? -1
    }

    func testQueueDepthPerLUNIsNeverExceeded() throws {
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 32)
        let scheduler = IOScheduler(engine: engine.handle, profile: profile(lunDepth: 2))
        let index = scheduler.addLUN(lun.handle)
        let buffer = try AlignedBuffer(count: 8 * 4096)
        let sink = OrderSink()
        for i in 0..<8 {
            try scheduler.submit(.write, lun: index, buffer: buffer.pointer + i * 4096, length: 4096, offset: UInt64(i) * 4096,
                                 sink: sink, cookie: UInt64(i))
        }
        XCTAssertEqual(scheduler.currentStats.chunks, 2, "only queue_depth_per_lun requests go to the engine")
        scheduler.kick()
        XCTAssertTrue(sink.wait(8))
        XCTAssertEqual(sink.completionOrder.count, 8)
        XCTAssertEqual(scheduler.currentStats.chunks, 8)
    }

    func testIOPSCeilingWithInjectedClock() throws {
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 32)
        let clock = ManualClock()
        // 100 IOPS: burst = 50 ms worth = 5 requests.
        let scheduler = IOScheduler(engine: engine.handle, profile: profile(iops: 100), clock: clock)
        let index = scheduler.addLUN(lun.handle)
        let buffer = try AlignedBuffer(count: 4096)
        let sink = OrderSink()
        for i in 0..<12 {
            try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: UInt64(i))
        }
        scheduler.kick()
        XCTAssertTrue(sink.wait(5))
        XCTAssertEqual(scheduler.currentStats.chunks, 5, "the burst, then the bucket is empty")
        clock.advance(byNs: 30_000_000) // 30 ms at 100/s = 3 more
        scheduler.pumpAndSubmit()
        XCTAssertTrue(sink.wait(3))
        XCTAssertEqual(scheduler.currentStats.chunks, 8)
        clock.advance(byNs: 1_000_000_000)
        scheduler.pumpAndSubmit()
        XCTAssertTrue(sink.wait(4))
        XCTAssertEqual(sink.completionOrder.count, 12)
        XCTAssertGreaterThan(scheduler.currentStats.throttled, 0)
    }

    func testHostIOGoesBeforeQueuedBackgroundWork() throws {
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 32)
        let scheduler = IOScheduler(engine: engine.handle, profile: profile(lunDepth: 1, arrayDepth: 10), backgroundSharePercent: 20)
        let index = scheduler.addLUN(lun.handle)
        let buffer = try AlignedBuffer(count: 4096)
        let sink = OrderSink()
        // Cookies: 100+ background, 0+ host. The first host request occupies the only slot.
        try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 0)
        for i in 0..<3 {
            try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 4096, offset: 0, ioClass: .background,
                                 sink: sink, cookie: UInt64(100 + i))
        }
        try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 1)
        scheduler.kick()
        XCTAssertTrue(sink.wait(5))
        XCTAssertEqual(sink.completionOrder, [0, 1, 100, 101, 102], "queued host I/O overtakes background work")
    }

    func testBackgroundKeepsToItsShareOfWhatIsInFlightWhileHostsAreActive() throws {
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 64)
        let clock = ManualClock()
        let scheduler = IOScheduler(engine: engine.handle, profile: profile(lunDepth: 32, arrayDepth: 40), backgroundSharePercent: 10,
                                    clock: clock)
        let index = scheduler.addLUN(lun.handle)
        let buffer = try AlignedBuffer(count: 4096)
        let sink = OrderSink()
        // 18 host reads in flight (staged, not yet kicked): 10 % of what is in flight is 2 background chunks.
        for i in 0..<18 {
            try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: UInt64(100 + i))
        }
        for i in 0..<6 {
            try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 4096, offset: 0, ioClass: .background,
                                 sink: sink, cookie: UInt64(i))
        }
        XCTAssertEqual(scheduler.currentStats.backgroundChunks, 2, "18 host + 2 background in flight")
        scheduler.kick()
        XCTAssertTrue(sink.wait(24))
        // Hosts sent I/O just under the idle time ago, none in flight now: one background chunk at a time.
        clock.advance(byNs: IOScheduler.hostIdleNs - 1)
        let before = scheduler.currentStats.backgroundChunks
        for i in 0..<3 {
            try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 4096, offset: 0, ioClass: .background,
                                 sink: sink, cookie: UInt64(10 + i))
        }
        XCTAssertEqual(scheduler.currentStats.backgroundChunks - before, 1, "at least one, so the copy moves on")
        scheduler.kick()
        XCTAssertTrue(sink.wait(3))
    }

    func testBackgroundUsesTheWholeDepthWhenHostIOIsIdle() throws {
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 64)
        let clock = ManualClock()
        let scheduler = IOScheduler(engine: engine.handle, profile: profile(lunDepth: 32, arrayDepth: 20), backgroundSharePercent: 10,
                                    clock: clock)
        let index = scheduler.addLUN(lun.handle)
        let buffer = try AlignedBuffer(count: 4096)
        let sink = OrderSink()
        try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 100)
        scheduler.kick()
        XCTAssertTrue(sink.wait(1))
        clock.advance(byNs: IOScheduler.hostIdleNs) // nothing from hosts for the idle time: work-conserving
        for i in 0..<6 {
            try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 4096, offset: 0, ioClass: .background,
                                 sink: sink, cookie: UInt64(i))
        }
        XCTAssertEqual(scheduler.currentStats.backgroundChunks, 6, "an idle array's whole depth, not the 10% share")
        scheduler.kick()
        XCTAssertTrue(sink.wait(6))
    }

    func testBadRequestsAreRefusedBeforeQueueing() throws {
        let lun = try LUN(path: path, readWrite: true)
        let engine = try Engine(queueDepth: 4)
        let scheduler = IOScheduler(engine: engine.handle, profile: profile())
        let index = scheduler.addLUN(lun.handle)
        let buffer = try AlignedBuffer(count: 8192)
        let sink = OrderSink()
        XCTAssertThrowsError(try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 100, offset: 0, sink: sink, cookie: 0))
        XCTAssertThrowsError(try scheduler.submit(.read, lun: index, buffer: buffer.pointer, length: 8192, offset: (16 << 20) - 4096, sink: sink, cookie: 0)) {
            XCTAssertEqual(($0 as? IOError)?.code, ERANGE)
        }
        XCTAssertThrowsError(try scheduler.submit(.read, lun: 5, buffer: buffer.pointer, length: 4096, offset: 0, sink: sink, cookie: 0))
        XCTAssertEqual(scheduler.currentStats.requests, 0)
    }
}
