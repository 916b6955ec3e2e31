import Foundation
import NIOCore
import NIOPosix

/// Serves the domain's exported vdisks over NBD (SwiftNIO, one event loop): always on
/// a Unix socket, and on TCP when asked. Export name = vdisk name.
public final class NBDServer: @unchecked Sendable {
    private let group: MultiThreadedEventLoopGroup
    private var channels: [Channel] = []
    /// The loop's own engine when completions are reaped on the loop (`reapOnLoop`).
    private let loopReaper: NBDLoopReaper?
    let registry: NBDRegistry
    public let socketPath: String
    /// The TCP address actually bound (port 0 picks a free one), when listening on TCP.
    public private(set) var tcpAddress: String?

    public static let defaultMaxConnections = 64

    /// LUN requests the event loop has reaped itself (nil: completions go to the domain engine's reaper thread).
    public var completedOnLoop: UInt64? { loopReaper?.completed }

    /// - Parameter reapOnLoop: the event loop reaps the I/O it starts on an engine of its own
    ///   (one wake-up per request); false leaves completions to the domain engine's reaper thread.
    public init(domain: Domain, socketPath: String, tcpListen: String? = nil, maxConnections: Int = defaultMaxConnections,
                reapOnLoop: Bool = true, log: @escaping @Sendable (String) -> Void) throws(DomainError)
    {
        try Self.validate(maxConnections: maxConnections)
        let listen = try tcpListen.map { text throws(DomainError) in (text, try Self.parseListen(text)) }
        self.socketPath = socketPath
        registry = NBDRegistry(maxConnections: maxConnections)
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        if reapOnLoop {
            do { loopReaper = try NBDLoopReaper(loop: group.next(), log: log) } catch {
                try? group.syncShutdownGracefully()
                throw error
            }
        } else {
            loopReaper = nil
        }
        let registry = registry
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.so_keepalive), value: 1)
            // Large reads: a 1 MiB write arrives in a few syscalls, not sixteen.
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536,
                                                                                         maximum: NBD.maxPayload + 4096))
            .childChannelOption(.maxMessagesPerRead, value: 16)
            // Reply-side back-pressure: above 4 MiB unsent, the connection stops reading requests.
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 1 << 20, high: 4 << 20))
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if channel.localAddress?.protocol != .unix {
                        // Replies are gathered per event-loop turn already; don't let Nagle delay them.
                        try channel.syncOptions?.setOption(.socketOption(.tcp_nodelay), value: 1)
                    }
                    let handler = NBDConnection(domain: domain, registry: registry, eventLoop: channel.eventLoop,
                                                    allocator: channel.allocator, log: log)
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
        unlink(socketPath)
        do {
            channels.append(try UnixSocket.withOwnerOnlyFiles { try bootstrap.bind(unixDomainSocketPath: socketPath).wait() })
        } catch {
            stop()
            throw DomainError("NBD socket \(socketPath): \(error)")
        }
        if let (tcpListen, (host, port)) = listen {
            do {
                let channel = try bootstrap.bind(host: host, port: port).wait()
                channels.append(channel)
                tcpAddress = channel.localAddress.map { "\($0.ipAddress ?? host):\($0.port ?? port)" }
            } catch {
                stop()
                throw DomainError("--nbd-listen \(tcpListen): cannot listen: \(error)")
            }
        }
    }

    static func validate(maxConnections: Int) throws(DomainError) {
        guard maxConnections >= 1 else { throw DomainError("--nbd-max-connections \(maxConnections): must be at least 1") }
    }

    /// "PORT" (loopback), "HOST:PORT" or "[V6]:PORT".
    static func parseListen(_ text: String) throws(DomainError) -> (String, Int) {
        let bad = DomainError("--nbd-listen '\(text)': expected PORT or HOST:PORT (port 0..65535)")
        var host = "127.0.0.1", portText = Substring(text)
        if let colon = text.lastIndex(of: ":") {
            host = String(text[..<colon]).trimmingCharacters(in: CharacterSet(charactersIn: "[]"))
            portText = text[text.index(after: colon)...]
        }
        guard !host.isEmpty, let port = Int(portText), (0...65535).contains(port) else { throw bad }
        return (host, port)
    }

    /// Drops every client of `export` (it was unexported or its mode changed) and returns
    /// once they are gone with nothing in flight, so nothing more of theirs reaches the
    /// vdisk (at most `seconds`: a stuck request is not waited for longer); how many there were.
    public func dropConnections(export: String, seconds: Double = 10) async -> Int {
        let dropped = registry.closeConnections(export: export)
        let deadline = Date().addingTimeInterval(seconds)
        while registry.hasConnections(export: export), Date() < deadline { try? await Task.sleep(nanoseconds: 2_000_000) }
        return dropped
    }

    public func stop() {
        for c in channels { try? c.close().wait() }
        channels = []
        // Requests in flight complete on the event loop: close the clients, let them drain,
        // then stop the loop (a completion must never arrive at a loop that is gone).
        registry.closeAll()
        registry.waitUntilEmpty(timeoutSeconds: 10)
        loopReaper?.stop() // delivers what is left in flight, here, then releases the loop's engine
        try? group.syncShutdownGracefully()
        unlink(socketPath)
    }
}
