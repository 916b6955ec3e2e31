import Foundation

/// Several destinations for one source group: `async add-task G --peer P` mirrors the
/// group's vdisks to one more destination. A further task is a source record of its own,
/// named `G.T` (T: `--task`, default the peer's name), known by that name at its
/// destination: it takes its own cycle PiTs, has its own cycle position, state and link,
/// and suspends on its own, so a slow or cut task never delays another.
extension CommandHandler {
    func taskCommand(_ r: MgmtRequest) async throws(DomainError) -> MgmtResponse {
        let name = try arg(r, "name")
        guard let g = domain.metadata.asyncGroup(named: name), g.role == .source, g.taskOf == nil else {
            throw DomainError("async group '\(name)' is not a group whose source is here")
        }
        let tasks = domain.metadata.asyncGroupList.filter { $0.taskOf == name }.map { String($0.name.dropFirst(name.count + 1)) }
        if r.command == "async.delete-task" {
            let task = try arg(r, "task")
            guard tasks.contains(task) else {
                throw DomainError("async group '\(name)' has no task '\(task)' (its further tasks: \(tasks.isEmpty ? "none" : tasks.joined(separator: ", "))); "
                    + "its first task goes with `async delete-group \(name)`")
            }
            return .success(text: try await deleteSourceRecord(name + "." + task), json: ["deleted": name + "." + task])
        }
        let peer = try arg(r, "peer")
        let task = r.args["task"] ?? peer
        guard Parse.name(task) != nil, !tasks.contains(task), name.count + 1 + task.count <= 64 else {
            throw DomainError("--task '\(task)': a task name of letters, digits, - _ . not used by group '\(name)' yet (its tasks: \(tasks.joined(separator: ", ")))")
        }
        let sources = g.members.compactMap { m in domain.metadata.vdisks.first { $0.id == m.vdiskId } }
        guard sources.count == g.members.count else { throw DomainError("async group '\(name)': a member vdisk is gone") }
        return try await createSourceTask(name + "." + task, taskOf: name, sources: sources, vdg: g.sourceVDG, r)
    }

    /// Asks `--peer` to make the destination (group `name` there), then records the task here.
    func createSourceTask(_ name: String, taskOf: String?, sources: [VDiskRecord], vdg: String?, _ r: MgmtRequest) async throws(DomainError) -> MgmtResponse {
        guard let replication else { throw DomainError("this daemon does not run replication") }
        let peerName = try arg(r, "peer")
        guard domain.metadata.asyncGroup(named: name) == nil else { throw DomainError("async group '\(name)' already exists") }
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
        g.taskOf = taskOf
        try await domain.addAsyncGroup(g)
        replication.reconcileAsync()
        let pairs = zip(sources, dests).map { "'\($0.0.name)' -> '\($0.1)'" }.joined(separator: ", ")
        let what = taskOf.map { "async group '\($0)', task '\(name)'" } ?? "async group '\(name)'"
        return .success(text: "\(what): \(pairs) at peer '\(peerName)'; the initial copy (allocated extents only) starts now, then a cycle every pit_cycle of the link profile",
                        json: AsyncGroupView(domain.metadata.asyncGroup(named: name)!, domain: domain, progress: nil))
    }

    /// Deletes source (or destination) record `name`, telling the destination when this is
    /// the source; one line saying what was done.
    func deleteSourceRecord(_ name: String) async throws(DomainError) -> String {
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
        return "async group '\(name)' deleted (its vdisk and PiTs stay)\(remote)"
    }
}
