import Foundation
import Prometheus

/// Prometheus metrics of a domain: I/O counts, bytes and latency per vdisk and per
/// LUN, pool capacity. Metric objects are created once per label set and cached,
/// so recording an I/O is a dictionary lookup and atomic adds.
public final class DomainMetrics: @unchecked Sendable {
    public let registry = PrometheusCollectorRegistry()
    private let lock = NSLock()
    private var ioSets: [String: IOSet] = [:]
    private static let buckets: [Duration] = [
        .microseconds(50), .microseconds(100), .microseconds(250), .microseconds(500), .milliseconds(1),
        .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .seconds(1),
    ]

    /// One label set's counters and histogram; hot paths keep it and record without lookups.
    public struct IOSet: Sendable {
        let ios: Counter
        let bytes: Counter
        let latency: DurationHistogram

        public func record(bytes count: Int, latencyNs: UInt64) {
            ios.increment()
            bytes.increment(by: Int64(count))
            latency.recordNanoseconds(Int64(latencyNs))
        }
    }

    public func vdiskSeries(_ vdisk: String, op: String) -> IOSet { set(kind: "vdisk", labels: [("vdisk", vdisk), ("op", op)]) }

    public func lunSeries(pool: String, lun: String, op: String) -> IOSet {
        set(kind: "lun", labels: [("pool", pool), ("lun", lun), ("op", op)])
    }

    public init() {}

    private func set(kind: String, labels: [(String, String)]) -> IOSet {
        let key = kind + labels.map { "|\($0.0)=\($0.1)" }.joined()
        lock.lock()
        defer { lock.unlock() }
        if let s = ioSets[key] { return s }
        let s = IOSet(
            ios: registry.makeCounter(descriptor: .init(namespace: "svsp", subsystem: kind, metricName: "io", unitName: "total",
                                                        helpText: "I/O requests completed"), labels: labels),
            bytes: registry.makeCounter(descriptor: .init(namespace: "svsp", subsystem: kind, metricName: "io", unitName: "bytes_total",
                                                          helpText: "Bytes transferred"), labels: labels),
            latency: registry.makeDurationHistogram(descriptor: .init(namespace: "svsp", subsystem: kind, metricName: "io_latency",
                                                                      unitName: "seconds", helpText: "I/O latency"),
                                                    labels: labels, buckets: Self.buckets))
        ioSets[key] = s
        return s
    }


    /// The host-write hold of each PiT taken (the moment of its switch).
    private lazy var pitHold = registry.makeDurationHistogram(
        descriptor: .init(namespace: "svsp", subsystem: "pit", metricName: "hold", unitName: "seconds",
                          helpText: "How long host writes were held while a PiT was taken"), buckets: Self.buckets)
    public private(set) var longestPiTHoldNs: UInt64 = 0

    public func recordPiTHold(ns: UInt64) {
        lock.withLock { longestPiTHoldNs = max(longestPiTHoldNs, ns) }
        pitHold.recordNanoseconds(Int64(ns))
    }

    /// PiT and snapshot gauges per vdisk, refreshed before each scrape.
    public func updatePiTs(_ rows: [(vdisk: String, pits: Int, heldBytes: UInt64, snapshots: Int)]) {
        for r in rows {
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "vdisk", metricName: "pits", unitName: "",
                                                 helpText: "PiTs of the vdisk"), labels: [("vdisk", r.vdisk)]).set(to: Double(r.pits))
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "vdisk", metricName: "pit_held", unitName: "bytes",
                                                 helpText: "Bytes held only by the vdisk's PiTs"), labels: [("vdisk", r.vdisk)]).set(to: Double(r.heldBytes))
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "vdisk", metricName: "snapshots", unitName: "",
                                                 helpText: "Snapshots made from the vdisk's PiTs"), labels: [("vdisk", r.vdisk)]).set(to: Double(r.snapshots))
        }
    }

    /// Peer links and async groups, refreshed before each scrape.
    public func updateReplication(peers: [(name: String, up: Bool, rttMs: Double?)],
                                  groups: [(name: String, role: String, ageSeconds: Double?, toSend: UInt64, dataBytes: UInt64, wireBytes: UInt64)])
    {
        for p in peers {
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "peer", metricName: "up", unitName: "bool",
                                                 helpText: "1 while the outbound replication link to the peer is connected"),
                               labels: [("peer", p.name)]).set(to: p.up ? 1.0 : 0.0)
            if let rtt = p.rttMs {
                registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "peer", metricName: "rtt", unitName: "seconds",
                                                     helpText: "Round trip of the last ping"), labels: [("peer", p.name)]).set(to: rtt / 1000)
            }
        }
        for g in groups {
            let labels = [("group", g.name), ("role", g.role)]
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "async", metricName: "recovery_point_age", unitName: "seconds",
                                                 helpText: "Age of the last PiT the destination holds complete (-1: none yet)"),
                               labels: labels).set(to: g.ageSeconds ?? -1)
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "async", metricName: "to_send", unitName: "bytes",
                                                 helpText: "Bytes of the running cycle not sent yet"), labels: labels).set(to: Double(g.toSend))
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "async", metricName: "data_sent", unitName: "bytes",
                                                 helpText: "Block bytes shipped since the daemon started"), labels: labels).set(to: Double(g.dataBytes))
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "async", metricName: "wire_sent", unitName: "bytes",
                                                 helpText: "Bytes those blocks took on the wire (after compression)"), labels: labels).set(to: Double(g.wireBytes))
        }
    }

    /// Pool capacity gauges, refreshed before each scrape.
    public func updatePools(_ pools: [(name: String, capacity: UInt64, free: UInt64, healthy: Bool, stuckLUNs: Int)]) {
        for p in pools {
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "pool", metricName: "capacity", unitName: "bytes",
                                                 helpText: "Pool capacity"), labels: [("pool", p.name)]).set(to: Double(p.capacity))
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "pool", metricName: "free", unitName: "bytes",
                                                 helpText: "Pool free capacity"), labels: [("pool", p.name)]).set(to: Double(p.free))
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "pool", metricName: "healthy", unitName: "bool",
                                                 helpText: "1 when every LUN of the pool is present"),
                               labels: [("pool", p.name)]).set(to: p.healthy ? 1.0 : 0.0)
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "pool", metricName: "stuck", unitName: "luns",
                                                 helpText: "LUNs of the pool declared stuck (an I/O outlived the array profile's io_timeout)"),
                               labels: [("pool", p.name)]).set(to: Double(p.stuckLUNs))
        }
    }

    /// NBD per-export gauges and counters, refreshed before each scrape from the server's
    /// totals (monotonic: closed connections are folded in), so counters only move forward.
    private var nbdExported: [String: UInt64] = [:]

    /// Per live connection: its in-flight gauge and counters; removed when it closes, so
    /// the series stay bounded by `--nbd-max-connections`.
    private struct ConnectionSeries {
        let inFlight: Gauge
        let counters: [(Counter, KeyPath<NBDConnectionView.Counters, UInt64> & Sendable)]
        var last = NBDConnectionView.Counters()
    }

    private var nbdConnections: [Int: ConnectionSeries] = [:]

    private func updateNBDConnections(_ connections: [NBDConnectionView]) {
        var live = Set<Int>()
        for c in connections {
            guard let export = c.export else { continue } // still negotiating
            live.insert(c.id)
            var s = nbdConnections[c.id] ?? makeConnectionSeries(labels: [("connection", "\(c.id)"), ("export", export), ("peer", c.peer)])
            s.inFlight.set(to: Double(c.inFlight))
            for (counter, field) in s.counters {
                let delta = c.counters[keyPath: field] &- s.last[keyPath: field]
                if delta > 0 { counter.increment(by: Int64(delta)) }
            }
            s.last = c.counters
            nbdConnections[c.id] = s
        }
        for (id, s) in nbdConnections where !live.contains(id) {
            registry.unregisterGauge(s.inFlight)
            for (counter, _) in s.counters { registry.unregisterCounter(counter) }
            nbdConnections[id] = nil
        }
    }

    /// The NBD counters as metrics, per export and per connection: name, help, field.
    private static let nbdCounterFields: [(String, String, KeyPath<NBDConnectionView.Counters, UInt64> & Sendable)] = [
        ("reads", "NBD reads completed", \.reads),
        ("writes", "NBD writes completed", \.writes),
        ("read_bytes", "Bytes read over NBD", \.bytesRead),
        ("written_bytes", "Bytes written over NBD", \.bytesWritten),
        ("other_requests", "NBD flush, trim, write-zeroes and block-status requests", \.otherRequests),
        ("errors", "NBD requests answered with an I/O error", \.errors),
        ("refused", "Malformed or out-of-range NBD requests refused", \.refused),
    ]

    private func makeConnectionSeries(labels: [(String, String)]) -> ConnectionSeries {
        ConnectionSeries(
            inFlight: registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "nbd_connection", metricName: "in_flight",
                                                           unitName: "count", helpText: "Requests in flight on this NBD connection"),
                                         labels: labels),
            counters: Self.nbdCounterFields.map { metric, help, field in
                (registry.makeCounter(descriptor: .init(namespace: "svsp", subsystem: "nbd_connection", metricName: metric,
                                                        unitName: "total", helpText: help + " on this connection"), labels: labels), field)
            })
    }

    func updateNBD(exports: [String: (connections: Int, counters: NBDConnectionView.Counters)], connections: [NBDConnectionView]) {
        lock.lock()
        defer { lock.unlock() }
        updateNBDConnections(connections)
        for (name, t) in exports {
            let labels = [("export", name)]
            registry.makeGauge(descriptor: .init(namespace: "svsp", subsystem: "nbd", metricName: "connections",
                                                 unitName: "count", helpText: "Open NBD connections"), labels: labels).set(to: Double(t.connections))
            for (metric, help, field) in Self.nbdCounterFields {
                let value = t.counters[keyPath: field]
                let key = "\(name)|\(metric)"
                let delta = value &- (nbdExported[key] ?? 0)
                guard delta > 0 else { continue }
                registry.makeCounter(descriptor: .init(namespace: "svsp", subsystem: "nbd", metricName: metric, unitName: "total",
                                                       helpText: help), labels: labels).increment(by: Int64(delta))
                nbdExported[key] = value
            }
        }
    }

    public func exposition() -> [UInt8] { registry.emitToBuffer() }
}
