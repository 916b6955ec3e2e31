import Foundation

/// The `async.*` commands a disaster-recovery admin runs on a bad day: fail over, detach,
/// split, recover, merge, transfer production. Each prints its plan and does nothing
/// without `--yes`.
extension CommandHandler {
    func asyncRoleCommand(_ r: MgmtRequest) async throws(DomainError) -> MgmtResponse? {
        switch r.command {
        case "async.failover", "async.detach-task":
            let name = try arg(r, "name")
            guard let g = domain.metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
            if g.role == .source {
                guard r.command == "async.detach-task" else {
                    throw DomainError("async group '\(name)' is a source here: run `async failover` at the destination (peer '\(g.peer)')")
                }
                return try await detachAtSource(name, g, r)
            }
            // At the destination, the source site lost (or not): the group ends here and its
            // vdisks become writable at their last complete PiT; failover also exports them.
            let failover = r.command == "async.failover"
            if failover, g.state == .detached, r.args["yes"] == "true" { // run again after a crash: the export is what may be missing
                let vdisks = domain.metadata.memberNames(of: g)
                for v in vdisks { try await domain.setExport(vdisk: v, mode: .readWrite) }
                return .success(text: "done: async group '\(name)' was already detached here; vdisk(s) \(vdisks.joined(separator: ", ")) are exported read-write",
                                json: ["done": "true"])
            }
            let plan = try domain.detachPlan(name)
            let age = plan.takenAt.map { String(format: "%.1f s ago", Date().timeIntervalSince1970 - $0) } ?? "time unknown"
            let steps = "async group '\(name)' (fed by peer '\(plan.peer)') ends here: nothing more is applied; vdisk(s) \(plan.vdisks.joined(separator: ", ")) "
                + "go back to their last complete PiT \(plan.pit) (taken at the source \(age); writes made there since are not here) and become writable"
                + (failover ? ", exported read-write over NBD" : "") + "; the PiTs stay; the source's task stops (split brain) until `async merge`"
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
            return try await merge(r)
        case "async.transfer-production", "async.split-task":
            return try await handOver(r, split: r.command == "async.split-task")
        default:
            return nil
        }
    }

    /// `detach-task` at the source: the task ends here (nothing more shipped; the common PiT
    /// stays held for a later merge) and, when the peer is reachable, there too (its vdisks
    /// writable at their last complete PiT). Without the peer, this side alone.
    private func detachAtSource(_ name: String, _ g: AsyncGroupRecord, _ r: MgmtRequest) async throws(DomainError) -> MgmtResponse {
        let reachable = replication?.isConnected(g.peer) == true
        let steps = "async group '\(name)' stops shipping here (the cycle PiTs waiting go; the last confirmed PiT \(g.confirmedPiT ?? "none") stays); "
            + (reachable ? "peer '\(g.peer)' detaches its vdisk(s) \(g.members.map(\.remoteVDisk).joined(separator: ", ")) at their last complete PiT (writable, not exported)"
                : "peer '\(g.peer)' is not connected: it is asked to detach when the link is back")
        guard r.args["yes"] == "true" else { return planOnly(steps) }
        try await domain.detachAsyncSource(name, peerDetach: .init(splitAt: nil))
        if reachable, let replication {
            try await domain.detachPeer(name) { (request: AsyncRequest) async throws(DomainError) -> AsyncResponse in try await replication.call(g.peer, request) }
        }
        replication?.reconcileAsync()
        return .success(text: "done: \(steps)", json: ["plan": steps, "done": "true"])
    }

    /// `merge G --from SIDE [--rollback]`: see `Domain.merge`.
    private func merge(_ r: MgmtRequest) async throws(DomainError) -> MgmtResponse {
        guard let replication else { throw DomainError("this daemon does not run replication") }
        let name = try arg(r, "name"), from = try arg(r, "from")
        guard let g = domain.metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
        let me = domain.metadata.name
        guard from == "here" || from == me || from == g.peer else {
            throw DomainError("--from '\(from)': name the side that wins: 'here' (or '\(me)') or the peer '\(g.peer)'")
        }
        guard replication.isConnected(g.peer) else { throw DomainError("peer '\(g.peer)' is not connected: a merge needs both sites") }
        let call = { (request: AsyncRequest) async throws(DomainError) -> AsyncResponse in try await replication.call(g.peer, request) }
        if r.args["full"] == "true" { // no common PiT: the loser is wiped and takes everything
            let winnerIsHere = from != g.peer
            let steps = "no common PiT is used (--full): the vdisks \(winnerIsHere ? "at peer '\(g.peer)'" : "here") are wiped (every block of them lost) "
                + "and become the destination, fed from nothing; the vdisks \(winnerIsHere ? "here" : "at peer '\(g.peer)'") are the source and its next cycle "
                + "ships everything they have allocated"
            guard r.args["yes"] == "true" else { return planOnly(steps) }
            try await domain.mergeFull(name, winnerIsHere: winnerIsHere, call: call)
            replication.reconcileAsync()
            return .success(text: "done: \(steps)", json: ["plan": steps, "done": "true"])
        }
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
    }

    /// `transfer-production` and `split-task`, at the source, both sites up: hold host writes
    /// here (unexport), ship a last cycle, check nothing changed since its PiT (so both sides
    /// hold it identical), then swap the roles (transfer) or part (split: both sides
    /// detached, this side exported read-write again). Reports how long writes were held.
    private func handOver(_ r: MgmtRequest, split: Bool) async throws(DomainError) -> MgmtResponse {
        guard let replication else { throw DomainError("this daemon does not run replication") }
        let name = try arg(r, "name")
        let (g, _) = try domain.asyncVDisk(name, role: .source)
        guard replication.isConnected(g.peer) else {
            throw DomainError("peer '\(g.peer)' is not connected: \(split ? "a split" : "a hand-over") needs both sites (`async failover \(name)` at the destination is for a lost source)")
        }
        if !split { try domain.refuseTurningWithOtherTasks(g) } // before the peer is asked to become the source
        let vdisks = domain.metadata.memberNames(of: g)
        let remote = g.members.map(\.remoteVDisk)
        let held = "host writes to vdisk(s) \(vdisks.joined(separator: ", ")) are held (unexported here) while a last cycle ships; once peer '\(g.peer)' holds that PiT, identical to them, "
        let steps = split
            ? held + "the task ends: peer '\(g.peer)' detaches \(remote.joined(separator: ", ")) (writable, not exported), this site exports its vdisks again; both keep the PiT for `async merge`"
            : held + "it becomes the source and exports \(remote.joined(separator: ", ")) read-write, and this site becomes its destination (read-only exports of the last complete PiT); hosts move to peer '\(g.peer)'"
        guard r.args["yes"] == "true" else { return planOnly(steps) }
        let start = Date()
        let exported = try await domain.unexport(vdisks)
        var shipped: UInt64 = 0 // block bytes this site shipped as the source, the last cycle included
        do throws(DomainError) {
            if g.state == .paused || g.state == .suspended { try await domain.updateAsyncGroup(name) { $0.state = .normal } }
            replication.captureNow(group: name)
            _ = try await waitForCycle(name, takenAfter: start, seconds: Double(r.args["seconds"] ?? "") ?? 120)
            // No cycle starts from here on and one under way finishes: the base is the newest
            // confirmed PiT, which the peer holds as its last complete one (later cycle PiTs
            // of the hold, empty, would otherwise move the peer on after this side chose).
            try await domain.updateAsyncGroup(name) { $0.state = .paused }
            await replication.waitIdle(group: name)
            guard let base = domain.metadata.asyncGroup(named: name)?.confirmedPiT else { throw DomainError("async group '\(name)' lost its confirmed PiT") }
            for (i, v) in vdisks.enumerated() where try domain.differences(from: g.memberPiT(base, i), to: nil).changedBytes > 0 {
                throw DomainError("vdisk '\(v)' changed after PiT '\(base)' although its writes were held")
            }
            shipped = replication.progress(ofGroup: name)?.dataBytes ?? 0
            if split {
                // Committed here first: a crash from now on leaves the peer's detach owed, and
                // the source task asks for it when the daemon is back.
                try await domain.detachAsyncSource(name, peerDetach: .init(splitAt: base))
                try await domain.detachPeer(name) { (request: AsyncRequest) async throws(DomainError) -> AsyncResponse in
                    try await replication.call(g.peer, request)
                }
            } else {
                var ask = AsyncRequest(op: .becomeSource, group: name, members: vdisks.map(AsyncRequest.MemberSpec.named))
                ask.base = base
                let answer = try await replication.call(g.peer, ask)
                var turn = AsyncRequest(op: .reverse, group: name, members: (answer.vdisks ?? remote).map(AsyncRequest.MemberSpec.named))
                turn.base = base
                _ = try await domain.reverseToDestination(turn, peer: g.peer)
            }
            replication.reconcileAsync()
        } catch {
            // Not handed over: hosts get their vdisks back here, and cycles go on (unless this side already turned).
            if let now = domain.metadata.asyncGroup(named: name), now.role == .source {
                if now.state == .paused { try? await domain.updateAsyncGroup(name) { $0.state = .normal } }
                for v in exported { _ = try? await domain.setExport(vdisk: v, mode: .readWrite) }
            }
            throw DomainError("\(split ? "split-task" : "transfer-production") of '\(name)' stopped: \(error.message)")
        }
        for v in exported { try await domain.setExport(vdisk: v, mode: split ? .readWrite : .readOnly) }
        let seconds = Date().timeIntervalSince(start)
        return .success(text: "done: \(steps); host writes were held for \(String(format: "%.2f", seconds)) s; "
                            + "this site shipped \(ByteSize.format(shipped)) of blocks as the source (since it became the source or started)",
                        json: ["plan": steps, "done": "true", "heldSeconds": String(format: "%.3f", seconds), "shippedBytes": String(shipped)])
    }

    /// The answer of an operation asked for without --yes: what it would do, nothing done.
    private func planOnly(_ steps: String) -> MgmtResponse {
        .success(text: "plan: \(steps).\nnothing was done: run again with --yes to do it", json: ["plan": steps, "done": "false"])
    }

    /// Waits until group `name`'s destination confirmed a PiT taken at or after `date`; its name.
    private func waitForCycle(_ name: String, takenAfter date: Date, seconds: Double) async throws(DomainError) -> String {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            guard let g = domain.metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' is gone") }
            if let pit = g.confirmedPiT, (g.confirmedAt ?? 0) >= date.timeIntervalSince1970 { return pit }
            try? await Task.sleep(nanoseconds: 50_000_000)
        }
        throw DomainError("no cycle taken after the hold completed within \(Int(seconds)) s (\(domain.metadata.asyncGroup(named: name)?.lastError ?? "no error reported"))")
    }
}
