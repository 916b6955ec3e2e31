import Foundation

/// Seeded LUN faults for tests and field drills: `svsp-ctl serve --fault-plan FILE`
/// (never on by default; the daemon logs it as critical). A JSON file:
///
///     {"seed": 7, "rules": [{"pool": "b", "op": "write", "class": "host", "errno": 5}]}
///
/// Each rule matches the chunks a pool's scheduler is about to send to a LUN (`lun`:
/// one LUN index, default every LUN; `op`: read, write, flush or any; `class`: host,
/// background or any) and fails them with `errno` instead of touching the device: the
/// first `after` matches pass, then each fails with `probability` (default 1), at most
/// `count` times (default unlimited). Draws come from one generator per rule seeded by
/// `seed`, so the same plan under the same I/O order fails the same chunks.
/// `"class": "host"` makes writes fail for host I/O while a copier's succeed. (A chunk the
/// engine had no room for is looked at again when it is retried, and counts again.)
///
/// `action` says what a chosen chunk does instead of failing (`fail`, the default):
/// - `delay`: reaches the device `delay_ms` later (a latency spike);
/// - `stuck`: never reaches the device nor answers, as a hung LUN; after the array
///   profile's `io_timeout` the scheduler declares the LUN stuck and fails it with ETIMEDOUT
///   (then, with nothing else in flight, the LUN has answered all it held: stuck no longer);
/// - `torn`: a write of more than `unit` bytes (default 4096) lands only partly, a seeded
///   number of whole units from its start, and the daemon kills itself with SIGKILL the
///   moment that part is on the device (a crash in the middle of a multi-block write).
///
/// `link_rules` act on the replication link (`LinkFaults`): `{"action": "drop" | "corrupt" |
/// "delay", "after_bytes": N, "probability": P, "count": C, "delay_ms": D}`.
public struct FaultPlan: Decodable, Sendable {
    public var seed: UInt64 = 1
    public var rules: [Rule]
    public var linkRules: [LinkRule]

    public struct LinkRule: Decodable, Sendable {
        public var action: String
        public var afterBytes: Int = 0
        public var probability: Double = 1
        public var count: Int?
        public var delayMs: Int?

        enum CodingKeys: String, CodingKey { case action, afterBytes = "after_bytes", probability, count, delayMs = "delay_ms" }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            action = try c.decode(String.self, forKey: .action)
            afterBytes = try c.decodeIfPresent(Int.self, forKey: .afterBytes) ?? 0
            probability = try c.decodeIfPresent(Double.self, forKey: .probability) ?? 1
            count = try c.decodeIfPresent(Int.self, forKey: .count)
            delayMs = try c.decodeIfPresent(Int.self, forKey: .delayMs)
        }
    }

    public struct Rule: Decodable, Sendable {
        public var pool: String
        public var lun: Int?
        public var op: String = "any"
        public var ioClass: String = "any"
        public var errno: Int32 = EIO
        public var probability: Double = 1
        public var after: Int = 0
        public var count: Int?
        public var action: String = "fail"
        public var delayMs: Int?
        public var unit: Int = 4096

        enum CodingKeys: String, CodingKey {
            case pool, lun, op, ioClass = "class", errno, probability, after, count, action, delayMs = "delay_ms", unit
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            pool = try c.decode(String.self, forKey: .pool)
            lun = try c.decodeIfPresent(Int.self, forKey: .lun)
            op = try c.decodeIfPresent(String.self, forKey: .op) ?? "any"
            ioClass = try c.decodeIfPresent(String.self, forKey: .ioClass) ?? "any"
            errno = try c.decodeIfPresent(Int32.self, forKey: .errno) ?? EIO
            probability = try c.decodeIfPresent(Double.self, forKey: .probability) ?? 1
            after = try c.decodeIfPresent(Int.self, forKey: .after) ?? 0
            count = try c.decodeIfPresent(Int.self, forKey: .count)
            action = try c.decodeIfPresent(String.self, forKey: .action) ?? "fail"
            delayMs = try c.decodeIfPresent(Int.self, forKey: .delayMs)
            unit = try c.decodeIfPresent(Int.self, forKey: .unit) ?? 4096
        }
    }

    enum CodingKeys: String, CodingKey { case seed, rules, linkRules = "link_rules" }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        seed = try c.decodeIfPresent(UInt64.self, forKey: .seed) ?? 1
        rules = try c.decodeIfPresent([Rule].self, forKey: .rules) ?? []
        linkRules = try c.decodeIfPresent([LinkRule].self, forKey: .linkRules) ?? []
    }

    /// Reads and checks a plan; every problem is one line naming the rule and field.
    public static func load(_ path: String) throws(DomainError) -> FaultPlan {
        guard let data = FileManager.default.contents(atPath: path) else { throw DomainError("--fault-plan \(path): cannot read the file") }
        let plan: FaultPlan
        do { plan = try JSONDecoder().decode(FaultPlan.self, from: data) } catch {
            throw DomainError("--fault-plan \(path): not a fault plan (\(Self.describe(error)))")
        }
        for (i, r) in plan.rules.enumerated() {
            let at = "--fault-plan \(path): rule \(i + 1)"
            guard ["read", "write", "flush", "any"].contains(r.op) else { throw DomainError("\(at): op '\(r.op)' (read, write, flush, any)") }
            guard ["host", "background", "any"].contains(r.ioClass) else { throw DomainError("\(at): class '\(r.ioClass)' (host, background, any)") }
            guard (1...4095).contains(r.errno), r.errno != EBUSY else {
                throw DomainError("\(at): errno \(r.errno) (1..4095; not EBUSY, which means 'retry' inside the scheduler)")
            }
            guard (0...1).contains(r.probability) else { throw DomainError("\(at): probability \(r.probability) (0..1)") }
            guard r.after >= 0, (r.count ?? 0) >= 0, (r.lun ?? 0) >= 0 else { throw DomainError("\(at): after, count and lun are not negative") }
            guard ["fail", "delay", "stuck", "torn"].contains(r.action) else {
                throw DomainError("\(at): action '\(r.action)' (fail, delay, stuck, torn)")
            }
            if r.action == "delay" {
                guard let ms = r.delayMs, (1...600_000).contains(ms) else { throw DomainError("\(at): delay needs delay_ms 1..600000") }
            } else if r.delayMs != nil {
                throw DomainError("\(at): delay_ms belongs to action delay, not '\(r.action)'")
            }
            if r.action == "torn" {
                guard r.op == "write" else { throw DomainError("\(at): torn needs op write, not '\(r.op)'") }
                guard r.unit >= 512, r.unit % 512 == 0, r.unit <= 1 << 20 else { throw DomainError("\(at): unit \(r.unit) (a multiple of 512 up to 1M)") }
            }
        }
        for (i, r) in plan.linkRules.enumerated() {
            let at = "--fault-plan \(path): link rule \(i + 1)"
            guard ["drop", "corrupt", "delay", "reorder"].contains(r.action) else {
                throw DomainError("\(at): action '\(r.action)' (drop, corrupt, delay, reorder)")
            }
            if r.action == "delay" || r.action == "reorder" {
                guard let ms = r.delayMs, (1...600_000).contains(ms) else { throw DomainError("\(at): \(r.action) needs delay_ms 1..600000") }
            } else if r.delayMs != nil {
                throw DomainError("\(at): delay_ms belongs to actions delay and reorder, not '\(r.action)'")
            }
            guard (0...1).contains(r.probability) else { throw DomainError("\(at): probability \(r.probability) (0..1)") }
            guard r.afterBytes >= 0, (r.count ?? 0) >= 0 else { throw DomainError("\(at): after_bytes and count are not negative") }
        }
        guard !plan.rules.isEmpty || !plan.linkRules.isEmpty else { throw DomainError("--fault-plan \(path): no rules and no link_rules") }
        return plan
    }

    /// The link faults of this plan, or nil when it has none.
    func linkFaults(report: @escaping @Sendable (String) -> Void) -> LinkFaults? {
        linkRules.isEmpty ? nil : LinkFaults(rules: linkRules, seed: seed, report: report)
    }

    private static func describe(_ error: Error) -> String {
        switch error {
        case DecodingError.keyNotFound(let key, _): return "missing '\(key.stringValue)'"
        case DecodingError.typeMismatch(_, let ctx), DecodingError.valueNotFound(_, let ctx):
            return "wrong type at \(ctx.codingPath.map(\.stringValue).joined(separator: "."))"
        case DecodingError.dataCorrupted(let ctx): return ctx.debugDescription
        default: return "\(error)"
        }
    }

    /// The faults for one pool's scheduler, or nil when no rule names the pool.
    func faults(forPool name: String) -> SchedulerFaults? {
        let mine = rules.enumerated().filter { $0.element.pool == name }
        guard !mine.isEmpty else { return nil }
        return SchedulerFaults(rules: mine.map { SchedulerFaults.Armed(rule: $0.element, state: seed &+ UInt64($0.offset) &* 0x9E37_79B9_7F4A_7C15) })
    }
}

/// One scheduler's armed rules. Called under the scheduler's lock, so it keeps no lock.
public final class SchedulerFaults: @unchecked Sendable {
    struct Armed {
        let rule: FaultPlan.Rule
        var state: UInt64 // splitmix64
        var matched = 0
        var failed = 0
    }

    private var rules: [Armed]
    /// The pool's LUN index of each scheduler slot (a missing LUN has no slot, so they differ).
    var lunIndexOfSlot: [Int] = []

    init(rules: [Armed]) { self.rules = rules }

    /// What a chosen chunk does instead of reaching the device as asked.
    enum Action: Equatable {
        case fail(Int32)
        case delay(ns: UInt64)
        case stuck
        /// Write only the first `bytes`, then SIGKILL the daemon once they are on the device.
        case torn(bytes: Int)
    }

    /// What this chunk (`length` bytes; the whole request: `whole`) does, or nil to let it
    /// reach the device. A torn rule matches only a write that is a whole request of more
    /// than one unit.
    func action(lun slot: Int, op: IOScheduler.Operation, ioClass: IOScheduler.IOClass, length: Int, whole: Bool) -> Action? {
        let lun = slot < lunIndexOfSlot.count ? lunIndexOfSlot[slot] : slot
        let opName = op == .read ? "read" : (op == .write ? "write" : "flush")
        let className = ioClass == .host ? "host" : "background"
        for i in rules.indices {
            let r = rules[i].rule
            guard r.lun == nil || r.lun == lun, r.op == "any" || r.op == opName, r.ioClass == "any" || r.ioClass == className
            else { continue }
            if r.action == "torn", !whole || length <= r.unit || length % r.unit != 0 { continue }
            rules[i].matched += 1
            guard rules[i].matched > r.after, r.count.map({ rules[i].failed < $0 }) ?? true else { continue }
            guard Double(SplitMix.next(&rules[i].state) >> 11) / Double(1 << 53) < r.probability else { continue }
            rules[i].failed += 1
            switch r.action {
            case "delay": return .delay(ns: UInt64(r.delayMs ?? 0) * 1_000_000)
            case "stuck": return .stuck
            case "torn": return .torn(bytes: r.unit * (1 + Int(SplitMix.next(&rules[i].state) % UInt64(length / r.unit - 1))))
            default: return .fail(r.errno)
            }
        }
        return nil
    }

}
