import Foundation
import IOEngine

/// Async mirror groups in the catalog (`AsyncGroupRecord`), and what the destination side
/// does with what a source sends: make the destination vdisk, write the blocks of a cycle
/// into it (the pending layer), and make the cycle visible as one PiT, in one commit.
/// Until that PiT exists, the last complete PiT is the destination's consistent image.
extension Domain {
    // MARK: catalog

    func addAsyncGroup(_ g: AsyncGroupRecord) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        guard Parse.name(g.name) != nil else { throw DomainError("group name '\(g.name)': use letters, digits, - _ . (at most 64)") }
        guard metadata.asyncGroup(named: g.name) == nil else { throw DomainError("async group '\(g.name)' already exists") }
        guard let v = metadata.vdisks.first(where: { $0.id == g.vdiskId }) else { throw DomainError("the group's vdisk is gone") }
        // A further task shares its group's vdisks; any other group may not.
        if let other = metadata.asyncGroup(of: v), g.taskOf == nil || (other.name != g.taskOf && other.taskOf != g.taskOf) {
            throw DomainError("vdisk '\(v.name)' is already in async group '\(other.name)'")
        }
        var next = metadata
        next.asyncGroupList.append(g)
        try await commit(next)
    }

    /// Changes group `name` (nothing when it is gone).
    func updateAsyncGroup(_ name: String, _ change: (inout AsyncGroupRecord) -> Void) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        guard let i = metadata.asyncGroupList.firstIndex(where: { $0.name == name }) else { return }
        var next = metadata
        change(&next.asyncGroupList[i])
        guard next.asyncGroupList[i] != metadata.asyncGroupList[i] else { return }
        try await commit(next)
    }

    /// Releases and deletes those of a group's cycle PiTs `names` that exist here, all but
    /// `keep`; one a host connection still reads stays (a later retirement takes it).
    func dropCyclePiTs(_ names: [String], keeping keep: String? = nil) async throws(DomainError) {
        for pit in names where pit != keep && metadata.hasPiT(orGroup: pit) {
            let members = metadata.pitList.filter { $0.name == pit || $0.group == pit }
            guard members.allSatisfy({ readers(of: $0.name) == 0 }) else { continue }
            try await holdPiT(named: pit, for: nil)
            try await deletePiT(named: pit)
        }
    }

    /// Unexports each of `vdisks` (their clients dropped, see `setExport`); returns the ones
    /// that were exported, for a role change to export again in their new mode.
    func unexport(_ vdisks: [String]) async throws(DomainError) -> [String] {
        var were: [String] = []
        for vdisk in vdisks where try await setExport(vdisk: vdisk, mode: nil).previous != nil { were.append(vdisk) }
        return were
    }

    /// Removes group `name`; its vdisk and PiTs stay (their holds are released).
    func removeAsyncGroup(_ name: String) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        guard metadata.asyncGroup(named: name) != nil else { throw DomainError("async group '\(name)' not found") }
        var next = metadata
        next.asyncGroupList.removeAll { $0.name == name }
        for i in next.pitList.indices where next.pitList[i].heldBy == name { next.pitList[i].heldBy = nil }
        try await commit(next)
    }

    /// The vdisk of group `name` on this side, or why there is none.
    func asyncVDisk(_ name: String, role: AsyncGroupRecord.Role) throws(DomainError) -> (AsyncGroupRecord, VDiskRecord) {
        guard let g = metadata.asyncGroup(named: name), g.role == role else { throw DomainError("async group '\(name)' is not a \(role.rawValue) here") }
        guard let v = metadata.vdisks.first(where: { $0.id == g.vdiskId }) else { throw DomainError("async group '\(name)': its vdisk is gone") }
        return (g, v)
    }

    // MARK: destination side

    /// `create-destination`: the vdisks the source will feed, one per member (each created
    /// thin, of its source's size and block size, unless it exists and `existing` allows
    /// it) and the group. Every member is checked before anything is made.
    func createAsyncDestination(_ r: AsyncRequest, peer: String) async throws(DomainError) -> AsyncResponse {
        guard let specs = r.members, !specs.isEmpty, specs.count <= 64 else { throw DomainError("create-destination: 1 to 64 members are required") }
        if let g = metadata.asyncGroup(named: r.group) {
            // A retried request: answer as before when it is the same group.
            let names = g.members.map { m in metadata.vdisks.first { $0.id == m.vdiskId }?.name }
            guard g.role == .destination, g.peer == peer, names == specs.map(\.vdisk) else {
                throw DomainError("async group '\(r.group)' already exists here")
            }
            return AsyncResponse(lastComplete: g.confirmedPiT)
        }
        guard Set(specs.map(\.vdisk)).count == specs.count else { throw DomainError("create-destination: two members have one destination vdisk") }
        for spec in specs {
            guard Parse.name(spec.vdisk) != nil else { throw DomainError("destination vdisk name '\(spec.vdisk)': use letters, digits, - _ . (at most 64)") }
            guard let v = metadata.vdisk(named: spec.vdisk) else { continue }
            guard r.existing == true else {
                throw DomainError("vdisk '\(spec.vdisk)' already exists at the destination (use --dest-existing to mirror onto it; its data will be overwritten)")
            }
            guard v.sizeBytes == spec.sizeBytes, v.blockSize == spec.blockSize else {
                throw DomainError("vdisk '\(spec.vdisk)' at the destination is \(v.sizeBytes) bytes of \(v.blockSize)-byte blocks; the source is \(spec.sizeBytes) of \(spec.blockSize)")
            }
            guard v.export == nil else { throw DomainError("vdisk '\(spec.vdisk)' at the destination is exported; unexport it first") }
            if let other = metadata.asyncGroup(of: v) { throw DomainError("vdisk '\(spec.vdisk)' at the destination is fed by async group '\(other.name)'") }
        }
        guard let pool = r.pool ?? metadata.pools.first?.name else { throw DomainError("the destination domain has no pool") }
        var ids: [UUID] = []
        for spec in specs {
            if metadata.vdisk(named: spec.vdisk) == nil {
                _ = try await createVDisk(name: spec.vdisk, poolName: pool, mirrorPools: [], sizeBytes: spec.sizeBytes, blockSize: spec.blockSize, thin: true)
            }
            guard let v = metadata.vdisk(named: spec.vdisk) else { throw DomainError("vdisk '\(spec.vdisk)' vanished") }
            ids.append(v.id)
        }
        var g = AsyncGroupRecord(name: r.group, role: .destination, vdiskId: ids[0], peer: peer, remoteVDisk: specs[0].vdisk)
        if ids.count > 1 { g.moreMembers = zip(ids, specs).dropFirst().map { AsyncGroupRecord.Member(vdiskId: $0.0, remoteVDisk: $0.1.vdisk) } }
        try await addAsyncGroup(g)
        return AsyncResponse()
    }

    /// `cycle-end`: every block of the cycle is durable; PiT `pit` of the destination (a
    /// group PiT of every member, at one instant) makes the cycle its new consistent image
    /// in one catalog commit, then recorded in the group.
    func completeAsyncCycle(_ r: AsyncRequest, peer: String) async throws(DomainError) -> AsyncResponse {
        guard let pit = r.pit, let cycle = r.cycle else { throw DomainError("cycle-end: pit and cycle are required") }
        let (g, _) = try asyncVDisk(r.group, role: .destination)
        guard g.peer == peer else { throw DomainError("async group '\(r.group)' is fed by peer '\(g.peer)', not '\(peer)'") }
        if g.confirmedPiT == pit { return AsyncResponse(lastComplete: pit) } // a retried cycle-end
        guard g.isFed, g.state != .detaching else { throw DomainError("async group '\(r.group)' is \(g.state.rawValue) here: no cycle completes") }
        if !metadata.hasPiT(orGroup: pit) {
            let names = g.members.indices.map { g.memberPiT(pit, $0) }
            _ = try await createPiTs(of: g.members.map(\.vdiskId), names: names, group: g.members.count > 1 ? pit : nil, kind: .standard)
        }
        try await updateAsyncGroup(r.group) {
            $0.previousPiT = $0.confirmedPiT
            $0.confirmedPiT = pit
            $0.cycle = cycle
            $0.confirmedAt = r.takenAt ?? Date().timeIntervalSince1970
        }
        await retireCyclePiTs(of: r.group)
        return AsyncResponse(lastComplete: pit)
    }

    /// The destination keeps its last complete PiT and the one before; older cycle PiTs go,
    /// except those a user holds or a host connection still reads (they go at a later
    /// cycle, once the host disconnected). New connections read the newest from its commit.
    private func retireCyclePiTs(of group: String) async {
        guard let g = metadata.asyncGroup(named: group), let kept = g.confirmedPiT else { return }
        let members = Set(g.members.map(\.vdiskId))
        let keep = [kept, g.previousPiT].compactMap { $0 }
        guard let floor = metadata.pitList.filter({ keep.contains($0.group ?? $0.name) }).map(\.createdAt).min() else { return }
        let old = metadata.pitList.filter { members.contains($0.vdiskId) && $0.kind == .standard && $0.heldBy == nil && $0.createdAt < floor }
        // (`pit delete` refuses a PiT a host connection reads: it stays for a later cycle.)
        for base in Set(old.map { $0.group ?? $0.name }).subtracting(keep).sorted() { try? await deletePiT(named: base) }
    }

    /// A `blocks` frame: each block's crc32c checked, then written into the destination vdisk
    /// (never visible to readers of the last complete PiT). `scratch` holds 1 MiB, aligned.
    func applyAsyncBlocks(_ h: BlockHeader, crcs: [UInt32], data: [UInt8], group: String, peer: String,
                          scratch: UnsafeMutableRawPointer) async throws(DomainError)
    {
        let (g, _) = try asyncVDisk(group, role: .destination)
        guard g.peer == peer else { throw DomainError("async group '\(group)' is fed by peer '\(g.peer)', not '\(peer)'") }
        guard g.isFed, g.state != .detaching else { throw DomainError("async group '\(group)' is \(g.state.rawValue) here: nothing more is applied") }
        let members = g.members
        guard Int(h.member) < members.count else { throw DomainError("blocks for member \(h.member) of group '\(group)', which has \(members.count)") }
        guard let v = metadata.vdisks.first(where: { $0.id == members[Int(h.member)].vdiskId }) else {
            throw DomainError("async group '\(group)': the vdisk of member \(h.member) is gone")
        }
        let length = Int(h.count) * Int(h.blockBytes)
        guard h.offset <= v.sizeBytes, UInt64(length) <= v.sizeBytes - h.offset else {
            throw DomainError("blocks at \(h.offset)+\(length) lie beyond vdisk '\(v.name)' (\(v.sizeBytes) bytes)")
        }
        let got: Int
        if h.compressed {
            do {
                got = try data.withUnsafeBytes { input throws(IOError) in
                    try Compression.decompress(input, into: UnsafeMutableRawBufferPointer(start: scratch, count: length))
                }
            } catch { throw DomainError("blocks at \(h.offset): the compressed data does not decompress (\(error))") }
        } else {
            got = data.count
            data.withUnsafeBytes { scratch.copyMemory(from: $0.baseAddress!, byteCount: data.count) }
        }
        guard got == length else { throw DomainError("blocks at \(h.offset): \(got) bytes of data for \(h.count) block(s)") }
        for i in 0..<Int(h.count) {
            let block = UnsafeRawBufferPointer(start: scratch + i * Int(h.blockBytes), count: Int(h.blockBytes))
            guard Checksum.crc32c(block) == crcs[i] else {
                throw DomainError("block at \(h.offset + UInt64(i) * UInt64(h.blockBytes)) of vdisk '\(v.name)' fails its crc32c (damaged between its read at the source and here); nothing of the frame was written")
            }
        }
        // FUA: the answer means durable, so a cut cycle may resume after this frame.
        try await write(vdisk: v.name, offset: h.offset, length: length, from: scratch, fua: true)
    }
}
