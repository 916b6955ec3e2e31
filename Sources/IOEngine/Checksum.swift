import CIOCore
import Glibc

/// ISA-L checksums through CIOCore.
public enum Checksum {
    /// CRC32C (iSCSI); pass a previous result as `seed` to continue it.
    @inline(__always)
    public static func crc32c(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress else { return seed }
        return cio_crc32c(base, UInt64(bytes.count), seed)
    }

    /// CRC-64/XZ; pass a previous result as `seed` to continue it.
    public static func crc64(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        guard let base = bytes.baseAddress else { return seed }
        return cio_crc64(base, UInt64(bytes.count), seed)
    }

    /// crc32c of every `blockSize` block of `bytes` into `out` (count must be bytes.count / blockSize).
    public static func crc32cBlocks(_ bytes: UnsafeRawBufferPointer, blockSize: Int,
                                    into out: UnsafeMutableBufferPointer<UInt32>) throws(IOError)
    {
        guard blockSize > 0, bytes.count % blockSize == 0, out.count >= bytes.count / blockSize,
              let base = bytes.baseAddress, let outBase = out.baseAddress
        else { throw IOError(code: EINVAL, operation: .checksum) }
        let rc = cio_crc32c_blocks(base, UInt64(bytes.count), UInt32(blockSize), outBase)
        if rc != 0 { throw IOError(result: rc, operation: .checksum) }
    }

    /// Index of the first block whose crc32c differs from `expected`, or nil when all match.
    public static func firstMismatch(_ bytes: UnsafeRawBufferPointer, blockSize: Int,
                                     expected: UnsafeBufferPointer<UInt32>) throws(IOError) -> Int?
    {
        guard blockSize > 0, bytes.count % blockSize == 0, expected.count >= bytes.count / blockSize,
              let base = bytes.baseAddress, let expBase = expected.baseAddress
        else { throw IOError(code: EINVAL, operation: .checksum) }
        var bad: UInt64 = 0
        let rc = cio_crc32c_verify(base, UInt64(bytes.count), UInt32(blockSize), expBase, &bad)
        if rc != 0 { throw IOError(result: rc, operation: .checksum) }
        return bad == UInt64.max ? nil : Int(bad)
    }
}
