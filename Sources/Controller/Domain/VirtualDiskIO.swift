import Foundation
import IOEngine

/// One-shot sink resuming a continuation (control-plane data path).
private final class ResultSink: CompletionSink, @unchecked Sendable {
    private let continuation: CheckedContinuation<Int64, Never>
    init(_ c: CheckedContinuation<Int64, Never>) { continuation = c }
    override func ioCompleted(cookie: UInt64, result: Int64) { continuation.resume(returning: result) }
}

/// The data access API: read, write (FUA), flush, trim and write-zeroes at byte
/// offsets of a vdisk, checked for block alignment and range, mapped through the
/// extent map onto the pool's LUNs and sent through the pool's scheduler.
/// Buffers must be aligned to 4096 (use `AlignedBuffer` or a `BufferPool`).
///
/// This is the async control-plane form (it allocates a continuation per piece);
/// the allocation-free callback form for front ends is still to come.
extension Domain {
    public enum DataOp: Sendable { case read, write }

    private func checkRange(_ v: VDiskRecord, offset: UInt64, length: Int) throws(DomainError) {
        let bs = UInt64(v.blockSize)
        guard length > 0, offset % bs == 0, UInt64(length) % bs == 0 else {
            throw DomainError("vdisk '\(v.name)': offset \(offset) and length \(length) must be multiples of its block size \(v.blockSize)")
        }
        guard offset <= v.sizeBytes, UInt64(length) <= v.sizeBytes - offset else {
            throw DomainError("vdisk '\(v.name)': range \(offset)+\(length) lies beyond its size \(v.sizeBytes)")
        }
    }

    /// Reads `length` bytes at `offset` into `buffer`; unallocated (thin) extents read as zeros.
    public func read(vdisk name: String, offset: UInt64, length: Int, into buffer: UnsafeMutableRawPointer) async throws(DomainError) {
        guard let v = metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        try checkRange(v, offset: offset, length: length)
        let start = DispatchTime.now().uptimeNanoseconds
        defer { metrics.recordVDisk(name, op: "read", bytes: length, latencyNs: DispatchTime.now().uptimeNanoseconds - start) }
        try await forEachPiece(v, offset: offset, length: length) { (ref, lunOffset, bufferOffset, pieceLength) throws(DomainError) in
            guard let ref else {
                memset(buffer + bufferOffset, 0, pieceLength)
                return
            }
            try await self.submit(.read, pool: v.poolId, ref: ref, lunOffset: lunOffset, buffer: buffer + bufferOffset,
                                  length: pieceLength, fua: false, vdisk: name)
        }
    }

    /// Writes `length` bytes at `offset`; `fua` makes them durable before returning.
    public func write(vdisk name: String, offset: UInt64, length: Int, from buffer: UnsafeMutableRawPointer, fua: Bool = false)
        async throws(DomainError)
    {
        guard let v = metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        try checkRange(v, offset: offset, length: length)
        try await allocateForWrite(v, offset: offset, length: length)
        let start = DispatchTime.now().uptimeNanoseconds
        defer { metrics.recordVDisk(name, op: "write", bytes: length, latencyNs: DispatchTime.now().uptimeNanoseconds - start) }
        let mapped = metadata.vdisk(named: name)!
        try await forEachPiece(mapped, offset: offset, length: length) { (ref, lunOffset, bufferOffset, pieceLength) throws(DomainError) in
            try await self.submit(.write, pool: v.poolId, ref: ref!, lunOffset: lunOffset, buffer: buffer + bufferOffset,
                                  length: pieceLength, fua: fua, vdisk: name)
        }
    }

    /// Flushes every LUN of the vdisk's pool.
    public func flush(vdisk name: String) async throws(DomainError) {
        guard let v = metadata.vdisk(named: name), let pool = metadata.pool(id: v.poolId) else { throw DomainError("vdisk '\(name)' not found") }
        for l in pool.luns {
            try await submit(.flush, pool: pool.id, ref: ExtentRef(lun: l.index, extent: 0), lunOffset: 0, buffer: nil, length: 0,
                             fua: false, vdisk: name)
        }
    }

    /// Writes zeros over the range (allocated extents only: unallocated ones already read as zeros).
    public func writeZeroes(vdisk name: String, offset: UInt64, length: Int) async throws(DomainError) {
        guard let v = metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        try checkRange(v, offset: offset, length: length)
        let chunk = min(length, 1 << 20)
        let zeros: AlignedBuffer
        do { zeros = try AlignedBuffer(count: chunk) } catch { throw DomainError("\(error)") }
        memset(zeros.pointer, 0, chunk)
        let zeroPointer = zeros.pointer
        try await forEachPiece(v, offset: offset, length: length) { (ref, lunOffset, _, pieceLength) throws(DomainError) in
            guard let ref else { return }
            var done = 0
            while done < pieceLength {
                let n = min(chunk, pieceLength - done)
                try await self.submit(.write, pool: v.poolId, ref: ref, lunOffset: lunOffset + UInt64(done), buffer: zeroPointer,
                                      length: n, fua: false, vdisk: name)
                done += n
            }
        }
        _ = zeros.count
    }

    /// Trim: the range no longer holds data the host needs. Thick extents stay allocated;
    /// we zero them so later reads are deterministic (the NBD front end advertises that).
    public func trim(vdisk name: String, offset: UInt64, length: Int) async throws(DomainError) {
        try await writeZeroes(vdisk: name, offset: offset, length: length)
    }

    // MARK: mapping

    private func allocateForWrite(_ v: VDiskRecord, offset: UInt64, length: Int) async throws(DomainError) {
        guard v.thin, let pool = metadata.pool(id: v.poolId) else { return }
        let first = Int(offset / pool.extentBytes), last = Int((offset + UInt64(length) - 1) / pool.extentBytes)
        let missing = (first...last).filter { v.extents[$0] == nil }
        if !missing.isEmpty { try await allocateExtents(vdisk: v.name, indices: missing) }
    }

    /// Splits a vdisk range at extent boundaries: (extent or nil, LUN byte offset, buffer offset, length).
    private func forEachPiece(_ v: VDiskRecord, offset: UInt64, length: Int,
                              _ body: (ExtentRef?, UInt64, Int, Int) async throws(DomainError) -> Void) async throws(DomainError)
    {
        guard let pool = metadata.pool(id: v.poolId) else { throw DomainError("vdisk '\(v.name)': its pool is gone") }
        var done = 0
        while done < length {
            let at = offset + UInt64(done)
            let index = Int(at / pool.extentBytes)
            let within = at % pool.extentBytes
            let piece = min(length - done, Int(pool.extentBytes - within))
            let ref = v.extents[index]
            let lunOffset = ref.map { pool.luns[$0.lun].dataStartBytes + UInt64($0.extent) * pool.extentBytes + within } ?? 0
            try await body(ref, lunOffset, done, piece)
            done += piece
        }
    }

    private func submit(_ op: IOScheduler.Operation, pool: UUID, ref: ExtentRef, lunOffset: UInt64,
                        buffer: UnsafeMutableRawPointer?, length: Int, fua: Bool, vdisk: String) async throws(DomainError)
    {
        guard let scheduler = schedulers[pool], let slot = schedulerSlots[pool]?[ref.lun] ?? nil else {
            throw DomainError("vdisk '\(vdisk)': LUN \(ref.lun) of its pool is missing")
        }
        let start = DispatchTime.now().uptimeNanoseconds
        while true {
            var refused: IOError?
            let result = await withCheckedContinuation { (c: CheckedContinuation<Int64, Never>) in
                let sink = ResultSink(c)
                do throws(IOError) {
                    try scheduler.submit(op, lun: slot, buffer: buffer, length: length, offset: lunOffset, fua: fua, sink: sink, cookie: 0)
                    scheduler.kick()
                } catch {
                    refused = error
                    c.resume(returning: -Int64(error.code))
                }
            }
            if let refused, refused.code == EBUSY {
                try? await Task.sleep(nanoseconds: 100_000)
                continue
            }
            if result < 0 {
                let error = refused ?? IOError(result: result, operation: op == .read ? .read : (op == .write ? .write : .flush),
                                               lun: lunHandle(pool: pool, index: ref.lun)?.path, offset: lunOffset)
                throw DomainError("vdisk '\(vdisk)': \(error)")
            }
            if let p = metadata.pool(id: pool) {
                metrics.recordLUN(pool: p.name, lun: p.luns[ref.lun].path, op: op == .read ? "read" : (op == .write ? "write" : "flush"),
                                  bytes: length, latencyNs: DispatchTime.now().uptimeNanoseconds - start)
            }
            return
        }
    }
}
