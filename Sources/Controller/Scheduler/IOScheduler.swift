import Dispatch
import Glibc
import IOEngine
import Synchronization

/// Sits between callers (vdisks, mirrors, benchmarks) and IOEngine and drives
/// every LUN of one array the way its profile says:
/// - per-LUN queues, FIFO, at most `queue_depth_per_lun` chunks in flight per LUN
///   and `queue_depth_per_array` over the array;
/// - requests larger than `max_io_size` are split into chunks (nothing is merged);
/// - token buckets enforce the array's IOPS and bandwidth ceilings;
/// - a background class (resync, verify, initial copy) may hold at most its share
///   of the array's queue depth, and yields to queued host I/O; its rate can also
///   be capped and changed while it runs.
///
/// Request state lives in a slot table sized at init; steady state allocates nothing.
/// Contract like the engine's: `submit` that returns normally calls the sink exactly
/// once; staged chunks reach the kernel on `kick()` or after a completion batch.
///
/// A chunk in flight longer than the profile's `io_timeout` marks its LUN stuck: what the
/// scheduler still holds for that LUN, and whatever comes for it until the device has
/// answered everything it holds, fails with ETIMEDOUT, so a mirror fails the leg over and
/// nothing else waits. Chunks already in the kernel are not abandoned: Linux AIO cannot
/// take back O_DIRECT I/O, and the kernel may still read or fill their buffers, so their
/// requests are answered when the device (or its driver's own timeout) answers them.
///
/// Chunks go to the engine of the thread that dispatches them (`EngineHandle.forThisThread`):
/// on an NBD event loop that reaps its own engine, the loop's, so their completions come
/// back to that loop with no other thread woken; elsewhere the domain's.
public final class IOScheduler: CompletionSink, @unchecked Sendable {
    public enum IOClass: UInt8, Sendable { case host, background }
    public enum Operation: UInt8, Sendable { case read, write, flush }

    public struct Stats: Sendable, Equatable {
        public var requests: UInt64 = 0
        public var chunks: UInt64 = 0
        public var completed: UInt64 = 0
        public var throttled: UInt64 = 0
        public var backgroundChunks: UInt64 = 0
        /// Times a LUN was declared stuck (`io_timeout`).
        public var timeouts: UInt64 = 0
    }

    private struct Slot {
        var sink: Unmanaged<CompletionSink>?
        var cookie: UInt64 = 0
        var buffer: UnsafeMutableRawPointer?
        var length: Int = 0
        var offset: UInt64 = 0
        var dispatchedBytes: Int = 0
        var chunksInFlight: Int = 0
        /// Since when a chunk of this request has been in flight with none answering (the watchdog's clock).
        var inFlightSinceNs: UInt64 = 0
        var result: Int64 = 0
        var lun: Int32 = 0
        var op: Operation = .read
        var ioClass: IOClass = .host
        var fua = false
        var nextFree: Int32 = -1
    }

    private struct LUNState {
        let handle: LUNHandle
        var inFlight = 0
        /// A chunk outlived `io_timeout`: requests fail with ETIMEDOUT until `inFlight` is 0.
        var stuck = false
        var host: SlotRing
        var background: SlotRing
    }

    private let engine: EngineHandle
    private let clock: NanoClock
    public let profile: ArrayProfile
    private let maxChunkBytes: Int
    private let backgroundDepth: Int
    private let backgroundSharePercent: Int
    /// Background chunks while hosts are active: at most the optimal I/O size, so a host
    /// request queued behind one waits for a small transfer, not a max_io_size one.
    private let backgroundActiveChunkBytes: Int
    private let lock = DataPathMutex(())
    private let slots: UnsafeMutablePointer<Slot>
    private let capacity: Int
    private var freeHead: Int32
    private var luns: [LUNState] = []
    /// The LUNs' handles, apart from their mutable queue state: `submit` checks requests
    /// against them before taking the lock (written only by `addLUN`, before any I/O).
    private var handles: [LUNHandle] = []
    private var arrayInFlight = 0
    private var backgroundInFlight = 0
    private var queuedHost = 0
    /// When a host chunk last went to a LUN: background work takes the whole depth only
    /// after host I/O has been idle for `hostIdleNs` (work-conserving, yet host first).
    private var lastHostDispatchNs: UInt64 = 0
    public static let hostIdleNs: UInt64 = 50_000_000
    /// Callers waiting for a free slot (`whenRoom`), first come first served.
    private var roomWaiters: [@Sendable () -> Void] = []
    private var iopsBucket: TokenBucket?
    private var bandwidthBucket: TokenBucket?
    private var backgroundBucket: TokenBucket?
    private var nextLUN = 0
    private var timerArmedUntilNs: UInt64 = 0
    private var stats = Stats()
    private let timer: DispatchSourceTimer
    private let timerQueue = DispatchQueue(label: "svsp.scheduler.pacing")
    /// Seeded faults of a `--fault-plan` (tests and drills only; nil costs one branch per chunk).
    var faults: SchedulerFaults?
    /// Chunks a fault plan delays or holds: counted in flight, not yet with the device.
    private var parked: [ParkedChunk] = []
    /// The request whose torn write kills the daemon when it lands (fault plans only).
    private var tornSlot = -1
    private let watchdog: DispatchSourceTimer
    /// Told (off the lock) when a LUN is declared stuck or answers again; set before any I/O.
    public var onLUNEvent: (@Sendable (String) -> Void)?

    private struct ParkedChunk {
        let index: Int
        let lun: Int
        let length: Int
        let offset: UInt64
        let bufferOffset: Int
        var dueNs: UInt64? // nil: held until the LUN is declared stuck
    }

    /// - Parameters:
    ///   - capacity: requests queued or in flight at most (submit beyond it throws EBUSY).
    ///   - backgroundSharePercent: the pool profile's share of queue depth for background work.
    public init(engine: EngineHandle, profile: ArrayProfile, backgroundSharePercent: Int = 20,
                capacity: Int = 1024, clock: NanoClock = MonotonicClock())
    {
        self.engine = engine
        self.profile = profile
        self.clock = clock
        self.capacity = capacity
        maxChunkBytes = Int(profile.maxIOBytes)
        backgroundDepth = max(1, profile.queueDepthPerArray * backgroundSharePercent / 100)
        self.backgroundSharePercent = backgroundSharePercent
        backgroundActiveChunkBytes = Int(min(profile.maxIOBytes, max(profile.optimalIOBytes, 4096)))
        slots = .allocate(capacity: capacity)
        slots.initialize(repeating: Slot(), count: capacity)
        for i in 0..<capacity { slots[i].nextFree = i + 1 < capacity ? Int32(i + 1) : -1 }
        freeHead = 0
        let now = clock.nowNs()
        // 50 ms of burst: smooth enough for ±5% over a second, loose enough not to starve bursts.
        iopsBucket = profile.iopsLimit.map {
            TokenBucket(ratePerSecond: Double($0), burstSeconds: 0.05, minimumBurst: 1, nowNs: now)
        }
        bandwidthBucket = profile.bandwidthLimitBytesPerSecond.map {
            TokenBucket(ratePerSecond: $0, burstSeconds: 0.05, minimumBurst: Double(profile.maxIOBytes), nowNs: now)
        }
        timer = DispatchSource.makeTimerSource(queue: timerQueue)
        watchdog = DispatchSource.makeTimerSource(queue: timerQueue)
        super.init()
        timer.setEventHandler { [weak self] in self?.timerFired() }
        timer.activate()
        let period = Int(max(profile.ioTimeoutNs / 4, 5_000_000))
        watchdog.schedule(deadline: .now() + .nanoseconds(period), repeating: .nanoseconds(period), leeway: .milliseconds(1))
        watchdog.setEventHandler { [weak self] in self?.checkTimeouts() }
        watchdog.activate()
    }

    deinit {
        timer.cancel()
        watchdog.cancel()
        slots.deinitialize(count: capacity)
        slots.deallocate()
    }

    /// Arms the rules of `plan` that name `pool` (tests and drills; set before any I/O).
    public func applyFaults(_ plan: FaultPlan, pool: String) {
        faults = plan.faults(forPool: pool)
        faults?.lunIndexOfSlot = Array(0..<handles.count)
    }

    /// Registers a LUN of this array; returns its index for `submit`. Setup time only.
    public func addLUN(_ handle: LUNHandle) -> Int {
        lock.withLock { _ in
            luns.append(LUNState(handle: handle, host: SlotRing(capacity: capacity),
                                 background: SlotRing(capacity: capacity)))
            handles.append(handle)
            return luns.count - 1
        }
    }

    /// Caps the background class at `bytesPerSecond` (nil: only its depth share limits it). Safe while copies run.
    public func setBackgroundRate(_ bytesPerSecond: Double?) {
        lock.withLock { _ in
            let now = clock.nowNs()
            if let rate = bytesPerSecond {
                let burst = max(rate * 0.05, Double(maxChunkBytes))
                if backgroundBucket == nil {
                    backgroundBucket = TokenBucket(ratePerSecond: rate, burst: burst, nowNs: now)
                } else {
                    backgroundBucket!.setRate(rate, burst: burst, nowNs: now)
                }
            } else {
                backgroundBucket = nil
            }
        }
        pumpAndSubmit()
    }

    public var currentStats: Stats { lock.withLock { _ in stats } }

    /// The paths of the LUNs declared stuck now.
    public var stuckLUNs: [String] { lock.withLock { _ in luns.filter(\.stuck).map(\.handle.path) } }

    /// No host I/O in flight and none sent for `hostIdleNs`: background work may use the whole depth.
    public var hostsIdle: Bool {
        lock.withLock { _ in arrayInFlight == backgroundInFlight && clock.nowNs() &- lastHostDispatchNs >= Self.hostIdleNs }
    }

    /// What background work may use now: the whole queue depth (no host I/O in flight or
    /// sent for `hostIdleNs`) or its `background_share`; for `mirror status`.
    public var backgroundAllowance: String {
        lock.withLock { _ in
            let idle = arrayInFlight == backgroundInFlight && clock.nowNs() &- lastHostDispatchNs >= Self.hostIdleNs
            return idle ? "whole queue depth (hosts idle)"
                : "\(backgroundSharePercent)% of what is in flight, chunks of \(backgroundActiveChunkBytes >> 10) KiB (hosts active)"
        }
    }

    /// Queues a request. Throws EINVAL/ERANGE for bad requests (checked here, before
    /// anything is queued) and EBUSY when `capacity` requests are outstanding.
    public func submit(_ op: Operation, lun: Int, buffer: UnsafeMutableRawPointer?, length: Int, offset: UInt64,
                       fua: Bool = false, ioClass: IOClass = .host, sink: CompletionSink, cookie: UInt64) throws(IOError)
    {
        let ioOp = IOOperation(op)
        guard lun >= 0, lun < handles.count else { throw IOError(code: EINVAL, operation: ioOp) }
        let info = handles[lun].info
        if op != .flush {
            let lbs = Int(info.logicalBlockSize)
            guard let buffer, length > 0, length % lbs == 0, offset % UInt64(lbs) == 0,
                  Int(bitPattern: buffer) % lbs == 0
            else { throw IOError(code: EINVAL, operation: ioOp, lun: handles[lun].path, offset: offset) }
            guard offset <= info.sizeBytes, UInt64(length) <= info.sizeBytes - offset else {
                throw IOError(code: ERANGE, operation: ioOp, lun: handles[lun].path, offset: offset)
            }
        }
        let accepted: Bool = lock.withLock { _ in
            guard freeHead >= 0 else { return false }
            let index = Int(freeHead)
            freeHead = slots[index].nextFree
            slots[index] = Slot(sink: Unmanaged.passRetained(sink), cookie: cookie, buffer: buffer, length: length,
                                offset: offset, lun: Int32(lun), op: op, ioClass: ioClass, fua: fua)
            if luns[lun].stuck { // answered at once, never queued behind what the LUN holds
                slots[index].result = -Int64(ETIMEDOUT)
                slots[index].dispatchedBytes = length
                stats.requests += 1
                finishLocked(index, deferred: true)
                return true
            }
            if ioClass == .host {
                luns[lun].host.push(Int32(index))
                queuedHost += 1
            } else {
                luns[lun].background.push(Int32(index))
            }
            stats.requests += 1
            pumpLocked()
            return true
        }
        if !accepted { throw IOError(code: EBUSY, operation: ioOp, lun: handles[lun].path, offset: offset) }
    }

    /// Hands staged chunks to the kernel (not needed inside completion callbacks).
    public func kick() { engine.forThisThread.submit() }

    /// Calls `wake` once a request slot is free (now, if one is): a caller refused with
    /// EBUSY parks here instead of sleeping, and is woken by the completion that makes room.
    public func whenRoom(_ wake: @escaping @Sendable () -> Void) {
        let now: Bool = lock.withLock { _ in
            if freeHead >= 0 { return true }
            roomWaiters.append(wake)
            return false
        }
        if now { wake() }
    }

    /// Re-runs dispatch now (tests with a ManualClock call it after advancing time).
    public func pumpAndSubmit() {
        _ = lock.withLock { _ in pumpLocked() }
        engine.forThisThread.submit()
    }

    // MARK: dispatch

    /// Dispatches chunks while depth and tokens allow, round-robin over LUNs so one
    /// busy LUN cannot starve the others. Caller holds the lock.
    /// Returns true when it staged chunks on the domain's engine.
    @discardableResult
    private func pumpLocked() -> Bool {
        let count = luns.count
        guard count > 0 else { return false }
        let target = engine.forThisThread
        var idleRounds = 0
        var staged = false
        while idleRounds < count, arrayInFlight < profile.queueDepthPerArray {
            let l = nextLUN
            nextLUN = (nextLUN + 1) % count
            if dispatchOne(lun: l, engine: target) {
                idleRounds = 0
                staged = true
            } else {
                idleRounds += 1
            }
        }
        return staged && target == engine
    }

    /// Dispatches the next chunk of this LUN's head request; false when nothing could go.
    private func dispatchOne(lun l: Int, engine: EngineHandle) -> Bool {
        guard luns[l].inFlight < profile.queueDepthPerLUN else { return false }
        var ioClass = IOClass.host
        var head = luns[l].host.peek()
        let now = clock.nowNs()
        var chunkLimit = maxChunkBytes
        if head == nil {
            // Background waits while host I/O is queued anywhere and keeps to its share of
            // depth, unless no host I/O is in flight or was sent for `hostIdleNs`: then it may
            // use the whole depth (an idle array copies at full speed).
            let hostIdle = arrayInFlight == backgroundInFlight && now &- lastHostDispatchNs >= Self.hostIdleNs
            guard queuedHost == 0, backgroundInFlight < (hostIdle ? profile.queueDepthPerArray : activeBackgroundLimit()),
                  let bg = luns[l].background.peek() else {
                return false
            }
            head = bg
            ioClass = .background
            if !hostIdle { chunkLimit = backgroundActiveChunkBytes }
        } else {
            lastHostDispatchNs = now
        }
        let index = Int(head!)
        let slot = slots[index]
        let chunk = slot.op == .flush ? 0 : min(chunkLimit, slot.length - slot.dispatchedBytes)
        if !takeTokens(bytes: chunk, ioClass: ioClass, now: now) { return false }

        let offset = slot.offset + UInt64(slot.dispatchedBytes)
        do throws(IOError) {
            var length = chunk
            var send = true
            var tearing = false
            if let faults, let action = faults.action(lun: l, op: slot.op, ioClass: ioClass, length: chunk,
                                                       whole: slot.dispatchedBytes == 0 && chunk == slot.length) {
                switch action {
                case .fail(let code): throw IOError(code: code, operation: IOOperation(slot.op))
                case .delay, .stuck:
                    var due: UInt64?
                    if case .delay(let ns) = action { due = now &+ ns }
                    parked.append(ParkedChunk(index: index, lun: l, length: chunk, offset: offset,
                                              bufferOffset: slot.dispatchedBytes, dueNs: due))
                    if let due { armTimer(at: due, now: now) }
                    send = false
                case .torn(let bytes):
                    // A tear the device cannot take (not whole logical blocks) is not simulated.
                    tearing = bytes % Int(handles[l].info.logicalBlockSize) == 0
                    if tearing { length = bytes }
                }
            }
            if send {
                try prep(index, lun: l, length: length, offset: offset, bufferOffset: slot.dispatchedBytes, engine: engine)
                if tearing { tornSlot = index } // only once the torn part is really on its way
            }
        } catch {
            if error.code == EBUSY {
                // The shared engine is full (other pools' I/O): look again shortly, even if
                // none of our own completions is coming to pump us.
                armTimer(at: now + 200_000, now: now)
                return false
            }
            // Refused outright: the rest of the request is not dispatched; it fails with this error.
            slots[index].result = -Int64(error.code)
            slots[index].dispatchedBytes = slot.length
            popHead(lun: l, ioClass: ioClass)
            if slots[index].chunksInFlight == 0 { finishLocked(index, deferred: true) }
            return true
        }
        if slots[index].chunksInFlight == 0 { slots[index].inFlightSinceNs = now }
        slots[index].dispatchedBytes += chunk
        slots[index].chunksInFlight += 1
        luns[l].inFlight += 1
        arrayInFlight += 1
        stats.chunks += 1
        if ioClass == .background {
            backgroundInFlight += 1
            stats.backgroundChunks += 1
        }
        if slot.op == .flush || slots[index].dispatchedBytes >= slot.length { popHead(lun: l, ioClass: ioClass) }
        return true
    }

    private func prep(_ index: Int, lun l: Int, length: Int, offset: UInt64, bufferOffset: Int,
                      engine: EngineHandle) throws(IOError)
    {
        let slot = slots[index]
        switch slot.op {
        case .read:
            try engine.prepRead(lun: luns[l].handle, buffer: slot.buffer! + bufferOffset, length: length,
                                offset: offset, sink: self, cookie: UInt64(index))
        case .write:
            try engine.prepWrite(lun: luns[l].handle, buffer: slot.buffer! + bufferOffset, length: length,
                                 offset: offset, fua: slot.fua, sink: self, cookie: UInt64(index))
        case .flush:
            try engine.prepFlush(lun: luns[l].handle, sink: self, cookie: UInt64(index))
        }
    }

    /// Background chunks in flight while hosts are active: the share of what is in flight,
    /// `background_share` of the whole (at least one, so copies always move on; at most the
    /// share of the array's depth). With 4 host requests in flight and a 20 % share: one.
    private func activeBackgroundLimit() -> Int {
        guard backgroundSharePercent < 100 else { return backgroundDepth }
        let hostInFlight = arrayInFlight - backgroundInFlight
        return min(backgroundDepth, max(1, hostInFlight * backgroundSharePercent / (100 - backgroundSharePercent)))
    }

    private func popHead(lun l: Int, ioClass: IOClass) {
        if ioClass == .host {
            _ = luns[l].host.pop()
            queuedHost -= 1
        } else {
            _ = luns[l].background.pop()
        }
    }

    private func takeTokens(bytes: Int, ioClass: IOClass, now: UInt64) -> Bool {
        var waitNs: UInt64 = 0
        if let b = iopsBucket { waitNs = max(waitNs, b.nanosUntilAvailable(nowNs: now)) }
        if let b = bandwidthBucket, bytes > 0 { waitNs = max(waitNs, b.nanosUntilAvailable(nowNs: now)) }
        if ioClass == .background, let b = backgroundBucket, bytes > 0 {
            waitNs = max(waitNs, b.nanosUntilAvailable(nowNs: now))
        }
        if waitNs > 0 {
            stats.throttled += 1
            armTimer(at: now + waitNs, now: now)
            return false
        }
        _ = iopsBucket?.take(1, nowNs: now)
        if bytes > 0 {
            _ = bandwidthBucket?.take(Double(bytes), nowNs: now)
            if ioClass == .background { _ = backgroundBucket?.take(Double(bytes), nowNs: now) }
        }
        return true
    }

    private func armTimer(at deadlineNs: UInt64, now: UInt64) {
        // One pending wake-up at a time; an earlier deadline re-arms it.
        if timerArmedUntilNs > now, timerArmedUntilNs <= deadlineNs { return }
        timerArmedUntilNs = deadlineNs
        timer.schedule(deadline: .now() + .nanoseconds(Int(min(deadlineNs - now, 1_000_000_000))), leeway: .microseconds(50))
    }

    private func timerFired() {
        var failed: [(index: Int, result: Int64)] = []
        lock.withLock { _ in
            timerArmedUntilNs = 0
            if !parked.isEmpty { releaseParkedLocked(failed: &failed) }
            pumpLocked()
        }
        engine.forThisThread.submit()
        for f in failed { ioCompleted(cookie: UInt64(f.index), result: f.result) }
    }

    /// Sends the delayed chunks whose time has come (fault plans only).
    private func releaseParkedLocked(failed: inout [(index: Int, result: Int64)]) {
        let now = clock.nowNs()
        let target = engine.forThisThread
        var i = 0
        while i < parked.count {
            guard let due = parked[i].dueNs else { i += 1; continue }
            if due > now {
                armTimer(at: due, now: now)
                i += 1
                continue
            }
            let p = parked[i]
            do throws(IOError) {
                try prep(p.index, lun: p.lun, length: p.length, offset: p.offset, bufferOffset: p.bufferOffset, engine: target)
                parked.remove(at: i)
            } catch {
                if error.code == EBUSY {
                    parked[i].dueNs = now + 200_000
                    armTimer(at: now + 200_000, now: now)
                    i += 1
                } else {
                    failed.append((p.index, -Int64(error.code)))
                    parked.remove(at: i)
                }
            }
        }
    }

    // MARK: timeouts

    /// The watchdog: a request with a chunk in flight longer than `io_timeout` marks its LUN
    /// stuck. Its queued requests fail now; chunks a fault plan holds for it (`stuck`) fail
    /// too, as a driver's own timeout would fail them; chunks in the kernel, and ones a plan
    /// delays, are answered when they answer.
    func checkTimeouts() {
        var failed: [(index: Int, result: Int64)] = []
        var events: [String] = []
        lock.withLock { _ in
            guard arrayInFlight > 0 else { return }
            // Read under the lock: a dispatch stamped after an earlier reading would wrap `now &- since`.
            let now = clock.nowNs()
            for i in 0..<capacity where slots[i].chunksInFlight > 0 && now &- slots[i].inFlightSinceNs > profile.ioTimeoutNs {
                let l = Int(slots[i].lun)
                guard !luns[l].stuck else { continue }
                luns[l].stuck = true
                stats.timeouts += 1
                let op = slots[i].op == .read ? "read" : (slots[i].op == .write ? "write" : "flush")
                events.append("LUN \(luns[l].handle.path) did not answer a \(op) within io_timeout "
                    + "\(ProfileUnits.formatDuration(profile.ioTimeoutNs)) (array profile \(profile.name)): declared stuck; "
                    + "its requests fail with ETIMEDOUT until it answers the \(luns[l].inFlight) it holds")
                failQueuedLocked(lun: l, code: ETIMEDOUT)
                parked.removeAll { p in // held ones never answer; delayed ones answer late, as a slow device does
                    guard p.lun == l, p.dueNs == nil else { return false }
                    failed.append((p.index, -Int64(ETIMEDOUT)))
                    return true
                }
            }
        }
        for e in events { onLUNEvent?(e) }
        for f in failed { ioCompleted(cookie: UInt64(f.index), result: f.result) }
    }

    /// The torn part of a write is on the device: say so in the daemon's log (the torture
    /// harness counts these lines) and crash at once, as a power cut would.
    private static func crashAfterTornWrite(_ path: String) -> Never {
        let line = "svsp: fault plan: a torn write landed partly on \(path); killing the daemon (SIGKILL)\n"
        _ = line.withCString { write(2, $0, strlen($0)) }
        kill(getpid(), SIGKILL)
        while true { pause() }
    }

    /// Fails every request queued for LUN `l` (partly sent ones finish when their chunks return).
    private func failQueuedLocked(lun l: Int, code: Int32) {
        for ioClass in [IOClass.host, .background] {
            while let head = ioClass == .host ? luns[l].host.peek() : luns[l].background.peek() {
                let index = Int(head)
                slots[index].result = -Int64(code)
                slots[index].dispatchedBytes = slots[index].length
                popHead(lun: l, ioClass: ioClass)
                if slots[index].chunksInFlight == 0 { finishLocked(index, deferred: true) }
            }
        }
    }

    // MARK: completion

    override public func ioCompleted(cookie: UInt64, result: Int64) {
        let index = Int(cookie)
        var done: (sink: Unmanaged<CompletionSink>, cookie: UInt64, result: Int64)?
        var room: (@Sendable () -> Void)?
        var answeredAgain: String?
        let stagedOnDomainEngine: Bool = lock.withLock { _ in
            let l = Int(slots[index].lun)
            if index == tornSlot { Self.crashAfterTornWrite(luns[l].handle.path) }
            luns[l].inFlight -= 1
            arrayInFlight -= 1
            if slots[index].ioClass == .background { backgroundInFlight -= 1 }
            slots[index].chunksInFlight -= 1
            if slots[index].chunksInFlight > 0 { slots[index].inFlightSinceNs = clock.nowNs() }
            if luns[l].stuck, luns[l].inFlight == 0 {
                luns[l].stuck = false
                answeredAgain = "LUN \(luns[l].handle.path) answered everything it held: no longer stuck"
            }
            if result < 0, slots[index].result >= 0 { slots[index].result = result }
            if slots[index].chunksInFlight == 0, slots[index].dispatchedBytes >= slots[index].length {
                done = finishLocked(index, deferred: false)
                if !roomWaiters.isEmpty { room = roomWaiters.removeFirst() } // one slot freed: one waiter
            }
            return pumpLocked()
        }
        // The reaper submits what its callbacks staged after the batch, and so does an event
        // loop reaping its own engine; a completion delivered elsewhere (an engine drained at
        // shutdown) that staged on the domain's engine submits it here.
        if stagedOnDomainEngine, !engine.isReaperThread { engine.submit() }
        if let answeredAgain { onLUNEvent?(answeredAgain) }
        if let done {
            let sink = done.sink.takeRetainedValue()
            sink.ioCompleted(cookie: done.cookie, result: done.result)
        }
        room?()
    }

    /// Frees the slot; returns what to tell the caller (or, for a request refused at
    /// dispatch, delivers it asynchronously so the caller is never called under our lock).
    @discardableResult
    private func finishLocked(_ index: Int, deferred: Bool) -> (sink: Unmanaged<CompletionSink>, cookie: UInt64, result: Int64)? {
        let slot = slots[index]
        let result = slot.result < 0 ? slot.result : Int64(slot.length)
        slots[index] = Slot()
        slots[index].nextFree = freeHead
        freeHead = Int32(index)
        stats.completed += 1
        if deferred, !roomWaiters.isEmpty { // no completion will follow for this slot: wake here
            let wake = roomWaiters.removeFirst()
            timerQueue.async { wake() }
        }
        guard let sink = slot.sink else { return nil }
        if deferred {
            let cookie = slot.cookie
            timerQueue.async { sink.takeRetainedValue().ioCompleted(cookie: cookie, result: result) }
            return nil
        }
        return (sink, slot.cookie, result)
    }
}

/// A fixed-capacity FIFO of slot indices (no allocation after init).
struct SlotRing {
    private var storage: [Int32]
    private var head = 0
    private var count = 0

    init(capacity: Int) { storage = Array(repeating: -1, count: max(capacity, 1)) }

    mutating func push(_ v: Int32) {
        precondition(count < storage.count, "slot ring overflow")
        storage[(head + count) % storage.count] = v
        count += 1
    }

    func peek() -> Int32? { count == 0 ? nil : storage[head] }

    mutating func pop() -> Int32? {
        guard count > 0 else { return nil }
        let v = storage[head]
        head = (head + 1) % storage.count
        count -= 1
        return v
    }

    var isEmpty: Bool { count == 0 }
}

extension IOOperation {
    /// The engine's name for a scheduler operation (in errors).
    init(_ op: IOScheduler.Operation) {
        switch op {
        case .read: self = .read
        case .write: self = .write
        case .flush: self = .flush
        }
    }
}
