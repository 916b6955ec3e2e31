import Foundation

/// The `async.*` management commands (source side; the destination side answers the
/// source's requests over the replication link).
extension CommandHandler {
    func asyncCommand(_ r: MgmtRequest) async throws(DomainError) -> MgmtResponse? {
        switch r.command {
        case "async.create-group":
            guard let replication else { throw DomainError("this daemon does not run replication") }
            let name = try arg(r, "name"), source = try arg(r, "source"), peerName = try arg(r, "peer")
            guard Parse.name(name) != nil else { throw DomainError("group name '\(name)': use letters, digits, - _ . (at most 64)") }
            guard domain.metadata.asyncGroup(named: name) == nil else { throw DomainError("async group '\(name)' already exists") }
            guard let v = domain.metadata.vdisk(named: source) else { throw DomainError("vdisk '\(source)' not found") }
            guard v.snapshot == nil else { throw DomainError("'\(source)' is a snapshot; mirror the vdisk it comes from") }
            if let other = domain.metadata.asyncGroup(of: v) { throw DomainError("vdisk '\(source)' is already in async group '\(other.name)'") }
            guard domain.metadata.peer(named: peerName) != nil else { throw DomainError("peer '\(peerName)' not found (add it with `svsp-ctl peer add`)") }
            let dest = r.args["dest"] ?? source
            _ = try await replication.call(peerName, AsyncRequest(op: .createDestination, group: name, vdisk: dest, sizeBytes: v.sizeBytes,
                                                                    blockSize: v.blockSize, pool: r.args["dest_pool"], existing: r.args["dest_existing"] == "true"))
            try await domain.addAsyncGroup(AsyncGroupRecord(name: name, role: .source, vdiskId: v.id, peer: peerName, remoteVDisk: dest))
            replication.reconcileAsync()
            return .success(text: "async group '\(name)': vdisk '\(source)' -> peer '\(peerName)' vdisk '\(dest)'; the initial copy (allocated extents only) starts now, then a cycle every pit_cycle of the link profile",
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

/// An async group and its task, as `async status` shows it.
struct AsyncGroupView: Codable {
    var name: String
    var role: String
    var vdisk: String
    var peer: String
    var remoteVDisk: String
    var state: String
    /// The last PiT the destination holds complete, and how old it is (the recovery point).
    var confirmedPiT: String?
    var recoveryPointAgeSeconds: Double?
    var cycle: UInt64
    var lastError: String?
    var progress: AsyncTaskProgress?

    init(_ g: AsyncGroupRecord, domain: Domain, progress: AsyncTaskProgress?) {
        name = g.name
        role = g.role.rawValue
        vdisk = domain.metadata.vdisks.first { $0.id == g.vdiskId }?.name ?? "?"
        peer = g.peer
        remoteVDisk = g.remoteVDisk
        state = g.state.rawValue
        confirmedPiT = g.confirmedPiT
        recoveryPointAgeSeconds = g.confirmedAt.map { ((Date().timeIntervalSince1970 - $0) * 10).rounded() / 10 }
        cycle = g.cycle
        lastError = g.lastError
        self.progress = progress
    }

    static func table(_ views: [AsyncGroupView]) -> String {
        guard !views.isEmpty else { return "no async groups" }
        return Table.render(["GROUP", "ROLE", "VDISK", "PEER", "STATE", "LAST COMPLETE PIT", "AGE", "CYCLE", "TO SEND", "LAST ERROR"], views.map { v in
            let toSend = v.progress.map { ByteSize.format($0.bytesToSend - min($0.bytesSent, $0.bytesToSend)) } ?? "-"
            return [v.name, v.role, v.vdisk, v.peer, v.state, v.confirmedPiT ?? "none yet",
                    v.recoveryPointAgeSeconds.map { String(format: "%.1f s", $0) } ?? "-", String(v.cycle), toSend,
                    v.lastError.map { String($0.prefix(80)) } ?? "-"]
        })
    }
}
