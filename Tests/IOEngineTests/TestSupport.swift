import Foundation
import IOEngine

/// A scratch folder removed at deinit.
final class TempDir {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "svsp-test-\(UUID().uuidString.prefix(8))"
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    func file(_ name: String) -> String { path + "/" + name }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Collects completions by cookie; `wait` blocks until `expected` have arrived.
final class CollectingSink: CompletionSink, @unchecked Sendable {
    private let lock = NSLock()
    private var results: [UInt64: Int64] = [:]
    private var arrivals = 0
    private let done = DispatchSemaphore(value: 0)

    override func ioCompleted(cookie: UInt64, result: Int64) {
        lock.lock()
        results[cookie] = result
        arrivals += 1
        lock.unlock()
        done.signal()
    }

    /// Waits for `count` completions (at most `seconds`); returns how many came.
    func wait(for count: Int, seconds: Double = 30) -> Int {
        var got = 0
        while got < count, done.wait(timeout: .now() + seconds) == .success { got += 1 }
        return got
    }

    func result(_ cookie: UInt64) -> Int64? { lock.lock(); defer { lock.unlock() }; return results[cookie] }
    var count: Int { lock.lock(); defer { lock.unlock() }; return arrivals }
}

/// Deterministic bytes for a position, so any block can be checked on its own.
func fillPattern(_ buffer: UnsafeMutableRawBufferPointer, offset: UInt64, seed: UInt64) {
    let words = buffer.count / 8
    let p = buffer.baseAddress!.assumingMemoryBound(to: UInt64.self)
    for i in 0..<words {
        var x = (offset &+ UInt64(i) &* 8) ^ seed
        x = (x ^ (x >> 33)) &* 0xFF51_AFD7_ED55_8CCD
        p[i] = x ^ (x >> 29)
    }
}

func isRoot() -> Bool { getuid() == 0 }

/// Runs a command; returns (status, stdout).
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

/// Attaches a loop device to `file`, or nil (with the reason) when this machine cannot.
func attachLoopDevice(_ file: String) -> (device: String?, reason: String) {
    guard isRoot() else { return (nil, "needs root for losetup") }
    let (status, dev) = shell(["losetup", "--find", "--show", "--direct-io=on", file])
    guard status == 0, dev.hasPrefix("/dev/loop") else { return (nil, "losetup failed (no loop devices here?)") }
    return (dev, "")
}
