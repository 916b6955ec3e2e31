import Foundation

/// The `peer.*` management commands.
extension CommandHandler {
    func peerCommand(_ r: MgmtRequest) async throws(DomainError) -> MgmtResponse? {
        switch r.command {
        case "peer.add":
            let id = try r.args["domain_id"].map { text throws(DomainError) in
                guard let id = UUID(uuidString: text) else { throw DomainError("--domain-id '\(text)' is not a UUID") }
                return id
            }
            let peer = try await domain.addPeer(name: try arg(r, "name"), address: try arg(r, "address"), secretFile: try arg(r, "secret_file"),
                                                linkProfile: try arg(r, "link_profile"), domainId: id)
            replication?.reconcile()
            let listening = replication?.listenAddress.map { "this domain accepts on \($0)" }
                ?? "this domain does not accept replication connections (serve --repl-listen HOST:PORT)"
            return .success(text: "peer '\(peer.name)' added: connecting to \(peer.address) over link profile '\(peer.linkProfile)'; "
                + "the secret is kept in \(domain.peerSecrets.folder); \(listening). Add this domain on the peer too, with the same secret file.",
                json: PeerView(peer, replication?.status(of: peer.name)))
        case "peer.remove":
            let name = try arg(r, "name")
            try await domain.removePeer(name: name)
            replication?.reconcile()
            return .success(text: "peer '\(name)' removed (its connections closed, its secret deleted)", json: ["removed": name])
        case "peer.list", "peer.show":
            var peers = domain.metadata.peerList
            if r.command == "peer.show" {
                let name = try arg(r, "name")
                guard let p = domain.metadata.peer(named: name) else { throw DomainError("peer '\(name)' not found") }
                peers = [p]
            }
            let views = peers.map { PeerView($0, replication?.status(of: $0.name)) }
            if r.command == "peer.show" { return .success(text: PeerView.detail(views[0]), json: views[0]) }
            return .success(text: PeerView.table(views, listening: replication?.listenAddress), json: views)
        default:
            return nil
        }
    }
}

/// A peer and its link, as `peer list|show` and `status` show them.
struct PeerView: Codable {
    var name: String
    var address: String
    var linkProfile: String
    /// Nil until given or learned at the first authenticated contact.
    var domainId: String?
    var link: PeerLinkStatus?

    init(_ p: PeerRecord, _ link: PeerLinkStatus?) {
        name = p.name
        address = p.address
        linkProfile = p.linkProfile
        domainId = p.domainId?.uuidString
        self.link = link
    }

    static func table(_ views: [PeerView], listening: String?) -> String {
        let head = "replication: " + (listening.map { "accepting on \($0)" } ?? "not accepting (serve --repl-listen HOST:PORT)")
        guard !views.isEmpty else { return head + "\nno peers" }
        return head + "\n" + Table.render(["PEER", "ADDRESS", "LINK PROFILE", "LINK", "RTT", "INBOUND", "LAST PROBLEM"], views.map { v in
            [v.name, v.address, v.linkProfile, v.link?.outbound.rawValue ?? "not running",
             v.link?.rttMs.map { String(format: "%.2f ms", $0) } ?? "-", String(v.link?.inbound ?? 0),
             v.link.flatMap(\.currentProblem).map { String($0.prefix(100)) } ?? "-"]
        })
    }

    static func detail(_ v: PeerView) -> String {
        var lines = ["peer \(v.name)", "  address: \(v.address)", "  link profile: \(v.linkProfile)",
                     "  domain id: \(v.domainId ?? "not known yet (learned at the first authenticated contact)")"]
        if let l = v.link {
            let since = Date(timeIntervalSince1970: l.since).formatted(.iso8601)
            lines.append("  outbound link: \(l.outbound.rawValue) since \(since)" + (l.detail.map { ": \($0)" } ?? ""))
            if let version = l.version { lines.append("  protocol version: \(version)") }
            if let rtt = l.rttMs { lines.append("  round trip: \(String(format: "%.3f", rtt)) ms") }
            lines.append("  inbound connections: \(l.inbound); outbound connections made: \(l.connections)")
            if let p = l.lastProblem, let at = l.lastProblemAt {
                lines.append("  last problem (\(Date(timeIntervalSince1970: at).formatted(.iso8601))): \(p)")
            }
        } else {
            lines.append("  link: not running (the daemon does not serve replication)")
        }
        return lines.joined(separator: "\n")
    }
}
