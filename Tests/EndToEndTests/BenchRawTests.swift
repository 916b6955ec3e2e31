import Foundation
import XCTest

/// `svsp-ctl bench raw` as a user runs it.
final class BenchRawTests: XCTestCase {
    func testVerifyWritesAndReadsBackEveryBlock() throws {
        let dir = TempDir()
        let target = dir.file("lun.img")
        let r = try CLI.run(["bench", "raw", "--target", target, "--size", "16M", "--rw", "randwrite", "--bs", "16k",
                             "--qd", "16", "--verify", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let phases = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        XCTAssertEqual(phases.map { $0["phase"] as? String }, ["verify-w", "verify-r"])
        XCTAssertEqual((phases[0]["write"] as? [String: Any])?["ios"] as? Int, 1024)
        XCTAssertEqual((phases[1]["read"] as? [String: Any])?["ios"] as? Int, 1024)
        // The file holds the pattern: no block is left zero.
        let data = try Data(contentsOf: URL(fileURLWithPath: target))
        XCTAssertEqual(data.count, 16 << 20)
        for block in stride(from: 0, to: data.count, by: 16384) {
            XCTAssertTrue(data[block..<(block + 64)].contains { $0 != 0 }, "block at \(block) was never written")
        }
    }

    func testTimedRunReportsLatencyPercentiles() throws {
        let dir = TempDir()
        let target = dir.file("lun.img")
        let r = try CLI.run(["bench", "raw", "--target", target, "--size", "8M", "--rw", "randrw", "--bs", "4k",
                             "--qd", "4", "--seconds", "0.5"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("p99.9 us"), r.stdout)
        XCTAssertTrue(r.stdout.contains("read") && r.stdout.contains("write"), r.stdout)
    }

    func testBadArgumentsGiveOneLineErrors() throws {
        let dir = TempDir()
        let target = dir.file("lun.img")
        XCTAssertEqual(try CLI.run(["bench", "raw", "--target", target, "--size", "4M", "--seconds", "0.1"]).status, 0)
        let cases: [([String], String)] = [
            (["--target", dir.file("absent.img")], "does not exist"),
            (["--target", target, "--size", "4M", "--rw", "sideways"], "--rw 'sideways'"),
            (["--target", target, "--size", "4M", "--bs", "3q"], "invalid size '3q'"),
            (["--target", target, "--size", "4M", "--bs", "1000"], "--bs 1000"),
            (["--target", target, "--size", "4M", "--qd", "0"], "--qd 0"),
            (["--target", target, "--size", "64M"], "smaller than --size"),
        ]
        for (args, expected) in cases {
            let r = try CLI.run(["bench", "raw"] + args)
            XCTAssertEqual(r.status, 1, "\(args): \(r.stderr)")
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, "one line for \(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("svsp-ctl: ") && r.stderr.contains(expected), "\(args): \(r.stderr)")
        }
    }

    func testVerifyReadPhaseFindsACorruptedByte() throws {
        let dir = TempDir()
        let target = dir.file("lun.img")
        let common = ["bench", "raw", "--target", target, "--size", "8M", "--bs", "4k", "--qd", "8", "--verify", "--seed", "42"]
        XCTAssertEqual(try CLI.run(common + ["--verify-phase", "write"]).status, 0)
        XCTAssertEqual(try CLI.run(common + ["--verify-phase", "read"]).status, 0, "an intact area verifies")

        let corruptAt: UInt64 = 5 * 4096 + 1234
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: target))
        try handle.seek(toOffset: corruptAt)
        let original = handle.readData(ofLength: 1)[0]
        try handle.seek(toOffset: corruptAt)
        handle.write(Data([original ^ 0xFF]))
        try handle.close()

        let r = try CLI.run(common + ["--verify-phase", "read"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("verify failed at offset \(corruptAt)"), r.stderr)
        XCTAssertTrue(r.stderr.contains("expected 0x\(String(original, radix: 16)) got 0x\(String(original ^ 0xFF, radix: 16))"), r.stderr)
    }
}
