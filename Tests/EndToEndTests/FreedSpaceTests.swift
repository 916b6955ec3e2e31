import Foundation
import XCTest

/// Freed space reads as zeros before anyone else can read it: thick creates, grows and
/// mirror legs never show what a deleted vdisk left on the disk.
extension NBDTests {
    private func qemuIO(_ export: String, _ commands: [String], file: StaticString = #filePath, line: UInt = #line) {
        let (rc, out) = shell(["timeout", "60", "qemu-io", "-f", "raw", uri(export)] + commands.flatMap { ["-c", $0] })
        XCTAssertEqual(rc, 0, out, file: file, line: line)
        XCTAssertFalse(out.contains("Pattern verification failed"), "\(export): \(commands): \(out)", file: file, line: line)
    }

    private func pool(_ name: String) throws -> [String: Any] { try json(["pool", "show", name]) }

    func testANewThickVDiskNeverReadsTheFormerTenantsData() throws {
        qemuIO("v1", ["write -P 0x5a 0 64M"])
        _ = try ok(["vdisk", "unexport", "v1"])
        _ = try ok(["vdisk", "delete", "v1"])
        // Pool a has 16 free extents besides v1's 64: the new vdisk needs the freed ones,
        // so its create waits until they are zeros.
        _ = try ok(["vdisk", "create", "v2", "--pool", "a", "--size", "64M"])
        _ = try ok(["vdisk", "export", "v2"])
        qemuIO("v2", ["read -P 0 0 64M"])

        // Grow: the extents added come from freed space too.
        qemuIO("v2", ["write -P 0x77 0 64M"])
        _ = try ok(["vdisk", "unexport", "v2"])
        _ = try ok(["vdisk", "delete", "v2"])
        _ = try ok(["vdisk", "create", "g", "--pool", "a", "--size", "4M"])
        _ = try ok(["vdisk", "grow", "g", "--size", "64M"])
        _ = try ok(["vdisk", "export", "g"])
        qemuIO("g", ["read -P 0 0 64M"])

        // A thick mirror over two legs' leftovers: both legs read zeros (and agree).
        qemuIO("m1", ["write -P 0x3c 0 16M"])
        _ = try ok(["vdisk", "unexport", "m1"])
        _ = try ok(["vdisk", "delete", "m1"])
        _ = try ok(["vdisk", "create", "m2", "--pool", "b", "--mirror-pool", "a", "--size", "16M"])
        _ = try ok(["vdisk", "export", "m2"])
        qemuIO("m2", ["read -P 0 0 16M"])
        XCTAssertTrue(try ok(["mirror", "verify", "m2"]).contains(" 0 differ"))

        // Once zeroed, the pool shows nothing left being zeroed, and a restart keeps it so.
        for _ in 0..<200 where (try pool("b")["zeroingBytes"] as? Int ?? -1) != 0 { usleep(50_000) }
        XCTAssertEqual(try pool("a")["zeroingBytes"] as? Int, 0)
        XCTAssertEqual(try pool("b")["zeroingBytes"] as? Int, 0)
    }

    /// The zeroing list is persisted: a daemon killed right after a delete zeroes the
    /// extents at its next start before anyone can have them.
    func testExtentsFreedBeforeAKillAreZeroedAfterTheRestart() throws {
        qemuIO("v1", ["write -P 0x5a 0 64M"])
        _ = try ok(["vdisk", "unexport", "v1"])
        _ = try ok(["vdisk", "delete", "v1"])
        daemon?.stop(signal: SIGKILL)
        daemon = try ServeProcess(state: state, log: log)
        _ = try ok(["vdisk", "create", "v2", "--pool", "a", "--size", "64M"])
        _ = try ok(["vdisk", "export", "v2"])
        qemuIO("v2", ["read -P 0 0 64M"])
    }
}
