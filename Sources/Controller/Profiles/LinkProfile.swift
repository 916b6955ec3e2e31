/// A link between domains: what async mirroring may send over it, and how.
public struct LinkProfile: Equatable, Sendable {
    public var name: String
    public var description: String?
    public var bandwidthBytesPerSecond: Double = 0
    public var rttNs: UInt64 = 0
    /// nil = off; 0...3 = ISA-L igzip level.
    public var compressionLevel: Int?
    public var pitCycleNs: UInt64 = 60_000_000_000
    public var bytesInFlight: UInt64 = 0
    public var retention: Int = 16
    public var captureMemoryBytes: UInt64 = 256 << 20

    public init(name: String) { self.name = name }

    static let knownFields = ["description", "bandwidth", "rtt", "compression", "pit_cycle", "bytes_in_flight",
                              "retention", "capture_memory"]

    public static func parse(name: String, file: String, yaml: String) -> (LinkProfile?, [ProfileProblem]) {
        var sink: [ProfileProblem] = []
        guard var r = FieldReader(file: file, yaml: yaml, problems: &sink) else { return (nil, sink) }
        var p = LinkProfile(name: name)
        p.description = r.optional("description", default: nil as String?, { Optional($0) }, rule: "") ?? nil
        let bw = r.required("bandwidth", Parse.rate(1000...1e12), rule: "must be a rate 8kbit/s..8Tbit/s (e.g. 100Mbit/s)")
        let rtt = r.required("rtt", Parse.duration(0...10_000_000_000), rule: "must be a duration 0ms..10s")
        let compression = r.absentable("compression", Parse.int(0...3), rule: "must be off or an igzip level 0..3")
        let cycle = r.optional("pit_cycle", default: p.pitCycleNs, Parse.duration(1_000_000_000...86_400_000_000_000),
                               rule: "must be a duration 1s..24h")
        let inFlight = r.absentable("bytes_in_flight", Parse.size((64 << 10)...(16 << 30)), rule: "must be a size 64k..16G")
        let retention = r.optional("retention", default: p.retention, Parse.int(1...1024), rule: "must be 1..1024 PiTs")
        let capture = r.optional("capture_memory", default: p.captureMemoryBytes, Parse.size((1 << 20)...(1 << 40)),
                                 rule: "must be a size 1M..1T")
        let problems = sink + r.finish(known: knownFields)
        guard let bw, let rtt, let compression, let cycle, let inFlight, let retention, let capture, problems.isEmpty
        else { return (nil, problems) }
        p.bandwidthBytesPerSecond = bw
        p.rttNs = rtt
        p.compressionLevel = compression
        p.pitCycleNs = cycle
        // Default window: two bandwidth-delay products (at least 1 MiB) keeps the pipe full.
        p.bytesInFlight = inFlight ?? Swift.max(1 << 20, UInt64(bw * Double(rtt) / 1e9 * 2))
        p.retention = retention
        p.captureMemoryBytes = capture
        return (p, [])
    }

    public func yaml() -> String {
        var lines: [String] = []
        if let description { lines.append("description: \"\(description)\"") }
        lines += [
            "bandwidth: \(ProfileUnits.formatRate(bandwidthBytesPerSecond))",
            "rtt: \(ProfileUnits.formatDuration(rttNs))",
            "compression: \(compressionLevel.map(String.init) ?? "off")",
            "pit_cycle: \(ProfileUnits.formatDuration(pitCycleNs))",
            "bytes_in_flight: \(ByteSize.format(bytesInFlight))",
            "retention: \(retention)",
            "capture_memory: \(ByteSize.format(captureMemoryBytes))",
        ]
        return lines.joined(separator: "\n") + "\n"
    }
}
