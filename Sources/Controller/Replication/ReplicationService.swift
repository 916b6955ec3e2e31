import Foundation
import NIOCore
import NIOPosix
import NIOSSL

/// The replication link to peer domains: accepts on `serve --repl-listen` and keeps one
/// outbound connection to each peer (reconnecting with backoff), each authenticated with
/// the peer's pre-shared key (`LinkTLS`) and opened with `hello`/`welcome`
/// (`ReplicationFrame`). What each link is doing, and the last thing refused, is kept per
/// peer for `peer show` and the metrics; every refusal is one line in the log.
public final class ReplicationService: @unchecked Sendable {
    let domain: Domain
    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private var serverChannel: Channel?
    public private(set) var listenAddress: String?
    let log: @Sendable (String) -> Void

    private let lock = NSLock()
    private var links: [String: PeerLinkStatus] = [:]
    private var connectors: [String: Task<Void, Never>] = [:]
    /// The source side of each async group, and its task.
    private var sources: [String: (source: AsyncSource, task: Task<Void, Never>)] = [:]
    private var channels: [ObjectIdentifier: Channel] = [:]
    private var stopped = false
    /// Each peer's outbound session once negotiated: requests and blocks go through it.
    private var sessions: [String: PeerSession] = [:]
    /// Each peer's newest accepted connection and the task handling what it receives.
    private var inbound: [String: (channel: Channel?, worker: Task<Void, Never>)] = [:]
    private var nextCallId: UInt64 = 0
    /// The last problem logged for a connection that named no known peer (logged once in a row).
    private var lastAnonymousProblem: String?

    /// How long a connection may take to finish its handshake and `hello`, or stay silent
    /// afterwards (pings go every `pingInterval`), before it is closed.
    static let idleTimeout = TimeAmount.seconds(15)
    static let pingInterval = TimeAmount.seconds(2)
    static let maxBackoffSeconds = 10.0

    /// A fault plan's link rules (tests and drills), applied below TLS on every connection.
    private let linkFaults: LinkFaults?

    public init(domain: Domain, log: @escaping @Sendable (String) -> Void) {
        self.domain = domain
        self.log = log
        linkFaults = domain.faultPlan?.linkFaults(report: log)
    }

    /// Listens on `hostPort` (nil: no inbound connections) and starts the outbound links.
    public func start(listen hostPort: String?) throws(DomainError) {
        if let hostPort {
            let (host, port) = try HostPort.parse(hostPort, option: "--repl-listen", listening: true)
            let bootstrap = ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 16)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { [self] channel in
                    channel.eventLoop.makeCompletedFuture { try self.setUpInbound(channel) }
                }
            do {
                let channel = try bootstrap.bind(host: host, port: port).wait()
                serverChannel = channel
                listenAddress = channel.localAddress.map { "\($0.ipAddress ?? host):\($0.port ?? port)" } ?? hostPort
            } catch {
                throw DomainError("--repl-listen \(hostPort): \(error)")
            }
        }
        reconcile()
    }

    /// Starts a link for each peer that has none; peers removed lose theirs.
    public func reconcile() {
        let names = Set(domain.metadata.peerList.map(\.name))
        lock.withLock {
            guard !stopped else { return }
            for name in names where connectors[name] == nil {
                links[name] = links[name] ?? PeerLinkStatus()
                connectors[name] = Task { await self.keepConnected(name) }
            }
            for (name, task) in connectors where !names.contains(name) {
                task.cancel()
                connectors[name] = nil
                links[name] = nil
            }
        }
        reconcileAsync()
        // Connections of removed peers close (their handlers look the peer up again).
        for channel in lock.withLock({ Array(channels.values) }) {
            channel.eventLoop.execute { channel.pipeline.fireUserInboundEventTriggered(PeerSession.Recheck()) }
        }
    }

    public func status(of peer: String) -> PeerLinkStatus? { lock.withLock { links[peer] } }

    /// Starts the cycles of every source group that has none running; stops those of groups gone.
    public func reconcileAsync() {
        let names = Set(domain.metadata.asyncGroupList.filter { $0.role == .source }.map(\.name))
        lock.withLock {
            guard !stopped else { return }
            for name in names where sources[name] == nil {
                let source = AsyncSource(group: name, service: self)
                sources[name] = (source, Task { await source.run() })
            }
            for (name, s) in sources where !names.contains(name) {
                s.task.cancel()
                sources[name] = nil
            }
        }
    }

    /// Makes group `name`'s source task take its next cycle PiT now (a hand-over waits for it).
    public func captureNow(group name: String) { lock.withLock { sources[name]?.source }?.captureNow() }

    /// Returns once group `name`'s source task has no capture or cycle under way that began
    /// before the call (a hand-over pauses the group first, so none begins after).
    public func waitIdle(group name: String) async { await lock.withLock { sources[name]?.source }?.waitIdle() }

    /// What group `name`'s source task is doing now (nil: none runs here).
    public func progress(ofGroup name: String) -> AsyncTaskProgress? { lock.withLock { sources[name]?.source.current } }

    public func stop() {
        let (tasks, open) = lock.withLock { () -> ([Task<Void, Never>], [Channel]) in
            stopped = true
            defer { connectors = [:]; sources = [:] }
            return (Array(connectors.values) + sources.values.map(\.task), Array(channels.values))
        }
        for t in tasks { t.cancel() }
        for c in open { try? c.close().wait() }
        try? serverChannel?.close().wait()
        try? group.syncShutdownGracefully()
    }

    // MARK: status, kept by the sessions

    func update(_ peer: String, _ change: (inout PeerLinkStatus) -> Void) {
        lock.withLock {
            guard links[peer] != nil else { return }
            change(&links[peer]!)
        }
    }

    /// A refusal or failure: kept for `peer show`, logged once per distinct reason in a row.
    func problem(_ peer: String?, _ line: String) {
        let now = Date().timeIntervalSince1970
        var fresh = true
        lock.withLock {
            if let peer, links[peer] != nil {
                fresh = links[peer]!.lastProblem != line
                links[peer]!.lastProblem = line
                links[peer]!.lastProblemAt = now
            } else {
                fresh = lastAnonymousProblem != line
                lastAnonymousProblem = line
            }
        }
        if fresh { log("replication: " + line) }
    }

    /// Makes `channel` the peer's accepted connection and starts its worker after the
    /// previous connection's (`startWorker` gets that one's task). A peer keeps one outbound
    /// connection, so an older accepted one is a link it gave up on: it is closed, and what
    /// its worker still holds is dropped, never applied after the new connection's frames.
    func adoptInbound(_ channel: Channel, peer: String, startWorker: (Task<Void, Never>?) -> Task<Void, Never>) {
        let older: Channel? = lock.withLock {
            let old = inbound[peer]
            inbound[peer] = (channel, startWorker(old?.worker))
            return old?.channel
        }
        older?.pipeline.fireUserInboundEventTriggered(PeerSession.Superseded())
    }

    /// The connection closed; its worker stays the one the next connection waits for (it
    /// may still be applying a frame it took before the close).
    func forgetInbound(_ channel: Channel, peer: String) {
        lock.withLock { if inbound[peer]?.channel === channel { inbound[peer]?.channel = nil } }
    }

    func register(_ session: PeerSession, for peer: String) { lock.withLock { sessions[peer] = session } }
    func unregister(_ session: PeerSession, for peer: String) {
        lock.withLock { if sessions[peer] === session { sessions[peer] = nil } }
    }

    public func isConnected(_ peer: String) -> Bool { lock.withLock { sessions[peer] != nil } }

    /// Sends an async request to `peer` and returns its answer; a refusal throws its reason.
    func call(_ peer: String, _ request: AsyncRequest) async throws(DomainError) -> AsyncResponse {
        guard let body = try? JSONEncoder().encode(request) else { throw DomainError("cannot encode the request") }
        let (ok, answer) = try await send(peer) { id in .request(id: id, body: Array(body)) }
        let r = (try? JSONDecoder().decode(AsyncResponse.self, from: Data(answer))) ?? AsyncResponse()
        guard ok else {
            throw DomainError("peer '\(peer)' refused \(request.op.rawValue) of group '\(request.group)': \(r.reason ?? "no reason given")", code: r.code ?? EIO)
        }
        return r
    }

    /// Sends one frame built with a fresh id through the peer's session; returns its response.
    func send(_ peer: String, _ frame: (UInt64) -> ReplicationMessage) async throws(DomainError) -> (ok: Bool, body: [UInt8]) {
        let (session, id) = lock.withLock { () -> (PeerSession?, UInt64) in
            nextCallId &+= 1
            return (sessions[peer], nextCallId)
        }
        guard let session else { throw DomainError("peer '\(peer)' is not connected (see `svsp-ctl peer show \(peer)`)") }
        do { return try await session.call(frame(id), id: id) } catch let e as DomainError { throw e } catch {
            throw DomainError("peer '\(peer)': \(error)")
        }
    }

    func track(_ channel: Channel) { lock.withLock { channels[ObjectIdentifier(channel)] = channel } }
    func untrack(_ channel: Channel) { lock.withLock { channels[ObjectIdentifier(channel)] = nil } }

    // MARK: inbound

    private func setUpInbound(_ channel: Channel) throws {
        let remote = channel.remoteAddress.map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" } ?? "?"
        let proven = ProvenIdentity()
        let me = domain.metadata
        let context = try LinkTLS.serverContext(selfIdentity: LinkTLS.identity(name: me.name, id: me.domainId)) { [self] identity in
            try keyForClient(identity, proven: proven)
        }
        let decoder = ReplicationFrameDecoder()
        let ops = channel.pipeline.syncOperations
        if let linkFaults { try ops.addHandler(LinkFaultHandler(linkFaults, accepted: true)) }
        try ops.addHandler(IdleStateHandler(readTimeout: Self.idleTimeout))
        try ops.addHandler(NIOSSLServerHandler(context: context))
        try ops.addHandler(ByteToMessageHandler(decoder, maximumBufferSize: 1 << 20))
        try ops.addHandler(PeerSession(service: self, role: .accepted(proven), remote: remote, decoder: decoder))
        track(channel)
    }

    /// The server's PSK lookup: the key of the peer the client names, or a refusal.
    private func keyForClient(_ identity: String, proven: ProvenIdentity) throws -> [UInt8] {
        guard let (name, id) = LinkTLS.parseIdentity(identity) else {
            throw proven.refuse(nil, "a client named itself '\(identity.prefix(80))', not svsp/<domain>/<id>")
        }
        let m = domain.metadata
        guard let peer = m.peer(named: name) else {
            throw proven.refuse(nil, "refused domain '\(name)' (\(id.uuidString)): unknown peer (add it with `svsp-ctl peer add \(name) ...`)")
        }
        if let pinned = peer.domainId, pinned != id {
            throw proven.refuse(name, "refused domain '\(name)': wrong domain id \(id.uuidString) (peer '\(name)' is \(pinned.uuidString))")
        }
        guard let secret = domain.peerSecrets.load(name) else {
            throw proven.refuse(name, "refused peer '\(name)': its secret file is missing under \(domain.peerSecrets.folder) (remove and add the peer again)")
        }
        proven.name = name
        proven.id = id
        return secret
    }

    // MARK: outbound

    /// Connects to `peer` and stays connected: after a failure, tries again with a backoff
    /// (1 s doubling to 10 s; back to 1 s after a link that was up).
    private func keepConnected(_ name: String) async {
        var backoff = 1.0
        while !Task.isCancelled {
            guard let peer = domain.metadata.peer(named: name) else { return }
            update(name) { $0.outbound = .connecting; $0.since = Date().timeIntervalSince1970 }
            let before = status(of: name)?.connections ?? 0
            do {
                let channel = try await connect(peer)
                track(channel)
                try? await channel.closeFuture.get()
                untrack(channel)
                update(name) { if $0.outbound == .connecting { $0.outbound = .down; $0.detail = $0.detail ?? "the connection closed during the handshake" } }
            } catch {
                let why = error is DomainError ? "\(error)" : LinkTLS.explain(error)
                update(name) { $0.outbound = .unreachable; $0.detail = why }
                problem(name, "peer '\(name)' at \(peer.address): \(why)")
            }
            if (status(of: name)?.connections ?? 0) > before { backoff = 1 } // it was up: try again soon
            try? await Task.sleep(nanoseconds: UInt64(backoff * 1e9))
            backoff = min(backoff * 2, Self.maxBackoffSeconds)
        }
    }

    private func connect(_ peer: PeerRecord) async throws -> Channel {
        let (host, port) = try HostPort.parse(peer.address, option: "peer '\(peer.name)' address")
        guard let secret = domain.peerSecrets.load(peer.name) else {
            throw DomainError("its secret file is missing under \(domain.peerSecrets.folder) (remove and add the peer again)")
        }
        let me = domain.metadata
        let pinned = peer.domainId
        let own = ProvenIdentity()
        let context = try LinkTLS.clientContext(selfIdentity: LinkTLS.identity(name: me.name, id: me.domainId), secret: secret) { hint in
            guard let (name, id) = LinkTLS.parseIdentity(hint) else {
                throw own.refuse(peer.name, "the server is not an svsp domain (it named itself '\(hint?.prefix(80) ?? "")')")
            }
            guard name == peer.name else { throw own.refuse(peer.name, "the server is domain '\(name)', not '\(peer.name)'") }
            if let pinned, pinned != id {
                throw own.refuse(peer.name, "wrong domain id: the server is '\(name)' \(id.uuidString), peer '\(peer.name)' is \(pinned.uuidString)")
            }
        }
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(.seconds(5))
            .channelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture {
                    let decoder = ReplicationFrameDecoder()
                    let ops = channel.pipeline.syncOperations
                    if let linkFaults { try ops.addHandler(LinkFaultHandler(linkFaults, accepted: false)) }
                    try ops.addHandler(IdleStateHandler(readTimeout: Self.idleTimeout))
                    try ops.addHandler(NIOSSLClientHandler(context: context, serverHostname: nil))
                    try ops.addHandler(ByteToMessageHandler(decoder, maximumBufferSize: 1 << 20))
                    try ops.addHandler(PeerSession(service: self, role: .connected(peer.name, own), remote: peer.address, decoder: decoder))
                }
            }
        return try await bootstrap.connect(host: host, port: port).get()
    }
}

/// Who a client proved to be in the handshake (set by the server's key lookup), and why
/// it was refused when it was.
final class ProvenIdentity: @unchecked Sendable {
    var name: String?
    var id: UUID?
    var refusal: (peer: String?, line: String)?

    func refuse(_ peer: String?, _ line: String) -> LinkTLS.Refusal {
        refusal = (peer, line)
        return LinkTLS.Refusal(reason: line)
    }
}

/// One peer's link as `peer show` reports it.
public struct PeerLinkStatus: Codable, Equatable, Sendable {
    public enum State: String, Codable, Sendable {
        case connecting, connected, down, unreachable, refused
    }

    /// Our connection to the peer.
    public var outbound: State = .connecting
    /// Why it is not connected (when it is not).
    public var detail: String?
    /// When `outbound` last changed (Unix seconds).
    public var since: Double = Date().timeIntervalSince1970
    public var version: UInt16?
    /// Round trip of the last ping, in milliseconds.
    public var rttMs: Double?
    /// Connections from the peer open now.
    public var inbound: Int = 0
    /// Our connections to the peer that completed the negotiation, since the daemon started.
    public var connections: Int = 0
    /// The last refusal or failure, either way, and when.
    public var lastProblem: String?
    public var lastProblemAt: Double?

    /// The last problem unless the link has been connected since it.
    var currentProblem: String? {
        guard let lastProblem, let at = lastProblemAt else { return nil }
        return outbound == .connected && since >= at ? nil : lastProblem
    }
}
