import Foundation
import XCTest

/// Runs the real svsp-ctl binary built beside the test bundle.
struct CLI {
    /// $SVSP_CTL, else the svsp-ctl in the build folder that holds the test bundle.
    static var binary: String {
        if let explicit = ProcessInfo.processInfo.environment["SVSP_CTL"] { return explicit }
        let bundle = Bundle(for: Marker.self).bundleURL
        let candidates = [bundle, bundle.deletingLastPathComponent()].map { $0.appendingPathComponent("svsp-ctl").path }
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates[0]
    }

    struct Result {
        let status: Int32
        let stdout: String
        let stderr: String
    }

    @discardableResult
    static func run(_ args: [String], environment: [String: String] = [:], killAfterSeconds: Int? = nil) throws -> Result {
        let p = Process()
        // Bounded when asked (timeout(1) exits 124), so a regression that hangs fails instead.
        p.executableURL = URL(fileURLWithPath: killAfterSeconds == nil ? binary : "/usr/bin/timeout")
        p.arguments = killAfterSeconds.map { ["\($0)", binary] + args } ?? args
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        p.environment = env
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        // Read both pipes concurrently so a chatty child cannot block on a full pipe.
        let errData = DataBox()
        let errReader = Thread { errData.data = err.fileHandleForReading.readDataToEndOfFile() }
        errReader.start()
        let outData = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        while !errReader.isFinished { usleep(1000) }
        return Result(status: p.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                      stderr: String(decoding: errData.data, as: UTF8.self))
    }
}

private final class Marker {}

private final class DataBox: @unchecked Sendable { var data = Data() }

final class TempDir {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "svsp-e2e-\(UUID().uuidString.prefix(8))"
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// A real `svsp-ctl serve` for a test: started on a state folder, ready once `status` answers.
final class ServeProcess {
    static let profiles = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("hardware-profiles").path

    let process: Process

    /// Starts the daemon; throws when it does not answer within 5 s.
    /// `netns`: run it in that network namespace (`ip netns exec`, which execs it: same pid).
    init(state: String, extra: [String] = [], log: String? = nil, profiles: String = ServeProcess.profiles,
         environment: [String: String] = [:], netns: String? = nil) throws
    {
        process = Process()
        let serve = ["serve", "--dir", state, "--profiles", profiles] + extra
        if let netns {
            process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
            process.arguments = ["netns", "exec", netns, CLI.binary] + serve
        } else {
            process.executableURL = URL(fileURLWithPath: CLI.binary)
            process.arguments = serve
        }
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        if let log { _ = FileManager.default.createFile(atPath: log, contents: nil) }
        process.standardError = FileHandle(forWritingAtPath: log ?? "/dev/null")
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        try process.run()
        for _ in 0..<200 {
            if try CLI.run(["status", "--dir", state]).status == 0 { return }
            usleep(25_000)
        }
        stop()
        throw CLIError("daemon for \(state) did not come up")
    }

    /// Sends `signal` and waits for the process to end.
    func stop(signal: Int32 = SIGTERM) {
        guard process.isRunning else { return }
        kill(process.processIdentifier, signal)
        process.waitUntilExit()
    }
}

/// A copy of the shipped profiles in `dir` with `files` (path under the profiles root ->
/// YAML text) written over it, for tests that need other numbers.
func customProfiles(in dir: TempDir, _ files: [String: String]) throws -> String {
    let root = dir.file("profiles")
    try? FileManager.default.removeItem(atPath: root)
    try FileManager.default.copyItem(atPath: ServeProcess.profiles, toPath: root)
    for (path, text) in files { try text.write(toFile: root + "/" + path, atomically: true, encoding: .utf8) }
    return root
}

struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// A TCP connection to 127.0.0.1:`port` (a socket descriptor the caller closes).
func connectLoopback(port: Int) throws -> Int32 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = UInt16(port).bigEndian
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr)
    let rc = withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard rc == 0 else {
        close(fd)
        throw CLIError("127.0.0.1:\(port) not reachable (errno \(errno))")
    }
    return fd
}

/// One HTTP GET on 127.0.0.1 (the metrics endpoint); the whole response, headers included.
func httpGet(port: Int, path: String) throws -> String {
    let fd = try connectLoopback(port: port)
    defer { close(fd) }
    let request = Array("GET \(path) HTTP/1.1\r\nHost: localhost\r\n\r\n".utf8)
    _ = request.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    var response = [UInt8]()
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n <= 0 { break }
        response += chunk[0..<n]
    }
    return String(decoding: response, as: UTF8.self)
}

/// Runs `executable` to its end with stdout and stderr together; returns (status, output).
func runCapturing(_ executable: String, _ args: [String], environment: [String: String] = [:]) throws -> (Int32, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: executable)
    p.arguments = args
    p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
    let out = Pipe()
    p.standardOutput = out
    p.standardError = out
    try p.run()
    let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    return (p.terminationStatus, text)
}

/// Runs a command (every end-to-end suite uses it); returns (status, stdout).
@discardableResult
func shell(_ args: [String]) -> (Int32, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    let out = Pipe()
    p.standardOutput = out
    p.standardError = FileHandle.nullDevice
    do { try p.run() } catch { return (-1, "") }
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
}
