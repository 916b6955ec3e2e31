import Foundation

/// Peer domains in the catalog (`PeerRecord`); their secrets beside it (`PeerSecrets`).
extension Domain {
    public var peerSecrets: PeerSecrets { PeerSecrets(stateDirectory: directory) }

    /// Adds peer `name` (the other domain's name). The secret file is read and kept under
    /// STATE/peers/ now, so the file named here may be removed afterwards.
    public func addPeer(name: String, address: String, secretFile: String, linkProfile: String, domainId: UUID?) async throws(DomainError) -> PeerRecord {
        guard Parse.name(name) != nil else { throw DomainError("peer name '\(name)': use the peer domain's name (letters, digits, - _ . at most 64)") }
        guard name != metadata.name else { throw DomainError("peer name '\(name)' is this domain's own name: name the other domain") }
        _ = try HostPort.parse(address, option: "--address")
        guard profiles.links[linkProfile] != nil else {
            let known = profiles.links.keys.sorted().joined(separator: ", ")
            throw DomainError("link profile '\(linkProfile)' not found (known: \(known.isEmpty ? "none" : known))")
        }
        if let domainId, domainId == metadata.domainId { throw DomainError("--domain-id \(domainId) is this domain's own id") }
        let secret = try PeerSecrets.read(file: secretFile)
        try await beginChange()
        defer { mutation.release() }
        guard metadata.peer(named: name) == nil else { throw DomainError("peer '\(name)' already exists (remove it first to change it)") }
        let peer = PeerRecord(name: name, address: address, linkProfile: linkProfile, domainId: domainId)
        try peerSecrets.store(secret, for: name)
        var next = metadata
        next.peerList.append(peer)
        do { try await commit(next) } catch {
            peerSecrets.remove(name)
            throw error
        }
        return peer
    }

    /// Removes peer `name` and its secret; its connections close.
    public func removePeer(name: String) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        guard metadata.peer(named: name) != nil else { throw DomainError("peer '\(name)' not found") }
        var next = metadata
        next.peerList.removeAll { $0.name == name }
        try await commit(next)
        peerSecrets.remove(name)
    }

    /// Pins the id a peer proved at its first authenticated contact (later contacts from
    /// a domain of that name with another id are refused). A no-op once pinned.
    func pinPeerDomainId(_ name: String, _ id: UUID) async throws(DomainError) {
        guard metadata.peer(named: name)?.domainId == nil else { return }
        try await beginChange()
        defer { mutation.release() }
        guard let i = metadata.peerList.firstIndex(where: { $0.name == name }), metadata.peerList[i].domainId == nil else { return }
        var next = metadata
        next.peerList[i].domainId = id
        try await commit(next)
    }
}
