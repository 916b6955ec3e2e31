import Foundation

/// The operations that change which side of an async group is which: fail over (detach at
/// the destination), recover (the old source becomes the destination), and the hand-over
/// (`transfer-production`: the destination becomes the source). Each starts from a common
/// PiT, a PiT both sides hold with the same image, and rolls back what differs from it.
extension Domain {
    /// What `async failover` (or `detach-task` at the destination) will do: the members, the
    /// PiT they go back to, and when the source took it; or why it cannot.
    public struct DetachPlan: Codable, Sendable {
        public var group: String
        public var peer: String
        public var vdisks: [String]
        public var pit: String
        public var takenAt: Double?
    }

    func detachPlan(_ name: String) throws(DomainError) -> DetachPlan {
        let (g, _) = try asyncVDisk(name, role: .destination)
        guard g.state != .detached else { throw DomainError("async group '\(name)' is already detached here; `async recover \(name)` mirrors back to peer '\(g.peer)'") }
        guard let base = g.confirmedPiT else {
            throw DomainError("async group '\(name)': no cycle completed here yet, so its vdisks hold no consistent image to fail over to")
        }
        let vdisks = metadata.memberNames(of: g)
        return DetachPlan(group: name, peer: g.peer, vdisks: vdisks, pit: base, takenAt: g.confirmedAt)
    }

    /// Ends group `name` here, at the destination, without the source: nothing more is
    /// applied (state `detaching`, committed first), every member is rolled back to its last
    /// complete PiT (what was applied of a cut cycle goes), then the group is `detached` and
    /// the members are ordinary writable vdisks. The PiTs stay (the last complete one is the
    /// common PiT `async recover` starts from). Run again after a crash.
    func detachAsyncDestination(_ name: String) async throws(DomainError) -> DetachPlan {
        let plan = try detachPlan(name)
        let g = try asyncVDisk(name, role: .destination).0
        try await updateAsyncGroup(name) { $0.state = .detaching }
        _ = try await unexport(plan.vdisks)
        for (i, vdisk) in plan.vdisks.enumerated() { try await rollback(vdisk: vdisk, to: g.memberPiT(plan.pit, i)) }
        CrashPoint.hit("async-detach-rolled-back")
        try await updateAsyncGroup(name) {
            $0.state = .detached
            $0.previousPiT = nil
        }
        return plan
    }

    /// `detach`, asked by the source (`split-task`, or `detach-task` there): as
    /// `detachAsyncDestination`; for a split (`r.base` given) only when the last complete
    /// PiT here is that PiT. A retried request answers as done.
    func detachForPeer(_ r: AsyncRequest, peer: String) async throws(DomainError) -> AsyncResponse {
        let (g, _) = try asyncVDisk(r.group, role: .destination)
        guard g.peer == peer else { throw DomainError("async group '\(r.group)' is fed by peer '\(g.peer)', not '\(peer)'") }
        if g.state == .detached { return AsyncResponse(vdisks: metadata.memberNames(of: g)) }
        if let base = r.base, g.confirmedPiT != base {
            throw DomainError("async group '\(r.group)': the last complete PiT here is \(g.confirmedPiT ?? "none"), not '\(base)': the sides are not identical")
        }
        return AsyncResponse(vdisks: try await detachAsyncDestination(r.group).vdisks)
    }

    /// The task ends at the source (`split-task`, `detach-task`): nothing more is captured or
    /// shipped (state `detached`, committed first, with the peer's detach still owed: the
    /// source task asks the peer for it until it answers, after a crash too, see
    /// `AsyncGroupRecord.peerDetach`); the cycle PiTs waiting go; the confirmed PiT stays,
    /// held: the common PiT a later `async merge` starts from.
    func detachAsyncSource(_ name: String, peerDetach: AsyncGroupRecord.PeerDetach) async throws(DomainError) {
        let (g, _) = try asyncVDisk(name, role: .source)
        try await updateAsyncGroup(name) {
            $0.state = .detached
            $0.resumeAt = nil
            $0.peerDetach = peerDetach
        }
        CrashPoint.hit("async-source-detached")
        try await dropCyclePiTs(g.pendingList, keeping: g.confirmedPiT)
        try await updateAsyncGroup(name) { $0.pending = nil }
    }

    /// Asks the peer for the detach a split or `detach-task` here still owes it (`peerDetach`),
    /// then records that it is done.
    func detachPeer(_ name: String, call: (AsyncRequest) async throws(DomainError) -> AsyncResponse) async throws(DomainError) {
        guard let g = metadata.asyncGroup(named: name), g.role == .source, let owed = g.peerDetach else { return }
        var detach = AsyncRequest(op: .detach, group: name)
        detach.base = owed.splitAt
        _ = try await call(detach)
        try await updateAsyncGroup(name) { $0.peerDetach = nil }
    }

    /// `reverse`, at the side that was the source: group `r.group` becomes a destination fed
    /// by `peer` from PiT `r.base`, which both sides hold. Members that changed since (their
    /// host writes after it, never shipped) are refused, or rolled back with `r.rollback`.
    /// The waiting cycle PiTs go; the common PiT stays (no longer held).
    func reverseToDestination(_ r: AsyncRequest, peer: String) async throws(DomainError) -> AsyncResponse {
        if r.full == true { return try await wipeAsLoser(r, peer: peer, role: .source) }
        guard let base = r.base, let specs = r.members else { throw DomainError("reverse: the common PiT and the peer's members are required") }
        if let done = metadata.asyncGroup(named: r.group), done.role == .destination, done.peer == peer, done.isFed, done.confirmedPiT == base {
            return AsyncResponse(vdisks: metadata.memberNames(of: done), changedBytes: 0) // a retried request (the answer was lost)
        }
        let (g, _) = try asyncVDisk(r.group, role: .source)
        guard g.peer == peer else { throw DomainError("async group '\(r.group)' mirrors to peer '\(g.peer)', not '\(peer)'") }
        guard specs.count == g.members.count else { throw DomainError("async group '\(r.group)' has \(g.members.count) member(s) here, \(specs.count) at peer '\(peer)'") }
        try refuseTurningWithOtherTasks(g)
        let vdisks = metadata.memberNames(of: g)
        let changed = try changedBytes(of: g, since: base)
        if changed > 0, r.rollback != true {
            throw DomainError("vdisk(s) \(vdisks.joined(separator: ", ")) of async group '\(r.group)' changed at this site since PiT '\(base)' "
                + "(\(ByteSize.format(changed)) in changed extents): mirroring onto them would overwrite that; only a rollback to the PiT can discard it")
        }
        let answer = AsyncResponse(vdisks: vdisks, changedBytes: changed)
        if r.dryRun == true { return answer }
        // Committed first: the source task stops shipping, and a restart finishes the reverse.
        try await updateAsyncGroup(r.group) {
            $0.state = .detaching
            $0.reversingFrom = base
            $0.remoteVDisk = specs[0].vdisk
            $0.moreMembers = specs.count > 1 ? zip($0.members.dropFirst(), specs.dropFirst()).map { .init(vdiskId: $0.0.vdiskId, remoteVDisk: $0.1.vdisk) } : nil
        }
        let exported = try await unexport(vdisks)
        try await finishReverse(r.group, from: base)
        // Hosts that read them keep reading, now the last complete PiT (read-only).
        for vdisk in exported { try await setExport(vdisk: vdisk, mode: .readOnly) }
        return answer
    }

    /// The rest of a reverse (state `detaching`, `reversingFrom` recorded, members not
    /// exported): members rolled back to `base` where they changed (what a cut cycle applied
    /// goes), the waiting cycle PiTs dropped, the group turned into the destination.
    /// Each step can run again: a restart after a crash part-way finishes it.
    func finishReverse(_ name: String, from base: String) async throws(DomainError) {
        guard let g = metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
        for (i, vdisk) in metadata.memberNames(of: g).enumerated() where try differences(from: g.memberPiT(base, i), to: nil).changedBytes > 0 {
            try await rollback(vdisk: vdisk, to: g.memberPiT(base, i))
        }
        CrashPoint.hit("async-reverse-rolled-back")
        try await dropCyclePiTs(g.pendingList + [g.confirmedPiT].compactMap { $0 }, keeping: base)
        try await turnGroup(name, into: .destination, from: base, remote: g.members.map(\.remoteVDisk))
    }

    /// At start, before hosts or the peer are served: the role changes a crash cut short are
    /// finished. A destination `detaching` is detached (its vdisks at the last complete PiT,
    /// writable, not exported); a source `detaching` from a reverse becomes the destination
    /// from the common PiT it recorded. Returns what was done, one line each.
    public func finishAsyncTransitions() async -> [String] {
        var lines: [String] = []
        for g in metadata.asyncGroupList where g.state == .detaching {
            do throws(DomainError) {
                if g.role == .destination {
                    let plan = try await detachAsyncDestination(g.name)
                    lines.append("async group '\(g.name)': the detach a crash cut short is finished: vdisk(s) \(plan.vdisks.joined(separator: ", ")) are at PiT \(plan.pit), writable, not exported")
                } else if let base = g.reversingFrom {
                    try await finishReverse(g.name, from: base)
                    lines.append("async group '\(g.name)': the reverse a crash cut short is finished: this side is peer '\(g.peer)''s destination from PiT \(base) (export its vdisks read-only again)")
                }
            } catch {
                report("async group '\(g.name)': the \(g.role == .destination ? "detach" : "reverse") a crash cut short cannot be finished: \(error.message)")
            }
        }
        return lines
    }

    /// `become-source` (a hand-over): this destination, whose last complete PiT is `base`
    /// and which the source says is identical to it, becomes the group's source from `base`
    /// and exports its members read-write. The source turns itself into the destination.
    func becomeSource(_ r: AsyncRequest, peer: String) async throws(DomainError) -> AsyncResponse {
        if r.full == true { return try await becomeSourceFromNothing(r, peer: peer) }
        guard let base = r.base, let specs = r.members else { throw DomainError("become-source: the common PiT and the peer's members are required") }
        let (g, _) = try asyncVDisk(r.group, role: .destination)
        guard g.peer == peer, g.isFed || g.state == .detached else { throw DomainError("async group '\(r.group)' is not fed by peer '\(peer)' here") }
        guard g.confirmedPiT == base else {
            throw DomainError("async group '\(r.group)': the last complete PiT here is \(g.confirmedPiT ?? "none"), not '\(base)': the sides are not identical")
        }
        guard specs.count == g.members.count else { throw DomainError("async group '\(r.group)' has \(g.members.count) member(s) here, \(specs.count) at peer '\(peer)'") }
        let vdisks = metadata.memberNames(of: g)
        guard g.isFed else { // detached (a merge it wins): production goes on as it is
            try await turnGroup(r.group, into: .source, from: base, remote: specs.map(\.vdisk))
            return AsyncResponse(vdisks: vdisks)
        }
        // What a cut cycle applied goes: the members become exactly `base`.
        _ = try await unexport(vdisks)
        for (i, vdisk) in vdisks.enumerated() where try differences(from: g.memberPiT(base, i), to: nil).changedBytes > 0 {
            try await rollback(vdisk: vdisk, to: g.memberPiT(base, i))
        }
        try await turnGroup(r.group, into: .source, from: base, remote: specs.map(\.vdisk))
        for vdisk in vdisks { try await setExport(vdisk: vdisk, mode: .readWrite) }
        return AsyncResponse(vdisks: vdisks)
    }

    /// `async recover`, at the side that failed over (group detached here): the other side
    /// (the old source) becomes this side's destination from the common PiT, rolled back to
    /// it; this side becomes the source and ships only what changed here since.
    func recoverAsSource(_ name: String, rollback: Bool = true, call: (AsyncRequest) async throws(DomainError) -> AsyncResponse) async throws(DomainError) -> AsyncResponse {
        let (g, _) = try asyncVDisk(name, role: .destination)
        guard g.state == .detached, let base = g.confirmedPiT else {
            throw DomainError("async group '\(name)' is not detached here: `async recover` runs at the site that failed over")
        }
        let vdisks = g.members.map { m in metadata.vdisks.first { $0.id == m.vdiskId } }
        let specs = try vdisks.map { v throws(DomainError) -> AsyncRequest.MemberSpec in
            guard let v else { throw DomainError("async group '\(name)': a member vdisk is gone") }
            return AsyncRequest.MemberSpec(vdisk: v.name, sizeBytes: v.sizeBytes, blockSize: v.blockSize)
        }
        var request = AsyncRequest(op: .reverse, group: name, members: specs)
        request.base = base
        request.rollback = rollback
        let answer = try await call(request)
        guard let theirs = answer.vdisks, theirs.count == specs.count else { throw DomainError("peer '\(g.peer)' answered without its members") }
        try await turnGroup(name, into: .source, from: base, remote: theirs)
        return answer
    }

    /// Rewrites group `name` for its new role, starting from common PiT `base` (nothing
    /// waiting, nothing half-shipped); `remote`: the peer's member vdisks, in member order. A
    /// source holds `base` (its next cycle ships the difference from it); a destination does not.
    func turnGroup(_ name: String, into role: AsyncGroupRecord.Role, from base: String?, remote: [String]) async throws(DomainError) {
        if let base { try await holdPiT(named: base, for: role == .source ? name : nil) }
        try await updateAsyncGroup(name) {
            $0.role = role
            $0.state = .normal
            $0.confirmedPiT = base
            if base == nil { $0.confirmedAt = nil } // nothing in common: the next cycle is a full copy
            if role == .source { $0.pitsTaken = max($0.pitsTaken ?? 0, $0.cycle) }
            $0.pending = nil
            $0.resumeAt = nil
            $0.previousPiT = nil
            $0.reversingFrom = nil
            $0.lastError = nil
            $0.remoteVDisk = remote[0]
            $0.moreMembers = remote.count > 1 ? zip($0.members.dropFirst(), remote.dropFirst()).map { .init(vdiskId: $0.0.vdiskId, remoteVDisk: $0.1) } : nil
        }
    }
}
