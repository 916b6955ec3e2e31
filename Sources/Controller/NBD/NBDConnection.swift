import Foundation
import IOEngine
import NIOCore

/// One NBD client: fixed-newstyle negotiation, then transmission with many
/// requests in flight and replies in completion order. Payload is copied once,
/// from the socket into an aligned pool buffer, and goes from there to every leg.
final class NBDConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum Phase { case clientFlags, options, transmission, closing }

    private let domain: Domain
    private let log: @Sendable (String) -> Void
    private var phase = Phase.clientFlags
    private var pending: ByteBuffer?
    private var port: VDiskPort?
    private var exportName = ""
    private var readOnly = false
    private var context: ChannelHandlerContext?
    private let sink: Sink
    private var inflight = 0

    /// In-flight requests: pool buffer, NBD cookie, what to send back.
    fileprivate struct Slot {
        var cookie: UInt64 = 0
        var isRead = false
        var length = 0
        var buffer: PooledBuffer?
    }

    /// Holds the connection (and so its buffers) alive while the kernel may still use them;
    /// the link is cut once the channel is gone and nothing is in flight.
    fileprivate final class Sink: CompletionSink, @unchecked Sendable {
        var owner: NBDConnection?
        let eventLoop: EventLoop
        init(eventLoop: EventLoop) { self.eventLoop = eventLoop }
        override func ioCompleted(cookie: UInt64, result: Int64) {
            let owner = owner
            eventLoop.execute { owner?.completed(slot: Int(cookie), result: result) }
        }
    }

    private let pool: BufferPool
    private var slots: [Slot]
    private var freeSlots: [Int]

    init(domain: Domain, eventLoop: EventLoop, log: @escaping @Sendable (String) -> Void) throws {
        self.domain = domain
        self.log = log
        let depth = 32
        pool = try BufferPool(bufferBytes: NBD.maxPayload, count: depth)
        slots = Array(repeating: Slot(), count: depth)
        freeSlots = Array((0..<depth).reversed())
        sink = Sink(eventLoop: eventLoop)
        sink.owner = self
    }

    func channelActive(context: ChannelHandlerContext) {
        self.context = context
        var out = context.channel.allocator.buffer(capacity: 18)
        out.writeInteger(NBD.initMagic)
        out.writeInteger(NBD.optMagic)
        out.writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        phase = .closing
        self.context = nil
        if inflight == 0 { sink.owner = nil }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if pending == nil { pending = incoming } else { pending!.writeBuffer(&incoming) }
        drain(context: context)
    }

    /// Handles every complete message buffered so far.
    private func drain(context: ChannelHandlerContext) {
        while phase != .closing, var buffer = pending {
            let before = buffer.readerIndex
            let progressed = step(&buffer, context: context)
            pending = buffer.readableBytes > 0 ? buffer : nil
            if !progressed || buffer.readerIndex == before { break }
        }
        if let p = pending, p.readerIndex > 0 {
            pending!.discardReadBytes()
        }
    }

    /// Consumes one message if complete; false when more bytes are needed.
    private func step(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) -> Bool {
        switch phase {
        case .clientFlags:
            guard let flags: UInt32 = buffer.readInteger() else { return false }
            if flags & UInt32(NBD.flagFixedNewstyle) == 0 {
                drop(context, "client does not speak fixed newstyle (flags \(flags))")
                return false
            }
            phase = .options
            return true
        case .options:
            guard buffer.readableBytes >= 16 else { return false }
            let magic: UInt64 = buffer.getInteger(at: buffer.readerIndex)!
            let option: UInt32 = buffer.getInteger(at: buffer.readerIndex + 8)!
            let length: UInt32 = buffer.getInteger(at: buffer.readerIndex + 12)!
            guard magic == NBD.optMagic else {
                drop(context, "bad option magic 0x\(String(magic, radix: 16))")
                return false
            }
            guard length <= NBD.maxOptionBytes else {
                drop(context, "option \(option) of \(length) bytes exceeds \(NBD.maxOptionBytes)")
                return false
            }
            guard buffer.readableBytes >= 16 + Int(length) else { return false }
            buffer.moveReaderIndex(forwardBy: 16)
            let payload = buffer.readSlice(length: Int(length))!
            handleOption(option, payload, context: context)
            return true
        case .transmission:
            return handleRequest(&buffer, context: context)
        case .closing:
            return false
        }
    }

    // MARK: negotiation

    private func optionReply(_ context: ChannelHandlerContext, _ option: UInt32, _ type: UInt32, _ body: ByteBuffer? = nil) {
        var out = context.channel.allocator.buffer(capacity: 20 + (body?.readableBytes ?? 0))
        out.writeInteger(NBD.optReplyMagic)
        out.writeInteger(option)
        out.writeInteger(type)
        out.writeInteger(UInt32(body?.readableBytes ?? 0))
        if var body { out.writeBuffer(&body) }
        context.write(wrapOutboundOut(out), promise: nil)
    }

    private func handleOption(_ option: UInt32, _ payload: ByteBuffer, context: ChannelHandlerContext) {
        var payload = payload
        switch option {
        case NBD.optAbort:
            optionReply(context, option, NBD.repAck)
            context.flush()
            phase = .closing
            context.close(promise: nil)
        case NBD.optList:
            for v in domain.metadata.vdisks {
                var body = context.channel.allocator.buffer(capacity: 4 + v.name.utf8.count)
                body.writeInteger(UInt32(v.name.utf8.count))
                body.writeString(v.name)
                optionReply(context, option, NBD.repServer, body)
            }
            optionReply(context, option, NBD.repAck)
            context.flush()
        case NBD.optInfo, NBD.optGo:
            guard let nameLength: UInt32 = payload.readInteger(), nameLength <= 4096,
                  let name = payload.readString(length: Int(nameLength)), let requests: UInt16 = payload.readInteger(),
                  payload.readableBytes == Int(requests) * 2
            else {
                optionReply(context, option, NBD.repErrInvalid)
                context.flush()
                return
            }
            guard let v = domain.metadata.vdisk(named: name), let port = try? domain.port(for: name) else {
                optionReply(context, option, NBD.repErrUnknown)
                context.flush()
                log("nbd: client asked for unknown export '\(name)'")
                return
            }
            var export = context.channel.allocator.buffer(capacity: 12)
            export.writeInteger(NBD.infoExport)
            export.writeInteger(v.sizeBytes)
            export.writeInteger(NBD.tflagHasFlags | NBD.tflagSendFlush | NBD.tflagSendFUA | NBD.tflagSendTrim
                | NBD.tflagSendWriteZeroes | NBD.tflagCanMultiConn)
            optionReply(context, option, NBD.repInfo, export)
            var sizes = context.channel.allocator.buffer(capacity: 14)
            sizes.writeInteger(NBD.infoBlockSize)
            sizes.writeInteger(UInt32(v.blockSize))
            let preferred = domain.metadata.pool(id: v.poolId).flatMap { domain.profiles.arrays[$0.arrayProfile]?.optimalIOBytes } ?? 65536
            sizes.writeInteger(UInt32(min(max(preferred, UInt64(v.blockSize)), UInt64(NBD.maxPayload))))
            sizes.writeInteger(UInt32(NBD.maxPayload))
            optionReply(context, option, NBD.repInfo, sizes)
            optionReply(context, option, NBD.repAck)
            context.flush()
            if option == NBD.optGo {
                self.port = port
                exportName = name
                phase = .transmission
            }
        default:
            // Structured replies, metadata contexts and the rest: not yet; clients fall back.
            optionReply(context, option, NBD.repErrUnsup)
            context.flush()
        }
    }

    // MARK: transmission

    private func handleRequest(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) -> Bool {
        guard buffer.readableBytes >= 28 else { return false }
        let start = buffer.readerIndex
        let magic: UInt32 = buffer.getInteger(at: start)!
        let flags: UInt16 = buffer.getInteger(at: start + 4)!
        let type: UInt16 = buffer.getInteger(at: start + 6)!
        let cookie: UInt64 = buffer.getInteger(at: start + 8)!
        let offset: UInt64 = buffer.getInteger(at: start + 16)!
        let length: UInt32 = buffer.getInteger(at: start + 24)!
        guard magic == NBD.requestMagic else {
            drop(context, "bad request magic 0x\(String(magic, radix: 16))")
            return false
        }
        if type == NBD.cmdWrite {
            guard length <= NBD.maxPayload else {
                drop(context, "write of \(length) bytes exceeds the advertised maximum \(NBD.maxPayload)")
                return false
            }
            guard buffer.readableBytes >= 28 + Int(length) else { return false }
        }
        guard !freeSlots.isEmpty else { return false } // all slots busy: wait for a completion
        guard port != nil else { return false }
        buffer.moveReaderIndex(forwardBy: 28)

        switch type {
        case NBD.cmdDisc:
            phase = .closing
            context.close(promise: nil)
            return true
        case NBD.cmdRead, NBD.cmdWrite:
            if type == NBD.cmdRead && length > NBD.maxPayload {
                reply(context, cookie: cookie, error: NBD.eInval)
                return true
            }
            let index = freeSlots.removeLast()
            guard let b = pool.handle.take() else {
                freeSlots.append(index)
                reply(context, cookie: cookie, error: NBD.eNoMem)
                return true
            }
            if type == NBD.cmdWrite {
                // The one copy of the payload: socket buffer -> aligned pool buffer.
                buffer.readWithUnsafeReadableBytes { raw in
                    b.pointer.copyMemory(from: raw.baseAddress!, byteCount: Int(length))
                    return Int(length)
                }
            }
            slots[index] = Slot(cookie: cookie, isRead: type == NBD.cmdRead, length: Int(length), buffer: b)
            submit(index, type == NBD.cmdRead ? .read : .write, offset: offset, length: Int(length), buffer: b.pointer,
                   fua: flags & NBD.cmdFlagFUA != 0, context: context)
        case NBD.cmdFlush, NBD.cmdTrim, NBD.cmdWriteZeroes:
            let index = freeSlots.removeLast()
            slots[index] = Slot(cookie: cookie, isRead: false, length: 0, buffer: nil)
            let op: VDiskPort.Op = type == NBD.cmdFlush ? .flush : (type == NBD.cmdTrim ? .trim : .writeZeroes)
            submit(index, op, offset: offset, length: Int(length), buffer: nil, fua: flags & NBD.cmdFlagFUA != 0, context: context)
        default:
            reply(context, cookie: cookie, error: NBD.eInval)
        }
        return true
    }

    private func submit(_ index: Int, _ op: VDiskPort.Op, offset: UInt64, length: Int, buffer: UnsafeMutableRawPointer?,
                        fua: Bool, context: ChannelHandlerContext)
    {
        do {
            inflight += 1
            try port!.submit(op, offset: offset, length: length, buffer: buffer, fua: fua, sink: sink, cookie: UInt64(index))
        } catch {
            inflight -= 1
            let code: UInt32 = error.code == ERANGE || error.code == EINVAL ? NBD.eInval : NBD.eIO
            if error.code == ERANGE || error.code == EINVAL { log("nbd: \(exportName): refused request at \(offset)+\(length): \(error)") }
            finishSlot(index)
            reply(context, cookie: slots[index].cookie, error: code)
        }
    }

    /// On the event loop: a request finished.
    fileprivate func completed(slot index: Int, result: Int64) {
        inflight -= 1
        let s = slots[index]
        guard let context, phase != .closing || context.channel.isActive else {
            finishSlot(index)
            if inflight == 0 { sink.owner = nil }
            return
        }
        if result < 0 {
            reply(context, cookie: s.cookie, error: result == -Int64(ENOSPC) ? NBD.eNoSpc : NBD.eIO)
        } else if s.isRead, let b = s.buffer {
            var out = context.channel.allocator.buffer(capacity: 16 + s.length)
            out.writeInteger(NBD.simpleReplyMagic)
            out.writeInteger(UInt32(0))
            out.writeInteger(s.cookie)
            out.writeBytes(UnsafeRawBufferPointer(start: b.pointer, count: s.length))
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
        } else {
            reply(context, cookie: s.cookie, error: 0)
        }
        finishSlot(index)
        // Requests that waited for a free slot may go now.
        if pending != nil { drain(context: context) }
    }

    private func finishSlot(_ index: Int) {
        if let b = slots[index].buffer { pool.handle.give(back: b) }
        slots[index] = Slot()
        freeSlots.append(index)
    }

    private func reply(_ context: ChannelHandlerContext, cookie: UInt64, error: UInt32) {
        var out = context.channel.allocator.buffer(capacity: 16)
        out.writeInteger(NBD.simpleReplyMagic)
        out.writeInteger(error)
        out.writeInteger(cookie)
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
    }

    private func drop(_ context: ChannelHandlerContext, _ why: String) {
        log("nbd: dropping client: \(why)")
        phase = .closing
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        phase = .closing
        context.close(promise: nil)
    }
}
