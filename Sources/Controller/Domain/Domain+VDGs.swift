import Foundation

/// Virtual disk groups (`VDGRecord`): their membership, kept in the catalog.
extension Domain {
    public func createVDG(name: String, members: [String]) async throws(DomainError) -> VDGRecord {
        try await changeVDGs { (next: inout DomainMetadata) throws(DomainError) -> VDGRecord in
            guard Parse.name(name) != nil else { throw DomainError("group name '\(name)': use letters, digits, - _ . (at most 64)") }
            guard next.vdg(named: name) == nil else { throw DomainError("virtual disk group '\(name)' already exists") }
            let g = VDGRecord(name: name, members: [])
            next.vdgList.append(g)
            return try Self.add(members, to: name, in: &next)
        }
    }

    public func addToVDG(_ name: String, members: [String]) async throws(DomainError) -> VDGRecord {
        try await changeVDGs { (next: inout DomainMetadata) throws(DomainError) -> VDGRecord in try Self.add(members, to: name, in: &next) }
    }

    public func removeFromVDG(_ name: String, members: [String]) async throws(DomainError) -> VDGRecord {
        try await changeVDGs { (next: inout DomainMetadata) throws(DomainError) -> VDGRecord in
            guard let gi = next.vdgList.firstIndex(where: { $0.name == name }) else { throw DomainError("virtual disk group '\(name)' not found") }
            for member in members {
                guard let v = next.vdisk(named: member) else { throw DomainError("vdisk '\(member)' not found") }
                guard next.vdgList[gi].members.contains(v.id) else { throw DomainError("vdisk '\(member)' is not in group '\(name)'") }
                next.vdgList[gi].members.removeAll { $0 == v.id }
            }
            return next.vdgList[gi]
        }
    }

    /// Deletes a group (its members and their PiTs stay).
    public func deleteVDG(_ name: String) async throws(DomainError) {
        _ = try await changeVDGs { (next: inout DomainMetadata) throws(DomainError) -> Bool in
            guard next.vdg(named: name) != nil else { throw DomainError("virtual disk group '\(name)' not found") }
            next.vdgList.removeAll { $0.name == name }
            return true
        }
    }

    private static func add(_ members: [String], to name: String, in next: inout DomainMetadata) throws(DomainError) -> VDGRecord {
        guard let gi = next.vdgList.firstIndex(where: { $0.name == name }) else { throw DomainError("virtual disk group '\(name)' not found") }
        guard !members.isEmpty else { throw DomainError("name at least one vdisk with --vdisk") }
        for member in members {
            guard let v = next.vdisk(named: member) else { throw DomainError("vdisk '\(member)' not found") }
            if let other = next.vdg(of: v) { throw DomainError("vdisk '\(member)' is already in group '\(other.name)'") }
            guard v.snapshot.map(\.writable) ?? true else { throw DomainError("'\(member)' is a read-only snapshot: it takes no writes to keep in step") }
            next.vdgList[gi].members.append(v.id)
        }
        return next.vdgList[gi]
    }

    private func changeVDGs<T>(_ change: (inout DomainMetadata) throws(DomainError) -> T) async throws(DomainError) -> T {
        try await beginChange()
        defer { mutation.release() }
        var next = metadata
        let result = try change(&next)
        try await commit(next)
        return result
    }
}
