import Glibc
import IOEngine
import NIOCore
import NIOPosix
import Synchronization

/// The NBD event loop's own AIO engine, reaped on the loop (DESIGN.md's data path: I/O
/// completes on the loop that owns the connection). Chunks the scheduler dispatches on the
/// loop go to this engine (`EngineHandle.onThisThread`): the host requests the loop starts,
/// and any queued chunk, host or background, that a completion on the loop makes room for.
/// Every request signals the engine's eventfd, which NIO watches through a pipe channel,
/// and the loop reaps when it is readable. A request then costs one thread wake-up (the
/// loop's) where a reaper thread costs two: the reaper's, then the loop's to send the reply.
final class NBDLoopReaper: @unchecked Sendable {
    private struct State {
        var box: EngineBox?
        var completedAtStop: UInt64 = 0
    }

    private let state: Mutex<State>
    private let channel: Channel
    private let loop: EventLoop
    private let log: @Sendable (String) -> Void

    static let queueDepth = 1024
    /// How long `stop` waits for I/O still in flight before it gives the engine up.
    static let drainSeconds = 10.0

    init(loop: EventLoop, log: @escaping @Sendable (String) -> Void) throws(DomainError) {
        let engine: Engine
        do { engine = try Engine(queueDepth: Self.queueDepth, callerReaps: true) } catch {
            throw DomainError("NBD event loop engine: \(error)")
        }
        let box = EngineBox(engine)
        self.loop = loop
        self.log = log
        let handle = box.engine.handle
        let fd = dup(handle.notifyDescriptor!)
        guard fd >= 0 else { throw DomainError("NBD event loop engine: dup of its eventfd: \(String(cString: strerror(errno)))") }
        do {
            channel = try NIOPipeBootstrap(group: loop)
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ReapHandler(engine: handle, log: log))
                    }
                }
                .takingOwnershipOfDescriptor(input: fd).wait()
        } catch {
            close(fd) // still ours: NIO owns it only once the channel exists
            throw DomainError("NBD event loop engine: cannot watch its eventfd: \(error)")
        }
        state = Mutex(State(box: box))
        do { try loop.submit { EngineHandle.setOnThisThread(handle) }.wait() } catch {
            try? channel.close().wait()
            throw DomainError("NBD event loop engine: \(error)")
        }
    }

    /// LUN requests completed on the loop so far.
    var completed: UInt64 {
        state.withLock { $0.box?.engine.handle.stats.completed ?? $0.completedAtStop }
    }

    /// Stops routing the loop's I/O here, stops reaping on the loop, delivers what is still
    /// in flight on this thread (a chunk the loop dispatched may outlive every connection)
    /// and releases the engine. Requests that never complete (a stuck LUN) are not waited
    /// for beyond `drainSeconds`: the engine is then left behind, logged, so shutdown goes on.
    /// Call after the connections are gone, while the loop still runs.
    func stop() {
        guard state.withLock({ $0.box != nil }) else { return } // stopped already
        try? loop.submit { EngineHandle.setOnThisThread(nil) }.wait()
        try? channel.close().wait()
        guard let handle = state.withLock({ $0.box?.engine.handle }) else { return }
        let deadline = NanoClockDeadline(seconds: Self.drainSeconds)
        while handle.inflight > 0, !deadline.passed {
            handle.reap()
            if handle.inflight > 0 { usleep(1000) }
        }
        let stuck = handle.inflight
        let box = state.withLock { s -> EngineBox? in
            s.completedAtStop = handle.stats.completed
            defer { s.box = nil }
            return s.box
        }
        if stuck > 0, let box {
            log("NBD event loop engine: \(stuck) LUN request(s) still in flight after \(Int(Self.drainSeconds)) s; left behind so shutdown goes on")
            Self.abandoned.withLock { $0.append(box) }
        }
        // Otherwise the last reference goes here: the engine is destroyed with nothing in flight.
    }

    /// Engines with requests that never completed: kept, never destroyed (destroy would wait for them).
    private static let abandoned = Mutex<[EngineBox]>([])

    /// Reads the eventfd's count (NIO does the read) and reaps.
    private final class ReapHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        private let engine: EngineHandle
        private let log: @Sendable (String) -> Void
        private var retryScheduled = false
        private var closed = false

        init(engine: EngineHandle, log: @escaping @Sendable (String) -> Void) {
            self.engine = engine
            self.log = log
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) { reap(context.eventLoop) }

        func errorCaught(context: ChannelHandlerContext, error: Error) {
            log("NBD event loop engine: its eventfd failed: \(error)")
            context.close(promise: nil)
        }

        func handlerRemoved(context: ChannelHandlerContext) { closed = true }

        private func reap(_ loop: EventLoop) {
            guard !closed else { return } // a retry scheduled before `stop` closed the channel
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

/// A monotonic deadline (shutdown waits).
struct NanoClockDeadline {
    private let endNs: UInt64
    init(seconds: Double) { endNs = MonotonicClock().nowNs() + UInt64(seconds * 1e9) }
    var passed: Bool { MonotonicClock().nowNs() >= endNs }
}
