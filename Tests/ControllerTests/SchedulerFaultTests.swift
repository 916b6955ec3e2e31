import Controller
import Foundation
import Glibc
import IOEngine
import XCTest

/// Fault-plan actions the scheduler carries out (latency spikes, hung I/O) and the
/// watchdog that declares a LUN stuck after the array profile's `io_timeout`.
final class SchedulerFaultTests: XCTestCase {
    private var dir: String!

    override func setUpWithError() throws {
        dir = NSTemporaryDirectory() + "svsp-sched-faults-\(UUID().uuidString.prefix(6))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try LUN.createFile(path: dir + "/lun.img", sizeBytes: 4 << 20)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: dir) }

    private func plan(_ json: String) throws -> FaultPlan {
        try JSONDecoder().decode(FaultPlan.self, from: Data(json.utf8))
    }

    /// A scheduler over the scratch LUN with `timeoutMs` of io_timeout and depth 1 per LUN
    /// (so a second request queues behind a hung one), the plan's rules for pool "p" armed.
    private func scheduler(_ engine: borrowing Engine, _ lun: borrowing LUN, timeoutMs: UInt64, plan json: String,
                           events: EventLog) throws -> (IOScheduler, Int)
    {
        var profile = ArrayProfile(name: "test")
        profile.ioTimeoutNs = timeoutMs * 1_000_000
        profile.queueDepthPerLUN = 1
        let scheduler = IOScheduler(engine: engine.handle, profile: profile)
        let index = scheduler.addLUN(lun.handle)
        scheduler.applyFaults(try plan(json), pool: "p")
        scheduler.onLUNEvent = { events.add($0) }
        return (scheduler, index)
    }

    private func keepAlive(_ engine: borrowing Engine, _ lun: borrowing LUN) {}
    private func keepAlive(_ a: borrowing AlignedBuffer, _ b: borrowing AlignedBuffer, _ c: borrowing AlignedBuffer) {}

    private func pattern(_ seed: UInt64) throws -> AlignedBuffer {
        let b = try AlignedBuffer(count: 64 << 10)
        for i in 0..<(b.count / 8) { b.pointer.storeBytes(of: (UInt64(i) &+ seed) &* 0x9E37_79B9_7F4A_7C15, toByteOffset: i * 8, as: UInt64.self) }
        return b
    }

    /// Whether the LUN holds `expected` at `offset` (read through the scheduler).
    private func holds(_ expected: borrowing AlignedBuffer, _ scheduler: IOScheduler, _ index: Int, offset: UInt64) throws -> Bool {
        let back = try AlignedBuffer(count: expected.count)
        let sink = OrderSink()
        try scheduler.submit(.read, lun: index, buffer: back.pointer, length: back.count, offset: offset, sink: sink, cookie: 99)
        scheduler.kick()
        XCTAssertTrue(sink.wait(1))
        XCTAssertEqual(sink.result(99), Int64(back.count))
        let same = memcmp(back.pointer, expected.pointer, expected.count) == 0
        keepAlive(back, back, back)
        return same
    }

    func testAHungWriteTimesOutAndWhatQueuedBehindItFailsTooThenTheLUNServesAgain() throws {
        let events = EventLog()
        let lun = try LUN(path: dir + "/lun.img", readWrite: true)
        let engine = try Engine(queueDepth: 32)
        let (scheduler, index) = try scheduler(engine, lun, timeoutMs: 200, plan: #"{"rules": [{"pool": "p", "op": "write", "action": "stuck", "count": 1}]}"#, events: events)
        let a = try pattern(1), b = try pattern(2), c = try pattern(3)
        let sink = OrderSink()
        let started = Date()
        try scheduler.submit(.write, lun: index, buffer: a.pointer, length: a.count, offset: 0, sink: sink, cookie: 1)
        try scheduler.submit(.write, lun: index, buffer: b.pointer, length: b.count, offset: 1 << 20, sink: sink, cookie: 2)
        scheduler.kick()
        XCTAssertFalse(sink.wait(1, seconds: 0.1), "the hung write answers before io_timeout")
        XCTAssertTrue(sink.wait(2, seconds: 10))
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(started), 0.2)
        XCTAssertEqual(sink.result(1), -Int64(ETIMEDOUT), "the hung write fails with ETIMEDOUT")
        XCTAssertEqual(sink.result(2), -Int64(ETIMEDOUT), "the write queued behind it fails with it, without waiting for the device")
        XCTAssertEqual(scheduler.currentStats.timeouts, 1)
        XCTAssertEqual(events.lines.count, 2, "\(events.lines)")
        XCTAssertTrue(events.lines.first?.contains("did not answer a write within io_timeout 200ms") == true, "\(events.lines)")
        XCTAssertTrue(events.lines.last?.contains("no longer stuck") == true, "\(events.lines)")
        XCTAssertEqual(scheduler.stuckLUNs, [])

        // The plan's one hang is spent: the LUN serves again, and nothing of the failed writes landed.
        try scheduler.submit(.write, lun: index, buffer: c.pointer, length: c.count, offset: 2 << 20, sink: sink, cookie: 3)
        scheduler.kick()
        XCTAssertTrue(sink.wait(1))
        XCTAssertEqual(sink.result(3), Int64(c.count))
        XCTAssertTrue(try holds(c, scheduler, index, offset: 2 << 20))
        let zeros = try AlignedBuffer(count: 64 << 10)
        zeros.bytes.initializeMemory(as: UInt8.self, repeating: 0) // not zeroed by itself
        XCTAssertTrue(try holds(zeros, scheduler, index, offset: 0), "the hung write never reached the device")
        keepAlive(a, b, c) // the device may read them until the end
        keepAlive(engine, lun) // the scheduler holds only their handles
    }

    func testASlowAnswerMarksTheLUNStuckNewRequestsFailAtOnceAndTheSlowOneStillLands() throws {
        let events = EventLog()
        let lun = try LUN(path: dir + "/lun.img", readWrite: true)
        let engine = try Engine(queueDepth: 32)
        let (scheduler, index) = try scheduler(engine, lun, timeoutMs: 150, plan: #"{"rules": [{"pool": "p", "op": "write", "action": "delay", "delay_ms": 1500, "count": 1}]}"#, events: events)
        let slow = try pattern(4), refused = try pattern(5)
        let sink = OrderSink()
        try scheduler.submit(.write, lun: index, buffer: slow.pointer, length: slow.count, offset: 0, sink: sink, cookie: 1)
        scheduler.kick()
        var tries = 0
        while scheduler.stuckLUNs.isEmpty, tries < 200 { usleep(10_000); tries += 1 }
        XCTAssertEqual(scheduler.stuckLUNs, [dir + "/lun.img"], "declared stuck after io_timeout")
        XCTAssertNil(sink.result(1), "a slow answer is not abandoned: the kernel would still own its buffer")

        let asked = Date()
        try scheduler.submit(.write, lun: index, buffer: refused.pointer, length: refused.count, offset: 1 << 20, sink: sink, cookie: 2)
        scheduler.kick()
        XCTAssertTrue(sink.wait(1, seconds: 5))
        XCTAssertEqual(sink.result(2), -Int64(ETIMEDOUT), "a request for a stuck LUN fails at once")
        XCTAssertLessThan(Date().timeIntervalSince(asked), 1.0, "not queued behind the slow one")
        XCTAssertNil(sink.result(1))

        XCTAssertTrue(sink.wait(1, seconds: 10))
        XCTAssertEqual(sink.result(1), Int64(slow.count), "the slow write lands whole when it answers")
        XCTAssertEqual(scheduler.stuckLUNs, [], "answering everything it held ends the stuck state")
        XCTAssertTrue(try holds(slow, scheduler, index, offset: 0))
        let zeros = try AlignedBuffer(count: 64 << 10)
        zeros.bytes.initializeMemory(as: UInt8.self, repeating: 0) // not zeroed by itself
        XCTAssertTrue(try holds(zeros, scheduler, index, offset: 1 << 20))
        keepAlive(slow, refused, slow)
        keepAlive(engine, lun) // the scheduler holds only their handles
    }

    func testALatencySpikeDelaysOnlyTheChosenRequests() throws {
        let events = EventLog()
        let lun = try LUN(path: dir + "/lun.img", readWrite: true)
        let engine = try Engine(queueDepth: 32)
        let (scheduler, index) = try scheduler(engine, lun, timeoutMs: 10_000, plan: #"{"rules": [{"pool": "p", "op": "read", "action": "delay", "delay_ms": 300, "after": 1, "count": 1}]}"#, events: events)
        let data = try pattern(6)
        let sink = OrderSink()
        try scheduler.submit(.write, lun: index, buffer: data.pointer, length: data.count, offset: 0, sink: sink, cookie: 1)
        scheduler.kick()
        XCTAssertTrue(sink.wait(1))
        var took: [TimeInterval] = []
        for _ in 0..<3 {
            let t = Date()
            XCTAssertTrue(try holds(data, scheduler, index, offset: 0))
            took.append(Date().timeIntervalSince(t))
        }
        XCTAssertLessThan(took[0], 0.25, "the first read passes (after: 1)")
        XCTAssertGreaterThanOrEqual(took[1], 0.3, "the second is held 300 ms")
        XCTAssertLessThan(took[2], 0.25, "count 1: only one")
        XCTAssertEqual(events.lines, [], "under io_timeout: no LUN declared stuck")
        keepAlive(engine, lun) // the scheduler holds only their handles
    }

    /// A torn write must still be whole logical blocks: on a 4096-byte-sector LUN a tear at a
    /// multiple of 1536 bytes would be refused by the device (and, armed before it was sent,
    /// would later have killed the process on an unrelated completion). It is not simulated:
    /// the write lands whole.
    func testATearThatIsNotWholeSectorsIsNotSimulated() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root for losetup") }
        let file = dir + "/lun4k.img"
        try LUN.createFile(path: file, sizeBytes: 4 << 20)
        let loop = Process()
        loop.executableURL = URL(fileURLWithPath: "/sbin/losetup")
        loop.arguments = ["--find", "--show", "--direct-io=on", "--sector-size", "4096", file]
        let out = Pipe()
        loop.standardOutput = out
        try loop.run()
        loop.waitUntilExit()
        let device = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        guard loop.terminationStatus == 0, device.hasPrefix("/dev/loop") else { throw XCTSkip("losetup failed (no loop devices here?)") }
        defer { _ = try? Process.run(URL(fileURLWithPath: "/sbin/losetup"), arguments: ["-d", device]).waitUntilExit() }

        let lun = try LUN(path: device, readWrite: true)
        XCTAssertEqual(lun.handle.info.logicalBlockSize, 4096)
        let engine = try Engine(queueDepth: 32)
        let (scheduler, index) = try scheduler(engine, lun, timeoutMs: 5000,
            plan: #"{"rules": [{"pool": "p", "op": "write", "action": "torn", "unit": 1536}]}"#, events: EventLog())
        let data = try pattern(7)
        let sink = OrderSink()
        for cookie in UInt64(1)...8 { // each a whole 12 KiB write the rule matches; no tear fits
            try scheduler.submit(.write, lun: index, buffer: data.pointer, length: 12288, offset: cookie << 16, sink: sink, cookie: cookie)
        }
        scheduler.kick()
        XCTAssertTrue(sink.wait(8))
        for cookie in UInt64(1)...8 { XCTAssertEqual(sink.result(cookie), 12288, "write \(cookie) lands whole") }
        let expected = try AlignedBuffer(count: 12288)
        memcpy(expected.pointer, data.pointer, 12288)
        XCTAssertTrue(try holds(expected, scheduler, index, offset: 8 << 16))
        keepAlive(data, expected, expected)
        keepAlive(engine, lun)
    }

    func testBadFaultActionsAreOneClearLine() throws {
        let cases = [
            (#"{"rules": [{"pool": "b", "action": "explode"}]}"#, "rule 1: action 'explode' (fail, delay, stuck, torn)"),
            (#"{"rules": [{"pool": "b", "action": "delay"}]}"#, "rule 1: delay needs delay_ms 1..600000"),
            (#"{"rules": [{"pool": "b", "action": "stuck", "delay_ms": 5}]}"#, "rule 1: delay_ms belongs to action delay, not 'stuck'"),
            (#"{"rules": [{"pool": "b", "op": "write"}, {"pool": "b", "action": "torn"}]}"#, "rule 2: torn needs op write, not 'any'"),
            (#"{"rules": [{"pool": "b", "op": "write", "action": "torn", "unit": 1000}]}"#, "rule 1: unit 1000 (a multiple of 512 up to 1M)"),
            (#"{"link_rules": [{"action": "shuffle"}]}"#, "link rule 1: action 'shuffle' (drop, corrupt, delay, reorder)"),
            (#"{"link_rules": [{"action": "reorder"}]}"#, "link rule 1: reorder needs delay_ms 1..600000"),
            (#"{"link_rules": [{"action": "drop", "after_bytes": -1}]}"#, "link rule 1: after_bytes and count are not negative"),
            (#"{"seed": 3}"#, "no rules and no link_rules"),
        ]
        for (json, expected) in cases {
            let path = dir + "/plan.json"
            try json.write(toFile: path, atomically: true, encoding: .utf8)
            XCTAssertThrowsError(try FaultPlan.load(path)) { error in
                XCTAssertEqual("\(error)", "--fault-plan \(path): \(expected)")
            }
        }
    }
}

/// Lines a scheduler reported, from any thread.
final class EventLog: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: [String] = []
    func add(_ line: String) { lock.withLock { stored.append(line) } }
    var lines: [String] { lock.withLock { stored } }
}
