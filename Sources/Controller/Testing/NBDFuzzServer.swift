import Foundation
import Synchronization

/// A real NBD server in this process over a small scratch domain (a file pool in a
/// temporary folder, a thick and a thin exported vdisk): each fuzz input is what one
/// client sends after the greeting; the answer is read until the server closes.
final class NBDFuzzServer: Sendable {
    static let shared = NBDFuzzServer()

    let socketPath: String
    private let server: NBDServer

    private init() {
        let dir = NSTemporaryDirectory() + "svsp-fuzz-nbd-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        socketPath = dir + "/nbd.sock"
        server = Self.blocking { () async throws -> NBDServer in
            _ = try Domain.initialize(directory: dir, name: "fuzz")
            let domain = try await Domain.open(directory: dir, profiles: try ProfileCatalog(root: ProfileCatalog.defaultRoot()))
            _ = try await domain.createPool(name: "p", arrayProfile: "file-backed", poolProfile: nil, lunPaths: [dir + "/p.img"],
                                            createBytes: 24 << 20, force: false)
            _ = try await domain.createVDisk(name: "thick", poolName: "p", sizeBytes: 4 << 20, blockSize: 512, thin: false)
            _ = try await domain.createVDisk(name: "thin", poolName: "p", sizeBytes: 8 << 20, blockSize: 4096, thin: true)
            try await domain.setExport(vdisk: "thick", mode: .readWrite)
            try await domain.setExport(vdisk: "thin", mode: .readWrite)
            return try NBDServer(domain: domain, socketPath: dir + "/nbd.sock") { _ in }
        }
        _ = server
    }

    private static func blocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) -> T {
        let box = Mutex<Result<T, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        Task {
            do { let v = try await body(); box.withLock { $0 = .success(v) } } catch { box.withLock { $0 = .failure(error) } }
            done.signal()
        }
        done.wait()
        switch box.withLock({ $0! }) {
        case .success(let v): return v
        case .failure(let e): fatalError("fuzz NBD server: cannot set up its domain: \(e)")
        }
    }

    /// Connects, takes the greeting, sends `input`, half-closes, and reads until the
    /// server closes (or 2 s pass: a server that neither answers nor closes is a hang).
    func exchange(_ input: UnsafeRawBufferPointer) {
        let (fd, _) = UnixSocket.connect(to: socketPath)
        precondition(fd >= 0, "fuzz NBD server: connect failed")
        defer { close(fd) }
        UnixSocket.setTimeouts(fd, seconds: 2)
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        _ = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, 18) } // the greeting
        var sent = 0
        while sent < input.count {
            let n = send(fd, input.baseAddress! + sent, input.count - sent, Int32(MSG_NOSIGNAL))
            if n <= 0 { break } // closed on us (a refused client) or not reading: both fine
            sent += n
        }
        shutdown(fd, Int32(SHUT_WR))
        let started = DispatchTime.now().uptimeNanoseconds
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            if DispatchTime.now().uptimeNanoseconds - started > 5_000_000_000 {
                fatalError("fuzz NBD server: still answering after 5 s of a \(input.count)-byte input")
            }
        }
    }
}
