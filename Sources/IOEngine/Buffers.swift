import CIOCore

/// Owner of one aligned allocation (control-plane use: labels, metadata, tests).
public struct AlignedBuffer: ~Copyable, @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let count: Int

    public init(count: Int, alignment: Int = 4096) throws(IOError) {
        var p: UnsafeMutableRawPointer?
        let rc = cio_aligned_alloc(count, alignment, &p)
        guard rc == 0, let p else { throw IOError(result: rc, operation: .bufferAllocate) }
        pointer = p
        self.count = count
    }

    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: pointer, count: count) }

    deinit { cio_aligned_free(pointer) }
}

/// Owner of a pool of equal aligned buffers allocated once; taking and returning
/// buffers never allocates. Thread-safe. Free it only when no I/O uses its buffers.
public struct BufferPool: ~Copyable, @unchecked Sendable {
    public let handle: BufferPoolHandle

    public init(bufferBytes: Int, count: Int, alignment: Int = 4096) throws(IOError) {
        var raw: OpaquePointer?
        let rc = cio_bufpool_create(bufferBytes, UInt32(clamping: count), alignment, &raw)
        guard rc == 0, let raw else { throw IOError(result: rc, operation: .bufferAllocate) }
        handle = BufferPoolHandle(raw: raw, bufferBytes: bufferBytes, count: count)
    }

    deinit { cio_bufpool_destroy(handle.raw) }
}

/// A buffer taken from a pool: its index (to give it back) and its memory.
public struct PooledBuffer: @unchecked Sendable {
    public let index: UInt32
    public let pointer: UnsafeMutableRawPointer
    public let count: Int
    public var bytes: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(start: pointer, count: count) }
}

/// Copyable view of a `BufferPool`, valid while the pool lives.
public struct BufferPoolHandle: @unchecked Sendable {
    let raw: OpaquePointer
    public let bufferBytes: Int
    public let count: Int

    /// A free buffer, or nil when all are in use.
    public func take() -> PooledBuffer? {
        var index: UInt32 = 0
        var data: UnsafeMutableRawPointer?
        guard cio_bufpool_get(raw, &index, &data) == 0, let data else { return nil }
        return PooledBuffer(index: index, pointer: data, count: bufferBytes)
    }

    public func give(back buffer: PooledBuffer) {
        let rc = cio_bufpool_put(raw, buffer.index)
        precondition(rc == 0, "buffer \(buffer.index) returned twice or to the wrong pool")
    }

    /// Buffer `index` without taking it (for callers that manage indices themselves).
    public func buffer(at index: Int) -> PooledBuffer {
        precondition(index >= 0 && index < count, "buffer index \(index) out of range 0..<\(count)")
        return PooledBuffer(index: UInt32(index), pointer: cio_bufpool_data(raw, UInt32(index))!, count: bufferBytes)
    }

    public var freeCount: Int { Int(cio_bufpool_free_count(raw)) }
}
