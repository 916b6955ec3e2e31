import Foundation
import XCTest

/// What the systemd unit relies on: `serve` tells the service manager it is ready (and that
/// it stops) over $NOTIFY_SOCKET, and `--version` names the build.
final class ServiceTests: XCTestCase {
    func testServeSaysReadyOnceItAnswersAndStoppingOnSIGTERM() throws {
        let dir = TempDir()
        try CLI.run(["domain", "init", "--dir", dir.file("state"), "--name", "svc"])
        for name in [dir.file("notify.sock"), "@svsp-notify-\(UUID().uuidString.prefix(8))"] {
            let listener = try DatagramListener(name)
            let serve = try ServeProcess(state: dir.file("state"), environment: ["NOTIFY_SOCKET": name])
            let ready = listener.receive(seconds: 10)
            XCTAssertTrue(ready?.hasPrefix("READY=1\n") == true, "\(name): got \(ready ?? "nothing")")
            XCTAssertTrue(ready?.contains("STATUS=serving domain 'svc'") == true, ready ?? "")
            XCTAssertEqual(try CLI.run(["status", "--dir", dir.file("state")]).status, 0)
            kill(serve.process.processIdentifier, SIGTERM)
            XCTAssertEqual(listener.receive(seconds: 10), "STOPPING=1", name)
            serve.process.waitUntilExit()
        }
    }

    func testVersionNamesTheBuild() throws {
        let r = try CLI.run(["--version"])
        XCTAssertEqual(r.status, 0)
        // A development build (this one) says so; scripts/build-release compiles the commit in.
        XCTAssertTrue(r.stdout.range(of: #"^svsp-ctl \d+\.\d+\.\d+ \((development build, commit unknown|commit [0-9a-f]{12})"#,
                                     options: .regularExpression) != nil, r.stdout)
    }
}

/// A Unix datagram socket bound at `name` (a leading '@': the abstract namespace), as systemd's.
private final class DatagramListener {
    let fd: Int32
    let path: String?

    init(_ name: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let abstract = name.hasPrefix("@")
        let bytes = Array((abstract ? String(name.dropFirst()) : name).utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i + (abstract ? 1 : 0)] = b }
        }
        path = abstract ? nil : name
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
        let rc = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard rc == 0 else { throw CLIError("bind \(name): errno \(errno)") }
    }

    /// One datagram, or nil after `seconds`.
    func receive(seconds: Int) -> String? {
        var timeout = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        return n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self) : nil
    }

    deinit {
        close(fd)
        if let path { unlink(path) }
    }
}
