import Foundation

/// `async merge G --from SIDE`: after a fail over, one side of the group is detached (its
/// vdisks written as production) and the other may still be the source, written too: a
/// split brain once they reconnect, during which nothing is shipped. A merge restarts
/// mirroring from the common PiT (the detached side's last complete PiT, which the source
/// holds as well) in the direction the admin picks. The losing side goes back to the common
/// PiT, but only with `rollback`: without it, a loser that changed since is refused with
/// how much changed. The winner's writes since then ship in the first cycle: only the
/// difference travels. Runs at either side.
extension Domain {
    /// What a merge will do: the common PiT, the vdisks of each side, and how much the
    /// losing side changed since the common PiT (what a rollback discards there).
    public struct MergePlan: Sendable {
        public var base: String
        public var winnerIsHere: Bool
        public var here: [String]
        public var there: [String]
        public var discardedBytes: UInt64
    }

    /// The other source records (tasks) mirroring any of `g`'s vdisks: while there are any,
    /// those vdisks cannot turn into a destination (the other tasks would ship a cycle being
    /// applied), so a reverse or a hand-over is refused.
    func otherTasks(sharingVDisksOf g: AsyncGroupRecord) -> [String] {
        let mine = Set(g.members.map(\.vdiskId))
        return metadata.asyncGroupList.filter { $0.name != g.name && $0.role == .source && $0.members.contains { mine.contains($0.vdiskId) } }.map(\.name)
    }

    func refuseTurningWithOtherTasks(_ g: AsyncGroupRecord) throws(DomainError) {
        let others = otherTasks(sharingVDisksOf: g)
        guard others.isEmpty else {
            throw DomainError("the vdisks of async group '\(g.name)' are also mirrored by task(s) \(others.joined(separator: ", ")): "
                + "they cannot become a destination while those ship them (delete them first: `async delete-task`)")
        }
    }

    /// Bytes (in changed extents) the members of `g` here changed since its cycle PiT `base`.
    func changedBytes(of g: AsyncGroupRecord, since base: String) throws(DomainError) -> UInt64 {
        var changed: UInt64 = 0
        for i in g.members.indices {
            guard metadata.pit(named: g.memberPiT(base, i)) != nil else {
                throw DomainError("async group '\(g.name)': PiT '\(g.memberPiT(base, i))' is not here, so the two sides share no PiT to start from (merge with --full: the losing side is wiped and takes a full copy)")
            }
            changed += try differences(from: g.memberPiT(base, i), to: nil).changedBytes
        }
        return changed
    }

    /// Asks the peer (through `call`) what the merge involves there; changes nothing.
    func mergePlan(_ name: String, winnerIsHere: Bool, call: (AsyncRequest) async throws(DomainError) -> AsyncResponse) async throws(DomainError) -> MergePlan {
        guard let g = metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
        let here = metadata.memberNames(of: g)
        if g.role == .destination {
            guard g.state == .detached, let base = g.confirmedPiT else {
                throw DomainError("async group '\(name)' is \(g.state.rawValue) here, not detached: there is nothing to merge (mirroring runs from peer '\(g.peer)')")
            }
            if winnerIsHere { // the peer goes back to `base` (`reverse`) and becomes the destination
                var probe = AsyncRequest(op: .reverse, group: name, members: here.map(AsyncRequest.MemberSpec.named))
                probe.base = base
                probe.rollback = true
                probe.dryRun = true
                let seen = try await call(probe)
                return MergePlan(base: base, winnerIsHere: true, here: here, there: seen.vdisks ?? [], discardedBytes: seen.changedBytes ?? 0)
            }
            var probe = AsyncRequest(op: .resumeFrom, group: name)
            probe.base = base
            probe.dryRun = true
            let seen = try await call(probe)
            return MergePlan(base: base, winnerIsHere: false, here: here, there: seen.vdisks ?? [], discardedBytes: try changedBytes(of: g, since: base))
        }
        var probe = AsyncRequest(op: .rejoin, group: name)
        probe.dryRun = true
        let seen = try await call(probe)
        guard let base = seen.base else { throw DomainError("peer '\(g.peer)' did not name its last complete PiT") }
        let mine = try changedBytes(of: g, since: base) // also: this side holds `base`
        return MergePlan(base: base, winnerIsHere: winnerIsHere, here: here, there: seen.vdisks ?? [],
                         discardedBytes: winnerIsHere ? seen.changedBytes ?? 0 : mine)
    }

    /// Runs the merge `plan` (from `mergePlan`). Each step can be run again after a crash or
    /// a lost answer: the side already turned answers as done.
    func merge(_ name: String, plan: MergePlan, rollback: Bool, call: (AsyncRequest) async throws(DomainError) -> AsyncResponse) async throws(DomainError) {
        guard let g = metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
        switch (g.role, plan.winnerIsHere) {
        case (.destination, true): // the peer becomes this side's destination
            _ = try await recoverAsSource(name, rollback: rollback, call: call)
        case (.destination, false): // fed again here, then the source ships from `base`
            var rejoin = AsyncRequest(op: .rejoin, group: name)
            rejoin.base = plan.base
            rejoin.rollback = rollback
            _ = try await rejoinAsDestination(rejoin, peer: g.peer)
            var resume = AsyncRequest(op: .resumeFrom, group: name)
            resume.base = plan.base
            _ = try await call(resume)
        case (.source, true): // the peer is fed again, then this side ships from `base`
            var rejoin = AsyncRequest(op: .rejoin, group: name)
            rejoin.base = plan.base
            rejoin.rollback = rollback
            _ = try await call(rejoin)
            var resume = AsyncRequest(op: .resumeFrom, group: name)
            resume.base = plan.base
            _ = try await resumeSource(resume, peer: g.peer)
        case (.source, false): // this side goes back to `base` as the destination; the peer becomes the source
            var turn = AsyncRequest(op: .reverse, group: name, members: plan.there.map(AsyncRequest.MemberSpec.named))
            turn.base = plan.base
            turn.rollback = rollback
            _ = try await reverseToDestination(turn, peer: g.peer)
            var become = AsyncRequest(op: .becomeSource, group: name, members: plan.here.map(AsyncRequest.MemberSpec.named))
            become.base = plan.base
            _ = try await call(become)
        }
    }

    /// `rejoin`, at a detached destination: fed again by its source from its last complete
    /// PiT, rolled back to it first (only with `r.rollback` when it changed since); exports
    /// turn read-only. Answers as done when it is fed from `r.base` already.
    func rejoinAsDestination(_ r: AsyncRequest, peer: String) async throws(DomainError) -> AsyncResponse {
        if r.full == true { return try await wipeAsLoser(r, peer: peer, role: .destination) }
        let (g, _) = try asyncVDisk(r.group, role: .destination)
        guard g.peer == peer else { throw DomainError("async group '\(r.group)' is fed by peer '\(g.peer)', not '\(peer)'") }
        let vdisks = metadata.memberNames(of: g)
        if g.isFed, g.state != .detaching, r.base != nil, g.confirmedPiT == r.base { return AsyncResponse(base: g.confirmedPiT, vdisks: vdisks, changedBytes: 0) }
        guard g.state == .detached, let base = g.confirmedPiT else {
            throw DomainError("async group '\(r.group)' is \(g.state.rawValue) here, not detached: there is nothing to merge")
        }
        if let asked = r.base, asked != base { throw DomainError("async group '\(r.group)': the last complete PiT here is '\(base)', not '\(asked)'") }
        let changed = try changedBytes(of: g, since: base)
        let answer = AsyncResponse(base: base, vdisks: vdisks, changedBytes: changed)
        if r.dryRun == true { return answer }
        if changed > 0, r.rollback != true {
            throw DomainError("vdisk(s) \(vdisks.joined(separator: ", ")) of async group '\(r.group)' changed at this site since PiT '\(base)' "
                + "(\(ByteSize.format(changed)) in changed extents): mirroring onto them would overwrite that; only a rollback to the PiT (--rollback) can discard it")
        }
        let exported = try await unexport(vdisks)
        for (i, vdisk) in vdisks.enumerated() where changed > 0 { try await rollback(vdisk: vdisk, to: g.memberPiT(base, i)) }
        CrashPoint.hit("async-rejoin-rolled-back") // still detached: the merge run again completes
        try await updateAsyncGroup(r.group) {
            $0.state = .normal
            $0.previousPiT = nil
            $0.lastError = nil
        }
        for vdisk in exported { try await setExport(vdisk: vdisk, mode: .readOnly) }
        return answer
    }

    /// `resume-from`, at a source (in a split brain, typically): ship from `r.base`, which
    /// both sides hold, again; the cycle PiTs taken since go (the next cycle's PiT carries
    /// every write since `base`). `dryRun`: only check this side holds `base`.
    func resumeSource(_ r: AsyncRequest, peer: String) async throws(DomainError) -> AsyncResponse {
        if r.full == true { return try await resumeFromNothing(r, peer: peer) }
        guard let base = r.base else { throw DomainError("resume-from: the common PiT is required") }
        let (g, _) = try asyncVDisk(r.group, role: .source)
        guard g.peer == peer else { throw DomainError("async group '\(r.group)' mirrors to peer '\(g.peer)', not '\(peer)'") }
        let vdisks = metadata.memberNames(of: g)
        let changed = try changedBytes(of: g, since: base)
        if r.dryRun == true { return AsyncResponse(vdisks: vdisks, changedBytes: changed) }
        try await dropCyclePiTs(g.pendingList + [g.confirmedPiT].compactMap { $0 }, keeping: base)
        try await turnGroup(r.group, into: .source, from: base, remote: g.members.map(\.remoteVDisk))
        return AsyncResponse(vdisks: vdisks, changedBytes: changed)
    }
}
