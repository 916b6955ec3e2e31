import Foundation
import XCTest

/// Mirror copies that must not lose acknowledged writes: a forced resync from a failed
/// leg, and a leg removal while a copy runs (legs named by index shifted under the copy).
extension MirrorTests {
    /// Writes the verify pattern of `seed` over the first `size` of `vdisk` (no read-back).
    private func writePattern(_ vdisk: String, seed: Int, size: String) -> Bool {
        Self.writePattern(vdisk, seed: seed, size: size, state: state)
    }

    static func writePattern(_ vdisk: String, seed: Int, size: String, state: String) -> Bool {
        (try? CLI.run(["vdisk", "verify", vdisk, "--phase", "write", "--seed", "\(seed)", "--size", size, "--dir", state]))?.status == 0
    }

    private func patternReadsBack(_ vdisk: String, seed: Int, size: String) throws -> Bool {
        try CLI.run(["vdisk", "verify", vdisk, "--phase", "read", "--seed", "\(seed)", "--size", size, "--dir", state]).stdout
            .contains("matched the pattern")
    }

    func testForcedResyncFromAFailedLegKeepsEveryHostWrite() throws {
        _ = try ok(["vdisk", "create", "x", "--pool", "b", "--mirror-pool", "c", "--size", "48M"])
        XCTAssertTrue(writePattern("x", seed: 1, size: "48M"))
        for l in [1, 2] { XCTAssertEqual(shell(["blockdev", "--setro", loops[l]]).0, 0) }
        XCTAssertFalse(writePattern("x", seed: 2, size: "1M"), "both legs refuse the write")
        XCTAssertEqual(try mirrorState("x")["state"] as? String, "failed")
        for l in [1, 2] { XCTAssertEqual(shell(["blockdev", "--setrw", loops[l]]).0, 0) }
        // Slow the copy so host writes land while it runs.
        _ = try ok(["vdisk", "create", "tmp", "--pool", "b", "--mirror-pool", "c", "--size", "1M"])
        _ = try ok(["mirror", "set-rate", "tmp", "16MiB/s"])
        let resync = ResultBox()
        let copier = Thread { [state] in resync.result = try? CLI.run(["mirror", "resync", "x", "--force-from", "0", "--dir", state]) }
        copier.start()
        // Once the forced copy has begun (leg 0 declared the truth), host writes go on during it.
        var tries = 0
        while try mirrorState("x")["percent"] == nil, tries < 500 { usleep(5_000); tries += 1 }
        var failures = 0
        let lastSeed = 19
        for seed in 10...lastSeed where !writePattern("x", seed: seed, size: "16M") { failures += 1 }
        XCTAssertFalse(copier.isFinished, "the copy must still run when the writes end (else the test proves nothing)")
        while !copier.isFinished { usleep(10_000) }
        XCTAssertEqual(resync.result?.status, 0, resync.result?.stderr ?? "")
        XCTAssertEqual(failures, 0, "host writes are acknowledged during the forced copy")
        XCTAssertEqual(try mirrorState("x")["state"] as? String, "normal")
        // Every acknowledged write is on both legs: the last pattern reads back, the legs agree.
        XCTAssertTrue(try patternReadsBack("x", seed: lastSeed, size: "16M"))
        try assertLegsIdentical(loops[1], loops[2], bytes: 48 << 20)
    }

    func testALegCannotBeRemovedWhileACopyRunsAndTheCopyNeverUsesAStaleLeg() throws {
        _ = try ok(["vdisk", "create", "t", "--pool", "a", "--mirror-pool", "b", "--mirror-pool", "c", "--size", "16M"])
        XCTAssertTrue(writePattern("t", seed: 1, size: "16M"))
        // Leg 1 (b) fails and misses the next pattern.
        XCTAssertEqual(shell(["blockdev", "--setro", loops[1]]).0, 0)
        XCTAssertTrue(writePattern("t", seed: 2, size: "16M"))
        XCTAssertEqual(((try mirrorState("t")["legs"]) as? [[String: Any]])?[1]["state"] as? String, "failed")
        XCTAssertEqual(shell(["blockdev", "--setrw", loops[1]]).0, 0)
        _ = try ok(["vdisk", "create", "tmp", "--pool", "a", "--mirror-pool", "b", "--size", "1M"])
        _ = try ok(["mirror", "set-rate", "tmp", "4MiB/s"])
        // A copy 0 -> 1 runs; removing leg 0 under it would shift every index by one.
        let resync = Thread { [state] in _ = try? CLI.run(["mirror", "resync", "t", "--dir", state]) }
        resync.start()
        usleep(700_000)
        let removal = try CLI.run(["mirror", "remove-leg", "t", "--leg", "0", "--dir", state])
        XCTAssertEqual(removal.status, 1, "refused while the copy runs")
        XCTAssertTrue(removal.stderr.contains("resync is running"), removal.stderr)
        _ = try ok(["mirror", "set-rate", "tmp", "none"])
        while !resync.isFinished { usleep(20_000) }
        XCTAssertEqual(try mirrorState("t")["state"] as? String, "normal")
        _ = try ok(["mirror", "remove-leg", "t", "--leg", "0"]) // once the copy is done
        XCTAssertTrue(try patternReadsBack("t", seed: 2, size: "16M"), "no stale data was copied over a good leg")
        try assertLegsIdentical(loops[1], loops[2], bytes: 16 << 20)
    }
}

final class ResultBox: @unchecked Sendable { var result: CLI.Result? }
