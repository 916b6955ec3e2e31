import CIOCore

/// Receives completions on the engine's reaper thread. Subclass it once per
/// owner (a benchmark, a mirror, a front end) and tell requests apart by their
/// cookie: the hot path then allocates nothing per I/O.
/// `result` is the byte count (or 0 for a flush) when ≥ 0, else -errno.
open class CompletionSink: @unchecked Sendable {
    public init() {}
    open func ioCompleted(cookie: UInt64, result: Int64) {}
    /// Called after each batch of completions, before the engine submits what they staged.
    open func batchCompleted() {}
}

/// The one C callback every request uses: recover the sink (retained at prep) and call it.
private let completionTrampoline: cio_completion_fn = { ctx, cookie, result in
    let sink = Unmanaged<CompletionSink>.fromOpaque(ctx!).takeRetainedValue()
    sink.ioCompleted(cookie: cookie, result: result)
}

/// The reaper's polling budget when none is given (CIOCore's CIO_POLL_DEFAULT_US).
public let defaultPollMicroseconds = Int(CIO_POLL_DEFAULT_US)
/// The most polling budget an engine takes (CIO_POLL_MAX_US).
public let maxPollMicroseconds = Int(CIO_POLL_MAX_US)

/// Owner of a Linux AIO engine (io_setup context, eventfd, reaper thread).
/// `deinit` stops new requests, delivers every completion of those in flight,
/// then releases the context.
///
/// An engine made with `callerReaps` has no reaper thread: its owner (an event
/// loop) watches `notifyDescriptor` and calls `reap()` when it is readable, so
/// the I/O the loop starts completes on the loop, one thread wake-up per request.
public struct Engine: ~Copyable, @unchecked Sendable {
    public let handle: EngineHandle

    /// - Parameter reapBatch: completions handled before the reaper submits again (nil: CIOCore's default, 2).
    /// - Parameter pollMaxMicroseconds: how long the reaper polls for a completion at low depth before it
    ///   sleeps (nil: CIOCore's default, `defaultPollMicroseconds`; 0: never poll).
    /// - Parameter callerReaps: no reaper thread; the owner reaps (see above).
    public init(queueDepth: Int, reapBatch: Int? = nil, pollMaxMicroseconds: Int? = nil, callerReaps: Bool = false)
        throws(IOError)
    {
        var opts = cio_engine_opts()
        cio_engine_opts_init(&opts)
        opts.queue_depth = UInt32(clamping: queueDepth)
        opts.caller_reaps = callerReaps
        if let reapBatch { opts.reap_batch = UInt32(clamping: reapBatch) }
        if let pollMaxMicroseconds { opts.poll_max_us = UInt32(clamping: pollMaxMicroseconds) }
        var raw: OpaquePointer?
        let rc = cio_engine_create(&opts, &raw)
        guard rc == 0, let raw else { throw IOError(result: rc, operation: .engineCreate) }
        handle = EngineHandle(raw: raw)
    }

    deinit { cio_engine_destroy(handle.raw) }
}

/// A copyable view of an engine, valid while its `Engine` owner lives; safe to
/// use from any thread, including completion callbacks.
public struct EngineHandle: Equatable, @unchecked Sendable {
    let raw: OpaquePointer

    public var queueDepth: Int { Int(cio_engine_queue_depth(raw)) }

    /// The engine this thread stages its I/O on, when it reaps one itself (an event
    /// loop; see `Engine(callerReaps:)`), else nil. Set on the thread, before its first I/O.
    public static var onThisThread: EngineHandle? {
        cio_engine_thread_engine().map { EngineHandle(raw: $0) }
    }

    /// Where I/O staged on this thread goes: this thread's own engine (`onThisThread`), else this one.
    @inline(__always)
    public var forThisThread: EngineHandle { Self.onThisThread ?? self }

    /// True on this engine's reaper thread, where the engine submits what callbacks stage.
    public var isReaperThread: Bool { cio_engine_is_reaper_thread(raw) }

    /// Makes `engine` (or none) this thread's engine for `onThisThread`.
    public static func setOnThisThread(_ engine: EngineHandle?) { cio_engine_set_thread_engine(engine?.raw) }

    /// For an engine its owner reaps: the descriptor that becomes readable when there is
    /// something to reap (owned by the engine: watch a dup of it). nil for a reaper-thread engine.
    public var notifyDescriptor: Int32? {
        let fd = cio_engine_notify_fd(raw)
        return fd >= 0 ? fd : nil
    }

    /// For an engine its owner reaps: runs what completed on this thread and submits what the
    /// callbacks staged, without waiting. `retrySoon`: staged requests wait for room in the
    /// kernel; call again in about a millisecond. Never from inside a completion.
    @discardableResult
    public func reap() -> (delivered: Int, retrySoon: Bool) {
        var retry = false
        let n = cio_engine_reap(raw, &retry)
        return (max(0, Int(n)), retry)
    }

    /// Stages a read into `buffer` (aligned memory you own until completion).
    /// On success the sink gets exactly one `ioCompleted`; on a thrown error never.
    @inline(__always)
    public func prepRead(lun: LUNHandle, buffer: UnsafeMutableRawPointer, length: Int, offset: UInt64,
                         sink: CompletionSink, cookie: UInt64) throws(IOError) {
        let ctx = Unmanaged.passRetained(sink)
        let rc = cio_engine_prep_read(raw, lun.raw, buffer, UInt64(length), offset, completionTrampoline,
                                      ctx.toOpaque(), cookie)
        if rc != 0 {
            ctx.release()
            throw IOError(result: rc, operation: .read, lun: lun.path, offset: offset)
        }
    }

    /// Stages a write; `fua` makes it durable before it completes.
    @inline(__always)
    public func prepWrite(lun: LUNHandle, buffer: UnsafeRawPointer, length: Int, offset: UInt64, fua: Bool = false,
                          sink: CompletionSink, cookie: UInt64) throws(IOError) {
        let ctx = Unmanaged.passRetained(sink)
        let rc = cio_engine_prep_write(raw, lun.raw, buffer, UInt64(length), offset, fua, completionTrampoline,
                                       ctx.toOpaque(), cookie)
        if rc != 0 {
            ctx.release()
            throw IOError(result: rc, operation: .write, lun: lun.path, offset: offset)
        }
    }

    /// Stages a flush of the LUN's volatile caches.
    public func prepFlush(lun: LUNHandle, sink: CompletionSink, cookie: UInt64) throws(IOError) {
        let ctx = Unmanaged.passRetained(sink)
        let rc = cio_engine_prep_flush(raw, lun.raw, completionTrampoline, ctx.toOpaque(), cookie)
        if rc != 0 {
            ctx.release()
            throw IOError(result: rc, operation: .flush, lun: lun.path)
        }
    }

    /// Hands staged requests to the kernel. Inside a completion callback there is
    /// no need: the engine submits after each batch.
    @discardableResult
    public func submit() -> Int { Int(cio_engine_submit(raw)) }

    public var inflight: Int { Int(cio_engine_inflight(raw)) }

    public var stats: cio_engine_stats {
        var s = cio_engine_stats()
        cio_engine_get_stats(raw, &s)
        return s
    }
}
