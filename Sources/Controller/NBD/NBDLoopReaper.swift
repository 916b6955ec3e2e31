import Glibc
import IOEngine
import NIOCore
import NIOPosix

/// The NBD event loop's own AIO engine, reaped on the loop (DESIGN.md's data path: I/O
/// completes on the loop that owns the connection). Chunks the loop dispatches go to this
/// engine (`EngineHandle.onThisThread`); every request signals its eventfd, which NIO
/// watches through a pipe channel, and the loop reaps when it is readable. A request then
/// costs one thread wake-up (the loop's) where a reaper thread costs two: the reaper's,
/// then the loop's to send the reply.
final class NBDLoopReaper: @unchecked Sendable {
    private let box: EngineBox
    private let channel: Channel
    private let loop: EventLoop

    static let queueDepth = 1024

    /// Requests of the loop's I/O completed on the loop so far.
    var completed: UInt64 { box.engine.handle.stats.completed }

    init(loop: EventLoop) throws(DomainError) {
        let engine: Engine
        do { engine = try Engine(queueDepth: Self.queueDepth, callerReaps: true) } catch {
            throw DomainError("NBD event loop engine: \(error)")
        }
        box = EngineBox(engine)
        self.loop = loop
        let handle = box.engine.handle
        let fd = dup(handle.notifyDescriptor!)
        guard fd >= 0 else { throw DomainError("NBD event loop engine: dup of its eventfd: \(String(cString: strerror(errno)))") }
        do {
            channel = try NIOPipeBootstrap(group: loop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ReapHandler(engine: handle))
                    }
                }
                .takingOwnershipOfDescriptor(input: fd).wait()
            try loop.submit { EngineHandle.setOnThisThread(handle) }.wait()
        } catch {
            close(fd)
            throw DomainError("NBD event loop engine: cannot watch its eventfd: \(error)")
        }
    }

    /// Stops routing the loop's I/O here and delivers what is still in flight on this
    /// thread (a background chunk the loop dispatched may outlive every connection).
    /// Call after the connections are gone, before the loop shuts down.
    func stop() {
        try? loop.submit { EngineHandle.setOnThisThread(nil) }.wait()
        try? channel.close().wait()
    }

    /// Reads the eventfd's count (NIO does the read) and reaps.
    private final class ReapHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        private let engine: EngineHandle
        private var retryScheduled = false

        init(engine: EngineHandle) { self.engine = engine }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) { reap(context.eventLoop) }

        private func reap(_ loop: EventLoop) {
            let (_, retrySoon) = engine.reap()
            // Staged requests the kernel had no room for: no completion will signal us for them.
            guard retrySoon, !retryScheduled else { return }
            retryScheduled = true
            let bound = NIOLoopBound(self, eventLoop: loop)
            loop.scheduleTask(in: .milliseconds(1)) {
                bound.value.retryScheduled = false
                bound.value.reap(loop)
            }
        }
    }
}
