import Foundation
import IOEngine

/// The data access API in async form, for control-plane code and tests: read,
/// write (FUA), flush, trim and write-zeroes at byte offsets of a vdisk. It runs on
/// the vdisk's `VDiskPort` (the allocation-free callback form front ends use),
/// adding one continuation per call. Buffers must be aligned to 4096.
extension Domain {
    public func read(vdisk name: String, offset: UInt64, length: Int, into buffer: UnsafeMutableRawPointer) async throws(DomainError) {
        try await run(.read, name, offset, length, buffer, fua: false)
    }

    public func write(vdisk name: String, offset: UInt64, length: Int, from buffer: UnsafeMutableRawPointer, fua: Bool = false)
        async throws(DomainError)
    {
        try await run(.write, name, offset, length, buffer, fua: fua)
    }

    public func flush(vdisk name: String) async throws(DomainError) {
        try await run(.flush, name, 0, 0, nil, fua: false)
    }

    public func writeZeroes(vdisk name: String, offset: UInt64, length: Int) async throws(DomainError) {
        try await run(.writeZeroes, name, offset, length, nil, fua: false)
    }

    /// Trim: the host no longer needs the range; it reads as zeroes afterwards. A thin
    /// vdisk's extents lying wholly inside are freed; a thick vdisk's are zeroed.
    public func trim(vdisk name: String, offset: UInt64, length: Int) async throws(DomainError) {
        try await run(.trim, name, offset, length, nil, fua: false)
    }

    private func run(_ op: VDiskPort.Op, _ name: String, _ offset: UInt64, _ length: Int, _ buffer: UnsafeMutableRawPointer?,
                     fua: Bool) async throws(DomainError)
    {
        let port = try port(for: name)
        while true {
            var refused: IOError?
            let result = await withCheckedContinuation { (c: CheckedContinuation<Int64, Never>) in
                do throws(IOError) {
                    try port.submit(op, offset: offset, length: length, buffer: buffer, fua: fua, sink: ContinuationSink(c), cookie: 0)
                } catch {
                    refused = error
                    c.resume(returning: -Int64(error.code))
                }
            }
            if let refused {
                switch refused.code {
                case EBUSY: // every slot of the port in use: wait for a request to finish, then again
                    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in port.whenRoom { c.resume() } }
                    continue
                case EINVAL:
                    throw DomainError("vdisk '\(name)': offset \(offset) and length \(length) must be multiples of its block size \(port.blockSize)")
                case ERANGE:
                    throw DomainError("vdisk '\(name)': range \(offset)+\(length) lies beyond its size \(port.sizeBytes)")
                case ENODEV:
                    throw DomainError("vdisk '\(name)' not found")
                case EROFS where port.refusesHostWrites:
                    throw DomainError("vdisk '\(name)' is a read-only snapshot: it takes no writes", code: EROFS)
                default:
                    throw DomainError("vdisk '\(name)': \(refused)", code: refused.code)
                }
            }
            if result < 0 {
                let ioOp: IOOperation = op == .read ? .read : (op == .flush ? .flush : .write)
                throw DomainError("vdisk '\(name)': \(IOError(result: result, operation: ioOp, lun: nil, offset: offset))")
            }
            return
        }
    }
}
