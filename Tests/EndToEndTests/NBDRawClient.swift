import Foundation

/// A minimal NBD client over a Unix socket for tests that must send what real clients
/// never would (bad magic, misaligned or oversized requests, half a request).
final class NBDRawClient: @unchecked Sendable {
    let fd: Int32

    init(socket path: String) throws {
        fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw CLIError("connect \(path): errno \(errno)") }
        setReceiveTimeout(seconds: 10)
    }

    /// Over TCP to 127.0.0.1:`port`.
    init(tcpPort port: Int) throws {
        fd = try connectLoopback(port: port)
        setReceiveTimeout(seconds: 10)
    }

    deinit { close(fd) }

    func setReceiveTimeout(seconds: Int) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    func send(_ bytes: [UInt8]) {
        var off = 0
        while off < bytes.count {
            // MSG_NOSIGNAL: a server that closed on us must fail the send, not SIGPIPE the tests.
            let n = bytes[off...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            off += n
        }
    }

    /// Sends `unit` over and over without ever reading, until `limit` bytes went out or the
    /// server has taken nothing for `stallSeconds`; returns the bytes the server accepted.
    func flood(_ unit: [UInt8], limit: Int, stallSeconds: Double = 1) -> Int {
        var block = [UInt8]()
        while block.count < 64 << 10 { block += unit }
        var sent = 0, offset = 0
        var lastProgress = Date()
        while sent < limit, Date().timeIntervalSince(lastProgress) < stallSeconds {
            let n = block[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
            if n > 0 {
                sent += n
                offset = (offset + n) % block.count
                lastProgress = Date()
            } else if n < 0 && errno != EAGAIN && errno != EWOULDBLOCK {
                break
            } else {
                usleep(10_000)
            }
        }
        return sent
    }

    /// Exactly `count` bytes, or nil when the server closed the connection (or timed out).
    func receive(_ count: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var off = 0
        while off < count {
            let n = out[off...].withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { return nil }
            off += n
        }
        return out
    }

    /// True once the server has closed its side.
    func isClosedByServer() -> Bool {
        var b: UInt8 = 0
        return read(fd, &b, 1) == 0
    }

    static func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
    static func int<T: FixedWidthInteger>(_ b: ArraySlice<UInt8>) -> T { b.reduce(T(0)) { $0 << 8 | T($1) } }

    /// Greeting, fixed newstyle + no zeroes, then NBD_OPT_GO for `export`. Returns the export size.
    func handshake(export: String, structured: Bool = false) throws -> UInt64 {
        guard let greeting = receive(18), greeting[0..<8].elementsEqual("NBDMAGIC".utf8) else { throw CLIError("no greeting") }
        send(Self.be(UInt32(3)))
        if structured {
            send(Self.be(UInt64(0x4948_4156_454F_5054)) + Self.be(UInt32(8)) + Self.be(UInt32(0)))
            guard let ack = receive(20), Self.int(ack[12..<16]) as UInt32 == 1 else { throw CLIError("structured replies refused") }
        }
        let name = Array(export.utf8)
        let payload = Self.be(UInt32(name.count)) + name + Self.be(UInt16(0))
        send(Self.be(UInt64(0x4948_4156_454F_5054)) + Self.be(UInt32(7)) + Self.be(UInt32(payload.count)) + payload)
        var size: UInt64 = 0
        while true {
            guard let head = receive(20) else { throw CLIError("closed during GO") }
            let type: UInt32 = Self.int(head[12..<16]), length: UInt32 = Self.int(head[16..<20])
            let body = length > 0 ? receive(Int(length)) ?? [] : []
            if type == 1 { return size }
            if type & 0x8000_0000 != 0 { throw CLIError("GO refused: 0x\(String(type, radix: 16))") }
            if type == 3, body.count >= 10, Self.int(body[0..<2]) as UInt16 == 0 { size = Self.int(body[2..<10]) }
        }
    }

    /// Sends one request header (and payload); the raw 28 bytes can be bent by the caller.
    static func request(type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32,
                        magic: UInt32 = 0x2560_9513) -> [UInt8]
    {
        be(magic) + be(flags) + be(type) + be(cookie) + be(offset) + be(length)
    }

    /// A simple reply: (error, cookie), then `dataBytes` of data when error is 0.
    func simpleReply(dataBytes: Int = 0) -> (error: UInt32, cookie: UInt64, data: [UInt8])? {
        guard let head = receive(16), Self.int(head[0..<4]) as UInt32 == 0x6744_6698 else { return nil }
        let error: UInt32 = Self.int(head[4..<8])
        let data = error == 0 && dataBytes > 0 ? receive(dataBytes) ?? [] : []
        return (error, Self.int(head[8..<16]), data)
    }
}
