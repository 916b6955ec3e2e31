/// How a storage pool uses an array: extents, placement, reserves, background share.
public struct PoolProfile: Equatable, Sendable {
    public enum Placement: String, Sendable { case concatenate, stripe }

    public var name: String
    public var description: String?
    public var arrayProfile: String = ""
    public var extentBytes: UInt64 = 4 << 20
    public var placement: Placement = .concatenate
    public var stripeBytes: UInt64?
    public var metadataReserveBytes: UInt64 = 64 << 20
    public var backgroundSharePercent: Int = 20
    public var dirtyRegionBytes: UInt64 = 1 << 20
    public var legRetryIntervalNs: UInt64 = 60_000_000_000
    /// PiTs kept per vdisk: taking one more retires standard PiTs before user PiTs, older
    /// before newer, never one a mirror task holds.
    public var pitRetention: Int = 16

    public init(name: String) { self.name = name }

    static let knownFields = ["description", "array", "extent_size", "placement", "stripe_size", "metadata_reserve",
                              "background_share", "dirty_region_size", "leg_retry_interval", "pit_retention"]

    public static func parse(name: String, file: String, yaml: String) -> (PoolProfile?, [ProfileProblem]) {
        var sink: [ProfileProblem] = []
        guard var r = FieldReader(file: file, yaml: yaml, problems: &sink) else { return (nil, sink) }
        var p = PoolProfile(name: name)
        p.description = r.optional("description", default: nil as String?, { Optional($0) }, rule: "") ?? nil
        let array = r.required("array", Parse.name, rule: "must be an array profile name (letters, digits, - _ .)")
        let extent = r.optional("extent_size", default: p.extentBytes, Parse.size((64 << 10)...(1 << 30), powerOfTwo: true),
                                rule: "must be a power of two 64k..1G")
        let placement = r.optional("placement", default: Placement.concatenate, { Placement(rawValue: $0) },
                                   rule: "must be concatenate or stripe")
        let stripe = r.absentable("stripe_size", Parse.size(4096...(1 << 30), powerOfTwo: true),
                                  rule: "must be a power of two 4k..1G")
        let reserve = r.optional("metadata_reserve", default: p.metadataReserveBytes, Parse.size((1 << 20)...(1 << 40)),
                                 rule: "must be a size 1M..1T")
        let share = r.optional("background_share", default: p.backgroundSharePercent, {
            Int($0.hasSuffix("%") ? String($0.dropLast()) : $0).flatMap { (1...100).contains($0) ? $0 : nil }
        }, rule: "must be a percentage 1..100")
        let region = r.optional("dirty_region_size", default: p.dirtyRegionBytes,
                                Parse.size((64 << 10)...(1 << 30), powerOfTwo: true), rule: "must be a power of two 64k..1G")
        let retry = r.optional("leg_retry_interval", default: p.legRetryIntervalNs,
                               Parse.duration(1_000_000_000...86_400_000_000_000), rule: "must be a duration 1s..24h")
        let retention = r.optional("pit_retention", default: p.pitRetention, { Int($0).flatMap { (1...1000).contains($0) ? $0 : nil } },
                                   rule: "must be a whole number 1..1000")
        let problems = sink + r.finish(known: knownFields)
        guard let array, let extent, let placement, let stripe, let reserve, let share, let region, let retry, let retention,
              problems.isEmpty
        else { return (nil, problems) }
        if placement == .stripe {
            guard let s = stripe else {
                return (nil, [.init(file: file, field: "stripe_size", rule: "required when placement is stripe")])
            }
            if s > extent {
                return (nil, [.init(file: file, field: "stripe_size", value: ByteSize.format(s),
                                    rule: "must not exceed extent_size \(ByteSize.format(extent))")])
            }
        } else if let s = stripe {
            return (nil, [.init(file: file, field: "stripe_size", value: ByteSize.format(s),
                                rule: "only allowed when placement is stripe")])
        }
        p.arrayProfile = array
        p.extentBytes = extent
        p.placement = placement
        p.stripeBytes = stripe
        p.metadataReserveBytes = reserve
        p.backgroundSharePercent = share
        p.dirtyRegionBytes = region
        p.legRetryIntervalNs = retry
        p.pitRetention = retention
        return (p, [])
    }

    public func yaml() -> String {
        var lines: [String] = []
        if let description { lines.append("description: \"\(description)\"") }
        lines += [
            "array: \(arrayProfile)",
            "extent_size: \(ByteSize.format(extentBytes))",
            "placement: \(placement.rawValue)",
        ]
        if let stripeBytes { lines.append("stripe_size: \(ByteSize.format(stripeBytes))") }
        lines += [
            "metadata_reserve: \(ByteSize.format(metadataReserveBytes))",
            "background_share: \(backgroundSharePercent)%",
            "dirty_region_size: \(ByteSize.format(dirtyRegionBytes))",
            "leg_retry_interval: \(ProfileUnits.formatDuration(legRetryIntervalNs))",
            "pit_retention: \(pitRetention)",
        ]
        return lines.joined(separator: "\n") + "\n"
    }
}
