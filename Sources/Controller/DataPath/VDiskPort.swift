import Foundation
import IOEngine

/// The allocation-free data path of one vdisk, as layers:
///
/// - the request core (this file): front ends (and the async data API) submit read,
///   write (FUA), flush, write-zeroes and trim at byte offsets with a sink and a cookie;
///   the core checks alignment and range, holds the request's range (`RangeLock`),
///   splits it at block-map and LUN boundaries (`LegRoute`), submits the pieces through
///   the pools' schedulers, counts them back and calls the sink once;
/// - the sync mirror (`SyncMirror`): which legs a request goes to and what its outcome
///   is when legs fail; read repair and copier ranges (`VDiskPort+Copiers.swift`);
/// - thin provisioning (`VDiskPort+Thin.swift`): first writes map chunks, trims release them.
///
/// Request state lives in a slot table sized at init and the leg layout is cached per
/// metadata generation, so steady-state I/O allocates nothing. The exceptions are
/// the slow paths: the first write into an unallocated thin extent (commits the
/// allocation first) and leg failures (commit the leg state first). The core's counters
/// (pieces in flight, outstanding per leg, the free list) are checked as preconditions.
///
/// The layers' files share the core's state below (internal, not private, for them).
public final class VDiskPort: CompletionSink, @unchecked Sendable {
    public enum Op: UInt8, Sendable { case read, write, flush, writeZeroes, trim }

    struct Request: @unchecked Sendable {
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
        var targetLegs: UInt8 = 0 // legs a write went to
        var failedLegs: UInt8 = 0 // legs whose piece failed
        var busyLegs: UInt8 = 0 // legs whose scheduler was full (EBUSY): the legs may now differ
        /// The ids of the legs the bit masks name, as mapped when the request was dispatched:
        /// a leg failure or repair is recorded against the right leg even if the layout changed since.
        var legIds = LegIds()
        var readLeg = -1
        var triedLegs: UInt8 = 0 // legs a read was sent to
        var deallocated = false // a thin trim's whole extents were freed (done once)
        var logged = false // counted in the dirty-region log
        var nextFree: Int32 = -1
    }

    /// Up to four leg ids, inline (no allocation per request).
    struct LegIds {
        private var ids = (UUID.zero, UUID.zero, UUID.zero, UUID.zero)
        subscript(_ i: Int) -> UUID {
            get {
                switch i {
                case 0: ids.0
                case 1: ids.1
                case 2: ids.2
                default: ids.3
                }
            }
            set {
                switch i {
                case 0: ids.0 = newValue
                case 1: ids.1 = newValue
                case 2: ids.2 = newValue
                default: ids.3 = newValue
                }
            }
        }
        /// The ids of the legs set in `mask`.
        func named(by mask: UInt8) -> [UUID] { (0..<4).filter { mask & (1 << $0) != 0 }.map { self[$0] } }
    }

    /// One leg's routing for one metadata generation (its block map is read live: thin
    /// allocations and trims change it without a new generation).
    struct LegMap {
        var id: UUID
        var state: LegState
        var extentBytes: UInt64
        var route: LegRoute?
        var lunCount: Int
        var schedulerSlot: [Int?]
        var scheduler: IOScheduler?
        var lunSeries: [[DomainMetrics.IOSet]] // [lun][read, write, flush]
    }

    struct Mapping {
        var generation: UInt64
        var sizeBytes: UInt64
        var blockSize: Int
        var mode: MirrorMode
        var thin: Bool
        var legs: [LegMap]
        /// `SyncMirror`'s masks for these legs: those writes go to, those reads may use.
        var writeLegs: UInt8
        var inSyncLegs: UInt8
        /// Thin vdisks: the largest leg extent, a multiple of the others' (nil otherwise).
        var deallocationUnit: UInt64?
        /// A read-only snapshot: writes are refused.
        var readOnly: Bool
    }

    public let domain: Domain
    public let vdiskName: String
    let capacity: Int
    let slots: UnsafeMutablePointer<Request>
    var freeHead: Int32 = 0
    let lock = NSLock()
    var mapping: Mapping
    var legOutstanding: [Int] = [0, 0, 0, 0]
    /// Who may touch which range now: host requests, copiers, releasing trims (see `RangeLock`).
    var ranges: RangeLock
    /// Entries a release let go (reused under the lock, so a release allocates nothing).
    var granted: [RangeLock.Holder] = []
    /// Copiers waiting for their range, by token; and the ranges copiers hold.
    var copierWaiters: [Int: CheckedContinuation<Void, Never>] = [:]
    var copierRanges: [(range: Range<UInt64>, token: Int)] = []
    /// Callers refused with EBUSY (every slot in use), woken as requests finish.
    var roomWaiters: [@Sendable () -> Void] = []
    /// `drain` callers: the slots they still wait for.
    var drainWaiters: [(pending: Set<Int>, continuation: CheckedContinuation<Void, Never>)] = []
    private let readSeries: DomainMetrics.IOSet
    private let writeSeries: DomainMetrics.IOSet
    /// The write-intent bitmap of a sync mirror with dirty-region tracking on
    /// (created when the vdisk becomes a mirror, e.g. by add-leg).
    public var dirtyLog: DirtyRegionLog? { lock.withLock { log } }
    private var log: DirtyRegionLog?
    /// Read repairs running: their leg writes bypass the slots, so a leg removal or a
    /// delete (whose freed extents only wait for slot requests) is refused meanwhile.
    var repairs = 0
    var repairsRunning: Int { lock.withLock { repairs } }

    /// An async destination's port for one host connection: it serves (read only) the PiT
    /// that was last complete when the host connected, never the cycle being applied.
    let reading: PiTReaderPin?

    public init(domain: Domain, vdisk name: String, capacity: Int = 256, reading pin: PiTReaderPin? = nil) throws(DomainError) {
        self.domain = domain
        vdiskName = name
        self.capacity = capacity
        reading = pin
        guard let m = Self.makeMapping(domain, name, pit: pin?.pit) else {
            throw DomainError(pin.map { "PiT '\($0.pit)' of vdisk '\(name)' not found" } ?? "vdisk '\(name)' not found")
        }
        mapping = m
        ranges = RangeLock(slots: capacity)
        granted.reserveCapacity(capacity)
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: Request(), count: capacity)
        for i in 0..<capacity { slots[i].nextFree = i + 1 < capacity ? Int32(i + 1) : -1 }
        readSeries = domain.metrics.vdiskSeries(name, op: "read")
        writeSeries = domain.metrics.vdiskSeries(name, op: "write")
        log = pin == nil ? Self.makeLog(domain, name) : nil
    }

    /// Picks up metadata changes now (instead of at the next request).
    public func refresh() { lock.withLock { _ = refreshIfNeeded() } }

    /// The bitmap of a mirror with dirty regions on, or nil. Its geometry comes from its
    /// own header; the pool profile's region size only sizes a new one. A bitmap that
    /// cannot be opened is a domain problem (never silently untracked writes).
    private static func makeLog(_ domain: Domain, _ name: String) -> DirtyRegionLog? {
        let meta = domain.metadata
        guard let v = meta.vdisk(named: name), v.isMirror, v.dirtyRegions, let pool = meta.pool(id: v.poolId) else { return nil }
        let regionBytes = domain.profiles.pools[pool.poolProfile]?.dirtyRegionBytes ?? (1 << 20)
        do {
            let log = try DirtyRegionLog(path: domain.directory + "/dirty/\(v.id.uuidString).bitmap", regionBytes: regionBytes,
                                         sizeBytes: v.sizeBytes)
            if let why = log.openProblem { domain.report("vdisk '\(name)': \(why): every region will be resynchronized") }
            return log
        } catch {
            domain.report("vdisk '\(name)': dirty-region bitmap unusable: \(error)")
            return nil
        }
    }

    deinit {
        slots.deinitialize(count: capacity)
        slots.deallocate()
    }

    public var blockSize: Int { lock.lock(); defer { lock.unlock() }; return mapping.blockSize }
    /// A read-only snapshot's port: every write is refused (EROFS).
    public var refusesHostWrites: Bool { lock.withLock { mapping.readOnly } }
    public var sizeBytes: UInt64 { lock.lock(); defer { lock.unlock() }; return mapping.sizeBytes }

    /// For a thin vdisk, the span that a trim frees when it covers it whole (the largest leg
    /// extent, a multiple of the others'); nil for thick vdisks, whose trims write zeroes.
    public var deallocationUnit: UInt64? {
        lock.lock()
        defer { lock.unlock() }
        _ = refreshIfNeeded()
        return mapping.deallocationUnit
    }

    private static func makeMapping(_ domain: Domain, _ name: String, pit pitName: String?) -> Mapping? {
        let m = domain.metadata
        guard let v = m.vdisk(named: name) else { return nil }
        // (leg, its state, pool, the block map read): the vdisk's legs, or the PiT's maps.
        var sources = v.legs.map { (id: $0.id, state: $0.state, poolId: $0.poolId, map: $0.id) }
        var readOnly = v.refusesHostWrites
        if let pitName {
            guard let pit = m.pit(named: pitName), pit.vdiskId == v.id else { return nil }
            sources = pit.maps.filter(\.complete).map { (id: $0.legId, state: LegState.inSync, poolId: $0.poolId, map: $0.mapId) }
            readOnly = true
        }
        var legs: [LegMap] = []
        for leg in sources {
            guard let pool = m.pool(id: leg.poolId) else { return nil }
            let series = pool.luns.map { lun in
                ["read", "write", "flush"].map { domain.metrics.lunSeries(pool: pool.name, lun: lun.path, op: $0) }
            }
            let runtime = domain.runtime(of: pool.id)
            legs.append(LegMap(id: leg.id, state: leg.state, extentBytes: pool.extentBytes, route: domain.route(map: leg.map, in: pool),
                               lunCount: pool.luns.count, schedulerSlot: runtime?.slots ?? [],
                               scheduler: runtime?.scheduler, lunSeries: series))
        }
        let unit = legs.map(\.extentBytes).max()
        let deallocationUnit = v.thin && legs.allSatisfy({ unit! % $0.extentBytes == 0 }) ? unit : nil
        let states = legs.map(\.state)
        return Mapping(generation: m.generation, sizeBytes: v.sizeBytes, blockSize: v.blockSize, mode: v.mode, thin: v.thin, legs: legs,
                       writeLegs: SyncMirror.writeLegs(states), inSyncLegs: SyncMirror.inSyncLegs(states), deallocationUnit: deallocationUnit,
                       readOnly: readOnly)
    }

    /// Re-reads the mapping when the metadata moved on (grow, thin allocation, leg states). Caller holds the lock.
    func refreshIfNeeded() -> Bool {
        if domain.generation == mapping.generation { return true }
        guard let m = Self.makeMapping(domain, vdiskName, pit: reading?.pit) else { return false }
        mapping = m
        if log == nil, m.legs.count > 1 { log = Self.makeLog(domain, vdiskName) } // it just became a mirror
        return true
    }

    /// Queues one request. Throws (and never calls the sink) for misaligned or
    /// out-of-range requests, a deleted vdisk, or when `capacity` requests are in flight (EBUSY).
    /// With `kick: false` the request's LUN I/O is only staged: the caller hands a whole
    /// batch to the kernel with one `kick()` (one io_submit for many requests and legs).
    public func submit(_ op: Op, offset: UInt64, length: Int, buffer: UnsafeMutableRawPointer?, fua: Bool = false,
                       sink: CompletionSink, cookie: UInt64, kick: Bool = true) throws(IOError)
    {
        let ioOp: IOOperation = op == .read ? .read : (op == .flush ? .flush : .write)
        if op != .read && op != .flush && domain.refusesWrites.load(ordering: .acquiring) {
            throw IOError(code: EROFS, operation: ioOp, lun: vdiskName, offset: offset) // see Domain.readOnlyReason
        }
        lock.lock()
        guard refreshIfNeeded() else {
            lock.unlock()
            throw IOError(code: ENODEV, operation: ioOp, lun: vdiskName, offset: offset)
        }
        if mapping.readOnly, op != .read, op != .flush {
            lock.unlock()
            throw IOError(code: EROFS, operation: ioOp, lun: vdiskName, offset: offset) // a read-only snapshot
        }
        if op != .flush {
            let bs = UInt64(mapping.blockSize)
            guard length > 0, offset % bs == 0, UInt64(length) % bs == 0, op != .read && op != .write || buffer != nil else {
                lock.unlock()
                throw IOError(code: EINVAL, operation: ioOp, lun: vdiskName, offset: offset)
            }
            guard offset <= mapping.sizeBytes, UInt64(length) <= mapping.sizeBytes - offset else {
                lock.unlock()
                throw IOError(code: ERANGE, operation: ioOp, lun: vdiskName, offset: offset)
            }
        }
        guard freeHead >= 0 else {
            lock.unlock()
            throw IOError(code: EBUSY, operation: ioOp, lun: vdiskName, offset: offset)
        }
        let index = Int(freeHead)
        precondition(slots[index].sink == nil, "slot \(index) is on the free list and in use")
        freeHead = slots[index].nextFree
        slots[index] = Request(sink: Unmanaged.passRetained(sink), cookie: cookie, op: op, offset: offset, length: length,
                               buffer: buffer, fua: fua, piecesInFlight: 1, startNs: DispatchTime.now().uptimeNanoseconds)
        let writeLog = op != .read && op != .flush && mapping.legs.count > 1 ? log : nil
        if let writeLog {
            lock.unlock()
            let ready = writeLog.beginWrite(offset: offset, length: length)
            lock.lock()
            slots[index].logged = true
            if !ready {
                // The regions' bits must be durable before the write reaches any leg; the
                // wait (a bitmap fdatasync, shared by every write waiting) is off this thread.
                lock.unlock()
                writeLog.whenDurable { durable in
                    if durable {
                        self.proceed(index, kick: true)
                    } else { // without its dirty bit on disk the write must not reach any leg
                        self.pieceDone(index, leg: -1, lun: -1, result: -Int64(EIO))
                    }
                }
                return
            }
        }
        let go = acquireRange(index)
        lock.unlock()
        if go { dispatch(index, kick: kick) }
    }

    /// After a durable dirty bit: the range, then the legs.
    private func proceed(_ index: Int, kick: Bool) {
        if lock.withLock({ acquireRange(index) }) { dispatch(index, kick: kick) }
    }

    /// Takes the request's range in the range lock; false when it waits (a release
    /// dispatches it later). Flushes take none. Caller holds the lock.
    private func acquireRange(_ index: Int) -> Bool {
        let r = slots[index]
        let kind: RangeLock.Kind
        switch r.op {
        case .flush: return true
        case .read: kind = .read
        case .write, .writeZeroes: kind = .write
        case .trim: kind = mapping.thin ? .trim : .write // a thin trim may release extents
        }
        return ranges.acquire(slot: index, kind, r.offset..<(r.offset + UInt64(r.length)))
    }

    /// Starts what a release let go: requests are dispatched, copiers resumed. Called
    /// without the lock, with what `takeGranted` returned.
    func start(_ holders: [RangeLock.Holder]) {
        for h in holders {
            switch h {
            case .slot(let s): dispatch(s)
            case .copier(let token): lock.withLock { copierWaiters.removeValue(forKey: token) }?.resume()
            }
        }
    }

    /// What releases under the lock let go, emptied. Caller holds the lock.
    func takeGranted() -> [RangeLock.Holder] {
        guard !granted.isEmpty else { return [] }
        let out = granted
        granted.removeAll(keepingCapacity: true)
        return out
    }

    /// Calls `wake` once a request slot is free (now, if one is): for callers refused
    /// with EBUSY, instead of sleeping.
    public func whenRoom(_ wake: @escaping @Sendable () -> Void) {
        lock.lock()
        if freeHead >= 0 {
            lock.unlock()
            wake()
        } else {
            roomWaiters.append(wake)
            lock.unlock()
        }
    }

    /// Hands every staged LUN request to the kernel (after submits with `kick: false`).
    public func kick() { domain.engine.forThisThread.submit() }

    /// The leg a read goes to (`SyncMirror.readLeg`). Caller holds the lock.
    private func pickReadLeg(excluding tried: UInt8) -> Int? {
        SyncMirror.readLeg(inSync: mapping.inSyncLegs, outstanding: legOutstanding, excluding: tried)
    }

    /// Sends every piece of request `index` to the schedulers. The request holds one
    /// extra "dispatching" count so a fast completion cannot finish it early.
    func dispatch(_ index: Int, kick: Bool = true) {
        lock.lock()
        guard refreshIfNeeded() else { // the vdisk was deleted: its extents may be another's by now
            slots[index].triedLegs = 0xFF // and no read retry on another leg
            lock.unlock()
            pieceDone(index, leg: -1, lun: -1, result: -Int64(ENODEV))
            return
        }
        if mapping.thin { // the slow paths of thin vdisks
            let r = slots[index]
            if r.op == .write, touchesUnallocated(offset: r.offset, length: r.length) {
                lock.unlock()
                allocateThenProceed(index)
                return
            }
            if r.op == .trim, !r.deallocated, coversAllocatedExtent(offset: r.offset, length: r.length) {
                slots[index].deallocated = true // it holds its range as a trim: nothing else is in there
                lock.unlock()
                deallocate(index, r)
                return
            }
        }
        if domain.sharingActive.load(ordering: .acquiring), slots[index].op != .read, slots[index].op != .flush {
            let r = slots[index]
            if touchesShared(offset: r.offset, length: r.length) {
                lock.unlock()
                redirectThenProceed(index)
                return
            }
        }
        let m = mapping
        var ids = LegIds()
        for l in m.legs.indices { ids[l] = m.legs[l].id }
        if slots[index].triedLegs != 0, (0..<m.legs.count).contains(where: { slots[index].legIds[$0] != ids[$0] }) {
            slots[index].triedLegs = 0 // a read retried after the leg layout changed: the old bits name other legs
        }
        slots[index].legIds = ids
        var legs: UInt8 = 0 // a bitmask, not an array: nothing allocated per request
        switch slots[index].op {
        case .read:
            if let l = pickReadLeg(excluding: slots[index].triedLegs) {
                legs = 1 << l
                slots[index].readLeg = l
                slots[index].triedLegs |= 1 << l
            }
        default:
            legs = m.writeLegs
            slots[index].targetLegs |= legs
        }
        let r = slots[index]
        lock.unlock()
        if legs == 0 {
            record(index, error: -Int64(EIO)) // no leg can serve it
        }
        for l in m.legs.indices where legs & (1 << l) != 0 {
            if !dispatch(index, r, leg: l, m.legs[l]) { break }
        }
        if kick { domain.engine.forThisThread.submit() } // every leg's pieces in one io_submit
        pieceDone(index, leg: -1, lun: -1, result: 0) // drop the dispatching count
    }

    /// Walks one leg's pieces of the request; false when a piece could not be sent.
    /// `from`: where to start (a byte of the request, or for a flush a LUN index) when a
    /// dispatch parked on a full scheduler goes on.
    @discardableResult
    private func dispatch(_ index: Int, _ r: Request, leg l: Int, _ leg: LegMap, from start: Int = 0) -> Bool {
        guard let scheduler = leg.scheduler else {
            legPieceFailed(index, leg: l, result: -Int64(EIO))
            return true
        }
        /// false: stop this leg (the piece failed, or the dispatch parked until the scheduler has room).
        func send(_ op: IOScheduler.Operation, lun: Int, lunOffset: UInt64, buffer: UnsafeMutableRawPointer?, length: Int, at position: Int) -> Bool {
            guard let slot = leg.schedulerSlot[lun] else {
                legPieceFailed(index, leg: l, result: -Int64(EIO)) // the LUN is missing
                return false
            }
            lock.lock()
            slots[index].piecesInFlight += 1
            legOutstanding[l] += 1
            lock.unlock()
            do {
                try scheduler.submit(op, lun: slot, buffer: buffer, length: length, offset: lunOffset, fua: r.fua, sink: self,
                                     cookie: UInt64(index) | UInt64(l) << 32 | UInt64(lun) << 40)
                return true
            } catch {
                lock.lock()
                legOutstanding[l] -= 1
                if error.code == EBUSY {
                    // The pool's scheduler is full: park here (the request keeps one piece
                    // counted, so it cannot finish) and go on when a completion makes room.
                    lock.unlock()
                    scheduler.whenRoom { [self] in
                        dispatch(index, r, leg: l, leg, from: position)
                        domain.engine.forThisThread.submit()
                        pieceDone(index, leg: -1, lun: -1, result: 0) // the parked count
                    }
                    return false
                }
                slots[index].piecesInFlight -= 1
                lock.unlock()
                legPieceFailed(index, leg: l, result: -Int64(error.code))
                return false
            }
        }

        if r.op == .flush {
            for lun in start..<leg.lunCount where leg.schedulerSlot[lun] != nil {
                if !send(.flush, lun: lun, lunOffset: 0, buffer: nil, length: 0, at: lun) { return true }
            }
            return true
        }
        guard let route = leg.route else {
            legPieceFailed(index, leg: l, result: -Int64(EIO)) // the pool's block maps are not open
            return true
        }
        var done = start
        while done < r.length {
            let place: (lun: Int, offset: UInt64)?, piece: Int
            do {
                (place, piece) = try route.piece(at: r.offset + UInt64(done), length: r.length - done)
            } catch {
                // A damaged map page: this leg's I/O fails (a mirror reads another leg), never wrong data.
                domain.report("vdisk '\(vdiskName)' leg \(l): \(error)")
                legPieceFailed(index, leg: l, result: -Int64(EIO))
                return true
            }
            if let place {
                let lunOffset = place.offset
                switch r.op {
                case .read:
                    if !send(.read, lun: place.lun, lunOffset: lunOffset, buffer: r.buffer! + done, length: piece, at: done) { return true }
                case .write:
                    if !send(.write, lun: place.lun, lunOffset: lunOffset, buffer: r.buffer! + done, length: piece, at: done) { return true }
                case .writeZeroes, .trim:
                    var z = 0
                    while z < piece {
                        let n = min(SharedZeros.bytes, piece - z)
                        if !send(.write, lun: place.lun, lunOffset: lunOffset + UInt64(z), buffer: SharedZeros.pointer, length: n, at: done + z) { return true }
                        z += n
                    }
                case .flush:
                    break
                }
            } else if r.op == .read {
                memset(r.buffer! + done, 0, piece) // thin and never written: zeros
            } else if r.op == .write {
                legPieceFailed(index, leg: l, result: -Int64(ENOSPC)) // allocation vanished (vdisk changed under us)
                return true
            }
            done += piece
        }
        return true
    }

    private func record(_ index: Int, error: Int64) {
        lock.lock()
        if slots[index].result >= 0 { slots[index].result = error }
        lock.unlock()
    }

    /// A leg's piece failed: counted as `SyncMirror.pieceFailure` says (the request decides at the end).
    func legPieceFailed(_ index: Int, leg: Int, result: Int64) {
        lock.lock()
        let busy = result == -Int64(EBUSY)
        switch SyncMirror.pieceFailure(isRead: slots[index].op == .read, legCount: mapping.legs.count, busy: busy) {
        case .requestError:
            // A mirrored write refused by a full queue may have reached the other legs: remembered.
            if busy, slots[index].op != .read, leg >= 0 { slots[index].busyLegs |= 1 << leg }
        case .legFailed:
            slots[index].failedLegs |= 1 << leg
        }
        if slots[index].result >= 0 { slots[index].result = result } // for a failed leg: kept only if no leg succeeds
        lock.unlock()
    }

    override public func ioCompleted(cookie: UInt64, result: Int64) {
        pieceDone(Int(cookie & 0xFFFF_FFFF), leg: Int((cookie >> 32) & 0xFF), lun: Int(cookie >> 40), result: result)
    }

    func pieceDone(_ index: Int, leg: Int, lun: Int, result: Int64) {
        if result < 0 {
            if leg >= 0 { legPieceFailed(index, leg: leg, result: result) } else { record(index, error: result) }
        }
        lock.lock()
        slots[index].piecesInFlight -= 1
        precondition(slots[index].piecesInFlight >= 0, "slot \(index): more pieces completed than sent")
        let now = DispatchTime.now().uptimeNanoseconds
        if leg >= 0 {
            legOutstanding[leg] -= 1
            precondition(legOutstanding[leg] >= 0, "leg \(leg): more pieces completed than sent")
            let r = slots[index]
            if result >= 0, leg < mapping.legs.count, lun < mapping.legs[leg].lunSeries.count {
                let which = r.op == .read ? 0 : (r.op == .flush ? 2 : 1)
                mapping.legs[leg].lunSeries[lun][which].record(bytes: Int(result), latencyNs: now &- r.startNs)
            }
        }
        guard slots[index].piecesInFlight == 0 else {
            lock.unlock()
            return
        }
        let r = slots[index]
        let mode = mapping.mode
        let answers = SyncMirror.Answers(isRead: r.op == .read, result: r.result, targetLegs: r.targetLegs, failedLegs: r.failedLegs,
                                         busyLegs: r.busyLegs, triedLegs: r.triedLegs)
        var outcome = SyncMirror.outcome(answers, legCount: mapping.legs.count, inSync: mapping.inSyncLegs, dirtyLog: log != nil)
        if outcome == .retryRead {
            slots[index].result = 0
            slots[index].piecesInFlight = 1
            lock.unlock()
            dispatch(index) // the leg that failed stays in triedLegs: finish() repairs it
            return
        }
        lock.unlock()
        if case .pinDirty(let then) = outcome {
            dirtyLog?.pin(offset: r.offset, length: r.length) // upkeep reconciles the regions
            outcome = then
        }
        if case .failLegs(let legs, let survivors) = outcome {
            finishAfterLegFailure(index, r, failed: legs, survivors: survivors, mode: mode)
            return
        }
        finish(index, r, result: r.result < 0 ? r.result : success(r), now: now)
    }

    /// What a request that succeeded answers: its length (0 for a flush).
    private func success(_ r: Request) -> Int64 { Int64(r.op == .flush ? 0 : r.length) }

    /// Persist the failed legs first; then answer as `SyncMirror.answerAfterLegFailure` says.
    private func finishAfterLegFailure(_ index: Int, _ r: Request, failed: UInt8, survivors: UInt8, mode: MirrorMode) {
        let ids = r.legIds.named(by: failed)
        Task {
            var recorded = true
            do { try await domain.markLegsFailed(vdisk: vdiskName, legs: ids) } catch { recorded = false }
            let result = SyncMirror.answerAfterLegFailure(survivors: survivors, mode: mode, recorded: recorded, success: success(r), error: r.result)
            self.finish(index, r, result: result, now: DispatchTime.now().uptimeNanoseconds)
        }
    }

    private func finish(_ index: Int, _ r: Request, result: Int64, now: UInt64) {
        if r.logged, let log = dirtyLog { log.endWrite(offset: r.offset, length: r.length) }
        lock.lock()
        precondition(slots[index].sink != nil && slots[index].piecesInFlight == 0, "slot \(index) finished twice or with pieces in flight")
        let repairLegs = r.op == .read && result >= 0 ? SyncMirror.repairLegs(tried: r.triedLegs, servedBy: r.readLeg) : 0
        ranges.release(.slot(index), into: &granted)
        let go = takeGranted()
        var drained: [CheckedContinuation<Void, Never>] = []
        if !drainWaiters.isEmpty {
            for i in drainWaiters.indices { drainWaiters[i].pending.remove(index) }
            drained = drainWaiters.filter { $0.pending.isEmpty }.map(\.continuation)
            drainWaiters.removeAll { $0.pending.isEmpty }
        }
        slots[index] = Request()
        slots[index].nextFree = freeHead
        freeHead = Int32(index)
        let room = roomWaiters.isEmpty ? nil : roomWaiters.removeFirst()
        lock.unlock()
        start(go)
        room?()
        for c in drained { c.resume() }
        if result >= 0 {
            if r.op == .read { readSeries.record(bytes: r.length, latencyNs: now &- r.startNs) }
            if r.op == .write { writeSeries.record(bytes: r.length, latencyNs: now &- r.startNs) }
        }
        if repairLegs != 0, reading == nil { // a PiT's legs are not the vdisk's to repair
            let bad = r.legIds.named(by: repairLegs), good = r.legIds[r.readLeg], offset = r.offset, length = r.length
            Task { await self.repair(legs: bad, from: good, offset: offset, length: length) }
        }
        r.sink!.takeRetainedValue().ioCompleted(cookie: r.cookie, result: result)
    }

}
