import Foundation
import NIOCore
import Synchronization

/// Counters of one NBD connection. The connection's event loop writes them (relaxed
/// atomics, nothing allocated); `status` and the metrics read them from other threads.
final class NBDConnectionStats: Sendable {
    let id: Int
    let peer: String
    let connectedAt = Date()
    let reads = Atomic<UInt64>(0)
    let writes = Atomic<UInt64>(0)
    let bytesRead = Atomic<UInt64>(0)
    let bytesWritten = Atomic<UInt64>(0)
    let otherRequests = Atomic<UInt64>(0) // flush, trim, write-zeroes, block status
    let errors = Atomic<UInt64>(0)
    let refused = Atomic<UInt64>(0) // malformed or out-of-range requests
    let inFlight = Atomic<Int>(0)

    init(id: Int, peer: String) {
        self.id = id
        self.peer = peer
    }

    static func add(_ counter: borrowing Atomic<UInt64>, _ n: UInt64) {
        counter.wrappingAdd(n, ordering: .relaxed)
    }

    var snapshot: NBDConnectionView.Counters {
        .init(reads: reads.load(ordering: .relaxed), writes: writes.load(ordering: .relaxed),
              bytesRead: bytesRead.load(ordering: .relaxed), bytesWritten: bytesWritten.load(ordering: .relaxed),
              otherRequests: otherRequests.load(ordering: .relaxed), errors: errors.load(ordering: .relaxed),
              refused: refused.load(ordering: .relaxed))
    }
}

/// Every live NBD connection (for `status`, the metrics, and dropping the clients of an
/// export that is unexported), plus per-export totals of connections already closed.
final class NBDRegistry: Sendable {
    /// "Unknown export" lines, across every connection: a client probing names cannot flood the log.
    let unknownExportLog = LogRateLimit(perSecond: 5)

    private struct Entry {
        let stats: NBDConnectionStats
        var export: String?
        let channel: Channel
    }

    private struct State {
        var nextId = 1
        var live: [Int: Entry] = [:]
        var closedTotals: [String: NBDConnectionView.Counters] = [:]
        var turnedAway: UInt64 = 0
    }

    private let state = DataPathMutex(State())
    /// Each connection may hold up to 32 MiB of payload buffers: this bounds the total.
    let maxConnections: Int

    init(maxConnections: Int) { self.maxConnections = maxConnections }

    /// Connections closed at accept because `maxConnections` were open.
    var turnedAway: UInt64 { state.withLock { $0.turnedAway } }

    /// "unix", "127.0.0.1:40112" or "[::1]:40112".
    static func peerName(_ address: SocketAddress?) -> String {
        guard let a = address, a.protocol != .unix, let ip = a.ipAddress else { return "unix" }
        return (a.protocol == .inet6 ? "[\(ip)]" : ip) + ":\(a.port ?? 0)"
    }

    enum Admission {
        case admitted(NBDConnectionStats)
        /// Over the limit; `first` is true for the first one since start (log it once).
        case turnedAway(first: Bool)
    }

    func register(channel: Channel) -> Admission {
        let peer = Self.peerName(channel.remoteAddress)
        return state.withLock { s in
            guard s.live.count < maxConnections else {
                s.turnedAway += 1
                return .turnedAway(first: s.turnedAway == 1)
            }
            let stats = NBDConnectionStats(id: s.nextId, peer: peer)
            s.nextId += 1
            s.live[stats.id] = Entry(stats: stats, export: nil, channel: channel)
            return .admitted(stats)
        }
    }

    func attach(_ id: Int, export: String) {
        state.withLock { $0.live[id]?.export = export }
    }

    func unregister(_ id: Int) {
        state.withLock { s in
            guard let e = s.live.removeValue(forKey: id), let export = e.export else { return }
            s.closedTotals[export, default: .init()].add(e.stats.snapshot)
        }
    }

    /// Closes every connection to `export` (after an unexport or a change to read-only);
    /// requests in flight finish, their replies are dropped. Returns how many were closed.
    @discardableResult
    func closeConnections(export: String) -> Int {
        let channels = state.withLock { s in s.live.values.filter { $0.export == export }.map(\.channel) }
        for c in channels { c.close(promise: nil) }
        return channels.count
    }

    func hasConnections(export: String) -> Bool { state.withLock { s in s.live.values.contains { $0.export == export } } }

    func closeAll() {
        let channels = state.withLock { s in s.live.values.map(\.channel) }
        for c in channels { c.close(promise: nil) }
    }

    /// Waits until every connection has finished (closed, nothing in flight).
    func waitUntilEmpty(timeoutSeconds: Double) {
        let deadline = Date().addingTimeInterval(timeoutSeconds)
        while state.withLock({ !$0.live.isEmpty }), Date() < deadline { usleep(5000) }
    }

    func connections() -> [NBDConnectionView] {
        let dates = ISO8601DateFormatter()
        return state.withLock { s in
            s.live.values.sorted { $0.stats.id < $1.stats.id }.map { e in
                NBDConnectionView(id: e.stats.id, export: e.export, peer: e.stats.peer,
                                  connectedAt: dates.string(from: e.stats.connectedAt),
                                  inFlight: e.stats.inFlight.load(ordering: .relaxed), counters: e.stats.snapshot)
            }
        }
    }

    /// Per export: live connections and totals since the daemon started.
    func exportTotals() -> [String: (connections: Int, counters: NBDConnectionView.Counters)] {
        state.withLock { s in
            var out: [String: (connections: Int, counters: NBDConnectionView.Counters)] = [:]
            for (name, c) in s.closedTotals { out[name] = (0, c) }
            for e in s.live.values {
                guard let name = e.export else { continue }
                var t = out[name] ?? (0, .init())
                t.connections += 1
                t.counters.add(e.stats.snapshot)
                out[name] = t
            }
            return out
        }
    }
}

/// One connection as `svsp-ctl status` shows it.
public struct NBDConnectionView: Codable, Sendable {
    public struct Counters: Codable, Sendable {
        var reads: UInt64 = 0
        var writes: UInt64 = 0
        var bytesRead: UInt64 = 0
        var bytesWritten: UInt64 = 0
        var otherRequests: UInt64 = 0
        var errors: UInt64 = 0
        var refused: UInt64 = 0

        mutating func add(_ o: Counters) {
            reads += o.reads
            writes += o.writes
            bytesRead += o.bytesRead
            bytesWritten += o.bytesWritten
            otherRequests += o.otherRequests
            errors += o.errors
            refused += o.refused
        }
    }

    var id: Int
    var export: String?
    var peer: String
    var connectedAt: String
    var inFlight: Int
    var counters: Counters
}
