import Dispatch
import Foundation
import Synchronization
import Histogram
import IOEngine

/// Access pattern of a raw benchmark.
enum AccessPattern: String, CaseIterable, Sendable {
    case read, write, randread, randwrite, randrw

    var isRandom: Bool { self == .randread || self == .randwrite || self == .randrw }
}

/// Results of one direction (reads or writes).
struct DirectionStats: Sendable {
    var ios: UInt64 = 0
    var bytes: UInt64 = 0
    var latency = Histogram<UInt64>(lowestDiscernibleValue: 1, highestTrackableValue: 600_000_000_000,
                                    numberOfSignificantValueDigits: .three)
}

/// A verify failure: where, and what the block held instead of the pattern.
struct VerifyFailure: Error, CustomStringConvertible {
    let offset: UInt64
    let expected: UInt8
    let got: UInt8
    let expectedCRC: UInt32?
    let gotCRC: UInt32
    var description: String {
        let crcs = expectedCRC.map { " (block crc32c expected 0x\(String($0, radix: 16)) got 0x\(String(gotCRC, radix: 16)))" } ?? ""
        return "verify failed at offset \(offset): expected 0x\(String(expected, radix: 16)) got 0x\(String(got, radix: 16))" + crcs
    }
}

/// What a `RawWorkload` runs (the same for every target).
struct RawWorkloadConfig {
    var pattern: AccessPattern
    var blockBytes: Int
    var queueDepth: Int
    var areaBytes: UInt64
    var readPercent: Int = 50
    /// nil = one pass over the area.
    var seconds: Double?
    /// One pass only: write (or read and check) the verify pattern.
    var verifyWrite = false
    var verifyRead = false
    var seed: UInt64 = 0x5157_5350
}

/// Drives `queueDepth` requests against one LUN from the engine's completion
/// thread: each completion records its latency and issues the slot's next
/// request. Nothing allocates per I/O: slots, buffers and histograms exist up front.
///
/// Two ways to run: timed (until `seconds` pass) or one pass over the area
/// (each block exactly once, in sequential or permuted order) used by --verify.
final class RawWorkload<Target: BenchTarget>: CompletionSink, @unchecked Sendable {
    typealias Config = RawWorkloadConfig

    private let config: Config
    private let target: Target
    private let lunPath: String
    private let buffers: BufferPoolHandle
    private let blockCount: UInt64
    private let slotStartNs: UnsafeMutablePointer<UInt64>
    private let slotIsRead: UnsafeMutablePointer<Bool>
    private let slotOffset: UnsafeMutablePointer<UInt64>
    /// crc32c per block, written by the verify write pass, checked by the read pass.
    private let blockCRCs: UnsafeMutablePointer<UInt32>?

    private(set) var reads = DirectionStats()
    private(set) var writes = DirectionStats()
    private(set) var failure: Error?
    private var rng: UInt64
    private var sequentialCursor: UInt64 = 0
    private var passIndex: UInt64 = 0
    private var passStride: UInt64 = 1
    private var deadlineNs: UInt64 = .max
    private var outstanding = 0
    private var stopping = false
    private(set) var elapsedNs: UInt64 = 0
    private var startNs: UInt64 = 0
    /// Bytes completed so far, for a progress display on another thread.
    let completed = CompletedBytes()
    private let finished = DispatchSemaphore(value: 0)
    /// The engine may submit staged requests (and deliver their completions) while
    /// `run` is still staging the first ones: completions that arrive before `run`
    /// has finished staging wait for it on this lock. After that every completion
    /// comes from the one reaper thread and takes no lock.
    private let startupLock = NSLock()
    private let started = Atomic<Bool>(false)

    init(config: Config, target: Target, lunPath: String, buffers: BufferPoolHandle,
         blockCRCs: UnsafeMutablePointer<UInt32>? = nil)
    {
        precondition(buffers.count >= config.queueDepth && buffers.bufferBytes >= config.blockBytes)
        self.config = config
        self.target = target
        self.lunPath = lunPath
        self.buffers = buffers
        self.blockCRCs = blockCRCs
        blockCount = config.areaBytes / UInt64(config.blockBytes)
        slotStartNs = .allocate(capacity: config.queueDepth)
        slotIsRead = .allocate(capacity: config.queueDepth)
        slotOffset = .allocate(capacity: config.queueDepth)
        rng = config.seed | 1
        super.init()
        if config.pattern.isRandom { passStride = Self.coprimeStride(for: blockCount) }
    }

    deinit {
        slotStartNs.deallocate()
        slotIsRead.deallocate()
        slotOffset.deallocate()
    }

    /// A stride coprime with n, so i * stride mod n visits every block once.
    private static func coprimeStride(for n: UInt64) -> UInt64 {
        guard n > 2 else { return 1 }
        var s = n / 2 + n / 7 + 1
        func gcd(_ a: UInt64, _ b: UInt64) -> UInt64 { b == 0 ? a : gcd(b, a % b) }
        while gcd(s, n) != 1 { s += 1 }
        return s % n == 0 ? 1 : s
    }

    /// Runs to the end and returns; throws the first I/O or verify failure.
    func run() throws {
        startNs = monotonicNanoseconds()
        if let seconds = config.seconds { deadlineNs = startNs + UInt64(seconds * 1e9) }
        if !config.verifyWrite {
            // Timed writes carry a fixed non-zero pattern, generated once.
            for slot in 0..<config.queueDepth {
                Pattern.fill(buffers.buffer(at: slot).pointer, count: config.blockBytes, offset: UInt64(slot), seed: config.seed)
            }
        }
        startupLock.lock()
        outstanding = config.queueDepth
        for slot in 0..<config.queueDepth where !issue(slot: slot) { outstanding -= 1 }
        let nothingIssued = outstanding == 0
        if nothingIssued { elapsedNs = monotonicNanoseconds() - startNs }
        started.store(true, ordering: .releasing)
        startupLock.unlock()
        if !nothingIssued {
            target.submit()
            finished.wait()
        }
        if let failure { throw failure }
    }

    private func nextRandom() -> UInt64 {
        rng ^= rng << 13
        rng ^= rng >> 7
        rng ^= rng << 17
        return rng
    }

    /// Picks the slot's next request and stages it; false when there is none (pass done, stopping, or error).
    private func issue(slot: Int) -> Bool {
        if stopping { return false }
        let block: UInt64
        let isRead: Bool
        if config.seconds == nil {
            guard passIndex < blockCount else { return false }
            block = config.pattern.isRandom ? (passIndex &* passStride) % blockCount : passIndex
            passIndex += 1
            isRead = config.verifyRead
        } else {
            switch config.pattern {
            case .read, .write:
                block = sequentialCursor
                sequentialCursor = (sequentialCursor + 1) % blockCount
            default:
                block = nextRandom() % blockCount
            }
            switch config.pattern {
            case .read, .randread: isRead = true
            case .write, .randwrite: isRead = false
            case .randrw: isRead = Int(nextRandom() % 100) < config.readPercent
            }
        }
        let offset = block * UInt64(config.blockBytes)
        let buffer = buffers.buffer(at: slot).pointer
        if config.verifyWrite {
            Pattern.fill(buffer, count: config.blockBytes, offset: offset, seed: config.seed)
            blockCRCs?[Int(block)] = Checksum.crc32c(UnsafeRawBufferPointer(start: buffer, count: config.blockBytes))
        }
        slotIsRead[slot] = isRead
        slotOffset[slot] = offset
        slotStartNs[slot] = monotonicNanoseconds()
        do {
            if isRead {
                try target.prepRead(buffer: buffer, length: config.blockBytes, offset: offset, sink: self, cookie: UInt64(slot))
            } else {
                try target.prepWrite(buffer: buffer, length: config.blockBytes, offset: offset, sink: self, cookie: UInt64(slot))
            }
        } catch {
            fail(error)
            return false
        }
        return true
    }

    private func fail(_ error: Error) {
        if failure == nil { failure = error }
        stopping = true
    }

    override func ioCompleted(cookie: UInt64, result: Int64) {
        if !started.load(ordering: .acquiring) {
            startupLock.lock() // run() is still staging: wait until it is done
            startupLock.unlock()
        }
        let now = monotonicNanoseconds()
        let slot = Int(cookie)
        let latencyNs = now &- slotStartNs[slot]
        if result < 0 {
            fail(IOError(result: result, operation: slotIsRead[slot] ? .read : .write, lun: lunPath,
                         offset: slotOffset[slot]))
        } else if slotIsRead[slot] {
            _ = reads.latency.record(max(latencyNs, 1))
            reads.ios += 1
            reads.bytes += UInt64(result)
            if config.verifyRead { check(slot: slot) }
        } else {
            _ = writes.latency.record(max(latencyNs, 1))
            writes.ios += 1
            writes.bytes += UInt64(result)
        }
        completed.bytes.store(reads.bytes &+ writes.bytes, ordering: .relaxed)
        if now >= deadlineNs { stopping = true }
        if !issue(slot: slot) {
            outstanding -= 1
            if outstanding == 0 {
                elapsedNs = now - startNs
                finished.signal()
            }
        }
    }

    /// With the write pass's crc table, one crc32c per block; without it (a read-only
    /// verify of an earlier run's pattern) the pattern itself is regenerated and compared.
    private func check(slot: Int) {
        let offset = slotOffset[slot]
        let buffer = buffers.buffer(at: slot).pointer
        var crcs: (expected: UInt32, got: UInt32)?
        if let blockCRCs { // with the write pass's table: one crc32c per block decides
            let got = Checksum.crc32c(UnsafeRawBufferPointer(start: buffer, count: config.blockBytes))
            let expected = blockCRCs[Int(offset / UInt64(config.blockBytes))]
            if got == expected { return }
            crcs = (expected, got)
        }
        let diff = Pattern.firstDifference(buffer, count: config.blockBytes, offset: offset, seed: config.seed)
        if crcs == nil, diff == nil { return }
        fail(VerifyFailure(offset: offset + UInt64(diff?.index ?? 0), expected: diff?.expected ?? 0,
                           got: diff?.got ?? 0, expectedCRC: crcs?.expected, gotCRC: crcs?.got ?? 0))
    }
}

/// A counter the reaper thread stores into (a plain store per completion, no read-modify-write)
/// and a progress display reads.
final class CompletedBytes: Sendable {
    let bytes = Atomic<UInt64>(0)
}
