import CIOCore
import Glibc

/// What an I/O error happened during.
public enum IOOperation: String, Sendable {
    case open, create, read, write, flush, submit, engineCreate = "engine-create"
    case bufferAllocate = "buffer-allocate", compress, decompress, checksum
}

/// One error type for the I/O layers: the errno, the operation, and where (LUN path, byte offset).
public struct IOError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A positive errno value (EIO, EINVAL, ...).
    public let code: Int32
    public let operation: IOOperation
    public let lun: String?
    public let offset: UInt64?

    public init(code: Int32, operation: IOOperation, lun: String? = nil, offset: UInt64? = nil) {
        self.code = code
        self.operation = operation
        self.lun = lun
        self.offset = offset
    }

    /// From a CIOCore result (negative errno).
    public init(result: some BinaryInteger & SignedInteger, operation: IOOperation, lun: String? = nil, offset: UInt64? = nil) {
        self.init(code: -Int32(truncatingIfNeeded: result), operation: operation, lun: lun, offset: offset)
    }

    /// The errno's symbolic name where we know it (EIO, EPERM, ...).
    public var codeName: String {
        switch code {
        case EIO: "EIO"
        case EPERM: "EPERM"
        case EACCES: "EACCES"
        case EROFS: "EROFS"
        case EINVAL: "EINVAL"
        case ERANGE: "ERANGE"
        case ENOSPC: "ENOSPC"
        case ENOENT: "ENOENT"
        case EBADF: "EBADF"
        case EBUSY: "EBUSY"
        case EAGAIN: "EAGAIN"
        case ESHUTDOWN: "ESHUTDOWN"
        case EBADMSG: "EBADMSG"
        case ENOMEM: "ENOMEM"
        case ENOBUFS: "ENOBUFS"
        case ENOTSUP: "ENOTSUP"
        case EEXIST: "EEXIST"
        default: "errno \(code)"
        }
    }

    /// Our wording for the errors CIOCore gives a meaning of its own.
    private var reason: String {
        switch (code, operation) {
        case (EINVAL, .read), (EINVAL, .write):
            "buffer, offset or length not aligned to the LUN's logical block size (or longer than 2 GiB)"
        case (ERANGE, _): "range lies beyond the end of the LUN"
        case (EBADF, .write): "LUN is open read-only"
        case (EBUSY, _): "queue full"
        case (ESHUTDOWN, _): "engine is shutting down"
        case (EBADMSG, .decompress): "corrupt or truncated compressed stream"
        case (ENOSPC, .compress), (ENOSPC, .decompress): "output buffer too small"
        default: String(cString: strerror(code))
        }
    }

    public var description: String {
        var where_ = ""
        if let lun { where_ += " on \(lun)" }
        if let offset { where_ += " at offset \(offset)" }
        return "\(operation.rawValue) failed\(where_): \(reason) (\(codeName))"
    }
}
