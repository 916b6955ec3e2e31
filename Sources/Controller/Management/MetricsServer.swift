import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix

/// The Prometheus endpoint: `GET /metrics` on HOST:PORT, served without blocking
/// (SwiftNIO's HTTP/1 codec, one event loop). It may face the network when bound off
/// loopback, so a client that does not finish its request within `readDeadline` is
/// dropped, request heads are bounded by the codec (80 KiB), bodies are refused, and
/// each connection answers one request and closes.
final class MetricsServer: @unchecked Sendable {
    static let readDeadline = TimeAmount.seconds(10)

    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let channel: Channel

    /// Listens on `hostPort` ("127.0.0.1:9464"; IPv4).
    init(hostPort: String, render: @escaping @Sendable () -> [UInt8]) throws(DomainError) {
        let parts = hostPort.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let port = UInt16(parts[1]) else {
            throw DomainError("--metrics-listen '\(hostPort)': expected HOST:PORT (e.g. 127.0.0.1:9464)")
        }
        let host = parts[0].isEmpty ? "127.0.0.1" : String(parts[0])
        var probe = in_addr()
        guard inet_pton(AF_INET, host, &probe) == 1 else {
            throw DomainError("--metrics-listen '\(hostPort)': '\(host)' is not an IPv4 address")
        }
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 16)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let ops = channel.pipeline.syncOperations
                    try ops.addHandler(IdleStateHandler(readTimeout: Self.readDeadline))
                    try ops.configureHTTPServerPipeline(withPipeliningAssistance: false, withErrorHandling: true)
                    try ops.addHandler(MetricsHandler(render: render))
                }
            }
        do {
            channel = try bootstrap.bind(host: host, port: Int(port)).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw DomainError("--metrics-listen \(hostPort): \(error)")
        }
    }

    func stop() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}

/// Answers one GET with the exposition text (404 for other paths, 405 for other methods).
private final class MetricsHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let render: @Sendable () -> [UInt8]
    private var head: HTTPRequestHead?
    private var answered = false

    init(render: @escaping @Sendable () -> [UInt8]) { self.render = render }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break // a GET has none; whatever comes is not kept
        case .end:
            guard let head, !answered else { return }
            answered = true
            let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
            if head.method != .GET {
                respond(context, .methodNotAllowed, Array("only GET /metrics is served\n".utf8))
            } else if path == "/metrics" || path == "/" {
                respond(context, .ok, render())
            } else {
                respond(context, .notFound, Array("only GET /metrics is served\n".utf8))
            }
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent { context.close(promise: nil) } else { context.fireUserInboundEventTriggered(event) }
    }

    private func respond(_ context: ChannelHandlerContext, _ status: HTTPResponseStatus, _ body: [UInt8]) {
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "text/plain; version=0.0.4")
        headers.add(name: "Content-Length", value: "\(body.count)")
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }
}
