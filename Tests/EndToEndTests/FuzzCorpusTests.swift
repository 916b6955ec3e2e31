import Foundation
import XCTest

/// Every input in Tests/FuzzCorpus (the seeds, and every crash a fuzzer found once it was
/// fixed) replayed through its target in the normal build: none may crash again.
final class FuzzCorpusTests: XCTestCase {
    static let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("FuzzCorpus").path

    private var replayer: String { (CLI.binary as NSString).deletingLastPathComponent + "/svsp-fuzz" }

    func testEveryCorpusReplaysWithoutACrash() throws {
        let targets = try FileManager.default.contentsOfDirectory(atPath: Self.corpus).sorted()
        XCTAssertEqual(Set(targets), ["setup-record", "bitmap-header", "lun-label", "profile", "mgmt-request", "nbd", "pool-metadata", "replication-frame"])
        for target in targets {
            let (status, text) = try runCapturing(replayer, [target, Self.corpus + "/" + target],
                                                  environment: ["SVSP_PROFILES": ServeProcess.profiles])
            XCTAssertEqual(status, 0, "\(target): \(text)")
            XCTAssertTrue(text.contains("input(s) replayed"), "\(target): \(text)")
        }
    }
}
