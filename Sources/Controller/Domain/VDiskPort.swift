import Foundation
import IOEngine

/// The allocation-free data path of one vdisk: front ends (and the async data API)
/// submit read, write (FUA), flush, write-zeroes and trim at byte offsets with a
/// sink and a cookie; the port checks alignment and range, maps the range through
/// the extent map onto the pool's LUNs, submits the pieces through the pool's
/// scheduler, and calls the sink once when every piece is done.
///
/// Request state lives in a slot table sized at init and the extent map is cached
/// per metadata generation, so steady-state I/O allocates nothing. The exception
/// is the first write into an unallocated thin extent: it commits new metadata
/// (an async slow path) before its pieces go out.
public final class VDiskPort: CompletionSink, @unchecked Sendable {
    public enum Op: UInt8, Sendable { case read, write, flush, writeZeroes, trim }

    private struct Request {
        var sink: Unmanaged<CompletionSink>?
        var cookie: UInt64 = 0
        var op: Op = .read
        var offset: UInt64 = 0
        var length: Int = 0
        var buffer: UnsafeMutableRawPointer?
        var fua = false
        var piecesInFlight = 0
        var result: Int64 = 0
        var startNs: UInt64 = 0
        var nextFree: Int32 = -1
    }

    /// The extent map and routing of one metadata generation.
    private struct Mapping {
        var generation: UInt64
        var sizeBytes: UInt64
        var blockSize: Int
        var extentBytes: UInt64
        var extents: [ExtentRef?]
        var lunDataStart: [UInt64]
        var schedulerSlot: [Int?]
        var scheduler: IOScheduler?
        var lunSeries: [[DomainMetrics.IOSet]] // [lun][read, write, flush]
    }

    public let domain: Domain
    public let vdiskName: String
    private let capacity: Int
    private let slots: UnsafeMutablePointer<Request>
    private var freeHead: Int32 = 0
    private let lock = NSLock()
    private var mapping: Mapping
    private let zeros: AlignedBuffer
    private static let zeroBytes = 1 << 20
    private let readSeries: DomainMetrics.IOSet
    private let writeSeries: DomainMetrics.IOSet

    public init(domain: Domain, vdisk name: String, capacity: Int = 256) throws(DomainError) {
        self.domain = domain
        vdiskName = name
        self.capacity = capacity
        guard let m = Self.makeMapping(domain, name) else { throw DomainError("vdisk '\(name)' not found") }
        mapping = m
        do { zeros = try AlignedBuffer(count: Self.zeroBytes) } catch { throw DomainError("\(error)") }
        memset(zeros.pointer, 0, Self.zeroBytes)
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: Request(), count: capacity)
        for i in 0..<capacity { slots[i].nextFree = i + 1 < capacity ? Int32(i + 1) : -1 }
        readSeries = domain.metrics.vdiskSeries(name, op: "read")
        writeSeries = domain.metrics.vdiskSeries(name, op: "write")
    }

    deinit {
        slots.deinitialize(count: capacity)
        slots.deallocate()
    }

    public var blockSize: Int { lock.lock(); defer { lock.unlock() }; return mapping.blockSize }
    public var sizeBytes: UInt64 { lock.lock(); defer { lock.unlock() }; return mapping.sizeBytes }

    private static func makeMapping(_ domain: Domain, _ name: String) -> Mapping? {
        let m = domain.metadata
        guard let v = m.vdisk(named: name), let pool = m.pool(id: v.poolId) else { return nil }
        let series = pool.luns.map { lun in
            ["read", "write", "flush"].map { domain.metrics.lunSeries(pool: pool.name, lun: lun.path, op: $0) }
        }
        return Mapping(generation: m.generation, sizeBytes: v.sizeBytes, blockSize: v.blockSize, extentBytes: pool.extentBytes,
                       extents: v.extents, lunDataStart: pool.luns.map(\.dataStartBytes),
                       schedulerSlot: domain.schedulerSlots[pool.id] ?? [], scheduler: domain.schedulers[pool.id],
                       lunSeries: series)
    }

    /// Re-reads the mapping when the metadata moved on (grow, thin allocation). Caller holds the lock.
    private func refreshIfNeeded() -> Bool {
        let generation = domain.metadata.generation
        if generation == mapping.generation { return true }
        guard let m = Self.makeMapping(domain, vdiskName) else { return false }
        mapping = m
        return true
    }

    /// Queues one request. Throws (and never calls the sink) for misaligned or
    /// out-of-range requests, a deleted vdisk, or when `capacity` requests are in flight (EBUSY).
    public func submit(_ op: Op, offset: UInt64, length: Int, buffer: UnsafeMutableRawPointer?, fua: Bool = false,
                       sink: CompletionSink, cookie: UInt64) throws(IOError)
    {
        lock.lock()
        guard refreshIfNeeded() else {
            lock.unlock()
            throw IOError(code: ENODEV, operation: op == .read ? .read : .write, lun: vdiskName, offset: offset)
        }
        if op != .flush {
            let bs = UInt64(mapping.blockSize)
            guard length > 0, offset % bs == 0, UInt64(length) % bs == 0,
                  op != .read && op != .write || buffer != nil
            else {
                lock.unlock()
                throw IOError(code: EINVAL, operation: op == .read ? .read : .write, lun: vdiskName, offset: offset)
            }
            guard offset <= mapping.sizeBytes, UInt64(length) <= mapping.sizeBytes - offset else {
                lock.unlock()
                throw IOError(code: ERANGE, operation: op == .read ? .read : .write, lun: vdiskName, offset: offset)
            }
        }
        guard freeHead >= 0 else {
            lock.unlock()
            throw IOError(code: EBUSY, operation: op == .read ? .read : .write, lun: vdiskName, offset: offset)
        }
        let index = Int(freeHead)
        freeHead = slots[index].nextFree
        slots[index] = Request(sink: Unmanaged.passRetained(sink), cookie: cookie, op: op, offset: offset, length: length,
                               buffer: buffer, fua: fua, piecesInFlight: 1, startNs: DispatchTime.now().uptimeNanoseconds)
        let needsAllocation = op == .write && touchesUnallocated(offset: offset, length: length)
        let first = Int(offset / mapping.extentBytes), last = Int((offset + UInt64(max(length, 1)) - 1) / mapping.extentBytes)
        lock.unlock()

        if needsAllocation {
            // Slow path, once per thin extent: commit the allocation, then dispatch.
            Task {
                do {
                    try await domain.allocateExtents(vdisk: vdiskName, indices: Array(first...last))
                    self.dispatch(index)
                } catch {
                    self.pieceDone(index, lun: -1, result: -Int64(ENOSPC))
                }
            }
            return
        }
        dispatch(index)
    }

    private func touchesUnallocated(offset: UInt64, length: Int) -> Bool {
        let first = Int(offset / mapping.extentBytes), last = Int((offset + UInt64(length) - 1) / mapping.extentBytes)
        return (first...last).contains { mapping.extents[$0] == nil }
    }

    /// Sends every piece of request `index` to the scheduler. The request holds one
    /// extra "dispatching" count so a fast completion cannot finish it early.
    private func dispatch(_ index: Int) {
        lock.lock()
        _ = refreshIfNeeded()
        let r = slots[index]
        let m = mapping
        lock.unlock()
        guard let scheduler = m.scheduler else {
            pieceDone(index, lun: -1, result: -Int64(EIO))
            return
        }
        func send(_ op: IOScheduler.Operation, lun: Int, lunOffset: UInt64, buffer: UnsafeMutableRawPointer?, length: Int) -> Bool {
            guard let slot = m.schedulerSlot[lun] else {
                record(index, error: -Int64(EIO)) // the LUN is missing
                return false
            }
            lock.lock()
            slots[index].piecesInFlight += 1
            lock.unlock()
            do {
                try scheduler.submit(op, lun: slot, buffer: buffer, length: length, offset: lunOffset, fua: r.fua, sink: self,
                                     cookie: UInt64(index) | UInt64(lun) << 32)
                return true
            } catch {
                lock.lock()
                slots[index].piecesInFlight -= 1
                lock.unlock()
                record(index, error: -Int64(error.code))
                return false
            }
        }

        if r.op == .flush {
            for lun in m.lunDataStart.indices where m.schedulerSlot[lun] != nil {
                if !send(.flush, lun: lun, lunOffset: 0, buffer: nil, length: 0) { break }
            }
        } else {
            var done = 0
            walk: while done < r.length {
                let at = r.offset + UInt64(done)
                let extent = Int(at / m.extentBytes)
                let within = at % m.extentBytes
                let piece = min(r.length - done, Int(m.extentBytes - within))
                if let ref = m.extents[extent] {
                    let lunOffset = m.lunDataStart[ref.lun] + UInt64(ref.extent) * m.extentBytes + within
                    switch r.op {
                    case .read:
                        if !send(.read, lun: ref.lun, lunOffset: lunOffset, buffer: r.buffer! + done, length: piece) { break walk }
                    case .write:
                        if !send(.write, lun: ref.lun, lunOffset: lunOffset, buffer: r.buffer! + done, length: piece) { break walk }
                    case .writeZeroes, .trim:
                        var z = 0
                        while z < piece {
                            let n = min(Self.zeroBytes, piece - z)
                            if !send(.write, lun: ref.lun, lunOffset: lunOffset + UInt64(z), buffer: zeros.pointer, length: n) { break walk }
                            z += n
                        }
                    case .flush:
                        break
                    }
                } else if r.op == .read {
                    memset(r.buffer! + done, 0, piece) // thin and never written: zeros
                } else if r.op == .write {
                    record(index, error: -Int64(ENOSPC)) // allocation vanished (vdisk changed under us)
                    break walk
                }
                done += piece
            }
        }
        scheduler.kick()
        pieceDone(index, lun: -1, result: 0) // drop the dispatching count
    }

    private func record(_ index: Int, error: Int64) {
        lock.lock()
        if slots[index].result >= 0 { slots[index].result = error }
        lock.unlock()
    }

    override public func ioCompleted(cookie: UInt64, result: Int64) {
        pieceDone(Int(cookie & 0xFFFF_FFFF), lun: Int(cookie >> 32), result: result)
    }

    private func pieceDone(_ index: Int, lun: Int, result: Int64) {
        lock.lock()
        if result < 0, slots[index].result >= 0 { slots[index].result = result }
        slots[index].piecesInFlight -= 1
        let r = slots[index]
        let now = DispatchTime.now().uptimeNanoseconds
        if lun >= 0, lun < mapping.lunSeries.count, result >= 0 {
            let which = r.op == .read ? 0 : (r.op == .flush ? 2 : 1)
            mapping.lunSeries[lun][which].record(bytes: Int(result), latencyNs: now &- r.startNs)
        }
        guard r.piecesInFlight == 0 else {
            lock.unlock()
            return
        }
        slots[index] = Request()
        slots[index].nextFree = freeHead
        freeHead = Int32(index)
        lock.unlock()
        let final = r.result < 0 ? r.result : Int64(r.op == .flush ? 0 : r.length)
        if final >= 0 {
            if r.op == .read { readSeries.record(bytes: r.length, latencyNs: now &- r.startNs) }
            if r.op == .write { writeSeries.record(bytes: r.length, latencyNs: now &- r.startNs) }
        }
        r.sink!.takeRetainedValue().ioCompleted(cookie: r.cookie, result: final)
    }
}
