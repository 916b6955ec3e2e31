import NIOCore

/// Transmission replies, simple or structured (when the client negotiated
/// NBD_OPT_STRUCTURED_REPLY), gathered in the connection's outbox.
extension NBDConnection {
    /// Writes what the outbox holds with one flush. Clearing right after the flush reuses
    /// the same storage when the socket took everything (the usual case); only when the
    /// client reads slower than we reply does NIO still hold it and a new one is made.
    func flushOutbox(_ context: ChannelHandlerContext) {
        guard outbox.readableBytes > 0 else { return }
        context.writeAndFlush(wrapOutboundOut(outbox), promise: nil)
        outbox.clear()
    }

    private func chunkHeader(cookie: UInt64, type: UInt16, length: Int) {
        outbox.writeInteger(NBD.structuredReplyMagic)
        outbox.writeInteger(NBD.replyFlagDone)
        outbox.writeInteger(type)
        outbox.writeInteger(cookie)
        outbox.writeInteger(UInt32(length))
    }

    private func simpleHeader(cookie: UInt64, error: UInt32) {
        outbox.writeInteger(NBD.simpleReplyMagic)
        outbox.writeInteger(error)
        outbox.writeInteger(cookie)
    }

    func appendDone(cookie: UInt64) {
        if structuredReplies {
            chunkHeader(cookie: cookie, type: NBD.replyTypeNone, length: 0)
        } else {
            simpleHeader(cookie: cookie, error: 0)
        }
    }

    func appendError(cookie: UInt64, error: UInt32) {
        if structuredReplies {
            chunkHeader(cookie: cookie, type: NBD.replyTypeError, length: 6)
            outbox.writeInteger(error)
            outbox.writeInteger(UInt16(0)) // no message
        } else {
            simpleHeader(cookie: cookie, error: error)
        }
    }

    /// The one copy of a read's data: aligned pool buffer -> reply buffer.
    func appendReadData(cookie: UInt64, offset: UInt64, from pointer: UnsafeMutableRawPointer, length: Int) {
        if structuredReplies {
            chunkHeader(cookie: cookie, type: NBD.replyTypeOffsetData, length: 8 + length)
            outbox.writeInteger(offset)
        } else {
            simpleHeader(cookie: cookie, error: 0)
        }
        outbox.writeBytes(UnsafeRawBufferPointer(start: pointer, count: length))
    }

    /// base:allocation for [offset, offset+length): thin extents never written are
    /// holes that read as zeros; everything else is data. One descriptor per run.
    func appendBlockStatus(cookie: UInt64, offset: UInt64, length: UInt64, one: Bool) {
        var runs: [(length: UInt32, flags: UInt32)] = []
        let end = offset + length
        let m = domain.metadata
        if let v = m.vdisk(named: exportName), v.thin, let route = domain.route(v.legs[0], in: m) {
            var at = offset
            while at < end, runs.count < (one ? 1 : 256) {
                // Pieces of one kind (mapped or not) merge into one descriptor.
                guard let (place, n) = try? route.piece(at: at, length: Int(min(end - at, 1 << 30))) else { break }
                let flags = place == nil ? NBD.stateHole | NBD.stateZero : 0
                if let last = runs.last, last.flags == flags, UInt64(last.length) + UInt64(n) <= UInt64(UInt32.max) {
                    runs[runs.count - 1].length += UInt32(n)
                } else {
                    runs.append((UInt32(n), flags))
                }
                at += UInt64(n)
            }
            if runs.isEmpty { runs.append((UInt32(length), 0)) }
        } else {
            runs.append((UInt32(length), 0))
        }
        chunkHeader(cookie: cookie, type: NBD.replyTypeBlockStatus, length: 4 + 8 * runs.count)
        outbox.writeInteger(NBD.baseAllocationId)
        for r in runs {
            outbox.writeInteger(r.length)
            outbox.writeInteger(r.flags)
        }
    }
}
