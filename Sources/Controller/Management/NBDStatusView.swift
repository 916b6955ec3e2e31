import Foundation

/// The NBD front end as `svsp-ctl status` shows it: listeners, every export with its
/// totals since the daemon started, and every live connection with its counters.
struct NBDStatusView: Codable {
    struct Export: Codable {
        var name: String
        var mode: String
        var connections: Int
        var counters: NBDConnectionView.Counters
    }

    var unixSocket: String
    var tcp: String?
    var maxConnections: Int
    var turnedAway: UInt64
    /// LUN requests completed on the NBD event loop (nil: left to the domain engine's reaper thread).
    var completedOnLoop: UInt64?
    var exports: [Export]
    var connections: [NBDConnectionView]

    init(_ server: NBDServer, domain: Domain) {
        unixSocket = server.socketPath
        tcp = server.tcpAddress
        maxConnections = server.registry.maxConnections
        turnedAway = server.registry.turnedAway
        completedOnLoop = server.completedOnLoop
        let totals = server.registry.exportTotals()
        exports = domain.metadata.vdisks.compactMap { v in
            guard let mode = v.export else { return nil }
            let t = totals[v.name]
            return Export(name: v.name, mode: mode.rawValue, connections: t?.connections ?? 0, counters: t?.counters ?? .init())
        }
        connections = server.registry.connections()
    }
}

extension Table {
    static func nbd(_ n: NBDStatusView) -> String {
        var lines = ["NBD: unix socket \(n.unixSocket)" + (n.tcp.map { ", tcp \($0)" } ?? "")
            + ", at most \(n.maxConnections) connections" + (n.turnedAway > 0 ? " (\(n.turnedAway) turned away)" : "")
            + (n.completedOnLoop.map { ", completions reaped on the event loop (\($0) so far)" } ?? ", completions reaped by the engine's thread")]
        if n.exports.isEmpty {
            lines.append("no exports (svsp-ctl vdisk export NAME)")
        } else {
            lines.append(render(["EXPORT", "MODE", "CONNS", "READS", "WRITES", "READ", "WRITTEN", "OTHER", "ERRORS", "REFUSED"],
                                n.exports.map { e in
                                    let c = e.counters
                                    return [e.name, e.mode, "\(e.connections)", "\(c.reads)", "\(c.writes)", ByteSize.format(c.bytesRead),
                                            ByteSize.format(c.bytesWritten), "\(c.otherRequests)", "\(c.errors)", "\(c.refused)"]
                                }))
        }
        if !n.connections.isEmpty {
            lines.append("")
            lines.append(render(["CONN", "EXPORT", "PEER", "SINCE", "INFLIGHT", "READS", "WRITES", "READ", "WRITTEN", "ERRORS", "REFUSED"],
                                n.connections.map { c in
                                    let k = c.counters
                                    return ["\(c.id)", c.export ?? "(negotiating)", c.peer, c.connectedAt, "\(c.inFlight)", "\(k.reads)",
                                            "\(k.writes)", ByteSize.format(k.bytesRead), ByteSize.format(k.bytesWritten), "\(k.errors)",
                                            "\(k.refused)"]
                                }))
        }
        return lines.joined(separator: "\n")
    }
}
