import NIOCore

/// Frames off the TLS stream (`ReplicationFrame.decode`: every header checked before its
/// payload is waited for). `version` is set once negotiation chose one.
final class ReplicationFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = ReplicationMessage
    var version: UInt16?

    func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        let version = version
        let decoded = try buffer.withUnsafeReadableBytes { bytes throws(ReplicationFrame.Malformed) in
            try ReplicationFrame.decode(bytes, version: version)
        }
        switch decoded {
        case .needMore:
            return .needMoreData
        case .frame(let message, let n):
            buffer.moveReaderIndex(forwardBy: n)
            context.fireChannelRead(wrapInboundOut(message))
            return .continue
        }
    }

    func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        if buffer.readableBytes > 0 { throw ReplicationFrame.Malformed("truncated: the connection closed inside a frame (\(buffer.readableBytes) byte(s))") }
        return .needMoreData
    }
}

extension ChannelHandlerContext {
    /// Sends one frame.
    func send(_ message: ReplicationMessage, version: UInt16 = 1) {
        let bytes = ReplicationFrame.encode(message, version: version)
        writeAndFlush(NIOAny(channel.allocator.buffer(bytes: bytes)), promise: nil)
    }
}
