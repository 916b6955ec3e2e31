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
