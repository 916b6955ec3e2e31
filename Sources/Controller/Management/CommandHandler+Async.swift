import Foundation

/// The `async.*` management commands (source side; the destination side answers the
/// source's requests over the replication link).
extension CommandHandler {
    func asyncCommand(_ r: MgmtRequest) async throws(DomainError) -> MgmtResponse? {
        switch r.command {
        case "async.create-group":
            guard let replication else { throw DomainError("this daemon does not run replication") }
            let name = try arg(r, "name"), peerName = try arg(r, "peer")
            guard Parse.name(name) != nil else { throw DomainError("group name '\(name)': use letters, digits, - _ . (at most 64)") }
            guard domain.metadata.asyncGroup(named: name) == nil else { throw DomainError("async group '\(name)' already exists") }
            let (sources, vdg) = try asyncSources(r)
            for v in sources {
                if let other = domain.metadata.asyncGroup(of: v) { throw DomainError("vdisk '\(v.name)' is already in async group '\(other.name)'") }
            }
            guard domain.metadata.peer(named: peerName) != nil else { throw DomainError("peer '\(peerName)' not found (add it with `svsp-ctl peer add`)") }
            let dests = r.args["dest"].map { $0.split(separator: ",").map(String.init) } ?? sources.map(\.name)
            guard dests.count == sources.count else {
                throw DomainError("--dest is given \(dests.count) time(s) for \(sources.count) source vdisk(s): name every destination, in member order, or none")
            }
            let specs = zip(sources, dests).map { AsyncRequest.MemberSpec(vdisk: $0.1, sizeBytes: $0.0.sizeBytes, blockSize: $0.0.blockSize) }
            var request = AsyncRequest(op: .createDestination, group: name, members: specs)
            request.pool = r.args["dest_pool"]
            request.existing = r.args["dest_existing"] == "true"
            _ = try await replication.call(peerName, request)
            var g = AsyncGroupRecord(name: name, role: .source, vdiskId: sources[0].id, peer: peerName, remoteVDisk: dests[0])
            if sources.count > 1 { g.moreMembers = zip(sources, dests).dropFirst().map { .init(vdiskId: $0.0.id, remoteVDisk: $0.1) } }
            g.sourceVDG = vdg
            try await domain.addAsyncGroup(g)
            replication.reconcileAsync()
            let pairs = zip(sources, dests).map { "'\($0.0.name)' -> '\($0.1)'" }.joined(separator: ", ")
            return .success(text: "async group '\(name)': \(pairs) at peer '\(peerName)'; the initial copy (allocated extents only) starts now, then a cycle every pit_cycle of the link profile",
                            json: AsyncGroupView(domain.metadata.asyncGroup(named: name)!, domain: domain, progress: nil))
        case "async.status":
            var groups = domain.metadata.asyncGroupList
            if let name = r.args["name"] {
                guard let g = domain.metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
                groups = [g]
            }
            let views = groups.map { AsyncGroupView($0, domain: domain, progress: replication?.progress(ofGroup: $0.name)) }
            return .success(text: AsyncGroupView.table(views), json: views)
        case "async.pause-task", "async.continue-task":
            let name = try arg(r, "name")
            _ = try domain.asyncVDisk(name, role: .source)
            let pause = r.command == "async.pause-task"
            try await domain.updateAsyncGroup(name) { $0.state = pause ? .paused : .normal }
            return .success(text: "async group '\(name)': task \(pause ? "paused (the cycle in flight finishes first)" : "continues")", json: ["group": name])
        case "async.failover", "async.detach-task":
            // At the destination, the source site lost (or not): the group ends here and its
            // vdisks become writable at their last complete PiT; failover also exports them.
            let name = try arg(r, "name")
            let failover = r.command == "async.failover"
            guard let g = domain.metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
            guard g.role == .destination else {
                throw DomainError("async group '\(name)' is a source here: run `async \(failover ? "failover" : "detach-task")` at the destination (peer '\(g.peer)')")
            }
            let plan = try domain.detachPlan(name)
            let age = plan.takenAt.map { String(format: "%.1f s ago", Date().timeIntervalSince1970 - $0) } ?? "time unknown"
            let steps = "async group '\(name)' (fed by peer '\(plan.peer)') ends here: nothing more is applied; vdisk(s) \(plan.vdisks.joined(separator: ", ")) "
                + "go back to their last complete PiT \(plan.pit) (taken at the source \(age); writes made there since are not here) and become writable"
                + (failover ? ", exported read-write over NBD" : "") + "; the PiTs stay; the source's task fails until it is deleted there"
            guard r.args["yes"] == "true" else { return planOnly(steps) }
            let done = try await domain.detachAsyncDestination(name)
            if failover { for v in done.vdisks { try await domain.setExport(vdisk: v, mode: .readWrite) } }
            return .success(text: "done: \(steps)", json: ["plan": steps, "done": "true"])
        case "async.recover":
            // At the site that failed over, the old source back: mirror back to it from the
            // common PiT, its writes since rolled back; this site stays in production.
            guard let replication else { throw DomainError("this daemon does not run replication") }
            let name = try arg(r, "name")
            let (g, _) = try domain.asyncVDisk(name, role: .destination)
            guard g.state == .detached, let base = g.confirmedPiT else {
                throw DomainError("async group '\(name)' is not detached here: `async recover` runs at the site that failed over")
            }
            let vdisks = domain.metadata.memberNames(of: g)
            var probe = AsyncRequest(op: .reverse, group: name, members: vdisks.map(AsyncRequest.MemberSpec.named))
            probe.base = base
            probe.rollback = true
            probe.dryRun = true
            let seen = try await replication.call(g.peer, probe)
            let theirs = (seen.vdisks ?? []).joined(separator: ", ")
            let steps = "peer '\(g.peer)' rolls vdisk(s) \(theirs) back to the common PiT \(base) (discarding \(ByteSize.format(seen.changedBytes ?? 0)) "
                + "in extents changed there since) and becomes this group's destination (read-only there); vdisk(s) \(vdisks.joined(separator: ", ")) "
                + "here stay in production and become the source; the first cycle ships only what changed here since \(base)"
            guard r.args["yes"] == "true" else { return planOnly(steps) }
            _ = try await domain.recoverAsSource(name) { (request: AsyncRequest) async throws(DomainError) -> AsyncResponse in
                try await replication.call(g.peer, request)
            }
            replication.reconcileAsync()
            return .success(text: "done: \(steps)", json: ["plan": steps, "done": "true"])
        case "async.merge":
            // After a fail over, the sites reconnected (a split brain): mirror again from the
            // common PiT, in the direction the admin picks; the loser is rolled back to it.
            guard let replication else { throw DomainError("this daemon does not run replication") }
            let name = try arg(r, "name"), from = try arg(r, "from")
            guard let g = domain.metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
            let me = domain.metadata.name
            guard from == "here" || from == me || from == g.peer else {
                throw DomainError("--from '\(from)': name the side that wins: 'here' (or '\(me)') or the peer '\(g.peer)'")
            }
            guard replication.isConnected(g.peer) else { throw DomainError("peer '\(g.peer)' is not connected: a merge needs both sites") }
            let call = { (request: AsyncRequest) async throws(DomainError) -> AsyncResponse in try await replication.call(g.peer, request) }
            let plan = try await domain.mergePlan(name, winnerIsHere: from != g.peer, call: call)
            let rollback = r.args["rollback"] == "true"
            let (winner, loser) = plan.winnerIsHere ? ("here", "peer '\(g.peer)'") : ("peer '\(g.peer)'", "here")
            let (winners, losers) = plan.winnerIsHere ? (plan.here, plan.there) : (plan.there, plan.here)
            let lost = plan.discardedBytes == 0 ? "are unchanged since it"
                : "go back to it (discarding \(ByteSize.format(plan.discardedBytes)) in extents changed there since)"
            let steps = "vdisk(s) \(winners.joined(separator: ", ")) \(winner) win and are the source from the common PiT \(plan.base); "
                + "vdisk(s) \(losers.joined(separator: ", ")) \(loser) \(lost) and become the destination (read-only); "
                + "the first cycle ships only what changed \(winner) since \(plan.base)"
            if plan.discardedBytes > 0, !rollback {
                throw DomainError("vdisk(s) \(losers.joined(separator: ", ")) \(loser) changed since the common PiT \(plan.base) (\(ByteSize.format(plan.discardedBytes)) in changed extents): "
                    + "merging onto them would overwrite that; add --rollback to discard it")
            }
            guard r.args["yes"] == "true" else { return planOnly(steps) }
            try await domain.merge(name, plan: plan, rollback: rollback, call: call)
            replication.reconcileAsync()
            return .success(text: "done: \(steps)", json: ["plan": steps, "done": "true"])
        case "async.transfer-production":
            // Planned hand-over, both sites up: hold host writes here, ship a last cycle, and
            // swap the roles once the peer holds an image identical to these vdisks.
            guard let replication else { throw DomainError("this daemon does not run replication") }
            let name = try arg(r, "name")
            let (g, _) = try domain.asyncVDisk(name, role: .source)
            guard replication.isConnected(g.peer) else {
                throw DomainError("peer '\(g.peer)' is not connected: a hand-over needs both sites (`async failover \(name)` at the destination is for a lost source)")
            }
            let vdisks = domain.metadata.memberNames(of: g)
            let remote = g.members.map(\.remoteVDisk)
            let steps = "host writes to vdisk(s) \(vdisks.joined(separator: ", ")) are held (unexported here) while a last cycle ships; once peer '\(g.peer)' "
                + "holds that PiT, identical to them, it becomes the source and exports \(remote.joined(separator: ", ")) read-write, and this site becomes "
                + "its destination (read-only exports of the last complete PiT); hosts move to peer '\(g.peer)'"
            guard r.args["yes"] == "true" else { return planOnly(steps) }
            let held = Date()
            let exported = vdisks.filter { domain.metadata.vdisk(named: $0)?.export != nil }
            for v in exported { try await domain.setExport(vdisk: v, mode: nil) }
            do throws(DomainError) {
                if g.state == .paused || g.state == .suspended { try await domain.updateAsyncGroup(name) { $0.state = .normal } }
                replication.captureNow(group: name)
                let base = try await waitForCycle(name, takenAfter: held, seconds: Double(r.args["seconds"] ?? "") ?? 120)
                for (i, v) in vdisks.enumerated() where try domain.differences(from: g.memberPiT(base, i), to: nil).changedBytes > 0 {
                    throw DomainError("vdisk '\(v)' changed after PiT '\(base)' although its writes were held")
                }
                var ask = AsyncRequest(op: .becomeSource, group: name, members: vdisks.map(AsyncRequest.MemberSpec.named))
                ask.base = base
                let answer = try await replication.call(g.peer, ask)
                var turn = AsyncRequest(op: .reverse, group: name, members: (answer.vdisks ?? remote).map(AsyncRequest.MemberSpec.named))
                turn.base = base
                _ = try await domain.reverseToDestination(turn, peer: g.peer)
                replication.reconcileAsync()
            } catch {
                // Not handed over: hosts get their vdisks back here (unless this side already turned).
                if domain.metadata.asyncGroup(named: name)?.role == .source { for v in exported { _ = try? await domain.setExport(vdisk: v, mode: .readWrite) } }
                throw DomainError("transfer-production of '\(name)' stopped: \(error.message)")
            }
            for v in exported { try await domain.setExport(vdisk: v, mode: .readOnly) }
            let seconds = Date().timeIntervalSince(held)
            return .success(text: "done: \(steps); host writes were held for \(String(format: "%.2f", seconds)) s",
                            json: ["plan": steps, "done": "true", "heldSeconds": String(format: "%.3f", seconds)])
        case "async.delete-group":
            let name = try arg(r, "name")
            guard let g = domain.metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
            var remote = ""
            if g.role == .source, let replication {
                do throws(DomainError) {
                    _ = try await replication.call(g.peer, AsyncRequest(op: .deleteGroup, group: name))
                    remote = "; the destination forgot it too"
                } catch {
                    remote = "; the destination could not be told (\(error.message)): delete the group there as well"
                }
            }
            try await domain.removeAsyncGroup(name)
            replication?.reconcileAsync()
            return .success(text: "async group '\(name)' deleted (its vdisk and PiTs stay)\(remote)", json: ["deleted": name])
        default:
            return nil
        }
    }
}

extension CommandHandler {
    /// The answer of an operation asked for without --yes: what it would do, nothing done.
    fileprivate func planOnly(_ steps: String) -> MgmtResponse {
        .success(text: "plan: \(steps).\nnothing was done: run again with --yes to do it", json: ["plan": steps, "done": "false"])
    }

    /// Waits until group `name`'s destination confirmed a PiT taken at or after `date`; its name.
    fileprivate func waitForCycle(_ name: String, takenAfter date: Date, seconds: Double) async throws(DomainError) -> String {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            guard let g = domain.metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' is gone") }
            if let pit = g.confirmedPiT, (g.confirmedAt ?? 0) >= date.timeIntervalSince1970 { return pit }
            try? await Task.sleep(nanoseconds: 50_000_000)
        }
        throw DomainError("no cycle taken after the hold completed within \(Int(seconds)) s (\(domain.metadata.asyncGroup(named: name)?.lastError ?? "no error reported"))")
    }

    /// The vdisks `async create-group` mirrors: `source` (a vdisk), `source_snapshot` (a
    /// snapshot vdisk) or `source_vdg` (every member of the VDG, in its order).
    fileprivate func asyncSources(_ r: MgmtRequest) throws(DomainError) -> ([VDiskRecord], String?) {
        let given = ["source", "source_snapshot", "source_vdg"].filter { r.args[$0] != nil }
        guard given.count == 1 else { throw DomainError("give exactly one of --source VDISK, --source-snapshot SNAPSHOT, --source-vdg VDG") }
        let m = domain.metadata
        if let name = r.args["source"] {
            guard let v = m.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
            guard v.snapshot == nil else { throw DomainError("'\(name)' is a snapshot: mirror it with --source-snapshot \(name)") }
            return ([v], nil)
        }
        if let name = r.args["source_snapshot"] {
            guard let v = m.vdisk(named: name) else { throw DomainError("snapshot '\(name)' not found") }
            guard v.snapshot != nil else { throw DomainError("'\(name)' is a vdisk, not a snapshot: mirror it with --source \(name)") }
            return ([v], nil)
        }
        let name = r.args["source_vdg"]!
        guard let g = m.vdg(named: name) else { throw DomainError("virtual disk group '\(name)' not found") }
        let members = g.members.compactMap { id in m.vdisks.first { $0.id == id } }
        guard !members.isEmpty else { throw DomainError("virtual disk group '\(name)' has no members") }
        return (members, name)
    }
}

/// An async group and its task, as `async status` shows it.
struct AsyncGroupView: Codable {
    var name: String
    var role: String
    var vdisk: String
    var peer: String
    var remoteVDisk: String
    /// Every member (a VDG source has several): local vdisk -> the peer's vdisk.
    var members: [[String: String]]
    var sourceVDG: String?
    /// Source: cycle PiTs taken and not yet confirmed by the destination.
    var pendingPiTs: [String]
    var state: String
    /// The last PiT the destination holds complete, and how old it is (the recovery point).
    var confirmedPiT: String?
    /// When the source took it (Unix seconds), and how long ago that is.
    var recoveryPoint: Double?
    var recoveryPointAgeSeconds: Double?
    var cycle: UInt64
    var lastError: String?
    var progress: AsyncTaskProgress?
    /// Source: the blocks read and shipped per second by the cycle running (or the last that
    /// shipped any), and bytes of blocks per byte on the wire since the daemon started (1
    /// without compression).
    var throughputBytesPerSecond: Double?
    var compressionRatio: Double?

    init(_ g: AsyncGroupRecord, domain: Domain, progress: AsyncTaskProgress?) {
        name = g.name
        role = g.role.rawValue
        vdisk = domain.metadata.vdisks.first { $0.id == g.vdiskId }?.name ?? "?"
        peer = g.peer
        remoteVDisk = g.remoteVDisk
        members = zip(domain.metadata.memberNames(of: g), g.members).map { ["vdisk": $0.0, "remote": $0.1.remoteVDisk] }
        sourceVDG = g.sourceVDG
        pendingPiTs = g.pendingList
        state = g.state.rawValue
        confirmedPiT = g.confirmedPiT
        recoveryPoint = g.confirmedAt
        recoveryPointAgeSeconds = g.confirmedAt.map { ((Date().timeIntervalSince1970 - $0) * 10).rounded() / 10 }
        cycle = g.cycle
        lastError = g.lastError
        self.progress = progress
        if let p = progress {
            // The cycle running now, once it shipped something; else the last that did.
            let shipped = p.bytesSent - min(p.resumedAt ?? 0, p.bytesSent)
            if p.finishedAt == nil, shipped > 0, let started = p.startedAt, Date().timeIntervalSince1970 > started {
                throughputBytesPerSecond = (Double(shipped) / (Date().timeIntervalSince1970 - started)).rounded()
            } else {
                throughputBytesPerSecond = p.lastThroughput
            }
        }
        if let p = progress, p.wireBytes > 0 { compressionRatio = (Double(p.dataBytes) / Double(p.wireBytes) * 1000).rounded() / 1000 }
    }

    static func table(_ views: [AsyncGroupView]) -> String {
        guard !views.isEmpty else { return "no async groups" }
        return Table.render(["GROUP", "ROLE", "VDISK", "PEER", "STATE", "LAST COMPLETE PIT", "AGE", "CYCLE", "WAITING", "TO SEND", "RATE", "LAST ERROR"], views.map { v in
            let toSend = v.progress.map { ByteSize.format($0.bytesToSend - min($0.bytesSent, $0.bytesToSend)) } ?? "-"
            let vdisk = v.sourceVDG.map { "vdg \($0) (\(v.members.count))" } ?? (v.members.count > 1 ? "\(v.members.count) vdisks" : v.vdisk)
            return [v.name, v.role, vdisk, v.peer, v.state, v.confirmedPiT ?? "none yet",
                    v.recoveryPointAgeSeconds.map { String(format: "%.1f s", $0) } ?? "-", String(v.cycle), v.role == "source" ? String(v.pendingPiTs.count) : "-", toSend,
                    v.throughputBytesPerSecond.map { ByteSize.format(UInt64($0)) + "/s" } ?? "-",
                    v.lastError.map { String($0.prefix(80)) } ?? "-"]
        })
    }
}
