import Foundation
import IOEngine

/// PiTs and snapshots: create, delete, roll back to. See `PiTRecord` for the model and
/// `Domain+Redirect.swift` for what host writes do afterwards.
extension Domain {
    /// What `pit create` did: the PiT, and how long host writes were held for it.
    public struct PiTCreated: Sendable {
        public var pit: PiTRecord
        public var holdNs: UInt64
    }

    /// Takes a PiT of `vdisk` now: host writes to it are held (those in flight land
    /// first) while every leg's map is cloned, one commit per pool; no data is copied.
    /// Writes after the instant are redirected (`redirectShared`). A crash before the
    /// catalog commit leaves clones nobody names, released at the next open: the PiT
    /// exists whole or not at all.
    public func createPiT(vdisk name: String, as pitName: String?, kind: PiTKind = .user) async throws(DomainError) -> PiTCreated {
        try await beginChange()
        defer { mutation.release() }
        guard let v = metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        let pitName = pitName ?? defaultPiTName(for: name)
        guard Parse.name(pitName) != nil else { throw DomainError("PiT name '\(pitName)': use letters, digits, - _ . (at most 64)") }
        guard metadata.pit(named: pitName) == nil else { throw DomainError("a PiT named '\(pitName)' already exists") }
        guard v.rollingBackTo == nil else { throw DomainError("vdisk '\(name)': a rollback is unfinished; it completes at the next start") }
        guard v.legs.contains(where: { $0.state == .inSync }) else { throw DomainError("vdisk '\(name)' has no in-sync leg to take a PiT of") }
        let maps = v.legs.map { PiTMap(legId: $0.id, poolId: $0.poolId, mapId: UUID(), complete: $0.state == .inSync) }
        let port = try port(for: name)
        sharingActive.store(true, ordering: .releasing) // before the gate opens: later writes check for sharing
        let whole: Range<UInt64> = 0..<max(v.sizeBytes, 1)
        await port.closeGate(whole)
        let held = DispatchTime.now().uptimeNanoseconds
        var made: [PiTMap] = []
        var failure: DomainError?
        for map in maps {
            guard let pool = metadata.pool(id: map.poolId) else { continue }
            do {
                try await changeBlockMaps(pool) { (t: inout VolumeTransaction) throws(PageStore.Failure) in try t.cloneMap(map.legId, as: map.mapId) }
                made.append(map)
            } catch {
                failure = DomainError("vdisk '\(name)': cannot take a PiT in pool '\(pool.name)': \(error)", code: error.code)
                break
            }
        }
        let holdNs = DispatchTime.now().uptimeNanoseconds - held
        port.openGate(whole)
        if failure == nil { CrashPoint.hit("pit-cloned") }
        metrics.recordPiTHold(ns: holdNs)
        let pit = PiTRecord(id: UUID(), name: pitName, kind: kind, vdiskId: v.id, createdAt: Date().timeIntervalSince1970,
                            sizeBytes: v.sizeBytes, maps: maps)
        if failure == nil {
            var next = metadata
            next.pitList.append(pit)
            do { try await commit(next) } catch { failure = error }
            if failure == nil { CrashPoint.hit("pit-committed") }
        }
        if let failure {
            deleteMapsInBackground(made.map { ($0.mapId, $0.poolId) })
            updateSharing()
            throw failure
        }
        return PiTCreated(pit: pit, holdNs: holdNs)
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
        guard let pit = metadata.pit(named: pitName) else { throw DomainError("PiT '\(pitName)' not found") }
        var next = metadata
        next.pitList.removeAll { $0.id == pit.id }
        try await commit(next)
        CrashPoint.hit("pit-delete-committed")
        updateSharing()
        deleteMapsInBackground(pit.maps.map { ($0.mapId, $0.poolId) })
    }

    /// Rolls `vdisk` back to its PiT `pitName`: every leg the PiT holds in sync gets a
    /// fresh clone of it (the PiT stays, and so do later PiTs: each is a map of its own,
    /// untouched by the rollback). A leg the PiT lacks (failed at the instant, added
    /// since) is copied afresh from the others. Refused while the vdisk is exported (hosts
    /// would keep cached data of the old image) or was resized since the PiT.
    /// Crash-safe: the catalog marks the rollback first; the next open finishes it.
    public func rollback(vdisk name: String, to pitName: String) async throws(DomainError) {
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
        let port = try port(for: name)
        let whole: Range<UInt64> = 0..<max(v.sizeBytes, 1)
        await port.closeGate(whole)
        defer { port.openGate(whole) }
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
    func updateSharing() { sharingActive.store(metadata.hasSharing, ordering: .releasing) }

    /// Deletes block maps (map id, pool id) no one names any more, step by step, in the background.
    func deleteMapsInBackground(_ maps: [(UUID, UUID)]) {
        guard !maps.isEmpty else { return }
        Task {
            for (id, poolId) in maps {
                guard let pool = self.metadata.pool(id: poolId) else { continue }
                do throws(DomainError) {
                    try await self.deleteBlockMap(id, in: pool)
                } catch {
                    self.report("pool '\(pool.name)': cannot release block map \(id) (\(error)); it is released at the next start")
                }
            }
            self.zeroingWork.signal()
        }
    }
}
