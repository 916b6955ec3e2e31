import Foundation
import Logging
import NIOCore
import NIOPosix

/// The management socket, served without blocking (SwiftNIO, one event loop): each
/// connection sends one JSON request line and gets one response line, then is closed.
/// A client that does not finish its request within `readDeadline`, or sends more than
/// `MgmtLimits.maxMessageBytes` without a newline, is dropped (logged); an idle or slow
/// client never delays another. Commands are counted from their first byte to their
/// reply, so shutdown waits for those being read or run, not for idle connections.
final class MgmtServer: @unchecked Sendable {
    static let readDeadline = TimeAmount.seconds(10)

    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let channel: Channel

    init(socketPath: String, running: RunningCommands, logger: Logger,
         handle: @escaping @Sendable (MgmtRequest) async -> MgmtResponse) throws(DomainError)
    {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: Self.readDeadline))
                    try channel.pipeline.syncOperations.addHandler(
                        MgmtConnection(running: running, logger: logger, handle: handle))
                }
            }
        unlink(socketPath)
        do {
            channel = try UnixSocket.withOwnerOnlyFiles { try bootstrap.bind(unixDomainSocketPath: socketPath).wait() }
        } catch {
            try? group.syncShutdownGracefully()
            throw DomainError("\(socketPath): cannot listen: \(error)")
        }
    }

    /// Stops accepting; connections already open finish on their own.
    func stopAccepting() { try? channel.close().wait() }

    /// After the running commands have answered.
    func shutdown() { try? group.syncShutdownGracefully() }
}

/// One management connection: reads a bounded request line, runs it, answers, closes.
private final class MgmtConnection: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum Phase { case idle, reading, running, done }
    private var phase = Phase.idle
    private var request = ByteBuffer()
    private let running: RunningCommands
    private let logger: Logger
    private let handle: @Sendable (MgmtRequest) async -> MgmtResponse

    init(running: RunningCommands, logger: Logger, handle: @escaping @Sendable (MgmtRequest) async -> MgmtResponse) {
        self.running = running
        self.logger = logger
        self.handle = handle
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        switch phase {
        case .running, .done: return // one request per connection: the rest is ignored
        case .idle:
            guard running.tryEnter() else {
                phase = .done
                reply(context.channel, .failure("the daemon is stopping"))
                return
            }
            phase = .reading
        case .reading: break
        }
        let newline = bytes.readableBytesView.firstIndex(of: UInt8(ascii: "\n"))
        let take = newline.map { $0 - bytes.readerIndex } ?? bytes.readableBytes
        guard request.readableBytes + take <= MgmtLimits.maxMessageBytes else {
            logger.warning("management: dropped a request over \(MgmtLimits.maxMessageBytes) bytes")
            finish(context.channel, nil)
            return
        }
        if var slice = bytes.readSlice(length: take) { request.writeBuffer(&slice) }
        guard newline != nil else { return }
        phase = .running
        let line = Data(request.readableBytesView)
        let (handle, logger) = (self.handle, self.logger)
        let loop = context.eventLoop
        let channel = context.channel
        let box = NIOLoopBound(self, eventLoop: loop)
        Task {
            let response: MgmtResponse
            if let request = try? JSONDecoder().decode(MgmtRequest.self, from: line) {
                response = await handle(request)
                if !response.ok { logger.notice("\(request.command): \(response.error ?? "")") }
            } else {
                response = .failure("malformed management request")
                logger.warning("management: malformed request")
            }
            loop.execute { box.value.finish(channel, response) }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read, phase == .idle || phase == .reading else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        logger.warning("management: dropped a client that sent no complete request within \(MgmtServer.readDeadline.nanoseconds / 1_000_000_000) s")
        finish(context.channel, nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        // A client gone mid-request: nothing to run. One being run still answers into the void.
        if phase == .reading { finish(context.channel, nil) }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if phase != .running && phase != .done { finish(context.channel, nil) }
    }

    /// Answers (when there is an answer), closes, and stops counting the command. Runs
    /// on the channel's loop; a channel already closed just drops the answer.
    private func finish(_ channel: Channel, _ response: MgmtResponse?) {
        let counted = phase == .reading || phase == .running
        phase = .done
        if let response { reply(channel, response) } else { channel.close(promise: nil) }
        if counted { running.leave() }
    }

    private func reply(_ channel: Channel, _ response: MgmtResponse) {
        var data = (try? JSONEncoder().encode(response)) ?? Data()
        data.append(UInt8(ascii: "\n"))
        channel.writeAndFlush(channel.allocator.buffer(bytes: data)).whenComplete { _ in channel.close(promise: nil) }
    }
}
