import Foundation

/// The domain's metadata: everything needed to find and rebuild its objects.
/// Persisted as one generation-numbered record (bootstrap file, then the setup vdisk).
public struct DomainMetadata: Codable, Equatable, Sendable {
    public var generation: UInt64 = 0
    public var domainId: UUID
    public var name: String
    public var pools: [PoolRecord] = []
    public var vdisks: [VDiskRecord] = []
    /// Pools holding a copy of the setup vdisk (empty until it is created).
    public var setupPools: [UUID] = []
    /// Point-in-time copies (nil: none; see `pitList`).
    public var pits: [PiTRecord]?
    /// Virtual disk groups (nil: none; see `vdgList`).
    public var vdgs: [VDGRecord]?
    /// Peer domains (nil: none; see `peerList`).
    public var peers: [PeerRecord]?
    /// Async mirror groups, source or destination side (nil: none; see `asyncGroupList`).
    public var asyncGroups: [AsyncGroupRecord]?
    /// Record format: nil for records written before legs had ids (converted at open).
    public var format: Int?
    /// 3: block maps in the pools' metadata areas (2: extent lists in this record, legs with ids).
    public static let currentFormat = 3

    public init(domainId: UUID = UUID(), name: String) {
        self.domainId = domainId
        self.name = name
    }

    public func pool(named name: String) -> PoolRecord? { pools.first { $0.name == name } }
    public func pool(id: UUID) -> PoolRecord? { pools.first { $0.id == id } }
    public func vdisk(named name: String) -> VDiskRecord? { vdisks.first { $0.name == name } }
}

public struct PoolRecord: Codable, Equatable, Sendable {
    public var id: UUID
    public var name: String
    public var arrayProfile: String
    public var poolProfile: String
    public var extentBytes: UInt64
    public var metadataReserveBytes: UInt64
    public var stripe: Bool
    public var luns: [LUNRecord]
    /// Format 2 only: freed extents not yet zeroed (now the space map says so). Read once
    /// by the conversion, never written.
    public var zeroing: [ExtentRef]?
    /// Where the pool's block maps and space map live (nil only in records of format 2).
    public var metadataArea: MetadataAreaRecord?

    public var extentCount: Int { luns.reduce(0) { $0 + $1.extentCount } }
    public var capacityBytes: UInt64 { UInt64(extentCount) * extentBytes }
}

/// The extents of one LUN that hold a pool's metadata area (contiguous).
public struct MetadataAreaRecord: Codable, Equatable, Sendable {
    public var lun: Int
    public var firstExtent: Int
    public var extentCount: Int
}

public struct LUNRecord: Codable, Equatable, Sendable {
    public var path: String
    public var index: Int
    public var sizeBytes: UInt64
    /// Byte offset of extent 0 on this LUN (after label and metadata reserve).
    public var dataStartBytes: UInt64
    public var extentCount: Int
}

/// Where one extent of a vdisk lives: LUN index within the pool and extent index on that LUN.
public struct ExtentRef: Codable, Equatable, Hashable, Sendable {
    public var lun: Int
    public var extent: Int
}

/// A mirror leg's state: in sync, being filled (snap-sync or resync), or failed.
public enum LegState: String, Codable, Sendable {
    case inSync = "in-sync", copying, failed
}

/// What a sync mirror does when a leg cannot take a write.
public enum MirrorMode: String, Codable, Sendable, CaseIterable {
    /// The host write fails when any leg cannot take it.
    case synchronousAlways = "synchronous-always"
    /// The write goes on with the surviving legs; the failed leg is marked (persisted first).
    case automaticFailover = "automatic-failover"
}

/// One copy of a vdisk's data, in one pool.
public struct LegRecord: Codable, Equatable, Sendable {
    /// Stable for the leg's life: copiers and the data path name legs by id, never by
    /// their index, which shifts when a leg is removed or split off.
    public var id: UUID
    public var poolId: UUID
    /// Format 2 only: the extent list, moved into the pool's block map (keyed by `id`) by
    /// the conversion and never written again.
    public var legacyExtents: [ExtentRef?]?
    public var state: LegState = .inSync
    /// The metadata generation at which the leg failed: resync copies towards it, never from it.
    public var failedAtGeneration: UInt64?
    /// add-leg: the whole leg must be copied (set in the same commit that adds it, cleared
    /// once the dirty-region bitmap carries every region), so a crash in between cannot
    /// leave an uncopied leg that looks in sync.
    public var copyAll: Bool?

    public init(id: UUID = UUID(), poolId: UUID, state: LegState = .inSync) {
        self.id = id
        self.poolId = poolId
        self.state = state
    }

    private enum CodingKeys: String, CodingKey { case id, poolId, legacyExtents = "extents", state, failedAtGeneration, copyAll }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        id = try c.decodeIfPresent(UUID.self, forKey: .id) ?? UUID() // older records: given one at open, then committed
        poolId = try c.decode(UUID.self, forKey: .poolId)
        legacyExtents = try c.decodeIfPresent([ExtentRef?].self, forKey: .legacyExtents)
        state = try c.decode(LegState.self, forKey: .state)
        failedAtGeneration = try c.decodeIfPresent(UInt64.self, forKey: .failedAtGeneration)
        copyAll = try c.decodeIfPresent(Bool.self, forKey: .copyAll)
    }

    mutating func markFailed(atGeneration generation: UInt64) {
        state = .failed
        failedAtGeneration = generation
    }
}

/// How a vdisk is exported to hosts.
public enum ExportMode: String, Codable, Sendable {
    case readWrite = "read-write"
    case readOnly = "read-only"
}

public struct VDiskRecord: Codable, Equatable, Sendable {
    public var id: UUID
    public var name: String
    public var sizeBytes: UInt64
    public var blockSize: Int
    public var thin: Bool
    /// 1 leg for a plain vdisk, 2..4 (each in a different pool) for a sync mirror.
    public var legs: [LegRecord]
    public var mode: MirrorMode = .automaticFailover
    public var dirtyRegions: Bool = true
    /// Served over NBD (export name = vdisk name) when set; persisted, so exports survive restarts.
    public var export: ExportMode?
    /// Set for a snapshot (a vdisk made from a PiT); read-only unless writable.
    public var snapshot: SnapshotOrigin?
    /// A rollback to this PiT (by id) whose maps were not all swapped yet: the next open
    /// finishes it before any I/O (swapping a leg twice gives the same image).
    public var rollingBackTo: UUID?

    /// Whether host writes are refused (a read-only snapshot).
    public var refusesHostWrites: Bool { snapshot.map { !$0.writable } ?? false }

    /// A mirror's state as `mirror status` and `vdisk list` show it: failed (no leg in
    /// sync), snap-sync (a leg is being copied), partial (a leg failed), normal.
    public var mirrorState: String {
        if !legs.contains(where: { $0.state == .inSync }) { return "failed" }
        if legs.contains(where: { $0.state == .copying }) { return "snap-sync" }
        if legs.contains(where: { $0.state == .failed }) { return "partial" }
        return "normal"
    }

    /// The first leg's pool (where a plain vdisk lives).
    public var poolId: UUID { legs[0].poolId }
    /// The index of the leg with `id` now (nil when it was removed or split off).
    public func legIndex(_ id: UUID) -> Int? { legs.firstIndex { $0.id == id } }
    public var isMirror: Bool { legs.count > 1 }
}

extension UUID {
    /// All zeros: an unused slot in fixed-size id tables.
    static let zero = UUID(uuid: (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
}
