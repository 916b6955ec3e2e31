import Controller
import Foundation

/// What `bench raw` prints: a table for people, or JSON for scripts.
struct BenchReport: Codable {
    struct Direction: Codable {
        var ios: UInt64
        var iops: Double
        var mibPerSecond: Double
        var latencyUs: [String: Double]
    }

    var target: String
    var rw: String
    var blockBytes: Int
    var queueDepth: Int
    var seconds: Double
    var phase: String
    var seed: UInt64?
    var read: Direction?
    var write: Direction?

    static func direction(_ stats: DirectionStats, elapsedNs: UInt64) -> Direction? {
        guard stats.ios > 0 else { return nil }
        let seconds = Double(elapsedNs) / 1e9
        func us(_ ns: UInt64) -> Double { (Double(ns) / 1000 * 10).rounded() / 10 }
        return Direction(
            ios: stats.ios,
            iops: (Double(stats.ios) / seconds).rounded(),
            mibPerSecond: (Double(stats.bytes) / seconds / 1_048_576 * 10).rounded() / 10,
            latencyUs: [
                "p50": us(stats.latency.valueAtPercentile(50)),
                "p99": us(stats.latency.valueAtPercentile(99)),
                "p99.9": us(stats.latency.valueAtPercentile(99.9)),
                "max": us(stats.latency.max),
            ])
    }

    static func tableHeader() -> String {
        pad("phase", 8) + pad("op", 6) + padL("IOPS", 10) + padL("MiB/s", 10) + padL("p50 us", 10) + padL("p99 us", 10)
            + padL("p99.9 us", 10) + padL("max us", 10)
    }

    func tableRows() -> [String] {
        [("read", read), ("write", write)].compactMap { name, d in
            guard let d else { return nil }
            return Self.pad(phase, 8) + Self.pad(name, 6) + Self.padL(String(format: "%.0f", d.iops), 10)
                + Self.padL(String(format: "%.1f", d.mibPerSecond), 10)
                + ["p50", "p99", "p99.9", "max"].map { Self.padL(String(format: "%.1f", d.latencyUs[$0] ?? 0), 10) }.joined()
        }
    }

    static func sweepHeader() -> String {
        pad("bs", 8) + padL("qd", 6) + pad("  op", 8) + padL("IOPS", 10) + padL("MiB/s", 10) + padL("p50 us", 10) + padL("p99 us", 10)
    }

    /// One point of a sweep: the direction that ran (both for randrw).
    func sweepRow() -> String {
        [("read", read), ("write", write)].compactMap { name, d in
            guard let d else { return nil }
            return Self.pad(ByteSize.format(UInt64(blockBytes)), 8) + Self.padL("\(queueDepth)", 6) + Self.pad("  " + name, 8)
                + Self.padL(String(format: "%.0f", d.iops), 10) + Self.padL(String(format: "%.1f", d.mibPerSecond), 10)
                + Self.padL(String(format: "%.1f", d.latencyUs["p50"] ?? 0), 10) + Self.padL(String(format: "%.1f", d.latencyUs["p99"] ?? 0), 10)
        }.joined(separator: "\n")
    }

    private static func pad(_ s: String, _ n: Int) -> String { s.padding(toLength: max(n, s.count + 1), withPad: " ", startingAt: 0) }
    private static func padL(_ s: String, _ n: Int) -> String { String(repeating: " ", count: max(1, n - s.count)) + s }
}
