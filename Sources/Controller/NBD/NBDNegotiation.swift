import NIOCore

/// Fixed-newstyle negotiation: NBD_OPT_GO/INFO/LIST/ABORT/EXPORT_NAME,
/// STRUCTURED_REPLY and the base:allocation meta context. Runs once per connection,
/// so it may allocate freely.
extension NBDConnection {
    /// Handles every complete negotiation message buffered in `pending`.
    /// Stops while the client is not reading the replies (the channel is above its high
    /// water mark): a client streaming options it never reads the answers to cannot make
    /// us queue without bound; the rest waits in `pending` and no more is read meanwhile.
    func negotiate(context: ChannelHandlerContext) {
        while phase == .clientFlags || phase == .options, context.channel.isWritable, var buffer = pending {
            let before = buffer.readerIndex
            let progressed = negotiationStep(&buffer, context: context)
            pending = buffer.readableBytes > 0 ? buffer : nil
            if !progressed || buffer.readerIndex == before { break }
        }
        if let p = pending, p.readerIndex > 0 { pending!.discardReadBytes() }
    }

    /// Consumes one message if complete; false when more bytes are needed (or the client was dropped).
    private func negotiationStep(_ buffer: inout ByteBuffer, context: ChannelHandlerContext) -> Bool {
        if phase == .clientFlags {
            guard let flags: UInt32 = buffer.readInteger() else { return false }
            if flags & UInt32(NBD.flagFixedNewstyle) == 0 || flags & ~(UInt32(NBD.flagFixedNewstyle) | NBD.clientFlagNoZeroes) != 0 {
                drop(context, "client flags 0x\(String(flags, radix: 16)): fixed newstyle required, no unknown flags")
                return false
            }
            clientNoZeroes = flags & NBD.clientFlagNoZeroes != 0
            phase = .options
            return true
        }
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
        context.flush()
        return true
    }

    private func optionReply(_ context: ChannelHandlerContext, _ option: UInt32, _ type: UInt32, _ body: ByteBuffer? = nil) {
        var out = context.channel.allocator.buffer(capacity: 20 + (body?.readableBytes ?? 0))
        out.writeInteger(NBD.optReplyMagic)
        out.writeInteger(option)
        out.writeInteger(type)
        out.writeInteger(UInt32(body?.readableBytes ?? 0))
        if var body { out.writeBuffer(&body) }
        context.write(wrapOutboundOut(out), promise: nil)
    }

    /// The vdisk behind an export name, when it exists and is exported.
    private func exported(_ name: String) -> VDiskRecord? {
        guard let v = domain.metadata.vdisk(named: name), v.export != nil else { return nil }
        return v
    }

    private func transmissionFlags(_ v: VDiskRecord) -> UInt16 {
        // Multi-conn: a FLUSH reaches every leg's LUNs, so it covers writes completed on any connection.
        var flags = NBD.tflagHasFlags | NBD.tflagSendFlush | NBD.tflagSendFUA | NBD.tflagCanMultiConn
        if v.export == .readOnly {
            flags |= NBD.tflagReadOnly
        } else {
            flags |= NBD.tflagSendTrim | NBD.tflagSendWriteZeroes
        }
        return flags
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
            guard payload.readableBytes == 0 else { return optionReply(context, option, NBD.repErrInvalid) }
            for v in domain.metadata.vdisks where v.export != nil {
                var body = context.channel.allocator.buffer(capacity: 4 + v.name.utf8.count)
                body.writeInteger(UInt32(v.name.utf8.count))
                body.writeString(v.name)
                optionReply(context, option, NBD.repServer, body)
            }
            optionReply(context, option, NBD.repAck)
        case NBD.optStructuredReply:
            guard payload.readableBytes == 0 else { return optionReply(context, option, NBD.repErrInvalid) }
            structuredReplies = true
            optionReply(context, option, NBD.repAck)
        case NBD.optListMetaContext, NBD.optSetMetaContext:
            metaContext(option, &payload, context: context)
        case NBD.optExportName:
            let name = payload.readString(length: payload.readableBytes) ?? ""
            guard let v = exported(name), let port = try? domain.exportPort(for: name) else {
                // This option has no error reply: the protocol's answer is to disconnect.
                drop(context, "EXPORT_NAME for unknown or unexported \(NBDClientText.escaped(name))")
                return
            }
            var out = context.channel.allocator.buffer(capacity: 134)
            out.writeInteger(v.sizeBytes)
            out.writeInteger(transmissionFlags(v))
            if !clientNoZeroes { out.writeRepeatingByte(0, count: 124) }
            context.write(wrapOutboundOut(out), promise: nil)
            enterTransmission(v, port: port)
        case NBD.optInfo, NBD.optGo:
            guard let nameLength: UInt32 = payload.readInteger(), nameLength <= 4096,
                  let name = payload.readString(length: Int(nameLength)), let requests: UInt16 = payload.readInteger(),
                  payload.readableBytes == Int(requests) * 2
            else {
                return optionReply(context, option, NBD.repErrInvalid)
            }
            guard let v = exported(name), let port = try? domain.exportPort(for: name) else {
                if let line = registry.unknownExportLog.admit("\(who): asked for unknown or unexported export \(NBDClientText.escaped(name))") {
                    log(line)
                }
                return optionReply(context, option, NBD.repErrUnknown)
            }
            var export = context.channel.allocator.buffer(capacity: 12)
            export.writeInteger(NBD.infoExport)
            export.writeInteger(v.sizeBytes)
            export.writeInteger(transmissionFlags(v))
            optionReply(context, option, NBD.repInfo, export)
            var sizes = context.channel.allocator.buffer(capacity: 14)
            sizes.writeInteger(NBD.infoBlockSize)
            sizes.writeInteger(UInt32(v.blockSize))
            let preferred = domain.metadata.pool(id: v.poolId).flatMap { domain.profiles.arrays[$0.arrayProfile]?.optimalIOBytes } ?? 65536
            // Preferred must be a power of two: the largest one within the profile's optimal I/O size.
            let bounded = min(max(preferred, UInt64(v.blockSize)), UInt64(NBD.maxPayload))
            sizes.writeInteger(UInt32(1) << (63 - bounded.leadingZeroBitCount))
            sizes.writeInteger(UInt32(NBD.maxPayload))
            optionReply(context, option, NBD.repInfo, sizes)
            optionReply(context, option, NBD.repAck)
            if option == NBD.optGo { enterTransmission(v, port: port) }
        default:
            optionReply(context, option, NBD.repErrUnsup)
        }
    }

    /// NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT: the only context is base:allocation.
    private func metaContext(_ option: UInt32, _ payload: inout ByteBuffer, context: ChannelHandlerContext) {
        if option == NBD.optSetMetaContext { metaContextExport = nil } // a failed SET selects nothing
        guard let nameLength: UInt32 = payload.readInteger(), nameLength <= 4096,
              let name = payload.readString(length: Int(nameLength)), let count: UInt32 = payload.readInteger(), count <= 256
        else { return optionReply(context, option, NBD.repErrInvalid) }
        var queries: [String] = []
        for _ in 0..<count {
            guard let n: UInt32 = payload.readInteger(), n <= 4096, let q = payload.readString(length: Int(n)) else {
                return optionReply(context, option, NBD.repErrInvalid)
            }
            queries.append(q)
        }
        guard payload.readableBytes == 0 else { return optionReply(context, option, NBD.repErrInvalid) }
        if option == NBD.optSetMetaContext, !structuredReplies {
            return optionReply(context, option, NBD.repErrInvalid)
        }
        guard exported(name) != nil else { return optionReply(context, option, NBD.repErrUnknown) }
        let listing = option == NBD.optListMetaContext
        let selected = queries.contains(NBD.baseAllocation) || (listing && (queries.isEmpty || queries.contains("base:")))
        if selected {
            var body = context.channel.allocator.buffer(capacity: 4 + NBD.baseAllocation.utf8.count)
            body.writeInteger(NBD.baseAllocationId)
            body.writeString(NBD.baseAllocation)
            optionReply(context, option, NBD.repMetaContext, body)
        }
        if !listing { metaContextExport = selected ? name : nil }
        optionReply(context, option, NBD.repAck)
    }

    private func enterTransmission(_ v: VDiskRecord, port: VDiskPort) {
        if buffers == nil {
            do {
                buffers = try PayloadBuffers()
            } catch {
                log("\(who): no memory for payload buffers: \(error)")
                phase = .closing
                context?.close(promise: nil)
                return
            }
        }
        self.port = port
        exportName = v.name
        readOnly = v.export == .readOnly
        exportBytes = v.sizeBytes
        blockBytes = UInt64(v.blockSize)
        allocationContext = structuredReplies && metaContextExport == v.name
        if let stats { registry.attach(stats.id, export: v.name) }
        phase = .transmission
        // An unexport (or a change of mode) that raced with this negotiation closes us here.
        if domain.metadata.vdisk(named: v.name)?.export != v.export { context?.close(promise: nil) }
    }
}
