import CIOCore
import Glibc

/// One aligned megabyte of zeros, the source of every vdisk's write-zeroes and trim.
/// The kernel only reads it, so all vdisks share it instead of holding one each.
enum SharedZeros {
    static let bytes = 1 << 20

    nonisolated(unsafe) static let pointer: UnsafeMutableRawPointer = {
        var p: UnsafeMutableRawPointer?
        let rc = cio_aligned_alloc(bytes, 4096, &p)
        guard rc == 0, let p else { fatalError("svsp: cannot allocate the 1 MiB zero block (error \(-rc))") }
        memset(p, 0, bytes)
        return p
    }()
}
