import Foundation
import IOEngine
import NIOCore
import Synchronization

/// One NBD client: fixed-newstyle negotiation (NBDNegotiation.swift), then transmission
/// with up to `depth` requests in flight and replies in completion order.
///
/// Steady state allocates nothing per request: slots, pool buffers, the completion
/// queue and the reply buffer are made once; completions reach the event loop through
/// one stored closure; the payload of a write is copied once, from NIO's receive
/// buffer into an aligned pool buffer (however the socket fragments it), and goes from
/// there to every leg; a read's data is copied once, from the pool buffer into the
/// reply buffer. When every slot is busy the connection stops reading from the socket.
final class NBDConnection: ChannelDuplexHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Phase { case clientFlags, options, transmission, closing }

    static let depth = 32
    /// Replies gathered before they are flushed within one batch of input.
    static let outboxFlushBytes = 256 << 10
    static let headerBytes = 28
    /// A client must have chosen an export by then: idle sockets must not hold the
    /// connection limit against real clients.
    static let negotiationSeconds: Int64 = 10

    let domain: Domain
    let registry: NBDRegistry
    let log: @Sendable (String) -> Void
    var phase = Phase.clientFlags
    var stats: NBDConnectionStats?

    // Negotiation state (NBDNegotiation.swift).
    var pending: ByteBuffer?
    var clientNoZeroes = false
    var structuredReplies = false
    var metaContextExport: String? // export the base:allocation context was selected for

    // The export, once NBD_OPT_GO (or EXPORT_NAME) succeeded.
    var port: VDiskPort?
    var exportName = ""
    var readOnly = false
    var exportBytes: UInt64 = 0
    var blockBytes: UInt64 = 512
    var allocationContext = false

    // Transmission input: a header split across reads, a write payload being received,
    // bytes of a refused write being skipped, input parked while every slot is busy.
    var header: ByteBuffer
    var receiving: Int?
    var received = 0
    var discarding = 0
    var discardedReply: (cookie: UInt64, error: UInt32)?
    var parked: ByteBuffer?
    var readWanted = false
    /// Requests the vdisk had no room for (EBUSY: many connections at once): retried shortly.
    var busy: [Int] = []
    var busyRetryArmed = false
    var disconnectRequested = false
    var loggedRefusal = false
    /// Requests staged since the last io_submit: one kick per batch of input.
    var needsKick = false

    /// Replies gathered during one event-loop turn and written with one flush.
    var outbox: ByteBuffer
    var context: ChannelHandlerContext?
    let sink: Sink
    /// Requests at the vdisk; `status` sees the same number through the stats.
    var inflight = 0 {
        didSet { stats?.inFlight.store(inflight, ordering: .relaxed) }
    }

    struct Slot {
        var cookie: UInt64 = 0
        var type: UInt16 = 0
        var offset: UInt64 = 0
        var length = 0
        var fua = false
        var buffer: PooledBuffer?
        /// TRIM and WRITE_ZEROES may cover GiBs: they run as `zeroChunk` pieces one after
        /// another, so one request cannot fill the pool's scheduler; this is where it ends.
        var end: UInt64 = 0
    }

    /// Largest piece of a TRIM or WRITE_ZEROES handed to the vdisk at once.
    static let zeroChunk = 4 << 20
    /// Requests (and writes' payloads) above this are beyond what the protocol lets a
    /// client expect to be served; below it, a too-large request is refused and skipped.
    static let protocolLimit = 32 << 20

    /// The payload buffers, made when the client enters transmission (a connection that
    /// only negotiates, or never does, costs no 32 MiB).
    final class PayloadBuffers {
        let pool: BufferPool
        init() throws(IOEngine.IOError) { pool = try BufferPool(bufferBytes: NBD.maxPayload, count: NBDConnection.depth) }
    }

    var buffers: PayloadBuffers?
    var slots: [Slot]
    var freeSlots: [Int]

    /// The completion callback, on the event loop (its own engine, `NBDLoopReaper`) or on the
    /// domain engine's reaper thread (chunks dispatched elsewhere, `--nbd-completions thread`):
    /// records the result in a preallocated queue and schedules the loop once per batch (from
    /// the loop itself that is a queued task, no wake-up). Holds the connection
    /// (and so its buffers) alive while the kernel may still use them; the link is cut
    /// once the channel is gone and nothing is in flight.
    final class Sink: CompletionSink, @unchecked Sendable {
        struct Queue {
            var ring: [Int]
            var results: [Int64]
            var head = 0
            var count = 0
            var scheduled = false
        }

        var owner: NBDConnection?
        let eventLoop: EventLoop
        let queue: DataPathMutex<Queue>
        private(set) var wake: @Sendable () -> Void = {}

        init(eventLoop: EventLoop, depth: Int) {
            self.eventLoop = eventLoop
            queue = DataPathMutex(Queue(ring: Array(repeating: 0, count: depth), results: Array(repeating: 0, count: depth)))
            super.init()
            // Made once: handing a stored closure to execute() allocates nothing.
            wake = { [weak self] in self?.owner?.drainCompletions() }
        }

        override func ioCompleted(cookie: UInt64, result: Int64) {
            let schedule = queue.withLock { q in
                let slot = Int(cookie)
                q.results[slot] = result
                q.ring[(q.head + q.count) % q.ring.count] = slot
                q.count += 1
                if q.scheduled { return false }
                q.scheduled = true
                return true
            }
            if schedule { eventLoop.execute(wake) }
        }

        func pop() -> (slot: Int, result: Int64)? {
            queue.withLock { q in
                guard q.count > 0 else {
                    q.scheduled = false
                    return nil
                }
                let slot = q.ring[q.head]
                q.head = (q.head + 1) % q.ring.count
                q.count -= 1
                return (slot, q.results[slot])
            }
        }
    }

    init(domain: Domain, registry: NBDRegistry, eventLoop: EventLoop, allocator: ByteBufferAllocator,
         log: @escaping @Sendable (String) -> Void)
    {
        self.domain = domain
        self.registry = registry
        self.log = log
        slots = Array(repeating: Slot(), count: Self.depth)
        freeSlots = Array((0..<Self.depth).reversed())
        busy.reserveCapacity(Self.depth)
        header = allocator.buffer(capacity: 64)
        outbox = allocator.buffer(capacity: 256 << 10)
        sink = Sink(eventLoop: eventLoop, depth: Self.depth)
        sink.owner = self
    }

    var who: String { "nbd client \(stats?.id ?? 0)" + (exportName.isEmpty ? "" : " (\(exportName))") }

    // MARK: channel events

    func channelActive(context: ChannelHandlerContext) {
        self.context = context
        switch registry.register(channel: context.channel) {
        case .admitted(let s):
            stats = s
            context.eventLoop.scheduleTask(in: .seconds(Self.negotiationSeconds)) { [weak self] in
                guard let self, let context = self.context, self.phase == .clientFlags || self.phase == .options else { return }
                self.drop(context, "no export chosen within \(Self.negotiationSeconds) s")
            }
        case .turnedAway(let first):
            if first {
                log("nbd: \(registry.maxConnections) connections open, closing new ones until some end "
                    + "(serve --nbd-max-connections; `status` counts them)")
            }
            phase = .closing
            context.close(promise: nil)
            return
        }
        var out = context.channel.allocator.buffer(capacity: 18)
        out.writeInteger(NBD.initMagic)
        out.writeInteger(NBD.optMagic)
        out.writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if phase == .transmission, receiving != nil || parked != nil {
            log("\(who): disconnected in the middle of a request")
        }
        phase = .closing
        if let index = receiving { // payload never completed: the request was never started
            receiving = nil
            release(index)
        }
        parked = nil
        pending = nil
        self.context = nil
        finishIfIdle()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        switch phase {
        case .transmission:
            if parked != nil {
                // NIO may deliver more of one read loop after we stopped asking: keep it in order.
                parked!.writeBuffer(&incoming)
                return
            }
            consume(&incoming, context: context)
        case .clientFlags, .options:
            if pending == nil { pending = incoming } else { pending!.writeBuffer(&incoming) }
            negotiateThenConsume(context)
        case .closing:
            break
        }
    }

    /// Handles the buffered options; what follows the one that chose an export is requests.
    private func negotiateThenConsume(_ context: ChannelHandlerContext) {
        negotiate(context: context)
        if phase == .transmission, var rest = pending {
            pending = nil
            consume(&rest, context: context)
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushOutbox(context)
    }

    /// Back-pressure: no socket reads while every slot is busy (unless the last one is
    /// waiting for its write's payload), while input is parked, or while the client is
    /// not reading its replies (the channel is above its high water mark).
    /// The same holds during negotiation: no reads while the client leaves its option
    /// replies unread, or while a whole option is already waiting to be handled.
    func read(context: ChannelHandlerContext) {
        if mustWaitBeforeReading(context) {
            readWanted = true
        } else {
            context.read()
        }
    }

    private func mustWaitBeforeReading(_ context: ChannelHandlerContext) -> Bool {
        switch phase {
        case .transmission:
            return (freeSlots.isEmpty && receiving == nil) || parked != nil || !context.channel.isWritable
        case .clientFlags, .options:
            return !context.channel.isWritable || (pending?.readableBytes ?? 0) > 16 + Int(NBD.maxOptionBytes)
        case .closing:
            return false
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            switch phase {
            case .clientFlags, .options: // options held back while the client was not reading
                negotiateThenConsume(context)
                flushOutbox(context) // replies without a slot (refusals, block status) leave now
            case .transmission where parked != nil && (!freeSlots.isEmpty || receiving != nil):
                endOfTurn(context) // input parked while replies could not leave
            default: break
            }
        }
        resumeReading(context)
        context.fireChannelWritabilityChanged()
    }

    func resumeReading(_ context: ChannelHandlerContext) {
        guard readWanted, phase != .closing, !mustWaitBeforeReading(context) else { return }
        readWanted = false
        context.read()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if phase != .closing { log("\(who): \(error)") }
        phase = .closing
        context.close(promise: nil)
    }

    func drop(_ context: ChannelHandlerContext, _ why: String) {
        log("\(who): dropping the connection: \(why)")
        NBDConnectionStats.add(stats!.refused, 1)
        phase = .closing
        closeAfterReplies(context)
    }

    /// Cuts the link that keeps this connection alive once nothing can use it any more.
    func finishIfIdle() {
        guard phase == .closing, context == nil, inflight == 0 else { return }
        if let stats { registry.unregister(stats.id) }
        stats = nil
        sink.owner = nil
    }

    // MARK: transmission input

    /// Handles every complete request in `buffer` (their LUN I/O goes to the kernel in one
    /// io_submit at the end); input that cannot be taken yet is parked.
    func consume(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) {
        defer {
            if needsKick {
                needsKick = false
                port?.kick()
            }
        }
        while buffer.readableBytes > 0, phase == .transmission, !disconnectRequested {
            if discarding > 0 {
                let n = min(discarding, buffer.readableBytes)
                buffer.moveReaderIndex(forwardBy: n)
                discarding -= n
                if discarding == 0, let r = discardedReply {
                    discardedReply = nil
                    appendError(cookie: r.cookie, error: r.error)
                }
                continue
            }
            if let index = receiving {
                receivePayload(index, from: &buffer)
                continue
            }
            guard !freeSlots.isEmpty else {
                parked = buffer // resumed when a slot frees up
                return
            }
            // Replies that take no slot (refusals, errors, block status) are bounded too: past
            // a quarter MiB they are flushed, and input waits while the client does not read them.
            if outbox.readableBytes >= Self.outboxFlushBytes {
                flushOutbox(context)
                if !context.channel.isWritable {
                    parked = buffer // resumed when the channel is writable again
                    return
                }
            }
            if header.readableBytes > 0 || buffer.readableBytes < Self.headerBytes {
                var piece = buffer.readSlice(length: min(Self.headerBytes - header.readableBytes, buffer.readableBytes))!
                header.writeBuffer(&piece)
                guard header.readableBytes == Self.headerBytes else { return }
                startRequest(&header, context: context)
                header.clear()
            } else {
                startRequest(&buffer, context: context)
            }
        }
    }

    /// Copies the next part of a write's payload into its pool buffer; submits it when complete.
    private func receivePayload(_ index: Int, from buffer: inout ByteBuffer) {
        let length = slots[index].length
        let n = min(length - received, buffer.readableBytes)
        let destination = slots[index].buffer!.pointer + received
        buffer.readWithUnsafeReadableBytes { raw in
            destination.copyMemory(from: raw.baseAddress!, byteCount: n)
            return n
        }
        received += n
        if received == length {
            receiving = nil
            submit(index)
        }
    }

    /// Parses one 28-byte request header from `buffer` and starts the request.
    private func startRequest(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) {
        let magic: UInt32 = buffer.readInteger()!
        let flags: UInt16 = buffer.readInteger()!
        let type: UInt16 = buffer.readInteger()!
        let cookie: UInt64 = buffer.readInteger()!
        var offset: UInt64 = buffer.readInteger()!
        var length: UInt32 = buffer.readInteger()!
        guard magic == NBD.requestMagic else {
            drop(context, "bad request magic 0x\(String(magic, radix: 16))")
            return
        }
        let hasPayload = type == NBD.cmdWrite
        if hasPayload, length > Self.protocolLimit {
            // Beyond what any client may expect: the protocol allows a disconnect.
            drop(context, "write of \(length) bytes exceeds \(Self.protocolLimit)")
            return
        }
        if let error = refusal(type: type, offset: offset, length: UInt64(length)) {
            if hasPayload, length > 0 {
                discarding = Int(length)
                discardedReply = (cookie, error)
            } else {
                appendError(cookie: cookie, error: error)
            }
            return
        }
        switch type {
        case NBD.cmdDisc:
            // Requests in flight finish first; then the connection closes.
            disconnectRequested = true
            closeIfDisconnecting(context)
            return
        case NBD.cmdBlockStatus:
            appendBlockStatus(cookie: cookie, offset: offset, length: UInt64(length), one: flags & NBD.cmdFlagReqOne != 0)
            NBDConnectionStats.add(stats!.otherRequests, 1)
            return
        default:
            break
        }
        if type == NBD.cmdFlush { (offset, length) = (0, 0) } // a flush's range fields mean nothing
        let index = freeSlots.removeLast()
        var buffer: PooledBuffer?
        if type == NBD.cmdRead || type == NBD.cmdWrite {
            buffer = buffers!.pool.handle.buffer(at: index) // slot i owns buffer i: no free list, no lock
        }
        slots[index] = Slot(cookie: cookie, type: type, offset: offset, length: Int(length), fua: flags & NBD.cmdFlagFUA != 0,
                            buffer: buffer, end: offset + UInt64(length)) // range-checked, or zeroed for FLUSH
        if type == NBD.cmdTrim || type == NBD.cmdWriteZeroes { slots[index].length = pieceLength(type: type, offset: offset, end: offset + UInt64(length)) }
        if hasPayload {
            receiving = index
            received = 0
        } else {
            submit(index)
        }
    }

    /// The next piece of a TRIM or WRITE_ZEROES at `offset`: at most `zeroChunk` of zeroing.
    /// A trim of a thin vdisk sends the whole extents it covers as one piece (they are freed,
    /// not written) and ends its zeroed pieces at extent boundaries, so that one can start there.
    func pieceLength(type: UInt16, offset: UInt64, end: UInt64) -> Int {
        let remaining = end - offset
        if type == NBD.cmdTrim, let unit = port?.deallocationUnit {
            if offset % unit == 0, remaining >= unit { return Int(min(remaining / unit * unit, max(unit, (1 << 30) / unit * unit))) }
            return Int(min(UInt64(Self.zeroChunk), remaining, unit - offset % unit))
        }
        return Int(min(UInt64(Self.zeroChunk), remaining))
    }

    /// Why a request must be refused (the NBD error to answer with), or nil.
    private func refusal(type: UInt16, offset: UInt64, length: UInt64) -> UInt32? {
        let error: UInt32?
        let why: String
        switch type {
        case NBD.cmdDisc, NBD.cmdFlush:
            return nil
        case NBD.cmdRead, NBD.cmdWrite, NBD.cmdTrim, NBD.cmdWriteZeroes, NBD.cmdBlockStatus:
            let writes = type == NBD.cmdWrite || type == NBD.cmdTrim || type == NBD.cmdWriteZeroes
            if writes, readOnly {
                (error, why) = (NBD.ePerm, "write to a read-only export")
            } else if type == NBD.cmdBlockStatus, !allocationContext {
                (error, why) = (NBD.eInval, "block status without a negotiated meta context")
            } else if type == NBD.cmdRead || type == NBD.cmdWrite, length > UInt64(NBD.maxPayload) {
                // Above the advertised maximum block size: refused (a write's payload is skipped).
                (error, why) = (structuredReplies && type == NBD.cmdRead ? NBD.eOverflow : NBD.eInval,
                                "\(type == NBD.cmdRead ? "read" : "write") of \(length) bytes exceeds \(NBD.maxPayload)")
            } else if length == 0 || offset % blockBytes != 0 || length % blockBytes != 0 {
                (error, why) = (NBD.eInval, "\(offset)+\(length) is not aligned to the block size \(blockBytes)")
            } else if offset > exportBytes || length > exportBytes - offset {
                (error, why) = (writes ? NBD.eNoSpc : NBD.eInval, "\(offset)+\(length) is beyond the export's \(exportBytes) bytes")
            } else {
                return nil
            }
        default:
            (error, why) = (NBD.eInval, "unknown command \(type)")
        }
        NBDConnectionStats.add(stats!.refused, 1)
        if !loggedRefusal { // once per connection: a confused client must not flood the log
            loggedRefusal = true
            log("\(who): refused a request: \(why) (further refusals are counted, not logged)")
        }
        return error
    }

    func submit(_ index: Int) {
        let s = slots[index]
        let op: VDiskPort.Op
        switch s.type {
        case NBD.cmdRead: op = .read
        case NBD.cmdWrite: op = .write
        case NBD.cmdFlush: op = .flush
        case NBD.cmdTrim: op = .trim
        default: op = .writeZeroes
        }
        inflight += 1
        do {
            try port!.submit(op, offset: s.offset, length: s.length, buffer: s.buffer?.pointer, fua: s.fua, sink: sink,
                             cookie: UInt64(index), kick: false)
            needsKick = true
        } catch {
            inflight -= 1
            if error.code == EBUSY {
                retryWhenRoom(index)
                return
            }
            NBDConnectionStats.add(stats!.errors, 1)
            log("\(who): request at \(s.offset)+\(s.length) failed to start: \(error)")
            release(index)
            appendError(cookie: s.cookie, error: error.code == EINVAL || error.code == ERANGE ? NBD.eInval
                                                  : (error.code == EROFS ? NBD.ePerm : NBD.eIO))
        }
    }

    /// The vdisk's request table is full (many connections at full depth): try again in
    /// a moment rather than failing a request that did nothing wrong.
    private func retryWhenRoom(_ index: Int) {
        busy.append(index)
        guard !busyRetryArmed, let context else { return }
        busyRetryArmed = true
        let loopBound = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(in: .microseconds(200)) {
            let connection = loopBound.value
            connection.busyRetryArmed = false
            let waiting = connection.busy
            connection.busy.removeAll(keepingCapacity: true)
            guard connection.context != nil else {
                for i in waiting { connection.release(i) }
                connection.finishIfIdle()
                return
            }
            for i in waiting { connection.submit(i) }
            if let context = connection.context { connection.endOfTurn(context) }
        }
    }

    // MARK: completions

    /// On the event loop: every request finished since the last call.
    func drainCompletions() {
        while let (index, result) = sink.pop() {
            inflight -= 1
            let s = slots[index]
            if result == -Int64(EBUSY), context != nil { // a pool's scheduler was full: the piece is resent
                retryWhenRoom(index)
                continue
            }
            let zeroing = s.type == NBD.cmdTrim || s.type == NBD.cmdWriteZeroes
            let next = s.offset + UInt64(s.length)
            if zeroing, result >= 0, next < s.end, context != nil { // the next piece of a long TRIM or WRITE_ZEROES
                slots[index].offset = next
                slots[index].length = pieceLength(type: s.type, offset: next, end: s.end)
                submit(index)
                continue
            }
            if let stats {
                if result < 0 {
                    NBDConnectionStats.add(stats.errors, 1)
                } else if s.type == NBD.cmdRead {
                    NBDConnectionStats.add(stats.reads, 1)
                    NBDConnectionStats.add(stats.bytesRead, UInt64(s.length))
                } else if s.type == NBD.cmdWrite {
                    NBDConnectionStats.add(stats.writes, 1)
                    NBDConnectionStats.add(stats.bytesWritten, UInt64(s.length))
                } else {
                    NBDConnectionStats.add(stats.otherRequests, 1)
                }
            }
            if context != nil {
                if result < 0 {
                    appendError(cookie: s.cookie, error: result == -Int64(ENOSPC) ? NBD.eNoSpc : NBD.eIO)
                } else if s.type == NBD.cmdRead {
                    appendReadData(cookie: s.cookie, offset: s.offset, from: s.buffer!.pointer, length: s.length)
                } else {
                    appendDone(cookie: s.cookie)
                }
            }
            release(index)
        }
        guard let context else {
            finishIfIdle()
            return
        }
        endOfTurn(context)
    }

    /// After requests finished or were resent: parked input, the kick, the replies, a
    /// pending disconnect, and reading again.
    func endOfTurn(_ context: ChannelHandlerContext) {
        if var input = parked { // requests that waited for a free slot may go now
            parked = nil
            consume(&input, context: context)
        }
        if needsKick { // consume() kicks too; this covers resent requests and next zeroing pieces
            needsKick = false
            port?.kick()
        }
        flushOutbox(context)
        closeIfDisconnecting(context)
        resumeReading(context)
    }

    func release(_ index: Int) {
        slots[index].buffer = nil
        freeSlots.append(index)
    }

    private func closeIfDisconnecting(_ context: ChannelHandlerContext) {
        guard disconnectRequested, inflight == 0, busy.isEmpty, phase == .transmission else { return }
        phase = .closing
        closeAfterReplies(context)
    }

    /// Closes once every reply written so far has left: a close fails writes still
    /// pending, so it waits for this (possibly empty) last write, which completes after
    /// all earlier ones. A client that never reads them is cut off after 30 s.
    func closeAfterReplies(_ context: ChannelHandlerContext) {
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(outbox)).whenComplete { _ in channel.close(promise: nil) }
        outbox.clear()
        context.eventLoop.scheduleTask(in: .seconds(30)) { channel.close(promise: nil) }
    }
}
