import Foundation
import XCTest

/// The NBD front end with real clients (nbdinfo, qemu-io, nbdcopy, qemu-img, fio's nbd engine).
final class NBDTests: XCTestCase {
    private var dir: TempDir!
    private var state: String { dir.file("state") }
    private var socket: String { state + "/nbd.sock" }
    private var daemon: ServeProcess?

    private func tool(_ name: String) -> Bool { shell(["sh", "-c", "command -v \(name)"]).0 == 0 }

    override func setUpWithError() throws {
        for t in ["nbdinfo", "qemu-io", "nbdcopy", "qemu-img"] where !tool(t) {
            throw XCTSkip("NBD tests skipped: \(t) not installed (Debian: qemu-utils, libnbd-bin)")
        }
        dir = TempDir()
        XCTAssertEqual(try CLI.run(["domain", "init", "--dir", state, "--name", "n"]).status, 0)
        daemon = try ServeProcess(state: state)
        for pool in ["a", "b"] {
            _ = try ok(["pool", "create", pool, "--array-profile", "file-backed", "--lun", dir.file("\(pool).img"), "--create-size", "100M"])
        }
        _ = try ok(["vdisk", "create", "v1", "--pool", "a", "--size", "64M"])
        _ = try ok(["vdisk", "create", "m1", "--pool", "a", "--mirror-pool", "b", "--size", "16M"])
        _ = try ok(["vdisk", "export", "v1"])
        _ = try ok(["vdisk", "export", "m1"])
    }

    override func tearDown() {
        daemon?.stop()
    }

    private func ok(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> String {
        let r = try CLI.run(args + ["--dir", state])
        XCTAssertEqual(r.status, 0, "\(args): \(r.stderr)", file: file, line: line)
        return r.stdout
    }

    private func uri(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(socket)" }

    func testListAndQemuIOOnPlainAndMirroredVDisks() throws {
        let (status, list) = shell(["timeout", "20", "nbdinfo", "--list", "nbd+unix:///?socket=\(socket)"])
        XCTAssertEqual(status, 0)
        XCTAssertTrue(list.contains("export=\"v1\"") && list.contains("67108864"), list)
        XCTAssertTrue(list.contains("export=\"m1\"") && list.contains("16777216"), list)
        for export in ["v1", "m1"] {
            let (rc, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri(export), "-c", "write -P 0xab 0 1M",
                                   "-c", "read -P 0xab 0 1M", "-c", "write -z 65536 8192", "-c", "read -P 0 65536 8192", "-c", "flush"])
            XCTAssertEqual(rc, 0, out)
            XCTAssertFalse(out.contains("Pattern verification failed"), out)
        }
        XCTAssertTrue(try ok(["mirror", "verify", "m1"]).contains(" 0 differ"))
    }

    func testNBDCopyInAndOutComparesEqual() throws {
        let source = dir.file("random.bin"), back = dir.file("back.bin")
        var bytes = [UInt8](repeating: 0, count: 64 << 20)
        var x: UInt64 = 0x1234_5678
        for i in stride(from: 0, to: bytes.count, by: 8) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            withUnsafeBytes(of: x) { for j in 0..<8 { bytes[i + j] = $0[j] } }
        }
        try Data(bytes).write(to: URL(fileURLWithPath: source))
        XCTAssertEqual(shell(["timeout", "60", "nbdcopy", source, uri("v1")]).0, 0)
        XCTAssertEqual(shell(["timeout", "60", "nbdcopy", uri("v1"), back]).0, 0)
        XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: back)) == Data(bytes), "what went in comes back out")
        let converted = dir.file("converted.raw")
        XCTAssertEqual(shell(["timeout", "60", "qemu-img", "convert", "-O", "raw", uri("v1"), converted]).0, 0)
        XCTAssertTrue(try Data(contentsOf: URL(fileURLWithPath: converted)) == Data(bytes))
    }

    func testFioVerifyOnAMirrorLeavesIdenticalLegs() throws {
        let (hasEngine, _) = shell(["sh", "-c", "fio --enghelp=nbd >/dev/null 2>&1"])
        guard hasEngine == 0 else { throw XCTSkip("fio has no nbd engine here") }
        let (rc, out) = shell(["timeout", "120", "fio", "--name=v", "--ioengine=nbd", "--uri=\(uri("m1"))", "--rw=randwrite", "--bs=4k",
                               "--iodepth=32", "--size=16M", "--verify=crc32c", "--do_verify=1", "--output-format=terse"])
        XCTAssertEqual(rc, 0, out)
        XCTAssertTrue(try ok(["mirror", "verify", "m1"]).contains(" 0 differ"), "both legs hold the same bytes")
    }

    func testMalformedHandshakesAreDroppedAndOthersUnaffected() throws {
        // A client that sends garbage instead of option magic is disconnected.
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in socket.utf8.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        XCTAssertEqual(rc, 0)
        var greeting = [UInt8](repeating: 0, count: 18)
        XCTAssertEqual(read(fd, &greeting, 18), 18)
        XCTAssertEqual(Array(greeting[0..<8]), Array("NBDMAGIC".utf8))
        var flags: [UInt8] = [0, 0, 0, 3]
        _ = write(fd, &flags, 4)
        var junk = [UInt8](repeating: 0x41, count: 16)
        _ = write(fd, &junk, 16)
        var buf = [UInt8](repeating: 0, count: 64)
        XCTAssertEqual(read(fd, &buf, 64), 0, "bad option magic: the server closes the connection")
        close(fd)
        // An unknown export is an error reply, not a crash; normal clients keep working.
        let (bad, _) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("nope"), "-c", "read 0 512"])
        XCTAssertNotEqual(bad, 0)
        let (good, out) = shell(["timeout", "20", "qemu-io", "-f", "raw", uri("v1"), "-c", "read 0 4096"])
        XCTAssertEqual(good, 0, out)
        XCTAssertTrue(try ok(["status"]).contains("health: normal"))
    }
}
