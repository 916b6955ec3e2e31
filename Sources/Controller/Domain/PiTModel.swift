import Foundation

/// A point-in-time copy of a vdisk: for each leg, a block map cloned from the leg's at
/// the PiT's instant (sharing its pages and chunks; host writes after it are redirected
/// to new chunks, see `Domain+Redirect.swift`). Kept in the catalog; its maps live in the
/// legs' pools, made before the catalog commit that names them and deleted after the one
/// that drops them (a crash in between leaves maps nobody names, released at open).
public struct PiTRecord: Codable, Equatable, Sendable {
    public var id: UUID
    public var name: String
    public var kind: PiTKind
    public var vdiskId: UUID
    /// Seconds since 1970 (UTC) of the instant.
    public var createdAt: Double
    /// The vdisk's size at the instant (a rollback gives it back).
    public var sizeBytes: UInt64
    public var maps: [PiTMap]
    /// The group PiT it was taken with (`pit create --vdg`): one instant for every member.
    public var group: String?
    /// The mirror task that still needs it (retention never retires it; delete refuses).
    public var heldBy: String?

    /// The map a leg of the vdisk has in this PiT, if it was in sync at the instant.
    public func map(ofLeg id: UUID) -> PiTMap? { maps.first { $0.legId == id && $0.complete } }
}

/// Who took a PiT: the mirror service (standard: retention removes them first) or a user.
public enum PiTKind: String, Codable, Sendable {
    case standard, user
}

/// One leg's block map in a PiT.
public struct PiTMap: Codable, Equatable, Sendable {
    public var legId: UUID
    public var poolId: UUID
    public var mapId: UUID
    /// The leg was in sync at the instant. PiTs are taken of in-sync legs only (so this
    /// is always true for them); kept so a record can say a map is not to be read.
    public var complete: Bool
}

/// What a snapshot vdisk was made from: a read-only view or a writable clone of a PiT.
/// Its legs' maps are clones of the PiT's, so it shares the PiT's chunks and outlives it.
public struct SnapshotOrigin: Codable, Equatable, Sendable {
    public var pitName: String
    public var vdiskName: String
    public var writable: Bool
}

extension DomainMetadata {
    /// The PiTs of every vdisk, oldest first.
    public var pitList: [PiTRecord] {
        get { pits ?? [] }
        set { pits = newValue.isEmpty ? nil : newValue }
    }

    public func pit(named name: String) -> PiTRecord? { pitList.first { $0.name == name } }
    public func pits(of vdisk: VDiskRecord) -> [PiTRecord] { pitList.filter { $0.vdiskId == vdisk.id } }
    /// Whether a PiT, or a group PiT, is named so.
    public func hasPiT(orGroup name: String) -> Bool { pitList.contains { $0.name == name || $0.group == name } }

    /// Whether any map shares pages or chunks with another (the data path then checks each
    /// write for a redirect; with no PiT and no snapshot it skips the check).
    public var hasSharing: Bool { !pitList.isEmpty || vdisks.contains { $0.snapshot != nil } }

    /// Block map ids named by PiTs, in `pool`.
    func pitMapIds(in pool: UUID) -> [UUID] { pitList.flatMap(\.maps).filter { $0.poolId == pool }.map(\.mapId) }
}

/// A virtual disk group: vdisks whose PiTs are taken at one instant (a database's log
/// and data files). A vdisk belongs to one group at most.
public struct VDGRecord: Codable, Equatable, Sendable {
    public var name: String
    public var members: [UUID]
}

extension DomainMetadata {
    public var vdgList: [VDGRecord] {
        get { vdgs ?? [] }
        set { vdgs = newValue.isEmpty ? nil : newValue }
    }

    public func vdg(named name: String) -> VDGRecord? { vdgList.first { $0.name == name } }
    /// The group `vdisk` belongs to, if any.
    public func vdg(of vdisk: VDiskRecord) -> VDGRecord? { vdgList.first { $0.members.contains(vdisk.id) } }
}
