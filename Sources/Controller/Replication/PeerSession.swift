import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import IOEngine

/// One replication connection after TLS: the `hello`/`welcome` negotiation, then pings
/// to keep the link measured. The side that connected (`.connected`) sends `hello` and
/// pings; the side that accepted (`.accepted`) checks that `hello` names the domain the
/// pre-shared key was given to, chooses the version and answers.
final class PeerSession: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ReplicationMessage

    /// Sent through every open connection when the peers change: a removed peer's close.
    struct Recheck {}
    /// Sent to an accepted connection when its peer connected again: this one is a link
    /// the peer gave up on, and closes.
    struct Superseded {}
    /// From a fault plan's `reorder` link rule: the worker holds what it received for
    /// `ms`, as a slow disk would, while the connection is cut.
    struct HoldWork { let ms: Int }

    enum Role {
        /// We accepted it: who the client proved to be in the handshake.
        case accepted(ProvenIdentity)
        /// We connected to this peer: why our own handshake check refused the server, if it did.
        case connected(String, ProvenIdentity)
    }

    private let service: ReplicationService
    private let role: Role
    private let remote: String
    private let decoder: ReplicationFrameDecoder
    /// The peer's name once it proved it (accepted: after `hello`; connected: from the start).
    private var peer: String?
    private var version: UInt16?
    private var pinger: RepeatedTask?
    private var lastPing: (nonce: UInt64, at: UInt64)?
    /// Why we closed, for the status (nil: the other side closed).
    private var closeReason: String?
    private var reported = false
    private var channel: Channel?
    /// Connected side: requests and blocks sent, waiting for their `response`.
    private let callLock = NSLock()
    private var calls: [UInt64: CheckedContinuation<(ok: Bool, body: [UInt8]), Error>] = [:]
    private var closed = false
    /// Accepted side: requests and blocks, handled in order by one task.
    private var work: AsyncStream<ReplicationMessage>.Continuation?
    /// Accepted side, fault plans only: the worker's next message is applied no earlier than
    /// this uptime (ns), as behind a slow disk.
    private let workHeldUntil = NIOLockedValueBox<UInt64>(0)
    /// Set once this side decided to close (TLS may keep the socket a few seconds longer for
    /// its close_notify): the worker applies nothing it has not started.
    private let ending = NIOLockedValueBox(false)

    init(service: ReplicationService, role: Role, remote: String, decoder: ReplicationFrameDecoder) {
        self.service = service
        self.role = role
        self.remote = remote
        self.decoder = decoder
        if case .connected(let name, _) = role { peer = name }
    }

    private var what: String {
        switch role {
        // The host only: a peer that keeps failing the same way logs one line, not one per port.
        case .accepted: "connection from \(remote.split(separator: ":").dropLast().joined(separator: ":"))" + (peer.map { " (peer '\($0)')" } ?? "")
        case .connected(let name, _): "peer '\(name)' at \(remote)"
        }
    }

    func handlerAdded(context: ChannelHandlerContext) { channel = context.channel }

    func channelActive(context: ChannelHandlerContext) {
        if case .connected = role { // held by TLS until its handshake is done
            let me = service.domain.metadata
            context.send(.hello(versions: ReplicationFrame.versions, domainId: me.domainId, domainName: me.name))
        }
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let message = unwrapInboundIn(data)
        switch (role, message) {
        case (.accepted(let proven), .hello(let versions, let id, let name)) where version == nil:
            guard name == proven.name, id == proven.id else {
                return refuse(context, .wrongDomain, "hello names domain '\(name)' \(id.uuidString), but the key was given to '\(proven.name ?? "?")'")
            }
            let ours = ReplicationFrame.versions
            let chosen = min(versions.upperBound, ours.upperBound)
            guard chosen >= max(versions.lowerBound, ours.lowerBound) else {
                return refuse(context, .noCommonVersion, "peer '\(name)' speaks protocol versions \(versions.lowerBound)...\(versions.upperBound), this domain \(ours.lowerBound)...\(ours.upperBound)")
            }
            let me = service.domain.metadata
            context.send(.welcome(version: chosen, domainId: me.domainId, domainName: me.name))
            established(chosen, peer: name, id: id)
            let channel = context.channel
            service.adoptInbound(channel, peer: name) { previous in
                startWorker(peer: name, version: chosen, channel: channel, after: previous)
            }
            service.update(name) { $0.inbound += 1 }
            service.log("replication: peer '\(name)' connected from \(remote) (protocol v\(chosen))")
        case (.connected(let name, _), .welcome(let chosen, let id, let peerName)) where version == nil:
            guard ReplicationFrame.versions.contains(chosen) else {
                return fail(context, "peer chose protocol version \(chosen), this domain speaks \(ReplicationFrame.versions)")
            }
            guard peerName == name else { return fail(context, "welcome names domain '\(peerName)', not '\(name)'") }
            established(chosen, peer: name, id: id)
            service.update(name) {
                $0.outbound = .connected
                $0.detail = nil
                $0.since = Date().timeIntervalSince1970
                $0.version = chosen
                $0.connections += 1
            }
            service.log("replication: peer '\(name)' connected (to \(remote), protocol v\(chosen))")
            service.register(self, for: name)
            let channel = context.channel
            pinger = context.eventLoop.scheduleRepeatedTask(initialDelay: .zero, delay: ReplicationService.pingInterval) { [self] _ in
                let nonce = DispatchTime.now().uptimeNanoseconds
                lastPing = (nonce, nonce)
                let bytes = ReplicationFrame.encode(.ping(nonce: nonce), version: chosen)
                channel.writeAndFlush(channel.allocator.buffer(bytes: bytes), promise: nil)
            }
        case (.connected(let name, _), .refuse(_, let reason)):
            closeReason = "refused by the peer: \(reason)"
            service.update(name) { $0.outbound = .refused; $0.detail = "refused by the peer: \(reason)" }
            report("refused by the peer: \(reason)")
            end(context)
        case (.accepted, .request), (.accepted, .blocks):
            guard version != nil, let work else { return refuse(context, .malformed, "\(message.kind) frame before negotiation") }
            work.yield(message)
        case (.connected, .response(let id, let ok, let body)) where version != nil:
            guard let call = callLock.withLock({ calls.removeValue(forKey: id) }) else {
                return refuse(context, .malformed, "a response to \(id), which was never asked")
            }
            call.resume(returning: (ok, body))
        case (_, .ping(let nonce)) where version != nil:
            context.send(.pong(nonce: nonce), version: version!)
        case (_, .pong(let nonce)) where version != nil:
            if let last = lastPing, last.nonce == nonce, let peer {
                let ms = Double(DispatchTime.now().uptimeNanoseconds - last.at) / 1e6
                service.update(peer) { $0.rttMs = (ms * 1000).rounded() / 1000 }
            }
        default:
            refuse(context, .malformed, "unexpected \(message.kind) frame" + (version == nil ? " before negotiation" : ""))
        }
    }

    private func established(_ chosen: UInt16, peer name: String, id: UUID) {
        version = chosen
        decoder.version = chosen
        peer = name
        let domain = service.domain
        Task { try? await domain.pinPeerDomainId(name, id) }
    }

    /// Closes the connection; from now its worker starts nothing more.
    private func end(_ context: ChannelHandlerContext) {
        ending.withLockedValue { $0 = true }
        context.close(promise: nil)
    }

    /// Answers `refuse` (best effort), reports once and closes.
    private func refuse(_ context: ChannelHandlerContext, _ code: ReplicationMessage.RefusalCode, _ reason: String) {
        context.send(.refuse(code: code, reason: reason), version: version ?? 1)
        fail(context, reason)
    }

    private func fail(_ context: ChannelHandlerContext, _ reason: String) {
        closeReason = reason
        if case .connected(let name, _) = role { service.update(name) { $0.outbound = .refused; $0.detail = reason } }
        report(reason)
        end(context)
    }

    /// One log line (and the peer's last problem) per connection.
    private func report(_ reason: String) {
        guard !reported else { return }
        reported = true
        service.problem(peer, "\(what): \(reason)")
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        var reason: String
        if case .accepted(let proven) = role, peer == nil, let name = proven.name { peer = name }
        if case .accepted(let proven) = role, let refusal = proven.refusal {
            peer = peer ?? refusal.peer
            reason = refusal.line
        } else if case .connected(_, let own) = role, let refusal = own.refusal {
            reason = refusal.line
        } else if let malformed = error as? ReplicationFrame.Malformed {
            reason = "malformed frame: \(malformed.reason)"
            context.send(.refuse(code: .malformed, reason: reason), version: version ?? 1)
        } else if case .accepted(let proven) = role, peer == nil, let name = proven.name {
            peer = name // it named a known peer, then failed (a wrong key shows here)
            reason = LinkTLS.explain(error)
        } else {
            reason = LinkTLS.explain(error)
        }
        if case .connected(let name, _) = role {
            let state: PeerLinkStatus.State = version == nil ? .refused : .down
            service.update(name) { $0.outbound = state; $0.detail = reason }
        }
        closeReason = reason
        report(reason)
        end(context)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
            let seconds = ReplicationService.idleTimeout.nanoseconds / 1_000_000_000
            fail(context, version == nil ? "no handshake within \(seconds) s" : "nothing received for \(seconds) s")
            return
        }
        if event is Superseded {
            closeReason = "superseded: the peer connected again"
            end(context)
            return
        }
        if let hold = event as? HoldWork {
            workHeldUntil.withLockedValue { $0 = DispatchTime.now().uptimeNanoseconds + UInt64(hold.ms) * 1_000_000 }
            return
        }
        if event is Recheck {
            if let peer, service.domain.metadata.peer(named: peer) == nil {
                closeReason = "peer '\(peer)' was removed"
                end(context)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        ending.withLockedValue { $0 = true }
        pinger?.cancel()
        work?.finish()
        let waiting = callLock.withLock { () -> [CheckedContinuation<(ok: Bool, body: [UInt8]), Error>] in
            closed = true
            defer { calls = [:] }
            return Array(calls.values)
        }
        let why = closeReason ?? "the connection closed"
        for c in waiting { c.resume(throwing: DomainError("link to peer '\(peer ?? "?")' lost: \(why)")) }
        if case .connected(let name, _) = role { service.unregister(self, for: name) }
        service.untrack(context.channel)
        switch role {
        case .accepted:
            if version != nil, let peer {
                service.forgetInbound(context.channel, peer: peer)
                service.update(peer) { $0.inbound = max(0, $0.inbound - 1) }
                service.log("replication: peer '\(peer)' disconnected (from \(remote))" + (closeReason.map { ": \($0)" } ?? ""))
            }
        case .connected(let name, _):
            if version != nil {
                let why = closeReason ?? "the peer closed the connection"
                service.update(name) {
                    $0.outbound = .down
                    $0.detail = why
                    $0.since = Date().timeIntervalSince1970
                    $0.version = nil
                    $0.rttMs = nil
                }
                service.log("replication: peer '\(name)' disconnected: \(why)")
            }
        }
        context.fireChannelInactive()
    }

    // MARK: calls (connected side)

    /// Sends a `request` or `blocks` frame with id `id` and returns its response.
    func call(_ message: ReplicationMessage, id: UInt64) async throws -> (ok: Bool, body: [UInt8]) {
        guard let channel, let version else { throw DomainError("link to peer '\(peer ?? "?")' is not up") }
        return try await withCheckedThrowingContinuation { c in
            let refused = callLock.withLock { () -> Bool in
                if closed { return true }
                calls[id] = c
                return false
            }
            if refused { return c.resume(throwing: DomainError("link to peer '\(peer ?? "?")' lost")) }
            let bytes = ReplicationFrame.encode(message, version: version)
            channel.writeAndFlush(channel.allocator.buffer(bytes: bytes), promise: nil)
        }
    }

    // MARK: requests and blocks (accepted side)

    /// Handles what the peer sends, one message at a time, in order, answering each.
    /// Starts the task that handles this connection's requests and blocks, once `previous`
    /// (the worker of the peer's connection before this one) has ended: nothing an older
    /// connection received is applied after anything of a newer one (a frame the older took
    /// before its close, say behind a slow disk, is finished first). What is still queued
    /// when the connection closed is dropped, not applied: its answers could not reach the
    /// peer, which sends it again on its new connection.
    private func startWorker(peer name: String, version: UInt16, channel: Channel, after previous: Task<Void, Never>?) -> Task<Void, Never> {
        let (stream, continuation) = AsyncStream<ReplicationMessage>.makeStream()
        work = continuation
        let domain = service.domain, service = service, heldUntil = workHeldUntil, ending = ending
        return Task {
            await previous?.value
            guard let scratch = try? AlignedBuffer(count: BlockHeader.maxDataBytes) else { return }
            var group: String? // the group the last cycle-begin named: blocks go there
            var dropped = 0
            defer {
                if dropped > 0 { service.log("replication: peer '\(name)': \(dropped) frame(s) received before its connection closed were not applied (it sends them again)") }
            }
            for await message in stream {
                guard !ending.withLockedValue({ $0 }), channel.isActive else { dropped += 1; continue }
                // A fault plan's `reorder`: this message's apply waits (it may outlast the connection).
                let until = heldUntil.withLockedValue { $0 }, now = DispatchTime.now().uptimeNanoseconds
                if until > now { try? await Task.sleep(nanoseconds: until - now) }
                let id: UInt64, outcome: Result<AsyncResponse, DomainError>
                switch message {
                case .request(let rid, let body):
                    id = rid
                    do throws(DomainError) {
                        guard let r = try? JSONDecoder().decode(AsyncRequest.self, from: Data(body)) else {
                            throw DomainError("request \(rid): not an async mirror request")
                        }
                        switch r.op {
                        case .createDestination: outcome = .success(try await domain.createAsyncDestination(r, peer: name))
                        case .cycleBegin:
                            let (g, _) = try domain.asyncVDisk(r.group, role: .destination)
                            if g.state == .detached {
                                throw DomainError("async group '\(r.group)' was failed over at peer '\(domain.metadata.name)' (detached there at PiT \(g.confirmedPiT ?? "none")): "
                                    + "both sides may have written since, so nothing is shipped until an admin picks the side that wins with `async merge \(r.group) --from SIDE`",
                                    code: AsyncResponse.splitBrain)
                            }
                            guard g.isFed else { throw DomainError("async group '\(r.group)' is \(g.state.rawValue) here: it takes no cycles") }
                            group = r.group
                            outcome = .success(AsyncResponse())
                        case .cycleEnd: outcome = .success(try await domain.completeAsyncCycle(r, peer: name))
                        case .deleteGroup:
                            try await domain.removeAsyncGroup(r.group)
                            outcome = .success(AsyncResponse())
                        case .reverse:
                            outcome = .success(try await domain.reverseToDestination(r, peer: name))
                            service.reconcileAsync() // its source task stops
                        case .becomeSource:
                            outcome = .success(try await domain.becomeSource(r, peer: name))
                            service.reconcileAsync() // its source task starts
                        case .rejoin: outcome = .success(try await domain.rejoinAsDestination(r, peer: name))
                        case .resumeFrom: outcome = .success(try await domain.resumeSource(r, peer: name))
                        case .detach: outcome = .success(try await domain.detachForPeer(r, peer: name))
                        }
                    } catch { outcome = .failure(error) }
                case .blocks(let h, let crcs, let data):
                    id = h.id
                    do throws(DomainError) {
                        guard let group else { throw DomainError("blocks before any cycle-begin") }
                        try await domain.applyAsyncBlocks(h, crcs: crcs, data: data, group: group, peer: name, scratch: scratch.pointer)
                        outcome = .success(AsyncResponse())
                    } catch {
                        outcome = .failure(error)
                        service.log("replication: peer '\(name)': blocks refused: \(error.message)") // the source retries the cycle
                    }
                default:
                    continue
                }
                let answer: ReplicationMessage = switch outcome {
                case .success(let r): .response(id: id, ok: true, body: Array((try? JSONEncoder().encode(r)) ?? Data()))
                case .failure(let e): .response(id: id, ok: false, body: Array((try? JSONEncoder().encode(AsyncResponse(reason: e.message, code: e.code))) ?? Data()))
                }
                channel.writeAndFlush(channel.allocator.buffer(bytes: ReplicationFrame.encode(answer, version: version)), promise: nil)
            }
            withExtendedLifetime(scratch) {}
        }
    }
}
