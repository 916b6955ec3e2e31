import Glibc
import IOEngine

/// One aligned megabyte of zeros, the source of every vdisk's write-zeroes and trim.
/// The kernel only reads it, so all vdisks share it instead of holding one each.
enum SharedZeros {
    static let bytes = 1 << 20

    private static let block: AlignedBuffer = {
        do {
            let block = try AlignedBuffer(count: bytes)
            memset(block.pointer, 0, bytes)
            return block
        } catch {
            fatalError("svsp: cannot allocate the 1 MiB zero block: \(error)")
        }
    }()

    static var pointer: UnsafeMutableRawPointer { block.pointer }
}
