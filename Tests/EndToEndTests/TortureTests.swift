import Foundation
import XCTest

/// A few rounds of `scripts/torture` per scenario on every test run (CI): SIGKILL (and,
/// as root with loop devices, a failing leg) at random moments under NBD writes, every
/// acknowledged write checked afterwards. `scripts/torture --rounds 1000` is the long run.
final class TortureTests: XCTestCase {
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("scripts/torture").path

    private func torture(_ scenario: String, rounds: Int = 5) throws {
        guard shell(["sh", "-c", "command -v python3"]).0 == 0 else { throw XCTSkip("torture skipped: python3 not installed") }
        let (status, text) = try runCapturing("/usr/bin/env", ["python3", Self.script, "--rounds", "\(rounds)", "--scenario", scenario,
                                                               "--svsp-ctl", CLI.binary])
        XCTAssertEqual(status, 0, text)
        XCTAssertTrue(text.contains("total: \(rounds) rounds (\(scenario))") && text.contains(", 0 failed"), text)
        print(text)
    }

    func testMirrorTorture() throws { try torture("mirror") }

    /// The harness's own model: a trim cut by the fault that landed anyway leaves zeros,
    /// which must stay allowed in later rounds (it once settled back to the older write,
    /// and the next round reported an acknowledged write lost that a trim had replaced).
    func testTortureModel() throws {
        guard shell(["sh", "-c", "command -v python3"]).0 == 0 else { throw XCTSkip("python3 not installed") }
        let (status, text) = try runCapturing("/usr/bin/env", ["python3", Self.script, "--self-test"])
        XCTAssertEqual(status, 0, text)
        XCTAssertTrue(text.contains("torture self-test: ok"), text)
    }

    /// 20 rounds: thin first writes, trims, and vdisk creates and deletes cut by SIGKILL.
    func testThinTorture() throws { try torture("thin", rounds: 20) }

    /// 6 rounds: a mirror taking PiTs while writes are redirected, cut by SIGKILL or a
    /// failing leg; every acknowledged PiT checked through a snapshot.
    func testPiTTorture() throws { try torture("pit", rounds: 6) }

    /// 5 rounds: two daemons and an async group with 1 s cycles, the source or the
    /// destination SIGKILLed under writes; every image the destination calls complete is
    /// causally consistent, and once caught up it equals the source block for block.
    func testAsyncTorture() throws { try torture("async", rounds: 5) }

    /// 10 rounds of `async transfer-production` back and forth while the writer writes at
    /// whichever site is production: no acknowledged write lost, both sites equal after
    /// each round, the old source shipped no more than was written there. (Before the
    /// role changes dropped the clients of the exports they remove, a writer connected
    /// during the hold kept writing: every round failed.)
    func testAlternatePrimaryTorture() throws { try torture("alternate", rounds: 10) }
}
