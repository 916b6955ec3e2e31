import Foundation
import IOEngine

/// PiTs and snapshots: create, delete, roll back to. See `PiTRecord` for the model and
/// `Domain+Redirect.swift` for what host writes do afterwards.
extension Domain {
    /// What `pit create` did: the PiTs (one per vdisk), how long host writes were held
    /// for the switch (every gate closed until the clones are durable), and how long the
    /// gates took to close (the writes in flight landing first).
    public struct PiTCreated: Sendable {
        public var pits: [PiTRecord]
        public var holdNs: UInt64
        public var drainNs: UInt64
        /// PiTs retention retired in the same commit (names).
        public var retired: [String] = []
    }

    /// Takes a PiT of `vdisk` now: host writes to it are held (those in flight land
    /// first) while every leg's map is cloned, one commit per pool; no data is copied.
    /// Writes after the instant are redirected (`redirectShared`). A crash before the
    /// catalog commit leaves clones nobody names, released at the next open: the PiT
    /// exists whole or not at all.
    public func createPiT(vdisk name: String, as pitName: String?, kind: PiTKind = .user) async throws(DomainError) -> PiTCreated {
        guard let v = metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        return try await takePiTs([(v.id, pitName ?? defaultPiTName(for: name))], group: nil, kind: kind)
    }

    /// One PiT of every member of group `vdg`, all at one instant: every member's gate is
    /// closed (so no write is acknowledged on any member) before any map is cloned, so no
    /// write acknowledged after the instant on one member is in its PiT while an earlier
    /// one on another member is missing. The PiTs are named NAME.<vdisk>.
    public func createGroupPiT(vdg group: String, as pitName: String?, kind: PiTKind = .user) async throws(DomainError) -> PiTCreated {
        guard let g = metadata.vdg(named: group) else { throw DomainError("virtual disk group '\(group)' not found") }
        let members = g.members.compactMap { id in metadata.vdisks.first { $0.id == id } }
        guard !members.isEmpty else { throw DomainError("virtual disk group '\(group)' has no members") }
        let base = pitName ?? defaultPiTName(for: group)
        guard metadata.pitList.allSatisfy({ $0.group != base }) else { throw DomainError("a group PiT named '\(base)' already exists") }
        return try await takePiTs(members.map { ($0.id, "\(base).\($0.name)") }, group: base, kind: kind)
    }

    /// PiTs of `vdisks` at one instant, named `names` (member for member); with several, as
    /// group PiT `group` (the async mirror's cycle PiTs of a VDG).
    public func createPiTs(of vdisks: [UUID], names: [String], group: String?, kind: PiTKind) async throws(DomainError) -> PiTCreated {
        guard !vdisks.isEmpty, vdisks.count == names.count else { throw DomainError("a PiT needs one name per vdisk") }
        if let group, metadata.pitList.contains(where: { $0.group == group }) { throw DomainError("a group PiT named '\(group)' already exists") }
        return try await takePiTs(Array(zip(vdisks, names)).map { (vdisk: $0.0, name: $0.1) }, group: group, kind: kind)
    }

    /// Checks that PiTs named so can be taken of these vdisks now (run before the gates
    /// close, and again under the catalog lock before the commit); returns the vdisks.
    private func checkPiTs(_ targets: [(vdisk: UUID, name: String)], in m: DomainMetadata) throws(DomainError) -> [VDiskRecord] {
        var vdisks: [VDiskRecord] = []
        for (i, (id, pitName)) in targets.enumerated() {
            guard let v = m.vdisks.first(where: { $0.id == id }) else { throw DomainError("a vdisk of the PiT was deleted meanwhile") }
            guard Parse.name(pitName) != nil else { throw DomainError("PiT name '\(pitName)': use letters, digits, - _ . (at most 64)") }
            guard m.pit(named: pitName) == nil, !targets.prefix(i).contains(where: { $0.name == pitName }) else {
                throw DomainError("a PiT named '\(pitName)' already exists")
            }
            guard v.rollingBackTo == nil else { throw DomainError("vdisk '\(v.name)': a rollback is unfinished; it completes at the next start") }
            guard v.legs.contains(where: { $0.state == .inSync }) else { throw DomainError("vdisk '\(v.name)' has no in-sync leg to take a PiT of") }
            vdisks.append(v)
        }
        return vdisks
    }

    /// Holds host writes to every target (those in flight land first), clones the maps
    /// of the legs in sync at that instant (one commit per pool, pools in parallel), lets
    /// writes go, then records the PiTs in the catalog.
    ///
    /// The catalog lock is taken only for that last commit, never while the gates drain:
    /// a write in flight that fails a leg must record the failure (a catalog change)
    /// before it can finish, so holding the lock across the drain deadlocks.
    private func takePiTs(_ targets: [(vdisk: UUID, name: String)], group: String?, kind: PiTKind) async throws(DomainError) -> PiTCreated {
        if let why = readOnlyReason { throw DomainError(why, code: EROFS) }
        let before = try checkPiTs(targets, in: metadata)
        _ = try retentionVictims(for: before) // refused early, before any write is held
        let ports = try before.map { v throws(DomainError) in try port(for: v.name) }
        sharingActive.store(true, ordering: .releasing) // before any gate opens: later writes check for sharing
        let asked = DispatchTime.now().uptimeNanoseconds
        for (i, p) in ports.enumerated() { await p.closeGate(0..<max(before[i].sizeBytes, 1)) }
        let held = DispatchTime.now().uptimeNanoseconds
        let instant = Date().timeIntervalSince1970
        // The instant: writes that were in flight have landed, and those that failed a leg
        // have recorded it, so the legs in sync now hold every acknowledged write. A failed
        // or copying leg's map is not the vdisk's image (and its pool may be the one
        // failing); a rollback copies such a leg from the others.
        let atInstant = metadata
        var pits: [PiTRecord] = []
        for (i, v) in before.enumerated() {
            let legs = atInstant.vdisks.first { $0.id == v.id }?.legs.filter { $0.state == .inSync } ?? []
            var pit = PiTRecord(id: UUID(), name: targets[i].name, kind: kind, vdiskId: v.id, createdAt: instant, sizeBytes: v.sizeBytes,
                                maps: legs.map { PiTMap(legId: $0.id, poolId: $0.poolId, mapId: UUID(), complete: true) })
            pit.group = group
            pits.append(pit)
        }
        var byPool: [UUID: [PiTMap]] = [:]
        for pit in pits { for map in pit.maps { byPool[map.poolId, default: []].append(map) } }
        let failures = await withTaskGroup(of: (UUID, DomainError?).self) { tasks in
            for (poolId, maps) in byPool {
                tasks.addTask {
                    guard let pool = self.metadata.pool(id: poolId) else { return (poolId, DomainError("a pool of the PiT is gone")) }
                    do throws(DomainError) {
                        try await self.changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
                            for map in maps { try t.cloneMap(map.legId, as: map.mapId) }
                        }
                        return (poolId, nil)
                    } catch {
                        return (poolId, DomainError("cannot take a PiT in pool '\(pool.name)': \(error)", code: error.code))
                    }
                }
            }
            var out: [UUID: DomainError] = [:]
            for await (poolId, failure) in tasks { if let failure { out[poolId] = failure } }
            return out
        }
        let now = DispatchTime.now().uptimeNanoseconds
        let holdNs = now - held, drainNs = held - asked
        for (i, p) in ports.enumerated() { p.openGate(0..<max(before[i].sizeBytes, 1)) }
        metrics.recordPiTHold(ns: now - asked)
        var failure = failures.values.first
        if pits.contains(where: { $0.maps.isEmpty }) { failure = failure ?? DomainError("a vdisk of the PiT lost its last in-sync leg while writes drained") }
        var retired: [PiTRecord] = []
        if failure == nil {
            CrashPoint.hit("pit-cloned")
            do throws(DomainError) {
                try await beginChange()
                defer { mutation.release() }
                // What may have changed since the first check (another command ran meanwhile).
                let vdisks = try checkPiTs(targets, in: metadata)
                retired = try retentionVictims(for: vdisks)
                var next = metadata
                next.pitList.removeAll { p in retired.contains { $0.id == p.id } }
                next.pitList += pits
                try await commit(next)
            } catch {
                failure = error
            }
            if failure == nil { CrashPoint.hit("pit-committed") }
        }
        if let failure {
            deleteMapsInBackground(pits.flatMap(\.maps).filter { failures[$0.poolId] == nil }.map { ($0.mapId, $0.poolId) })
            updateSharing()
            throw failure
        }
        deleteMapsInBackground(retired.flatMap(\.maps).map { ($0.mapId, $0.poolId) })
        return PiTCreated(pits: pits, holdNs: holdNs, drainNs: drainNs, retired: retired.map(\.name))
    }

    /// The PiTs to retire so that each of `vdisks`, with one PiT more, keeps at most its
    /// pool profile's `pit_retention`: standard PiTs before user PiTs, older before newer,
    /// never one a mirror task holds (then the new PiT is refused, saying why).
    private func retentionVictims(for vdisks: [VDiskRecord]) throws(DomainError) -> [PiTRecord] {
        var victims: [PiTRecord] = []
        for v in vdisks {
            guard let pool = metadata.pool(id: v.poolId) else { continue }
            let limit = profiles.pools[pool.poolProfile]?.pitRetention ?? PoolProfile(name: "").pitRetention
            let existing = metadata.pits(of: v)
            let excess = existing.count + 1 - limit
            guard excess > 0 else { continue }
            let candidates = existing.filter { $0.heldBy == nil && readers(of: $0.name) == 0 }.sorted {
                ($0.kind == .standard ? 0 : 1, $0.createdAt) < ($1.kind == .standard ? 0 : 1, $1.createdAt)
            }
            guard candidates.count >= excess else {
                throw DomainError("vdisk '\(v.name)' has \(existing.count) PiT(s), pool profile '\(pool.poolProfile)' keeps \(limit) (pit_retention), "
                    + "and \(existing.count - candidates.count) of them are held by mirror tasks or read by hosts: delete a PiT or raise pit_retention", code: ENOSPC)
            }
            victims += candidates.prefix(excess)
        }
        return victims
    }

    /// Marks PiT `name` (or every member PiT of group PiT `name`) as needed by mirror task
    /// `task` (nil: released): retention and `pit delete` leave it alone meanwhile.
    public func holdPiT(named name: String, for task: String?) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        let which = metadata.pitList.indices.filter { metadata.pitList[$0].name == name || metadata.pitList[$0].group == name }
        guard !which.isEmpty else { throw DomainError("PiT '\(name)' not found") }
        var next = metadata
        for i in which { next.pitList[i].heldBy = task }
        guard next != metadata else { return }
        try await commit(next)
    }

    /// "<vdisk>.pit-<UTC time>", unique among the PiTs.
    private func defaultPiTName(for vdisk: String) -> String {
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone(identifier: "UTC")
        f.dateFormat = "yyyyMMdd-HHmmss"
        let base = "\(vdisk.prefix(40)).pit-\(f.string(from: Date()))"
        var name = base, n = 1
        while metadata.pit(named: name) != nil { n += 1; name = "\(base).\(n)" }
        return name
    }

    /// Deletes a PiT: the catalog drops it at once; its maps are released in the
    /// background, a bounded commit at a time (host I/O goes on), and what only it
    /// held goes to the zeroer. A crash part-way: the next open releases the rest.
    public func deletePiT(named pitName: String) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        // A PiT by name, or every member PiT of a group PiT.
        let doomed = metadata.pit(named: pitName).map { [$0] } ?? metadata.pitList.filter { $0.group == pitName }
        guard !doomed.isEmpty else { throw DomainError("PiT '\(pitName)' not found") }
        if let held = doomed.first(where: { $0.heldBy != nil }) {
            throw DomainError("PiT '\(held.name)' is held by mirror task '\(held.heldBy!)'; it is released when the task no longer needs it", code: EBUSY)
        }
        if let read = doomed.first(where: { readers(of: $0.name) > 0 }) {
            throw DomainError("PiT '\(read.name)' is read by \(readers(of: read.name)) host connection(s) of a read-only export; it can go once they disconnect", code: EBUSY)
        }
        var next = metadata
        next.pitList.removeAll { p in doomed.contains { $0.id == p.id } }
        try await commit(next)
        CrashPoint.hit("pit-delete-committed")
        updateSharing()
        deleteMapsInBackground(doomed.flatMap(\.maps).map { ($0.mapId, $0.poolId) })
    }

    /// Rolls `vdisk` back to its PiT `pitName`: every leg the PiT holds in sync gets a
    /// fresh clone of it (the PiT stays, and so do later PiTs: each is a map of its own,
    /// untouched by the rollback). A leg the PiT lacks (failed at the instant, added
    /// since) is copied afresh from the others. Refused while the vdisk is exported (hosts
    /// would keep cached data of the old image) or was resized since the PiT.
    /// Crash-safe: the catalog marks the rollback first; the next open finishes it.
    public func rollback(vdisk name: String, to pitName: String) async throws(DomainError) {
        // The gate first, then the catalog lock, as `mirror split` takes them: the other
        // order deadlocks against a split (or a write the gate drains that must record a
        // leg failure in the catalog).
        let port = try port(for: name)
        await port.closeGate(0..<UInt64.max)
        defer { port.openGate(0..<UInt64.max) }
        try await beginChange()
        defer { mutation.release() }
        guard let vi = metadata.vdisks.firstIndex(where: { $0.name == name }) else { throw DomainError("vdisk '\(name)' not found") }
        let v = metadata.vdisks[vi]
        guard let pit = metadata.pit(named: pitName) else { throw DomainError("PiT '\(pitName)' not found") }
        guard pit.vdiskId == v.id else { throw DomainError("PiT '\(pitName)' is not a PiT of vdisk '\(name)'") }
        if let mode = v.export {
            throw DomainError("vdisk '\(name)' is exported over NBD (\(mode.rawValue)); run `svsp-ctl vdisk unexport \(name)` before a rollback")
        }
        guard pit.sizeBytes == v.sizeBytes else {
            throw DomainError("vdisk '\(name)' is \(v.sizeBytes) bytes, its PiT '\(pitName)' \(pit.sizeBytes): resize it back first")
        }
        guard v.legs.contains(where: { $0.state == .inSync && pit.map(ofLeg: $0.id) != nil }) else {
            throw DomainError("PiT '\(pitName)' holds no in-sync copy of a leg vdisk '\(name)' has now")
        }
        try refuseWhileCopying(name, "a rollback")
        var next = metadata
        next.vdisks[vi].rollingBackTo = pit.id
        for l in next.vdisks[vi].legs.indices where pit.map(ofLeg: next.vdisks[vi].legs[l].id) == nil {
            next.vdisks[vi].legs[l].state = .copying // nothing to roll it back to: copied from the others
            next.vdisks[vi].legs[l].copyAll = true
        }
        try await commit(next)
        CrashPoint.hit("rollback-marked")
        try await finishRollback(vdisk: name)
        port.refresh()
    }

    /// The second half of a rollback (also at open, after a crash): swaps each leg onto a
    /// clone of its PiT map (one commit per pool; doing it twice gives the same image),
    /// then clears the mark. Legs to copy afresh get a resync.
    private func finishRollback(vdisk name: String) async throws(DomainError) {
        guard let vi = metadata.vdisks.firstIndex(where: { $0.name == name }), let pitId = metadata.vdisks[vi].rollingBackTo else { return }
        let v = metadata.vdisks[vi]
        guard let pit = metadata.pitList.first(where: { $0.id == pitId }) else {
            throw DomainError("vdisk '\(name)': the PiT of its unfinished rollback is gone")
        }
        var old: [(UUID, UUID)] = []
        for leg in v.legs {
            guard let map = pit.map(ofLeg: leg.id), let pool = metadata.pool(id: leg.poolId) else { continue }
            let swapped = UUID()
            try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in
                try t.cloneMap(map.mapId, as: swapped)
                try t.swapMaps(leg.id, swapped)
            }
            old.append((swapped, pool.id))
            CrashPoint.hit("rollback-swapped") // after the first leg: a mirror's legs now differ until the next open finishes
        }
        var next = metadata
        next.vdisks[vi].rollingBackTo = nil
        try await commit(next)
        deleteMapsInBackground(old)
        if v.legs.contains(where: { $0.copyAll == true }) { mirrors.resyncInBackground(vdisk: name, why: "a rollback") }
    }

    /// At open: rollbacks a crash cut short are finished before any I/O.
    func finishRollbacks() async {
        guard readOnlyReason == nil else { return }
        for v in metadata.vdisks where v.rollingBackTo != nil {
            do throws(DomainError) {
                await mutation.acquire()
                defer { mutation.release() }
                try await finishRollback(vdisk: v.name)
            } catch {
                report("vdisk '\(v.name)': cannot finish its rollback: \(error)")
            }
        }
    }

    /// Makes snapshot `name` of PiT `pitName`: a vdisk whose map is a clone of the PiT's
    /// (of its first in-sync leg), read-only or writable. It shares the PiT's chunks,
    /// outlives the PiT, is exported like any vdisk and deleted with `vdisk delete`.
    public func createSnapshot(name: String, of pitName: String, writable: Bool) async throws(DomainError) -> VDiskRecord {
        try await beginChange()
        defer { mutation.release() }
        guard Parse.name(name) != nil else { throw DomainError("snapshot name '\(name)': use letters, digits, - _ . (at most 64)") }
        guard metadata.vdisk(named: name) == nil else { throw DomainError("a vdisk or snapshot named '\(name)' already exists") }
        guard let pit = metadata.pit(named: pitName) else { throw DomainError("PiT '\(pitName)' not found") }
        guard let source = metadata.vdisks.first(where: { $0.id == pit.vdiskId }) else { throw DomainError("PiT '\(pitName)': its vdisk is gone") }
        guard let map = pit.maps.first(where: \.complete), let pool = metadata.pool(id: map.poolId) else {
            throw DomainError("PiT '\(pitName)' holds no in-sync copy")
        }
        let leg = LegRecord(poolId: pool.id)
        sharingActive.store(true, ordering: .releasing)
        try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in try t.cloneMap(map.mapId, as: leg.id) }
        var record = VDiskRecord(id: UUID(), name: name, sizeBytes: pit.sizeBytes, blockSize: source.blockSize, thin: source.thin, legs: [leg])
        record.snapshot = SnapshotOrigin(pitName: pit.name, vdiskName: source.name, writable: writable)
        var next = metadata
        next.vdisks.append(record)
        do {
            try await commit(next)
        } catch {
            deleteMapsInBackground([(leg.id, pool.id)])
            updateSharing()
            throw error
        }
        return record
    }

    /// Bytes held only by PiT `pit`: chunks its maps reference that no other map of the
    /// pool reaches (what deleting it gives back).
    public func bytesHeldOnly(by pit: PiTRecord) -> UInt64 {
        var total: UInt64 = 0
        for map in pit.maps {
            guard let pool = metadata.pool(id: map.poolId), let meta = poolMeta(pool.id) else { continue }
            let others = meta.mapIds.filter { $0 != map.mapId }
            guard let chunks = try? meta.chunksOnlyIn(map.mapId, comparedWith: others) else { continue }
            total += chunks * pool.extentBytes
        }
        return total
    }

    /// Whether writes must check for shared chunks: set while a PiT or snapshot exists
    /// (and from just before a clone is made).
    func updateSharing() {
        let sharing = metadata.hasSharing
        sharingActive.store(sharing, ordering: .releasing)
        if !sharing { releaseSpareChunks() }
    }

    /// Deletes block maps (map id, pool id) no one names any more, step by step, in the background.
    func deleteMapsInBackground(_ maps: [(UUID, UUID)]) {
        guard !maps.isEmpty else { return }
        Task { await self.deleteMaps(maps) }
    }

    /// Deletes block maps (map id, pool id) no one names any more (a removed leg, a PiT,
    /// a rollback's old map), then wakes the zeroer. One that fails is reported and
    /// released at the next start (`releaseOrphanMaps`).
    func deleteMaps(_ maps: [(UUID, UUID)]) async {
        for (id, poolId) in maps {
            guard let pool = metadata.pool(id: poolId) else { continue }
            do throws(DomainError) {
                try await deleteBlockMap(id, in: pool)
            } catch {
                report("pool '\(pool.name)': cannot release \(legName(id)) (\(error)); it is released at the next start")
            }
        }
        zeroingWork.signal()
    }
}
