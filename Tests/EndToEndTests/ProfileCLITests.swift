import Foundation
import XCTest

/// `svsp-ctl profile ...` as a field engineer runs it.
final class ProfileCLITests: XCTestCase {
    static let profiles = ServeProcess.profiles

    func testValidateShippedShowAndDiff() throws {
        let ok = try CLI.run(["profile", "validate", "--profiles", Self.profiles])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        XCTAssertTrue(ok.stdout.contains("5 arrays, 5 pools, 4 links"), ok.stdout)
        let show = try CLI.run(["profile", "show", "fc-15k-array", "--profiles", Self.profiles])
        XCTAssertEqual(show.status, 0, show.stderr)
        XCTAssertTrue(show.stdout.contains("iops_limit: 17000"), show.stdout)
        let pool = try CLI.run(["profile", "show", "pools/file-backed", "--profiles", Self.profiles])
        XCTAssertTrue(pool.stdout.contains("extent_size: 1M"), pool.stdout)
        let diff = try CLI.run(["profile", "diff", "nvme-local", "sata-ssd", "--profiles", Self.profiles])
        XCTAssertEqual(diff.status, 0)
        XCTAssertTrue(diff.stdout.contains("queue_depth_per_lun    128  ->  32"), diff.stdout)
        let missing = try CLI.run(["profile", "show", "nosuch", "--profiles", Self.profiles])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stderr.hasPrefix("svsp-ctl: profile 'nosuch' not found"), missing.stderr)
    }

    func testValidateListsEveryProblemAndExits1() throws {
        let dir = TempDir()
        try FileManager.default.createDirectory(atPath: dir.file("arrays"), withIntermediateDirectories: true)
        let file = dir.file("arrays/eva.yaml")
        try "queue_depth_per_lun: -3\nrotational: maybe\n".write(toFile: file, atomically: true, encoding: .utf8)
        let r = try CLI.run(["profile", "validate", file])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("arrays/eva.yaml: queue_depth_per_lun: -3: must be 1..4096"), r.stderr)
        XCTAssertTrue(r.stderr.contains("arrays/eva.yaml: rotational: maybe: must be true or false"), r.stderr)
    }

    func testTuneWritesAProfileThatValidates() throws {
        let dir = TempDir()
        let target = dir.file("lun.img")
        // Write the file's blocks first so reads measure real I/O.
        XCTAssertEqual(try CLI.run(["bench", "raw", "--target", target, "--size", "16M", "--rw", "write", "--bs", "1M",
                                    "--verify", "--verify-phase", "write"]).status, 0)
        try FileManager.default.createDirectory(atPath: dir.file("arrays"), withIntermediateDirectories: true)
        let out = dir.file("arrays/tuned.yaml")
        let r = try CLI.run(["profile", "tune", "--lun", target, "--out", out, "--seconds-per-step", "0.1",
                             "--depths", "1,2,8", "--sizes", "4k,64k", "--allow-write"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stderr.contains("[12/12] randwrite bs=64k qd=8"), "progress is shown: \(r.stderr)")
        let text = try String(contentsOfFile: out, encoding: .utf8)
        XCTAssertTrue(text.contains("# randread     4k     1"), text)
        XCTAssertTrue(text.contains("queue_depth_per_lun: "), text)
        let check = try CLI.run(["profile", "validate", out])
        XCTAssertEqual(check.status, 0, check.stderr)
    }

    func testTuneRefusesADeviceWithAFileSystemUnlessForced() throws {
        let dir = TempDir()
        let target = dir.file("fs.img")
        var bytes = [UInt8](repeating: 0, count: 1 << 20)
        bytes[1080] = 0x53; bytes[1081] = 0xEF // ext4 superblock magic
        try Data(bytes).write(to: URL(fileURLWithPath: target))
        let out = dir.file("t.yaml")
        let r = try CLI.run(["profile", "tune", "--lun", target, "--out", out, "--seconds-per-step", "0.05", "--depths", "1", "--sizes", "4k"])
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "svsp-ctl: \(target) holds an ext2/3/4 file system; profile tune refuses it without --force\n")
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        let forced = try CLI.run(["profile", "tune", "--lun", target, "--out", out, "--seconds-per-step", "0.05",
                                  "--depths", "1", "--sizes", "4k", "--force"])
        XCTAssertEqual(forced.status, 0, forced.stderr)
        let after = try Data(contentsOf: URL(fileURLWithPath: target))
        XCTAssertEqual(after[1080], 0x53, "a read-only sweep leaves the device untouched")
    }
}
