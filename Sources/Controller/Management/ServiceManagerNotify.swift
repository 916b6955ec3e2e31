import Foundation

/// systemd's readiness protocol (sd_notify(3)): when the service manager started us with
/// `Type=notify`, it passed a datagram socket in $NOTIFY_SOCKET; we send `READY=1` once the
/// management socket and the NBD server accept, and `STOPPING=1` when a signal arrives.
/// Without $NOTIFY_SOCKET (started by hand) every call does nothing. A few lines of our own
/// rather than linking libsystemd: the static release build then needs only glibc, libaio
/// and ISA-L.
public enum ServiceManagerNotify {
    /// Sends `state` (newline-separated KEY=VALUE lines); returns false when no manager listens.
    @discardableResult
    public static func send(_ state: String, environment: [String: String] = ProcessInfo.processInfo.environment) -> Bool {
        guard var path = environment["NOTIFY_SOCKET"], !path.isEmpty else { return false }
        // A leading '@' names a socket in the abstract namespace (a NUL byte on the wire).
        let abstract = path.hasPrefix("@")
        if abstract { path.removeFirst() }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        let offset = abstract ? 1 : 0
        guard pathBytes.count + offset < capacity else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, byte) in pathBytes.enumerated() { raw[i + offset] = byte }
        }
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + offset + pathBytes.count + (abstract ? 0 : 1))
        let sent = withUnsafePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                Array(state.utf8).withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), sa, length) }
            }
        }
        return sent >= 0
    }
}
