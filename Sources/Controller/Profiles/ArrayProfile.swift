/// A disk array / LUN class: how to drive its LUNs. Schema: hardware-profiles/README.md.
public struct ArrayProfile: Equatable, Sendable {
    public var name: String
    public var description: String?
    public var logicalBlockSize: UInt32 = 512
    public var optimalIOBytes: UInt64 = 64 << 10
    public var maxIOBytes: UInt64 = 1 << 20
    public var queueDepthPerLUN: Int = 32
    public var queueDepthPerArray: Int = 256
    public var iopsLimit: Int?
    public var bandwidthLimitBytesPerSecond: Double?
    public var latencyTargetNs: UInt64 = 10_000_000
    public var volatileWriteCache: Bool = true
    public var rotational: Bool = false
    /// A chunk in flight longer than this marks its LUN stuck (`IOScheduler`): what the
    /// scheduler still holds for it, and what comes after, fails with ETIMEDOUT.
    public var ioTimeoutNs: UInt64 = 30_000_000_000

    public init(name: String) { self.name = name }

    static let knownFields = ["description", "logical_block_size", "optimal_io_size", "max_io_size",
                              "queue_depth_per_lun", "queue_depth_per_array", "iops_limit", "bandwidth_limit",
                              "latency_target", "volatile_write_cache", "rotational", "io_timeout"]

    /// Parses and validates; returns nil with the problems when anything is wrong.
    public static func parse(name: String, file: String, yaml: String) -> (ArrayProfile?, [ProfileProblem]) {
        var sink: [ProfileProblem] = []
        guard var r = FieldReader(file: file, yaml: yaml, problems: &sink) else { return (nil, sink) }
        var p = ArrayProfile(name: name)
        p.description = r.optional("description", default: nil as String?, { Optional($0) }, rule: "") ?? nil
        let lbs = r.optional("logical_block_size", default: 512, { Int($0).flatMap { [512, 4096].contains($0) ? $0 : nil } },
                             rule: "must be 512 or 4096")
        let opt = r.optional("optimal_io_size", default: p.optimalIOBytes, Parse.size(512...(32 << 20)),
                             rule: "must be a size 512..32M")
        let max = r.optional("max_io_size", default: p.maxIOBytes, Parse.size(4096...(32 << 20)),
                             rule: "must be a size 4k..32M")
        let qLUN = r.optional("queue_depth_per_lun", default: p.queueDepthPerLUN, Parse.int(1...4096), rule: "must be 1..4096")
        let qArray = r.optional("queue_depth_per_array", default: p.queueDepthPerArray, Parse.int(1...65536),
                                rule: "must be 1..65536")
        let iops = r.absentable("iops_limit", Parse.int(1...100_000_000), rule: "must be 1..100000000 or none")
        let bw = r.absentable("bandwidth_limit", Parse.rate(1...1e12),
                              rule: "must be a rate such as 100MiB/s or 10Gbit/s, or none")
        let lat = r.optional("latency_target", default: p.latencyTargetNs, Parse.duration(1_000...60_000_000_000),
                             rule: "must be a duration 1us..60s (e.g. 2ms)")
        let vwc = r.optional("volatile_write_cache", default: true, Parse.bool, rule: "must be true or false")
        let rot = r.optional("rotational", default: false, Parse.bool, rule: "must be true or false")
        let timeout = r.optional("io_timeout", default: p.ioTimeoutNs, Parse.duration(10_000_000...600_000_000_000),
                                 rule: "must be a duration 10ms..600s (e.g. 30s)")
        let problems = sink + r.finish(known: knownFields)
        guard let lbs, let opt, let max, let qLUN, let qArray, let iops, let bw, let lat, let vwc, let rot, let timeout,
              problems.isEmpty
        else { return (nil, problems) }

        var crossField: [ProfileProblem] = []
        if opt % UInt64(lbs) != 0 {
            crossField.append(.init(file: file, field: "optimal_io_size", value: ByteSize.format(opt),
                                    rule: "must be a multiple of logical_block_size \(lbs)"))
        }
        if max % UInt64(lbs) != 0 || max % 4096 != 0 {
            crossField.append(.init(file: file, field: "max_io_size", value: ByteSize.format(max),
                                    rule: "must be a multiple of 4k and of logical_block_size"))
        }
        if opt > max {
            crossField.append(.init(file: file, field: "optimal_io_size", value: ByteSize.format(opt),
                                    rule: "must not exceed max_io_size \(ByteSize.format(max))"))
        }
        if qArray < qLUN {
            crossField.append(.init(file: file, field: "queue_depth_per_array", value: "\(qArray)",
                                    rule: "must be at least queue_depth_per_lun \(qLUN)"))
        }
        guard crossField.isEmpty else { return (nil, crossField) }
        p.logicalBlockSize = UInt32(lbs)
        p.optimalIOBytes = opt
        p.maxIOBytes = max
        p.queueDepthPerLUN = qLUN
        p.queueDepthPerArray = qArray
        p.iopsLimit = iops
        p.bandwidthLimitBytesPerSecond = bw
        p.latencyTargetNs = lat
        p.volatileWriteCache = vwc
        p.rotational = rot
        p.ioTimeoutNs = timeout
        return (p, [])
    }

    /// Every field, defaults resolved, as YAML a field engineer can commit.
    public func yaml() -> String {
        var lines: [String] = []
        if let description { lines.append("description: \"\(description)\"") }
        lines += [
            "logical_block_size: \(logicalBlockSize)",
            "optimal_io_size: \(ByteSize.format(optimalIOBytes))",
            "max_io_size: \(ByteSize.format(maxIOBytes))",
            "queue_depth_per_lun: \(queueDepthPerLUN)",
            "queue_depth_per_array: \(queueDepthPerArray)",
            "iops_limit: \(iopsLimit.map(String.init) ?? "none")",
            "bandwidth_limit: \(bandwidthLimitBytesPerSecond.map(ProfileUnits.formatRate) ?? "none")",
            "latency_target: \(ProfileUnits.formatDuration(latencyTargetNs))",
            "volatile_write_cache: \(volatileWriteCache)",
            "rotational: \(rotational)",
            "io_timeout: \(ProfileUnits.formatDuration(ioTimeoutNs))",
        ]
        return lines.joined(separator: "\n") + "\n"
    }
}
