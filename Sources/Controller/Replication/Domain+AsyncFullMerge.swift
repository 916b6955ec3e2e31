import Foundation

/// `async merge --full`: the two sides share no PiT (the common one was deleted), so there
/// is no difference to ship. The losing side is wiped (every member trimmed whole: a thin
/// vdisk's extents freed, a thick one's zeroed) and fed from nothing; the winner becomes (or
/// stays) the source with nothing confirmed, so its next cycle ships everything it has
/// allocated, as an initial copy does. The peer's part is asked with `full` on `reverse`,
/// `rejoin`, `resume-from` and `become-source`. Each step can run again after a crash.
extension Domain {
    /// Runs a full merge of group `name`, the side `winnerIsHere` names winning.
    func mergeFull(_ name: String, winnerIsHere: Bool, call: (AsyncRequest) async throws(DomainError) -> AsyncResponse) async throws(DomainError) {
        guard let g = metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
        let here = metadata.memberNames(of: g)
        // `ask` goes to the peer (naming this side's vdisks, its counterparts); `mine` is this side's part.
        var ask = AsyncRequest(op: .rejoin, group: name, members: here.map(AsyncRequest.MemberSpec.named))
        ask.full = true
        var mine = AsyncRequest(op: .rejoin, group: name)
        mine.full = true
        switch (g.role, winnerIsHere) {
        case (.destination, true): // the peer (the source) is wiped into this side's destination
            guard g.state == .detached else { throw DomainError("async group '\(name)' is \(g.state.rawValue) here: only a detached destination can win a merge") }
            ask.op = .reverse
            let theirs = try await call(ask).vdisks ?? g.members.map(\.remoteVDisk)
            try await dropCyclePiTs(of: name)
            try await turnGroup(name, into: .source, from: nil, remote: theirs)
        case (.destination, false): // wiped here, then the source ships everything
            _ = try await wipeAsLoser(mine, peer: g.peer, role: .destination)
            ask.op = .resumeFrom
            _ = try await call(ask)
        case (.source, true): // the peer is wiped, then this side ships everything
            _ = try await call(ask)
            _ = try await resumeFromNothing(mine, peer: g.peer)
        case (.source, false): // wiped here into the destination; the peer becomes the source
            _ = try await wipeAsLoser(mine, peer: g.peer, role: .source)
            ask.op = .becomeSource
            _ = try await call(ask)
        }
    }

    /// The loser of a full merge (`role`: what it is now): nothing more is shipped or
    /// applied, every member is unexported and trimmed whole, its cycle PiTs go, and it is
    /// a destination fed from nothing (the members exported again read-only). A destination
    /// already fed from nothing answers as done.
    func wipeAsLoser(_ r: AsyncRequest, peer: String, role: AsyncGroupRecord.Role) async throws(DomainError) -> AsyncResponse {
        if role == .destination, let done = metadata.asyncGroup(named: r.group), done.role == .destination, done.isFed, done.confirmedPiT == nil {
            return AsyncResponse(vdisks: metadata.memberNames(of: done))
        }
        let (g, _) = try asyncVDisk(r.group, role: role)
        guard g.peer == peer else { throw DomainError("async group '\(r.group)' is paired with peer '\(g.peer)', not '\(peer)'") }
        if role == .source {
            try refuseTurningWithOtherTasks(g)
            try await updateAsyncGroup(r.group) { $0.state = .detaching } // the source task stops
        } else {
            guard g.state == .detached else { throw DomainError("async group '\(r.group)' is \(g.state.rawValue) here, not detached: there is nothing to merge") }
        }
        let vdisks = metadata.memberNames(of: g)
        let exported = try await unexport(vdisks)
        for vdisk in vdisks { try await trimWhole(vdisk) }
        try await dropCyclePiTs(of: r.group)
        try await turnGroup(r.group, into: .destination, from: nil, remote: r.members?.map(\.vdisk) ?? g.members.map(\.remoteVDisk))
        for vdisk in exported { try await setExport(vdisk: vdisk, mode: .readOnly) }
        return AsyncResponse(vdisks: vdisks)
    }

    /// The winner of a full merge, the source: its cycle PiTs go and nothing is confirmed, so
    /// the next cycle ships everything allocated.
    func resumeFromNothing(_ r: AsyncRequest, peer: String) async throws(DomainError) -> AsyncResponse {
        let (g, _) = try asyncVDisk(r.group, role: .source)
        guard g.peer == peer else { throw DomainError("async group '\(r.group)' mirrors to peer '\(g.peer)', not '\(peer)'") }
        try await dropCyclePiTs(of: r.group)
        try await turnGroup(r.group, into: .source, from: nil, remote: g.members.map(\.remoteVDisk))
        return AsyncResponse(vdisks: metadata.memberNames(of: g))
    }

    /// The winner of a full merge, a detached destination: the source from nothing, its
    /// vdisks as they are (production goes on).
    func becomeSourceFromNothing(_ r: AsyncRequest, peer: String) async throws(DomainError) -> AsyncResponse {
        let (g, _) = try asyncVDisk(r.group, role: .destination)
        guard g.peer == peer, g.state == .detached else {
            throw DomainError("async group '\(r.group)' is \(g.state.rawValue) here: only a detached destination can win a merge")
        }
        try await dropCyclePiTs(of: r.group)
        try await turnGroup(r.group, into: .source, from: nil, remote: r.members?.map(\.vdisk) ?? g.members.map(\.remoteVDisk))
        return AsyncResponse(vdisks: metadata.memberNames(of: g))
    }

    /// All of the group's cycle PiTs (waiting, confirmed, previous) go: nothing is in common.
    private func dropCyclePiTs(of name: String) async throws(DomainError) {
        guard let g = metadata.asyncGroup(named: name) else { return }
        try await dropCyclePiTs(g.pendingList + [g.confirmedPiT, g.previousPiT].compactMap { $0 })
    }

    /// Trims all of vdisk `name` (thin: its extents freed; thick: zeroed), 1 GiB at a time.
    private func trimWhole(_ name: String) async throws(DomainError) {
        guard let v = metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        var offset: UInt64 = 0
        while offset < v.sizeBytes {
            let length = min(UInt64(1 << 30), v.sizeBytes - offset)
            try await trim(vdisk: name, offset: offset, length: Int(length))
            offset += length
        }
    }
}
