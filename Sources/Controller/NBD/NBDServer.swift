import Foundation
import NIOCore
import NIOPosix

/// Serves the domain's vdisks over NBD on a Unix socket (SwiftNIO), export name = vdisk name.
public final class NBDServer: @unchecked Sendable {
    private let group: MultiThreadedEventLoopGroup
    private var channel: Channel?
    public let socketPath: String

    public init(domain: Domain, socketPath: String, log: @escaping @Sendable (String) -> Void) throws(DomainError) {
        self.socketPath = socketPath
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        unlink(socketPath)
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .childChannelOption(.socketOption(.so_keepalive), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handler = try NBDConnection(domain: domain, eventLoop: channel.eventLoop, log: log)
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
        do {
            channel = try bootstrap.bind(unixDomainSocketPath: socketPath).wait()
            chmod(socketPath, 0o600)
        } catch {
            try? group.syncShutdownGracefully()
            throw DomainError("NBD socket \(socketPath): \(error)")
        }
    }

    public func stop() {
        try? channel?.close().wait()
        try? group.syncShutdownGracefully()
        unlink(socketPath)
    }
}
