import Foundation
import IOEngine

/// The allocation-free data path of one vdisk: front ends (and the async data API)
/// submit read, write (FUA), flush, write-zeroes and trim at byte offsets with a
/// sink and a cookie; the port checks alignment and range, maps the range through
/// each leg's extent map onto its pool's LUNs, submits the pieces through the
/// pools' schedulers, and calls the sink once when every piece is done.
///
/// Sync mirrors: writes go to every leg that is not failed (in-sync and copying);
/// the host hears only when all of them have the data. Reads go to the in-sync leg
/// with the fewest requests outstanding; a read error is retried on another in-sync
/// leg and the good data is written back to the leg that failed the read. A leg
/// that fails a write is marked failed in the metadata before the host is
/// answered; `automatic-failover` then acknowledges from the surviving legs,
/// `synchronous-always` fails the write.
///
/// Request state lives in a slot table sized at init and the maps are cached per
/// metadata generation, so steady-state I/O allocates nothing. The exceptions are
/// the slow paths: the first write into an unallocated thin extent (commits the
/// allocation first) and leg failures (commit the leg state first).
public final class VDiskPort: CompletionSink, @unchecked Sendable {
    public enum Op: UInt8, Sendable { case read, write, flush, writeZeroes, trim }

    private struct Request: @unchecked Sendable {
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
    private struct LegMap {
        var id: UUID
        var state: LegState
        var extentBytes: UInt64
        var route: LegRoute?
        var lunCount: Int
        var schedulerSlot: [Int?]
        var scheduler: IOScheduler?
        var lunSeries: [[DomainMetrics.IOSet]] // [lun][read, write, flush]
    }

    private struct Mapping {
        var generation: UInt64
        var sizeBytes: UInt64
        var blockSize: Int
        var mode: MirrorMode
        var thin: Bool
        var legs: [LegMap]
        /// Thin vdisks: the largest leg extent, a multiple of the others' (nil otherwise).
        var deallocationUnit: UInt64?
    }

    public let domain: Domain
    public let vdiskName: String
    private let capacity: Int
    private let slots: UnsafeMutablePointer<Request>
    private var freeHead: Int32 = 0
    private let lock = NSLock()
    private var mapping: Mapping
    private var legOutstanding: [Int] = [0, 0, 0, 0]
    /// Who may touch which range now: host requests, copiers, releasing trims (see `RangeLock`).
    private var ranges: RangeLock
    /// Entries a release let go (reused under the lock, so a release allocates nothing).
    private var granted: [RangeLock.Holder] = []
    /// Copiers waiting for their range, by token; and the ranges copiers hold.
    private var copierWaiters: [Int: CheckedContinuation<Void, Never>] = [:]
    private var copierRanges: [(range: Range<UInt64>, token: Int)] = []
    /// Callers refused with EBUSY (every slot in use), woken as requests finish.
    private var roomWaiters: [@Sendable () -> Void] = []
    /// `drain` callers: the slots they still wait for.
    private var drainWaiters: [(pending: Set<Int>, continuation: CheckedContinuation<Void, Never>)] = []
    private let readSeries: DomainMetrics.IOSet
    private let writeSeries: DomainMetrics.IOSet
    /// The write-intent bitmap of a sync mirror with dirty-region tracking on
    /// (created when the vdisk becomes a mirror, e.g. by add-leg).
    public var dirtyLog: DirtyRegionLog? { lock.withLock { log } }
    private var log: DirtyRegionLog?
    /// Read repairs running: their leg writes bypass the slots, so a leg removal or a
    /// delete (whose freed extents only wait for slot requests) is refused meanwhile.
    private var repairs = 0
    var repairsRunning: Int { lock.withLock { repairs } }

    public init(domain: Domain, vdisk name: String, capacity: Int = 256) throws(DomainError) {
        self.domain = domain
        vdiskName = name
        self.capacity = capacity
        guard let m = Self.makeMapping(domain, name) else { throw DomainError("vdisk '\(name)' not found") }
        mapping = m
        ranges = RangeLock(slots: capacity)
        granted.reserveCapacity(capacity)
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: Request(), count: capacity)
        for i in 0..<capacity { slots[i].nextFree = i + 1 < capacity ? Int32(i + 1) : -1 }
        readSeries = domain.metrics.vdiskSeries(name, op: "read")
        writeSeries = domain.metrics.vdiskSeries(name, op: "write")
        log = Self.makeLog(domain, name)
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
    public var sizeBytes: UInt64 { lock.lock(); defer { lock.unlock() }; return mapping.sizeBytes }

    /// For a thin vdisk, the span that a trim frees when it covers it whole (the largest leg
    /// extent, a multiple of the others'); nil for thick vdisks, whose trims write zeroes.
    public var deallocationUnit: UInt64? {
        lock.lock()
        defer { lock.unlock() }
        _ = refreshIfNeeded()
        return mapping.deallocationUnit
    }

    private static func makeMapping(_ domain: Domain, _ name: String) -> Mapping? {
        let m = domain.metadata
        guard let v = m.vdisk(named: name) else { return nil }
        var legs: [LegMap] = []
        for leg in v.legs {
            guard let pool = m.pool(id: leg.poolId) else { return nil }
            let series = pool.luns.map { lun in
                ["read", "write", "flush"].map { domain.metrics.lunSeries(pool: pool.name, lun: lun.path, op: $0) }
            }
            let runtime = domain.runtime(of: pool.id)
            legs.append(LegMap(id: leg.id, state: leg.state, extentBytes: pool.extentBytes, route: domain.route(leg, in: m),
                               lunCount: pool.luns.count, schedulerSlot: runtime?.slots ?? [],
                               scheduler: runtime?.scheduler, lunSeries: series))
        }
        let unit = legs.map(\.extentBytes).max()
        let deallocationUnit = v.thin && legs.allSatisfy({ unit! % $0.extentBytes == 0 }) ? unit : nil
        return Mapping(generation: m.generation, sizeBytes: v.sizeBytes, blockSize: v.blockSize, mode: v.mode, thin: v.thin, legs: legs,
                       deallocationUnit: deallocationUnit)
    }

    /// Re-reads the mapping when the metadata moved on (grow, thin allocation, leg states). Caller holds the lock.
    private func refreshIfNeeded() -> Bool {
        if domain.generation == mapping.generation { return true }
        guard let m = Self.makeMapping(domain, vdiskName) else { return false }
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
    private func start(_ holders: [RangeLock.Holder]) {
        for h in holders {
            switch h {
            case .slot(let s): dispatch(s)
            case .copier(let token): lock.withLock { copierWaiters.removeValue(forKey: token) }?.resume()
            }
        }
    }

    /// What releases under the lock let go, emptied. Caller holds the lock.
    private func takeGranted() -> [RangeLock.Holder] {
        guard !granted.isEmpty else { return [] }
        let out = granted
        granted.removeAll(keepingCapacity: true)
        return out
    }

    /// Slow path, once per thin extent: commit the allocation on every leg, then go on
    /// (the request keeps its range meanwhile, so no trim can release what it maps).
    private func allocateThenProceed(_ index: Int) {
        let (offset, length) = lock.withLock { (slots[index].offset, slots[index].length) }
        Task {
            do throws(DomainError) {
                try await domain.allocateExtents(vdisk: vdiskName, offset: offset, length: length)
            } catch {
                self.pieceDone(index, leg: -1, lun: -1, result: -Int64(error.code))
                return
            }
            self.dispatch(index)
        }
    }

    /// The requests in the port now (slot and start time): after a delete or a leg removal
    /// commits, these may still send I/O with the old mapping.
    func requestsInFlight() -> [(slot: Int, startNs: UInt64)] {
        lock.withLock { (0..<capacity).filter { slots[$0].sink != nil }.map { ($0, slots[$0].startNs) } }
    }

    /// Waits until every one of `requests` has finished (later requests, with the new
    /// mapping, do not count). Woken by the requests' own completions; a device that hangs
    /// keeps it waiting.
    func drain(_ requests: [(slot: Int, startNs: UInt64)]) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            lock.lock()
            let pending = Set(requests.filter { slots[$0.slot].sink != nil && slots[$0.slot].startNs == $0.startNs }.map(\.slot))
            if pending.isEmpty {
                lock.unlock()
                c.resume()
            } else {
                drainWaiters.append((pending, c))
                lock.unlock()
            }
        }
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
    public func kick() { domain.engine.submit() }

    /// Takes `range` for a copier (`RangeLock` kind copier): returns once no host write
    /// into it is in flight and new ones wait, so a copier can read one leg and write
    /// another without losing a host write.
    public func closeGate(_ range: Range<UInt64>) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            lock.lock()
            let (token, now) = ranges.acquireCopier(range)
            copierRanges.append((range, token))
            if now {
                lock.unlock()
                c.resume()
            } else {
                copierWaiters[token] = c
                lock.unlock()
            }
        }
    }

    /// Gives back a range taken by `closeGate`; what waited for it starts.
    public func openGate(_ range: Range<UInt64>) {
        lock.lock()
        guard let i = copierRanges.firstIndex(where: { $0.range == range }) else {
            lock.unlock()
            preconditionFailure("openGate(\(range)) without closeGate")
        }
        ranges.release(.copier(copierRanges.remove(at: i).token), into: &granted)
        let go = takeGranted()
        lock.unlock()
        start(go)
    }

    /// A trim of a thin vdisk that covers whole allocated extents releases them instead of
    /// writing zeroes: it holds its range as a trim (nothing else touches it meanwhile),
    /// commits the release, then zeroes only the partly covered extents at its ends.
    private func deallocate(_ index: Int, _ r: Request) {
        Task {
            do throws(DomainError) {
                try await self.domain.deallocateExtents(vdisk: self.vdiskName, offset: r.offset, length: r.length)
            } catch { // nothing released: answer the error (zero-filling GiBs in one go is no fallback)
                self.pieceDone(index, leg: -1, lun: -1, result: -Int64(error.code))
                return
            }
            self.dispatch(index) // the released extents are skipped; partly covered ones are zeroed
        }
    }

    /// Whether some leg maps a whole chunk inside the range (a trim can release it). Caller holds the lock.
    private func coversAllocatedExtent(offset: UInt64, length: Int) -> Bool {
        let end = offset + UInt64(length)
        return mapping.legs.contains { leg in
            let first = (offset + leg.extentBytes - 1) / leg.extentBytes * leg.extentBytes, last = end / leg.extentBytes * leg.extentBytes
            return first < last && anyPiece(of: leg, first, Int(last - first)) { $0 != nil }
        }
    }

    /// Whether a leg the write goes to (not failed) has a chunk of the range unmapped (the
    /// write allocates first). Caller holds the lock.
    private func touchesUnallocated(offset: UInt64, length: Int) -> Bool {
        mapping.legs.contains { $0.state != .failed && anyPiece(of: $0, offset, length) { $0 == nil } }
    }

    /// Whether a piece of the leg's range satisfies `test` (a map that cannot be read counts as mapped:
    /// the dispatch then fails the leg's I/O with the reason).
    private func anyPiece(of leg: LegMap, _ offset: UInt64, _ length: Int, _ test: ((lun: Int, offset: UInt64)?) -> Bool) -> Bool {
        guard let route = leg.route else { return false }
        var done = 0
        while done < length {
            guard let (place, n) = try? route.piece(at: offset + UInt64(done), length: length - done) else { return false }
            if test(place) { return true }
            done += n
        }
        return false
    }

    /// Picks the in-sync leg with the fewest outstanding requests that has not been tried. Caller holds the lock.
    private func pickReadLeg(excluding tried: UInt8) -> Int? {
        var best: Int?
        for (l, leg) in mapping.legs.enumerated() where leg.state == .inSync && tried & (1 << l) == 0 {
            if best == nil || legOutstanding[l] < legOutstanding[best!] { best = l }
        }
        return best
    }

    /// Sends every piece of request `index` to the schedulers. The request holds one
    /// extra "dispatching" count so a fast completion cannot finish it early.
    private func dispatch(_ index: Int, kick: Bool = true) {
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
            for (l, leg) in m.legs.enumerated() where leg.state != .failed {
                legs |= 1 << l
                slots[index].targetLegs |= 1 << l
            }
        }
        let r = slots[index]
        lock.unlock()
        if legs == 0 {
            record(index, error: -Int64(EIO)) // no leg can serve it
        }
        for l in m.legs.indices where legs & (1 << l) != 0 {
            if !dispatch(index, r, leg: l, m.legs[l]) { break }
        }
        if kick { domain.engine.submit() } // every leg's pieces in one io_submit
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
                        domain.engine.submit()
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

    /// A leg's piece failed: for writes remember the leg (the request decides at the end), for reads retry elsewhere.
    private func legPieceFailed(_ index: Int, leg: Int, result: Int64) {
        lock.lock()
        // A full queue is backpressure, not a broken leg: fail the request, keep the leg; but
        // a mirrored write may have reached the other legs, so remember it (see `finish`).
        if slots[index].op == .read || mapping.legs.count == 1 || result == -Int64(EBUSY) {
            if slots[index].result >= 0 { slots[index].result = result }
            if result == -Int64(EBUSY), slots[index].op != .read, leg >= 0 { slots[index].busyLegs |= 1 << leg }
        } else {
            slots[index].failedLegs |= 1 << leg
            if slots[index].result >= 0 { slots[index].result = result } // kept only if no leg succeeds
        }
        lock.unlock()
    }

    override public func ioCompleted(cookie: UInt64, result: Int64) {
        pieceDone(Int(cookie & 0xFFFF_FFFF), leg: Int((cookie >> 32) & 0xFF), lun: Int(cookie >> 40), result: result)
    }

    private func pieceDone(_ index: Int, leg: Int, lun: Int, result: Int64) {
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
        let mirrored = mapping.legs.count > 1
        let mode = mapping.mode
        var inSyncLegs: UInt8 = 0 // needed only for a write some leg refused (EBUSY)
        if r.busyLegs != 0 { for (l, leg) in mapping.legs.enumerated() where leg.state == .inSync { inSyncLegs |= 1 << l } }
        // A read that failed on one leg: retry it whole on another in-sync leg.
        if r.op == .read, r.result < 0, pickReadLeg(excluding: r.triedLegs) != nil {
            slots[index].result = 0
            slots[index].piecesInFlight = 1
            lock.unlock()
            dispatch(index) // the leg that failed stays in triedLegs: finish() repairs it
            return
        }
        lock.unlock()
        if r.busyLegs != 0 && mirrored {
            // A write refused by a full scheduler on some legs may have landed on others: the
            // legs may differ there until a copy makes them agree. With a bitmap the regions stay
            // pinned dirty (upkeep reconciles them); without one, nothing could track them, so
            // the refused legs fail over like legs that could not take the write.
            // (Only when an in-sync leg took it whole: back-pressure alone must never take
            // the last in-sync legs away; with none, the legs are kept and EBUSY answers.)
            if let log = dirtyLog {
                log.pin(offset: r.offset, length: r.length)
            } else if r.targetLegs & ~r.failedLegs & ~r.busyLegs & inSyncLegs != 0 {
                var failed = r
                failed.failedLegs |= r.busyLegs
                finishAfterLegFailure(index, failed, mode: mode)
                return
            }
        }
        if r.failedLegs != 0 && r.op != .read && mirrored {
            finishAfterLegFailure(index, r, mode: mode)
            return
        }
        finish(index, r, result: r.result < 0 ? r.result : Int64(r.op == .flush ? 0 : r.length), now: now)
    }

    /// Persist the failed legs first; then acknowledge from the survivors (automatic-failover)
    /// or fail the write (synchronous-always, or when no leg took it).
    private func finishAfterLegFailure(_ index: Int, _ r: Request, mode: MirrorMode) {
        let failed = r.legIds.named(by: r.failedLegs)
        let survivors = r.targetLegs & ~r.failedLegs
        Task {
            var result: Int64
            do {
                try await domain.markLegsFailed(vdisk: vdiskName, legs: failed)
                result = survivors != 0 && mode == .automaticFailover ? Int64(r.op == .flush ? 0 : r.length) : (r.result < 0 ? r.result : -Int64(EIO))
            } catch {
                result = -Int64(EIO) // cannot record the failure: the write must not be acknowledged
            }
            self.finish(index, r, result: result, now: DispatchTime.now().uptimeNanoseconds)
        }
    }

    private func finish(_ index: Int, _ r: Request, result: Int64, now: UInt64) {
        if r.logged, let log = dirtyLog { log.endWrite(offset: r.offset, length: r.length) }
        lock.lock()
        precondition(slots[index].sink != nil && slots[index].piecesInFlight == 0, "slot \(index) finished twice or with pieces in flight")
        let repairLegs = r.op == .read && result >= 0 ? r.triedLegs & ~(1 << UInt8(max(r.readLeg, 0))) : 0
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
        if repairLegs != 0 {
            let bad = r.legIds.named(by: repairLegs), good = r.legIds[r.readLeg], offset = r.offset, length = r.length
            Task { await self.repair(legs: bad, from: good, offset: offset, length: length) }
        }
        r.sink!.takeRetainedValue().ioCompleted(cookie: r.cookie, result: result)
    }

    /// Rewrites a range on legs that failed to read it, from the leg that served it.
    /// Host writes to the range are held meanwhile and the good data is read afresh,
    /// so the rewrite can never put older data over a newer host write. A leg that
    /// cannot take the rewrite is marked failed.
    private func repair(legs: [UUID], from good: UUID, offset: UInt64, length: Int) async {
        lock.withLock { repairs += 1 }
        defer { lock.withLock { repairs -= 1 } }
        let range = offset..<(offset + UInt64(length))
        guard let buffer = try? AlignedBuffer(count: length) else { return }
        await closeGate(range)
        defer { openGate(range) }
        do {
            try await domain.legIO(.read, vdisk: vdiskName, leg: good, offset: offset, length: length, buffer: buffer.pointer)
        } catch {
            return // the good leg failed too: its own error handling takes over
        }
        for l in legs {
            do {
                try await domain.legIO(.write, vdisk: vdiskName, leg: l, offset: offset, length: length, buffer: buffer.pointer)
            } catch {
                try? await domain.markLegsFailed(vdisk: vdiskName, legs: [l])
            }
        }
    }
}
