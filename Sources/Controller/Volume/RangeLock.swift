/// One lock over a vdisk's byte ranges, held by typed users. Who waits for whom
/// (W: the later one waits while the ranges overlap; -: they run together):
///
///                 read   write   copier   trim
///     read          -      -       -        W
///     write         -      -       W        W
///     copier        -      W       W        W
///     trim          W      W       W        W
///
/// read/write: host requests (write also covers write-zeroes and the trims of thick
/// vdisks, which write zeroes). copier: resync, verify and read repair read one leg and
/// write another, so no host write may land in between. trim: a thin trim releases
/// extents, so nothing may still read or write them. (PiT freeze and capture join the
/// table with PiTs.) Host reads and writes never wait for each other (NBD does not
/// order them), so they check only the few copier and trim entries.
///
/// Waiters are served first come, first served: an entry waits for every conflicting
/// entry that was there before it (held or waiting), so a stream of host writes cannot
/// starve a copier. Nothing polls: each entry counts what it waits for, each release
/// counts down those that came after it, and an entry whose count reaches zero is
/// granted and returned to the caller to start.
///
/// Not thread-safe: the owner (the vdisk's port) calls it under its own lock. Host
/// entries live in arrays indexed by request slot, so a host request allocates nothing.
public struct RangeLock {
    public enum Kind: UInt8, Sendable { case read, write, copier, trim }

    public static func conflicts(_ a: Kind, _ b: Kind) -> Bool {
        switch (a, b) {
        case (.read, .read), (.read, .write), (.write, .read), (.write, .write), (.read, .copier), (.copier, .read): false
        default: true
        }
    }

    /// Who holds or waits: a request slot of the port, or a copier (by its token).
    public enum Holder: Equatable, Sendable { case slot(Int), copier(Int) }

    private struct Entry {
        var holder: Holder
        var kind: Kind
        var range: Range<UInt64>
        var ticket: UInt64
        var blockers: Int
        var granted: Bool { blockers == 0 }
    }

    /// Read and write entries, by slot (nil: the slot holds none).
    private var hosts: [Entry?]
    /// Copier and trim entries, held or waiting, in arrival order (few at a time).
    private var special: [Entry] = []
    /// Slots of waiting read/write entries, in arrival order.
    private var waitingHosts: [Int] = []
    private var nextTicket: UInt64 = 1
    private var nextCopier = 0

    public init(slots: Int) {
        hosts = Array(repeating: nil, count: slots)
        waitingHosts.reserveCapacity(slots)
        special.reserveCapacity(16)
    }

    /// Takes `range` for request `slot`; true when granted now, false when it waits (it
    /// comes back from a later `release` as granted).
    public mutating func acquire(slot: Int, _ kind: Kind, _ range: Range<UInt64>) -> Bool {
        precondition(hosts[slot] == nil && !special.contains { $0.holder == .slot(slot) }, "slot \(slot) holds a range already")
        if kind == .read || kind == .write {
            let blockers = special.reduce(0) { $0 + (Self.conflicts($1.kind, kind) && $1.range.overlaps(range) ? 1 : 0) }
            hosts[slot] = Entry(holder: .slot(slot), kind: kind, range: range, ticket: take(), blockers: blockers)
            if blockers > 0 { waitingHosts.append(slot) }
            return blockers == 0
        }
        return addSpecial(.slot(slot), kind, range)
    }

    /// Takes `range` for a copier; returns its token and whether it is granted now.
    public mutating func acquireCopier(_ range: Range<UInt64>) -> (token: Int, granted: Bool) {
        nextCopier += 1
        return (nextCopier, addSpecial(.copier(nextCopier), .copier, range))
    }

    private mutating func addSpecial(_ holder: Holder, _ kind: Kind, _ range: Range<UInt64>) -> Bool {
        var blockers = special.reduce(0) { $0 + (Self.conflicts($1.kind, kind) && $1.range.overlaps(range) ? 1 : 0) }
        for case let h? in hosts where Self.conflicts(h.kind, kind) && h.range.overlaps(range) { blockers += 1 }
        special.append(Entry(holder: holder, kind: kind, range: range, ticket: take(), blockers: blockers))
        return blockers == 0
    }

    private mutating func take() -> UInt64 {
        defer { nextTicket += 1 }
        return nextTicket
    }

    /// Gives back what `holder` holds; the entries this lets go are returned to be started.
    public mutating func release(_ holder: Holder, into granted: inout [Holder]) {
        let gone: Entry
        if case .slot(let s) = holder, let h = hosts[s] {
            precondition(h.granted, "slot \(s) released a range it was still waiting for")
            gone = h
            hosts[s] = nil
        } else if let i = special.firstIndex(where: { $0.holder == holder }) {
            precondition(special[i].granted, "\(holder) released a range it was still waiting for")
            gone = special.remove(at: i)
        } else {
            return // held nothing (a flush, a request refused before it took a range)
        }
        // Only entries that came later counted `gone` among their blockers.
        for i in special.indices where special[i].ticket > gone.ticket && !special[i].granted
            && Self.conflicts(special[i].kind, gone.kind) && special[i].range.overlaps(gone.range)
        {
            special[i].blockers -= 1
            if special[i].granted { granted.append(special[i].holder) }
        }
        guard gone.kind != .read && gone.kind != .write, !waitingHosts.isEmpty else { return }
        waitingHosts.removeAll { s in
            guard var h = hosts[s], h.ticket > gone.ticket, Self.conflicts(h.kind, gone.kind), h.range.overlaps(gone.range) else { return false }
            h.blockers -= 1
            hosts[s] = h
            if h.granted { granted.append(.slot(s)) }
            return h.granted
        }
    }

    /// Entries held or waiting (for invariant checks and tests).
    public var count: Int { hosts.reduce(0) { $0 + ($1 == nil ? 0 : 1) } + special.count }
}
