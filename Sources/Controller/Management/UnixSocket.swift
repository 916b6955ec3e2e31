import Foundation

/// Blocking Unix-domain socket helpers for the management client (the daemon's side is `MgmtServer`).
enum UnixSocket {
    static func address(_ path: String) -> sockaddr_un? {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        return addr
    }

    /// Runs `body` (a bind) with umask 0177, so a socket file is owner-only from the
    /// moment it exists, never open to others until a chmod.
    static func withOwnerOnlyFiles<T>(_ body: () throws -> T) rethrows -> T {
        let old = umask(0o177)
        defer { umask(old) }
        return try body()
    }

    /// Send and receive timeouts on a blocking socket (a peer that stops answering ends in EAGAIN).
    static func setTimeouts(_ fd: Int32, seconds: Int) {
        var limit = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
    }

    static func connect(to path: String) -> (fd: Int32, errno: Int32) {
        guard var addr = address(path) else { return (-1, ENAMETOOLONG) }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return (-1, errno) }
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        if rc != 0 {
            let e = errno
            close(fd)
            return (-1, e)
        }
        return (fd, 0)
    }

    /// Reads one newline-terminated message of at most `limit` bytes; nil on EOF, error or overflow.
    static func readLine(_ fd: Int32, limit: Int) -> Data? {
        var data = Data()
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR { continue }
            if n < 0 { return nil } // errno tells why (EAGAIN: the receive timeout passed)
            if n == 0 { return data.isEmpty ? nil : data }
            if let nl = chunk[0..<n].firstIndex(of: UInt8(ascii: "\n")) {
                data.append(contentsOf: chunk[0..<nl])
                return data.count <= limit ? data : nil
            }
            data.append(contentsOf: chunk[0..<n])
            if data.count > limit { return nil }
        }
    }

    /// Writes all of `data` to any file descriptor (sockets and files), retrying EINTR and short writes.
    static func writeAll(_ fd: Int32, _ data: Data) -> Bool {
        data.withUnsafeBytes { buf in
            var done = 0
            while done < buf.count {
                let n = write(fd, buf.baseAddress! + done, buf.count - done)
                if n < 0 { if errno == EINTR { continue }; return false }
                done += n
            }
            return true
        }
    }
}
