import CIOCore
import Glibc

/// Facts probed when a LUN is opened.
public struct LUNInfo: Sendable, Equatable {
    public let sizeBytes: UInt64
    public let logicalBlockSize: UInt32
    public let physicalBlockSize: UInt32
    /// Buffer alignment we use: max(logical block size, 4096).
    public let alignment: UInt32
    public let isBlockDevice: Bool
    public let rotational: Bool
    public let readOnly: Bool

    init(_ c: cio_lun_info) {
        sizeBytes = c.size_bytes
        logicalBlockSize = c.logical_block_size
        physicalBlockSize = c.physical_block_size
        alignment = c.alignment
        isBlockDevice = c.is_block_device
        rotational = c.rotational
        readOnly = c.read_only
    }
}

/// Owner of an open LUN (file or block device, O_DIRECT). Closes in `deinit`;
/// the owner must outlive every I/O submitted through its `handle`.
public struct LUN: ~Copyable, @unchecked Sendable {
    public let handle: LUNHandle

    /// Opens `path` with O_DIRECT. Throws `IOError` (`.open`) naming the path.
    public init(path: String, readWrite: Bool) throws(IOError) {
        var raw: OpaquePointer?
        let rc = cio_lun_open(path, readWrite, &raw)
        guard rc == 0, let raw else { throw IOError(result: rc, operation: .open, lun: path) }
        var c = cio_lun_info()
        cio_lun_get_info(raw, &c)
        handle = LUNHandle(raw: raw, info: LUNInfo(c), path: path)
    }

    public var info: LUNInfo { handle.info }
    public var path: String { handle.path }

    deinit { cio_lun_close(handle.raw) }

    /// Creates (or grows) a regular file and preallocates it with fallocate.
    public static func createFile(path: String, sizeBytes: UInt64, zeroFill: Bool = false) throws(IOError) {
        let rc = cio_file_create(path, sizeBytes, zeroFill)
        guard rc == 0 else { throw IOError(result: rc, operation: .create, lun: path) }
    }
}

/// A copyable view of an open LUN, valid while its `LUN` owner lives.
public struct LUNHandle: @unchecked Sendable {
    let raw: OpaquePointer
    public let info: LUNInfo
    public let path: String

    /// Makes the range read as zeros without writing them where the LUN can (a file's
    /// hole or fallocate, BLKZEROOUT on a device), durably. False: it cannot (write zeros
    /// instead). Blocks the calling thread.
    public func zeroRange(offset: UInt64, length: UInt64) throws(IOError) -> Bool {
        let rc = cio_lun_zero_range(raw, offset, length)
        if rc == -Int32(EOPNOTSUPP) { return false }
        if rc != 0 { throw IOError(result: Int64(rc), operation: .write, lun: path, offset: offset) }
        return true
    }
}
