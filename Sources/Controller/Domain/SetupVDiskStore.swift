import Foundation
import IOEngine

/// The setup vdisk: the domain's metadata mirrored on 1 or 3..5 pools. Each copy
/// lives in the metadata reserve of its pool's first LUN as two alternating slots;
/// a record is a checksummed, generation-numbered header plus JSON.
///
/// Quorum counts the *configured* copies (a copy whose LUN is missing still counts
/// in N): an update commits when ⌊N/2⌋+1 copies have it, and loading needs that many
/// copies readable. Any committed generation is on a majority, and any majority
/// overlaps it, so the newest generation a readable majority holds anywhere is the
/// newest committed one (or a newer one whose commit was cut short, which is adopted:
/// nobody was told it succeeded or failed). Loading rewrites the copies that lack it.
/// With fewer copies readable the metadata is only read, never rewritten.
public final class SetupVDiskStore: @unchecked Sendable {
    /// One copy: a LUN and where its two slots are.
    public struct Copy: Sendable {
        public let poolName: String
        /// Nil when the pool's first LUN is missing: the copy still counts towards N.
        public let lun: LUNHandle?
        public let slotBytes: Int
        public var slotOffsets: (UInt64, UInt64) { (Self.firstSlot, Self.firstSlot + UInt64(slotBytes)) }
        static let firstSlot: UInt64 = 64 << 10

        public init(poolName: String, lun: LUNHandle?, metadataReserveBytes: UInt64) {
            self.poolName = poolName
            self.lun = lun
            slotBytes = Int((metadataReserveBytes - Self.firstSlot) / 2 / 4096 * 4096)
        }
    }

    /// What loading found on each copy.
    public struct CopyState: Sendable, Equatable {
        public let poolName: String
        public let generation: UInt64?
        public let problem: String?
    }

    static let magic = Array("SVSPMETA".utf8)
    static let headerBytes = 4096

    public let copies: [Copy]
    private let engine: EngineHandle
    public var majority: Int { copies.count / 2 + 1 }

    /// What `load` found: the metadata, each copy's state, and whether a majority of the
    /// configured copies was readable (without it the domain must not commit anything).
    public struct Loaded: Sendable {
        public let metadata: DomainMetadata
        public let states: [CopyState]
        public let readableCopies: Int
        public let hasQuorum: Bool
        /// Newer records that passed their checksums but were not usable (and were skipped).
        public let ignored: [String]
    }

    public init(copies: [Copy], engine: EngineHandle) {
        self.copies = copies
        self.engine = engine
    }

    /// Writes `metadata` (its generation picks the slot) to every copy; throws unless a majority
    /// took it. Returns each copy's state (a copy that failed keeps its problem).
    @discardableResult
    public func commit(_ metadata: DomainMetadata) async throws(DomainError) -> [CopyState] {
        let payload: Data
        do { payload = try JSONEncoder().encode(metadata) } catch { throw DomainError("cannot encode metadata: \(error)") }
        var written = 0
        var failures: [String] = []
        var states: [CopyState] = []
        for copy in copies {
            guard copy.lun != nil else {
                failures.append("\(copy.poolName): missing")
                states.append(CopyState(poolName: copy.poolName, generation: nil, problem: "missing (its pool's first LUN is not available)"))
                continue
            }
            do {
                try await write(payload, generation: metadata.generation, to: copy)
                written += 1
                states.append(CopyState(poolName: copy.poolName, generation: metadata.generation, problem: nil))
            } catch {
                failures.append("\(copy.poolName): \(error)")
                states.append(CopyState(poolName: copy.poolName, generation: nil, problem: "write failed: \(error)"))
            }
        }
        if written < majority {
            throw DomainError("setup vdisk update not committed: \(written) of \(copies.count) configured copies written, \(majority) needed (\(failures.joined(separator: "; ")))")
        }
        return states
    }

    /// The newest metadata the readable copies hold, and each copy's state. With a
    /// majority of the configured copies readable, copies that lack it are rewritten (in
    /// the slot its generation selects); without, nothing is written.
    public func load() async throws(DomainError) -> Loaded {
        var found: [(copy: Int, generation: UInt64, crc: UInt32, payload: Data)] = []
        var problems: [Int: String] = [:]
        var readable = 0
        for (i, copy) in copies.enumerated() {
            guard copy.lun != nil else {
                problems[i] = "missing (its pool's first LUN is not available)"
                continue
            }
            var usable = false
            for slot in [copy.slotOffsets.0, copy.slotOffsets.1] {
                switch await read(slot: slot, of: copy) {
                case .record(let g, let c, let p):
                    found.append((i, g, c, p))
                    usable = true // only a copy holding a record can vouch for what was committed
                case .empty: break
                case .damaged(let why): problems[i] = why
                }
            }
            if usable { readable += 1 }
        }
        let hasQuorum = readable >= majority
        // Newest generation first; for one generation written twice (a commit cut short,
        // then another), the content more copies hold. Then the first that decodes.
        let candidates = Dictionary(grouping: found) { "\($0.generation):\($0.crc)" }.values
            .sorted { ($0[0].generation, Set($0.map(\.copy)).count) > ($1[0].generation, Set($1.map(\.copy)).count) }
        var winner: (generation: UInt64, crc: UInt32, payload: Data)?
        var metadata: DomainMetadata?
        var undecodable: [String] = []
        for group in candidates {
            let c = group[0]
            do throws(DomainError) {
                metadata = try Self.decode(c.payload)
                winner = (c.generation, c.crc, c.payload)
                break
            } catch {
                let holders = Set(group.map(\.copy)).sorted().map { copies[$0].poolName }.joined(separator: ", ")
                undecodable.append("generation \(c.generation) on \(holders): \(error)")
            }
        }
        guard let winner, let metadata else {
            let why = undecodable.isEmpty ? "" : " (\(undecodable.joined(separator: "; ")))"
            throw DomainError("setup vdisk: none of its \(copies.count) copies holds a usable metadata record "
                + "(\(readable) readable)\(why)")
        }
        var states: [CopyState] = []
        for (i, copy) in copies.enumerated() {
            let newest = found.filter { $0.copy == i }.map(\.generation).max()
            let current = found.contains { $0.copy == i && $0.generation == winner.generation && $0.crc == winner.crc }
            if current {
                states.append(CopyState(poolName: copy.poolName, generation: newest, problem: nil))
                continue
            }
            let why = problems[i] ?? (newest.map { "stale (generation \($0))" } ?? "empty")
            guard hasQuorum, copy.lun != nil else {
                states.append(CopyState(poolName: copy.poolName, generation: newest, problem: why))
                continue
            }
            do {
                try await write(winner.payload, generation: winner.generation, to: copy)
                states.append(CopyState(poolName: copy.poolName, generation: newest, problem: "\(why); rewritten"))
            } catch {
                states.append(CopyState(poolName: copy.poolName, generation: newest, problem: "\(why); rewrite failed: \(error)"))
            }
        }
        return Loaded(metadata: metadata, states: states, readableCopies: readable, hasQuorum: hasQuorum, ignored: undecodable)
    }

    /// Decodes and checks a record: a record that passed its checksums but does not
    /// describe a consistent domain is treated as damaged, never trusted.
    static func decode(_ payload: Data) throws(DomainError) -> DomainMetadata {
        let metadata: DomainMetadata
        do { metadata = try JSONDecoder().decode(DomainMetadata.self, from: payload) } catch {
            throw DomainError("record does not decode: \(error)")
        }
        if let problem = metadata.consistencyProblem { throw DomainError("record is inconsistent: \(problem)") }
        return metadata.withLegacyLegIds()
    }

    // MARK: record I/O

    private func write(_ payload: Data, generation: UInt64, to copy: Copy) async throws(DomainError) {
        let total = (Self.headerBytes + payload.count + 4095) / 4096 * 4096
        guard total <= copy.slotBytes else {
            throw DomainError("metadata (\(payload.count) bytes) exceeds the setup slot (\(copy.slotBytes) bytes); raise metadata_reserve")
        }
        let buffer: AlignedBuffer
        do { buffer = try AlignedBuffer(count: total) } catch { throw DomainError("\(error)") }
        memset(buffer.pointer, 0, total)
        let out = buffer.bytes
        for (i, b) in Self.magic.enumerated() { out[i] = b }
        out.storeBytes(of: generation.littleEndian, toByteOffset: 8, as: UInt64.self)
        out.storeBytes(of: UInt64(payload.count).littleEndian, toByteOffset: 16, as: UInt64.self)
        payload.withUnsafeBytes { UnsafeMutableRawBufferPointer(rebasing: out[Self.headerBytes...]).copyMemory(from: $0) }
        let payloadCRC = Checksum.crc32c(UnsafeRawBufferPointer(rebasing: out[Self.headerBytes..<(Self.headerBytes + payload.count)]))
        out.storeBytes(of: payloadCRC.littleEndian, toByteOffset: 24, as: UInt32.self)
        let headerCRC = Checksum.crc32c(UnsafeRawBufferPointer(rebasing: out[0..<28]))
        out.storeBytes(of: headerCRC.littleEndian, toByteOffset: 28, as: UInt32.self)
        let slot = generation % 2 == 0 ? copy.slotOffsets.0 : copy.slotOffsets.1
        do {
            guard let lun = copy.lun else { throw DomainError("\(copy.poolName): missing") }
            _ = try await engine.write(lun: lun, from: buffer.pointer, length: total, offset: slot, fua: true)
        } catch {
            throw DomainError("\(error)")
        }
    }

    private enum SlotContent { case record(UInt64, UInt32, Data), empty, damaged(String) }

    /// What a slot's first 4 KiB say: nothing written, a record (generation, payload
    /// length, payload crc) whose length fits the slot, or why not. Pure: what is read
    /// back from disk is never trusted before this.
    enum SlotHeader: Equatable { case empty, record(generation: UInt64, length: Int, payloadCRC: UInt32), damaged(String) }

    static func parseHeader(_ h: UnsafeRawBufferPointer, slotBytes: Int, at slot: UInt64) -> SlotHeader {
        guard h.count >= headerBytes else { return .damaged("short header at \(slot)") }
        if h[0..<8].allSatisfy({ $0 == 0 }) { return .empty }
        guard h[0..<8].elementsEqual(magic) else { return .damaged("slot at \(slot) holds no record") }
        let headerCRC = h.loadUnaligned(fromByteOffset: 28, as: UInt32.self).littleEndian
        guard Checksum.crc32c(UnsafeRawBufferPointer(rebasing: h[0..<28])) == headerCRC else {
            return .damaged("record header checksum mismatch at \(slot)")
        }
        let generation = h.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
        let rawLength = h.loadUnaligned(fromByteOffset: 16, as: UInt64.self).littleEndian
        // Checked in UInt64 before any Int arithmetic: a crafted length must not trap.
        guard slotBytes > headerBytes, rawLength <= UInt64(slotBytes - headerBytes) else {
            return .damaged("record length \(rawLength) out of range at \(slot)")
        }
        return .record(generation: generation, length: Int(rawLength),
                       payloadCRC: h.loadUnaligned(fromByteOffset: 24, as: UInt32.self).littleEndian)
    }

    private func read(slot: UInt64, of copy: Copy) async -> SlotContent {
        guard let lun = copy.lun else { return .damaged("missing") }
        guard let header = try? AlignedBuffer(count: Self.headerBytes) else { return .damaged("out of memory") }
        do {
            _ = try await engine.read(lun: lun, into: header.pointer, length: Self.headerBytes, offset: slot)
        } catch {
            return .damaged("unreadable: \(error)")
        }
        let length: Int, payloadCRC: UInt32, generation: UInt64
        switch Self.parseHeader(UnsafeRawBufferPointer(header.bytes), slotBytes: copy.slotBytes, at: slot) {
        case .empty: return .empty
        case .damaged(let why): return .damaged(why)
        case .record(let g, let l, let c): (generation, length, payloadCRC) = (g, l, c)
        }
        let total = (Self.headerBytes + length + 4095) / 4096 * 4096
        guard let whole = try? AlignedBuffer(count: total) else { return .damaged("out of memory") }
        do {
            _ = try await engine.read(lun: lun, into: whole.pointer, length: total, offset: slot)
        } catch {
            return .damaged("unreadable: \(error)")
        }
        let body = UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(whole.bytes)[Self.headerBytes..<(Self.headerBytes + length)])
        guard Checksum.crc32c(body) == payloadCRC else { return .damaged("record payload checksum mismatch at \(slot)") }
        return .record(generation, payloadCRC, Data(body))
    }
}
