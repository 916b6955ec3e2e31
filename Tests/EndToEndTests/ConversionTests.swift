import Foundation
import XCTest

/// A domain written by the release before block maps (catalog format 2, made by
/// `scripts/make-format2-fixture` with that release) opens, is converted once, and keeps
/// every byte of every vdisk: thick, thin (holes stay holes) and a mirror.
final class ConversionTests: XCTestCase {
    private let root = "/tmp/svsp-format2-fixture" // where the fixture was made: pools record absolute LUN paths
    private var state: String { root + "/state" }

    private func ok(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try CLI.run(args + ["--dir", state])
        XCTAssertEqual(r.status, 0, "\(args): \(r.stderr)", file: file, line: line)
        return r.stdout
    }

    /// qemu-io reads over NBD; every pattern must verify.
    private func read(_ vdisk: String, _ commands: [String], file: StaticString = #filePath, line: UInt = #line) {
        let (rc, out) = shell(["timeout", "30", "qemu-io", "-f", "raw", "nbd+unix:///\(vdisk)?socket=\(state)/nbd.sock"]
            + commands.flatMap { ["-c", $0] })
        XCTAssertEqual(rc, 0, out, file: file, line: line)
        XCTAssertFalse(out.contains("Pattern verification failed"), out, file: file, line: line)
    }

    override func setUpWithError() throws {
        let fixture = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/format2-domain.tar.gz").path
        try? FileManager.default.removeItem(atPath: root)
        XCTAssertEqual(shell(["tar", "-C", "/", "-xSzf", fixture]).0, 0)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: root) }

    func testADomainOfThePreviousFormatIsConvertedKeepingEveryByte() throws {
        var daemon: ServeProcess? = try ServeProcess(state: state)
        defer { daemon?.stop() }
        XCTAssertTrue(try ok(["status"]).contains("normal"))
        for pool in ["a", "b", "c"] {
            XCTAssertTrue(try ok(["pool", "check", pool]).hasSuffix("clean\n"), pool)
        }
        func checkData() throws {
            read("k", ["read -P 0x11 0 1M", "read -P 0x12 1M 3M"])
            read("t", ["read -P 0 0 1M", "read -P 0x22 1M 64k", "read -P 0 1088k 3968k", "read -P 0x23 5M 1M", "read -P 0 6M 2M"])
            read("m", ["read -P 0x33 0 4M"])
            XCTAssertTrue(try ok(["mirror", "verify", "m"]).contains(" 0 differ"))
            let vdisks = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(try ok(["vdisk", "list", "--json"]).utf8)) as? [[String: Any]])
            XCTAssertEqual(vdisks.first { $0["name"] as? String == "t" }?["allocatedBytes"] as? Int, 2 << 20, "the thin vdisk's holes stay holes")
        }
        try checkData()
        // Converted once: a restart opens the block maps as they are, and new writes go there.
        daemon?.stop()
        daemon = try ServeProcess(state: state)
        try checkData()
        let (rc, out) = shell(["timeout", "30", "qemu-io", "-f", "raw", "nbd+unix:///t?socket=\(state)/nbd.sock",
                               "-c", "write -P 0x44 7M 4k", "-c", "read -P 0x44 7M 4k"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertTrue(try ok(["pool", "check", "b"]).hasSuffix("clean\n"))
    }
}
