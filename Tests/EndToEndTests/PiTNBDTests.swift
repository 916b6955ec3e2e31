import Foundation
import XCTest

/// Snapshots over NBD with real clients: a read-only view and a writable clone of a PiT
/// compare equal to the PiT's image (`qemu-img compare`, and `nbdcopy` byte for byte)
/// while the vdisk moves on; writes into the clone never reach the PiT or the vdisk.
extension NBDTests {
    /// A file holding `size` bytes: `base` everywhere, then each (offset, length, byte) over it.
    private func image(_ name: String, size: Int, base: UInt8, _ writes: [(Int, Int, UInt8)]) throws -> String {
        var bytes = [UInt8](repeating: base, count: size)
        for (offset, length, byte) in writes { for i in offset..<(offset + length) { bytes[i] = byte } }
        let path = dir.file(name)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    private func qemuIO(_ export: String, _ commands: [String], readOnly: Bool = false) -> Int32 {
        shell(["timeout", "30", "qemu-io"] + (readOnly ? ["-r"] : []) + ["-f", "raw", uri(export)] + commands.flatMap { ["-c", $0] }).0
    }

    private func compare(_ file: String, _ export: String, _ what: String, line: UInt = #line) {
        let (rc, out) = shell(["timeout", "60", "qemu-img", "compare", "-f", "raw", "-F", "raw", file, uri(export)])
        XCTAssertEqual(rc, 0, "\(what): qemu-img compare: \(out)", line: line)
        let copy = dir.file("copy-\(export).img")
        let (crc, cout) = shell(["timeout", "60", "nbdcopy", uri(export), copy])
        XCTAssertEqual(crc, 0, "\(what): nbdcopy: \(cout)", line: line)
        XCTAssertEqual(FileManager.default.contents(atPath: copy), FileManager.default.contents(atPath: file), "\(what): nbdcopy's bytes", line: line)
    }

    func testSnapshotsOfAPiTServeItsImageOverNBD() throws {
        let size = 16 << 20
        XCTAssertEqual(qemuIO("m1", ["write -P 0x11 0 16M"]), 0)
        _ = try ok(["pit", "create", "m1", "--name", "p1"])
        // The vdisk moves on: a 4 KiB write into one extent, a whole extent, a run across two.
        let later: [(Int, Int, UInt8)] = [(4096, 4096, 0x22), (2 << 20, 1 << 20, 0x33), ((5 << 20) - 8192, 16384, 0x44)]
        for (offset, length, byte) in later { XCTAssertEqual(qemuIO("m1", ["write -P \(byte) \(offset) \(length)"]), 0) }
        _ = try ok(["snapshot", "create", "s1", "--pit", "p1"])
        _ = try ok(["snapshot", "create", "s2", "--pit", "p1", "--writable"])
        _ = try ok(["vdisk", "export", "s1", "--read-only"])
        _ = try ok(["vdisk", "export", "s2"])
        let pitImage = try image("p1.img", size: size, base: 0x11, [])
        compare(pitImage, "s1", "the read-only snapshot")
        compare(pitImage, "s2", "the writable clone before any write")
        compare(try image("m1.img", size: size, base: 0x11, later), "m1", "the vdisk")
        // Writes into the clone: only the clone changes.
        let cloneWrites: [(Int, Int, UInt8)] = [(0, 65536, 0x55), (9 << 20, 12288, 0x66)]
        for (offset, length, byte) in cloneWrites { XCTAssertEqual(qemuIO("s2", ["write -P \(byte) \(offset) \(length)"]), 0) }
        compare(try image("s2.img", size: size, base: 0x11, cloneWrites), "s2", "the clone after its writes")
        compare(pitImage, "s1", "the read-only snapshot after the clone's writes")
        XCTAssertNotEqual(qemuIO("s1", ["write -P 0x77 0 4096"]), 0, "a read-only snapshot refuses writes")
        // pit diff names the vdisk's changes since the PiT (extent granularity: 1 MiB here).
        let diff = try json(["pit", "diff", "p1"])
        let ranges = try XCTUnwrap(diff["ranges"] as? [[String: Any]]).map { ($0["offset"] as! Int, $0["length"] as! Int) }
        XCTAssertEqual(ranges.map { $0.0 }, [0, 2 << 20, 4 << 20], "\(ranges)")
        // Deleting the snapshots and the PiT gives their extents back; the vdisk keeps its image.
        for s in ["s1", "s2"] {
            _ = try ok(["vdisk", "unexport", s])
            _ = try ok(["snapshot", "delete", s])
        }
        _ = try ok(["pit", "delete", "p1"])
        compare(try image("m1-after.img", size: size, base: 0x11, later), "m1", "the vdisk after the deletes")
        usleep(500_000)
        for pool in ["a", "b"] { XCTAssertTrue(try ok(["pool", "check", pool]).hasSuffix("clean\n")) }
    }
}
