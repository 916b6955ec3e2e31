import Foundation

/// A minimal HTTP listener for Prometheus scrapes: `GET /metrics` on HOST:PORT.
final class MetricsServer: @unchecked Sendable {
    private let fd: Int32
    private let render: @Sendable () -> [UInt8]

    /// Listens on `hostPort` ("127.0.0.1:9464"; IPv4).
    init(hostPort: String, render: @escaping @Sendable () -> [UInt8]) throws(DomainError) {
        let parts = hostPort.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2, let port = UInt16(parts[1]) else {
            throw DomainError("--metrics-listen '\(hostPort)': expected HOST:PORT (e.g. 127.0.0.1:9464)")
        }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        let host = parts[0].isEmpty ? "127.0.0.1" : String(parts[0])
        guard inet_pton(AF_INET, host, &addr.sin_addr) == 1 else {
            throw DomainError("--metrics-listen '\(hostPort)': '\(host)' is not an IPv4 address")
        }
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var one: Int32 = 1
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard s >= 0, rc == 0, listen(s, 16) == 0 else {
            let why = String(cString: strerror(errno))
            if s >= 0 { close(s) }
            throw DomainError("--metrics-listen \(hostPort): \(why)")
        }
        fd = s
        self.render = render
    }

    func start() {
        let thread = Thread { [self] in serve() }
        thread.start()
    }

    func stop() {
        Glibc.shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
    }

    private func serve() {
        while true {
            let c = accept(fd, nil, nil)
            if c < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            var request = [UInt8](repeating: 0, count: 4096)
            let n = request.withUnsafeMutableBytes { read(c, $0.baseAddress, $0.count) }
            let line = n > 0 ? String(decoding: request[0..<n], as: UTF8.self).split(separator: "\r\n").first ?? "" : ""
            let body: [UInt8]
            let status: String
            if line.hasPrefix("GET /metrics ") || line.hasPrefix("GET / ") {
                body = render()
                status = "200 OK"
            } else {
                body = Array("only GET /metrics is served\n".utf8)
                status = "404 Not Found"
            }
            let head = "HTTP/1.1 \(status)\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n"
            _ = UnixSocket.writeAll(c, Data(head.utf8) + Data(body))
            close(c)
        }
    }
}
