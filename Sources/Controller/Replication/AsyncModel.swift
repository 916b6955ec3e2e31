import Foundation

/// An async mirror group as one domain keeps it: at the source, the vdisks it mirrors (one,
/// a snapshot, or every member of a VDG) and its task to a peer; at the destination, the
/// vdisks a source feeds, member for member. Both sides name the group alike, and a cycle
/// is known by the name of the standard PiT it ships (for several members, a group PiT
/// whose member PiTs are NAME.0, NAME.1, ... in member order).
public struct AsyncGroupRecord: Codable, Equatable, Sendable {
    public enum Role: String, Codable, Sendable { case source, destination }
    public enum State: String, Codable, Sendable {
        /// Cycles run (or wait for the link).
        case normal
        /// A task is paused by the admin.
        case paused
        /// The last cycle failed; it is retried (the reason is in the task).
        case degraded
        /// Source: standard PiTs waiting for the link reached the link profile's retention:
        /// no new ones are taken; when the link is back, one coalesced difference catches up.
        case suspended
        /// Destination: being detached (fail over): nothing more is applied; the members are
        /// rolled back to the last complete PiT, then the group goes. A crash part-way leaves
        /// it so, and `async detach-task` or `async failover` runs it again.
        case detaching
        /// Destination: detached (failed over, split or detached): its vdisks are ordinary
        /// writable vdisks at the last complete PiT; kept so `async recover` and `async merge`
        /// know the peer and the common PiT. Source: its task ended (split, detach-task):
        /// nothing is captured or shipped; the confirmed PiT stays for a merge.
        case detached
        /// Source: the destination failed over (detached) while this side went on as the
        /// source: both may have written since their common PiT. Nothing is shipped and no
        /// PiT taken until an admin picks the side that wins (`async merge --from`).
        case splitBrain = "split-brain"
    }

    /// A destination a task feeds now (its vdisks read-only to hosts, at their last complete PiT).
    public var isFed: Bool { role == .destination && state != .detached }

    /// One vdisk of the group and its counterpart at the peer.
    public struct Member: Codable, Equatable, Sendable {
        public var vdiskId: UUID
        public var remoteVDisk: String
    }

    /// Where a cut cycle goes on: its PiT and the byte position (in its members' ranges laid
    /// end to end) before which every block was answered, so is durable at the destination.
    public struct ResumePoint: Codable, Equatable, Sendable {
        public var pit: String
        public var position: UInt64
    }

    public var name: String
    public var role: Role
    /// Source: the (first) vdisk mirrored. Destination: the (first) vdisk fed.
    public var vdiskId: UUID
    /// The other side.
    public var peer: String
    /// The (first) vdisk's counterpart at the peer.
    public var remoteVDisk: String
    /// Members after the first (a VDG source).
    public var moreMembers: [Member]?
    /// Source: the VDG it mirrors, when it mirrors one (its members at creation).
    public var sourceVDG: String?
    /// Source: this record is a further task of group `taskOf` (`async add-task`), named
    /// `<taskOf>.<task>`: the same vdisks to another destination, with PiTs and cycles of its own.
    public var taskOf: String?
    public var state: State = .normal
    /// The last cycle the destination made complete (its PiT exists at both sides), or nil
    /// before the initial copy completed.
    public var confirmedPiT: String?
    public var cycle: UInt64 = 0
    /// When `confirmedPiT` was taken at the source (the recovery point), Unix seconds.
    public var confirmedAt: Double?
    public var lastError: String?
    /// Source: standard PiTs taken and not yet confirmed, oldest first (held by the group;
    /// shipped in order), and how many cycles' PiTs were ever taken (names the next).
    public var pending: [String]?
    public var pitsTaken: UInt64?
    /// Source: the cycle being shipped, as far as the destination answered (saved every few
    /// seconds, so a source restart resumes there, not from the cycle's start).
    public var resumeAt: ResumePoint?
    /// Destination: the complete PiT before the last, kept one cycle longer (a host reading
    /// the read-only export as the cycle switched finishes its reads on it).
    public var previousPiT: String?
    /// Source `detached` by `split-task` or `detach-task` whose peer has not answered its own
    /// detach yet: the source task asks it again whenever the link is up (for a split, only
    /// if its last complete PiT is `splitAt`, the PiT both sides hold identical).
    public struct PeerDetach: Codable, Equatable, Sendable {
        public var splitAt: String?
    }
    public var peerDetach: PeerDetach?
    /// Source `detaching`: the common PiT of the reverse under way (it becomes the peer's
    /// destination from it); a restart after a crash part-way finishes the reverse.
    public var reversingFrom: String?

    public var members: [Member] { [Member(vdiskId: vdiskId, remoteVDisk: remoteVDisk)] + (moreMembers ?? []) }
    public var pendingList: [String] {
        get { pending ?? [] }
        set { pending = newValue.isEmpty ? nil : newValue }
    }

    /// The PiT of member `i` in cycle PiT `base` (one member: the base itself).
    public func memberPiT(_ base: String, _ i: Int) -> String { moreMembers?.isEmpty == false ? "\(base).\(i)" : base }
}

extension DomainMetadata {
    public var asyncGroupList: [AsyncGroupRecord] {
        get { asyncGroups ?? [] }
        set { asyncGroups = newValue.isEmpty ? nil : newValue }
    }

    public func asyncGroup(named name: String) -> AsyncGroupRecord? { asyncGroupList.first { $0.name == name } }
    /// The names of group `g`'s member vdisks on this side, in member order ("?" for one gone).
    public func memberNames(of g: AsyncGroupRecord) -> [String] { g.members.map { m in vdisks.first { $0.id == m.vdiskId }?.name ?? "?" } }
    public func asyncGroup(of vdisk: VDiskRecord) -> AsyncGroupRecord? { asyncGroupList.first { $0.members.contains { $0.vdiskId == vdisk.id } } }
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
        /// Asked of a source by the peer it fed (after a fail over, or for a hand-over): become
        /// that peer's destination from PiT `base`, which both hold (rolled back to it first
        /// with `rollback`; refused when changed since without). `dryRun`: only say what it would do.
        case reverse
        /// Asked of a destination by its source in a hand-over (both identical at PiT `base`):
        /// become the source of the group from `base`, and export the members read-write.
        /// Asked of a detached destination by a merge it wins: become the source from `base`
        /// (its own last complete PiT), its vdisks as they are.
        case becomeSource = "become-source"
        /// Asked of a detached destination by a merge its source wins: be fed again from its
        /// last complete PiT `base` (rolled back to it with `rollback`; refused when changed
        /// since without). `dryRun`: only say what it would do (and which PiT `base` is).
        case rejoin
        /// Asked of a source by a merge it wins, run at the destination: ship from `base`
        /// (which both hold) again, the cycle PiTs taken since dropped.
        case resumeFrom = "resume-from"
        /// Asked of a destination by its source (`split-task`, `detach-task` there): end the
        /// task here, the vdisks writable at the last complete PiT (for a split, `base`).
        case detach
    }

    /// A destination vdisk to make (or adopt): `create-destination` lists one per member.
    public struct MemberSpec: Codable, Sendable {
        public var vdisk: String
        public var sizeBytes: UInt64
        public var blockSize: Int

        /// A member named only (requests that change roles carry no geometry).
        public static func named(_ vdisk: String) -> MemberSpec { MemberSpec(vdisk: vdisk, sizeBytes: 0, blockSize: 0) }
    }

    public var op: Op
    public var group: String
    public var members: [MemberSpec]?
    public var pool: String?
    public var existing: Bool?
    public var cycle: UInt64?
    public var pit: String?
    /// `cycle-end`: when the source took the PiT (Unix seconds): the destination's recovery point.
    public var takenAt: Double?
    /// `reverse`: the common PiT, whether to roll back to it, whether only to say what would be done.
    public var base: String?
    public var rollback: Bool?
    public var dryRun: Bool?
    /// A merge with no common PiT (`--full`): the loser is wiped and fed from nothing, the
    /// winner ships everything it has allocated.
    public var full: Bool?
}

public struct AsyncResponse: Codable, Sendable {
    public var reason: String?
    /// With a refusal: its code (an errno, or `splitBrain`), so the asking side can tell kinds apart.
    public var code: Int32?
    /// The refusal of a cycle by a destination that was failed over (detached): a split
    /// brain. Not an errno, so no local failure can be taken for it.
    public static let splitBrain: Int32 = 1_000_001
    /// `rejoin` (dry run): the last complete PiT there, the common PiT of a merge.
    public var base: String?
    /// The destination's last complete PiT (after `cycleEnd`, the one just taken).
    public var lastComplete: String?
    /// `reverse`: the answering side's member vdisks, and the bytes (in changed extents)
    /// they changed since the common PiT, which a rollback discards.
    public var vdisks: [String]?
    public var changedBytes: UInt64?
}
