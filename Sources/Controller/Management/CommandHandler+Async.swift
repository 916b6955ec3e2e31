import Foundation

/// The `async.*` management commands (source side; the destination side answers the
/// source's requests over the replication link).
extension CommandHandler {
    func asyncCommand(_ r: MgmtRequest) async throws(DomainError) -> MgmtResponse? {
        switch r.command {
        case "async.create-group":
            let name = try arg(r, "name")
            guard Parse.name(name) != nil else { throw DomainError("group name '\(name)': use letters, digits, - _ . (at most 64)") }
            let (sources, vdg) = try asyncSources(r)
            for v in sources {
                if let other = domain.metadata.asyncGroup(of: v) { throw DomainError("vdisk '\(v.name)' is already in async group '\(other.name)'") }
            }
            return try await createSourceTask(name, taskOf: nil, sources: sources, vdg: vdg, r)
        case "async.status":
            var groups = domain.metadata.asyncGroupList
            if let name = r.args["name"] {
                guard let g = domain.metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
                groups = [g] + groups.filter { $0.taskOf == name } // and its further tasks
            }
            let views = groups.map { AsyncGroupView($0, domain: domain, progress: replication?.progress(ofGroup: $0.name)) }
            return .success(text: AsyncGroupView.table(views), json: views)
        case "async.pause-task", "async.continue-task":
            let name = try arg(r, "name")
            let (g, _) = try domain.asyncVDisk(name, role: .source)
            if [.detached, .splitBrain, .detaching].contains(g.state) {
                throw DomainError("async group '\(name)' is \(g.state.rawValue) here: `async merge \(name) --from SIDE` restarts mirroring")
            }
            let pause = r.command == "async.pause-task"
            try await domain.updateAsyncGroup(name) { $0.state = pause ? .paused : .normal }
            return .success(text: "async group '\(name)': task \(pause ? "paused (the cycle in flight finishes first)" : "continues")", json: ["group": name])
        case "async.delete-group":
            let name = try arg(r, "name")
            guard let g = domain.metadata.asyncGroup(named: name) else { throw DomainError("async group '\(name)' not found") }
            guard g.taskOf == nil else { throw DomainError("'\(name)' is a task of async group '\(g.taskOf!)': delete it with `async delete-task`") }
            var lines: [String] = []
            for task in domain.metadata.asyncGroupList where task.taskOf == name { lines.append(try await deleteSourceRecord(task.name)) }
            lines.insert(try await deleteSourceRecord(name), at: 0)
            return .success(text: lines.joined(separator: "\n"), json: ["deleted": name])
        case "async.add-task", "async.delete-task":
            return try await taskCommand(r)
        default:
            return try await asyncRoleCommand(r)
        }
    }
}

extension CommandHandler {
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
    /// Source: the group this record is a further task of (`async add-task`).
    var taskOf: String?
    /// Source: a split or detach-task here whose peer has not detached its side yet (asked again when the link is up).
    var peerDetachOwed: Bool?
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
        taskOf = g.taskOf
        peerDetachOwed = g.peerDetach != nil ? true : nil
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
