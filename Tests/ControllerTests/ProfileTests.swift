import Controller
import Foundation
import XCTest

/// The shipped profiles load, and each kind of mistake gets its own one-line problem.
final class ProfileTests: XCTestCase {
    static let shippedRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("hardware-profiles").path

    func testEveryShippedProfileValidates() throws {
        let catalog = try ProfileCatalog(root: Self.shippedRoot)
        XCTAssertEqual(Set(catalog.arrays.keys), ["nvme-local", "sata-ssd", "fc-15k-array", "sata-7k2-array", "file-backed"])
        XCTAssertEqual(Set(catalog.pools.keys), ["nvme-local", "sata-ssd", "fc-15k-array", "sata-7k2-array", "file-backed"])
        XCTAssertEqual(Set(catalog.links.keys), ["lan-10g", "metro-1g", "wan-100m-20ms", "t3-45m-50ms"])
        let eva = try XCTUnwrap(catalog.arrays["fc-15k-array"])
        XCTAssertEqual(eva.iopsLimit, 17000)
        XCTAssertEqual(eva.bandwidthLimitBytesPerSecond, 780 * 1_048_576)
        XCTAssertFalse(eva.volatileWriteCache)
        let wan = try XCTUnwrap(catalog.links["wan-100m-20ms"])
        XCTAssertEqual(wan.bandwidthBytesPerSecond, 12_500_000)
        XCTAssertEqual(wan.rttNs, 20_000_000)
        XCTAssertEqual(wan.compressionLevel, 2)
        // Rendering round-trips: what `profile show` prints parses to the same values.
        for (name, p) in catalog.arrays {
            XCTAssertEqual(ArrayProfile.parse(name: name, file: "x", yaml: p.yaml()).0, p)
        }
        for (name, p) in catalog.pools { XCTAssertEqual(PoolProfile.parse(name: name, file: "x", yaml: p.yaml()).0, p) }
        for (name, p) in catalog.links { XCTAssertEqual(LinkProfile.parse(name: name, file: "x", yaml: p.yaml()).0, p) }
    }

    private func arrayProblems(_ yaml: String) -> [String] {
        ArrayProfile.parse(name: "eva", file: "arrays/eva.yaml", yaml: yaml).1.map(\.description)
    }

    func testOutOfRangeNamesFileFieldValueAndRule() {
        XCTAssertEqual(arrayProblems("queue_depth_per_lun: -3\n"), ["arrays/eva.yaml: queue_depth_per_lun: -3: must be 1..4096"])
    }

    func testBadUnit() {
        XCTAssertEqual(arrayProblems("max_io_size: 1Q\n"), ["arrays/eva.yaml: max_io_size: 1Q: must be a size 4k..32M"])
        let link = LinkProfile.parse(name: "l", file: "links/l.yaml", yaml: "bandwidth: 100Mbit\nrtt: 20ms\n").1
        XCTAssertEqual(link.map(\.description), ["links/l.yaml: bandwidth: 100Mbit: must be a rate 8kbit/s..8Tbit/s (e.g. 100Mbit/s)"])
        let rtt = LinkProfile.parse(name: "l", file: "links/l.yaml", yaml: "bandwidth: 1Gbit/s\nrtt: 20\n").1
        XCTAssertEqual(rtt.map(\.description), ["links/l.yaml: rtt: 20: must be a duration 0ms..10s"])
    }

    func testUnknownFieldIsAnErrorWithASuggestion() {
        XCTAssertEqual(arrayProblems("queue_dept_per_lun: 8\n"),
                       ["arrays/eva.yaml: queue_dept_per_lun: unknown field (did you mean 'queue_depth_per_lun'?)"])
        XCTAssertEqual(arrayProblems("colour: blue\n"), ["arrays/eva.yaml: colour: unknown field"])
    }

    func testMissingRequiredField() {
        let problems = LinkProfile.parse(name: "l", file: "links/l.yaml", yaml: "rtt: 20ms\n").1
        XCTAssertEqual(problems.map(\.description), ["links/l.yaml: bandwidth: required field missing"])
    }

    func testMalformedYAML() {
        let problems = arrayProblems("queue_depth_per_lun: [1, 2\n")
        XCTAssertEqual(problems.count, 1)
        XCTAssertTrue(problems[0].hasPrefix("arrays/eva.yaml: malformed YAML: "), problems[0])
        XCTAssertEqual(arrayProblems("- just\n- a list\n"), ["arrays/eva.yaml: must be a YAML mapping of field: value"])
    }

    func testCrossFieldRules() {
        XCTAssertEqual(arrayProblems("optimal_io_size: 2M\nmax_io_size: 1M\n"),
                       ["arrays/eva.yaml: optimal_io_size: 2M: must not exceed max_io_size 1M"])
        XCTAssertEqual(arrayProblems("queue_depth_per_lun: 64\nqueue_depth_per_array: 32\n"),
                       ["arrays/eva.yaml: queue_depth_per_array: 32: must be at least queue_depth_per_lun 64"])
        let stripe = PoolProfile.parse(name: "p", file: "pools/p.yaml", yaml: "array: a\nplacement: stripe\n").1
        XCTAssertEqual(stripe.map(\.description), ["pools/p.yaml: stripe_size: required when placement is stripe"])
    }

    func testEveryProblemIsReportedNotJustTheFirst() {
        XCTAssertEqual(arrayProblems("queue_depth_per_lun: 0\nrotational: maybe\nlatency_target: fast\n").count, 3)
    }

    func testPoolReferencingAMissingArray() throws {
        let dir = NSTemporaryDirectory() + "svsp-prof-\(UUID().uuidString.prefix(6))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for sub in ["arrays", "pools"] { try FileManager.default.createDirectory(atPath: dir + "/" + sub, withIntermediateDirectories: true) }
        try "queue_depth_per_lun: 8\n".write(toFile: dir + "/arrays/real.yaml", atomically: true, encoding: .utf8)
        try "array: imaginary\n".write(toFile: dir + "/pools/p.yaml", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try ProfileCatalog(root: dir)) { error in
            XCTAssertEqual("\(error)", "pools/p.yaml: array: imaginary: no array profile of that name in \(dir)/arrays")
        }
        XCTAssertEqual(ProfileCatalog.validate(files: [dir + "/pools/p.yaml"]).map(\.description),
                       ["pools/p.yaml: array: imaginary: no array profile of that name"])
        try "array: real\n".write(toFile: dir + "/pools/p.yaml", atomically: true, encoding: .utf8)
        XCTAssertEqual(ProfileCatalog.validate(files: [dir + "/pools/p.yaml"]), [])
    }

    func testUnits() {
        XCTAssertEqual(ProfileUnits.parseRate("100Mbit/s"), 12_500_000)
        XCTAssertEqual(ProfileUnits.parseRate("200MiB/s"), 200 * 1_048_576)
        XCTAssertEqual(ProfileUnits.parseRate("1GB/s"), 1e9)
        XCTAssertNil(ProfileUnits.parseRate("100Mbit"))
        XCTAssertEqual(ProfileUnits.parseDuration("20ms"), 20_000_000)
        XCTAssertEqual(ProfileUnits.parseDuration("0.2ms"), 200_000)
        XCTAssertEqual(ProfileUnits.parseDuration("5m"), 300_000_000_000)
        XCTAssertNil(ProfileUnits.parseDuration("20"))
    }
}
