import CIOCore
import Glibc

/// ISA-L igzip (gzip framing, so decompression checks CRC and length).
public enum Compression {
    /// Room `compress` may need for `inputBytes` of input.
    public static func bound(_ inputBytes: Int) -> Int { Int(cio_compress_bound(UInt64(inputBytes))) }

    /// Compresses at `level` 0...3 into `output`; returns the compressed length.
    public static func compress(level: Int, _ input: UnsafeRawBufferPointer,
                                into output: UnsafeMutableRawBufferPointer) throws(IOError) -> Int
    {
        var outLen: UInt64 = 0
        let rc = cio_compress(Int32(clamping: level), input.baseAddress ?? UnsafeRawPointer(output.baseAddress!),
                              UInt64(input.count), output.baseAddress, UInt64(output.count), &outLen)
        if rc != 0 { throw IOError(result: rc, operation: .compress) }
        return Int(outLen)
    }

    /// Decompresses a stream from `compress`; a corrupt or truncated stream throws EBADMSG.
    public static func decompress(_ input: UnsafeRawBufferPointer,
                                  into output: UnsafeMutableRawBufferPointer) throws(IOError) -> Int
    {
        var outLen: UInt64 = 0
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else {
            throw IOError(code: EBADMSG, operation: .decompress)
        }
        let rc = cio_decompress(inBase, UInt64(input.count), outBase, UInt64(output.count), &outLen)
        if rc != 0 { throw IOError(result: rc, operation: .decompress) }
        return Int(outLen)
    }
}
