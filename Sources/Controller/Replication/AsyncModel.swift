import Foundation

/// An async mirror group as one domain keeps it: at the source, the vdisk it mirrors and
/// its task to a peer; at the destination, the vdisk a source feeds. Both sides name the
/// group alike, and a cycle is known by the name of the standard PiT it ships.
public struct AsyncGroupRecord: Codable, Equatable, Sendable {
    public enum Role: String, Codable, Sendable { case source, destination }
    public enum State: String, Codable, Sendable {
        /// Cycles run (or wait for the link).
        case normal
        /// A task is paused by the admin.
        case paused
        /// The last cycle failed; it is retried (the reason is in the task).
        case degraded
    }

    public var name: String
    public var role: Role
    /// Source: the vdisk mirrored. Destination: the vdisk fed.
    public var vdiskId: UUID
    /// The other side.
    public var peer: String
    /// Source: the destination vdisk's name at the peer.
    public var remoteVDisk: String
    public var state: State = .normal
    /// The last cycle the destination made complete (its PiT exists at both sides), or nil
    /// before the initial copy completed.
    public var confirmedPiT: String?
    public var cycle: UInt64 = 0
    /// When `confirmedPiT` was taken at the source (the recovery point), Unix seconds.
    public var confirmedAt: Double?
    public var lastError: String?
}

extension DomainMetadata {
    public var asyncGroupList: [AsyncGroupRecord] {
        get { asyncGroups ?? [] }
        set { asyncGroups = newValue.isEmpty ? nil : newValue }
    }

    public func asyncGroup(named name: String) -> AsyncGroupRecord? { asyncGroupList.first { $0.name == name } }
    public func asyncGroup(of vdisk: VDiskRecord) -> AsyncGroupRecord? { asyncGroupList.first { $0.vdiskId == vdisk.id } }
}

/// The control operations of the async mirror, carried in `request` frames (JSON).
public struct AsyncRequest: Codable, Sendable {
    public enum Op: String, Codable, Sendable {
        /// Make (or adopt, with `existing`) the destination vdisk and the group record.
        case createDestination = "create-destination"
        /// Blocks of cycle `cycle` follow; `pit` names its PiT.
        case cycleBegin = "cycle-begin"
        /// Every block of the cycle was sent and answered: take PiT `pit` of the destination.
        case cycleEnd = "cycle-end"
        case deleteGroup = "delete-group"
    }

    public var op: Op
    public var group: String
    public var vdisk: String?
    public var sizeBytes: UInt64?
    public var blockSize: Int?
    public var pool: String?
    public var existing: Bool?
    public var cycle: UInt64?
    public var pit: String?
}

public struct AsyncResponse: Codable, Sendable {
    public var reason: String?
    /// The destination's last complete PiT (after `cycleEnd`, the one just taken).
    public var lastComplete: String?
}
