import Foundation
import XCTest

/// Progress of long work as a user sees it: a bar on a terminal, plain lines in a log,
/// nothing with --json; stdout stays the command's answer alone.
final class ProgressTests: XCTestCase {
    func testMirrorVerifyAndVDiskVerifyShowTheirProgressOnStderrOnly() throws {
        let dir = TempDir()
        let state = dir.file("state")
        try CLI.run(["domain", "init", "--dir", state, "--name", "p"])
        let serve = try ServeProcess(state: state)
        defer { serve.stop() }
        func ctl(_ args: [String], _ env: [String: String]) throws -> CLI.Result {
            let r = try CLI.run(args + ["--dir", state], environment: env)
            XCTAssertEqual(r.status, 0, "\(args): \(r.stderr)")
            return r
        }
        for pool in ["a", "b"] {
            _ = try ctl(["pool", "create", pool, "--array-profile", "file-backed", "--lun", dir.file("\(pool).img"), "--create-size", "600M"], [:])
        }
        _ = try ctl(["vdisk", "create", "m", "--pool", "a", "--mirror-pool", "b", "--size", "512M"], [:])

        // A log's lines: no carriage returns, the two phases of a vdisk verify (which writes every
        // block, so the mirror verify below reads real data), then 100 %.
        let plain = try ctl(["vdisk", "verify", "m"], ["SVSP_PROGRESS": "plain", "SVSP_PROGRESS_INTERVAL": "0.1"])
        let lines = plain.stderr.split(separator: "\n")
        XCTAssertGreaterThanOrEqual(lines.count, 2, plain.stderr)
        XCTAssertFalse(plain.stderr.contains("\r"), plain.stderr)
        XCTAssertTrue(lines.allSatisfy { $0.hasPrefix("verify m: ") && $0.hasSuffix("elapsed") }, plain.stderr)
        XCTAssertTrue(lines.last!.contains("100%, 1.0 GiB of 1.0 GiB"), plain.stderr)
        XCTAssertTrue(plain.stdout.contains("verified"), plain.stdout)

        // A terminal's bar: redrawn in place, ending at 100 % on its own line.
        let bar = try ctl(["mirror", "verify", "m"], ["SVSP_PROGRESS": "bar"])
        XCTAssertTrue(bar.stderr.contains("\r\u{1B}[Kverify m ["), bar.stderr)
        let last = bar.stderr.components(separatedBy: "\r\u{1B}[K").last!
        XCTAssertTrue(last.contains("100%  512.0 MiB of 512.0 MiB") && last.hasSuffix("done\n"), bar.stderr)
        XCTAssertTrue(bar.stdout.contains("blocks compared") && !bar.stdout.contains("\r"), bar.stdout)

        // --json: the answer only.
        let json = try ctl(["mirror", "verify", "m", "--json"], ["SVSP_PROGRESS": "bar"])
        XCTAssertEqual(json.stderr, "")
        XCTAssertNotNil(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any], json.stdout)
    }

    func testBenchRawSweepMeasuresEveryDepthAndRefusesABadList() throws {
        let dir = TempDir()
        let target = dir.file("lun.img")
        let r = try CLI.run(["bench", "raw", "--target", target, "--size", "16M", "--rw", "randread", "--bs", "4k,16k",
                             "--sweep", "qd=1,2,8", "--seconds", "0.2", "--json"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let points = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        XCTAssertEqual(points.map { $0["queueDepth"] as? Int }, [1, 2, 8, 1, 2, 8])
        XCTAssertEqual(points.map { $0["blockBytes"] as? Int }, [4096, 4096, 4096, 16384, 16384, 16384])
        XCTAssertTrue(points.allSatisfy { (($0["read"] as? [String: Any])?["ios"] as? Int ?? 0) > 0 }, r.stdout)
        for (sweep, expected) in [("qd=1,zero", "every depth must be a number"), ("1,2", "must be qd=LIST")] {
            let bad = try CLI.run(["bench", "raw", "--target", target, "--sweep", sweep, "--seconds", "0.1"])
            XCTAssertEqual(bad.status, 1)
            XCTAssertTrue(bad.stderr.hasPrefix("svsp-ctl: --sweep '\(sweep)': \(expected)") && bad.stderr.split(separator: "\n").count == 1,
                          bad.stderr)
        }
    }
}
