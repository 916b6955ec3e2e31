import Foundation

/// The replication protocol between peer domains: every frame, its header and its
/// limits, in one file (as DRBD keeps its wire format in `drbd_protocol.h`).
///
/// A frame is a 16-byte header, then its payload. Integers are big-endian.
///
///     offset size field
///     0      4    magic     "SVRP" (0x5356_5250)
///     4      2    version   the protocol version the frame is written in (1 until negotiated)
///     6      2    type      `ReplicationFrame.Kind`
///     8      4    length    payload bytes that follow, at most the type's `maxPayload`
///     12     4    reserved  zero
///
/// The header is checked (magic, version, type, the length against that type's limit,
/// reserved) before any payload byte is looked at or any buffer is sized from it, so a
/// peer can never make the daemon hold more than one frame's limit.
///
/// The link runs inside TLS with a pre-shared key, which authenticates and encrypts every
/// byte. Frames that carry blocks (the next protocol step) add a crc32c per block, computed
/// where the block is read at the source and checked before it is written at the
/// destination: TLS does not cover memory and disks at either end.
///
/// Negotiation: the side that connected sends `hello` (its domain, the versions it
/// speaks); the side that accepted answers `welcome` (its domain and the version chosen:
/// the highest both speak) or `refuse` (a code and a reason) and closes. Every later
/// frame is written in the chosen version. `ping`/`pong` keep an idle link measured.
///
/// Then the connecting side drives: `request` (an id and a JSON body: the async mirror's
/// control operations, `AsyncRequest`) answered by `response` (the same id, ok or not, a
/// JSON body), and `blocks` (an id, where the blocks go, a crc32c per 4 KiB block of the
/// uncompressed data, the data, optionally igzip-compressed), each answered by a
/// `response` once the blocks are durable at the destination: the sender keeps at most
/// the link profile's `bytes_in_flight` unanswered.
public enum ReplicationFrame {
    public static let magic: UInt32 = 0x5356_5250 // "SVRP"
    public static let headerBytes = 16
    /// The versions this build speaks.
    public static let versions: ClosedRange<UInt16> = 1...1

    public enum Kind: UInt16, CaseIterable, Sendable {
        case hello = 1
        case welcome = 2
        case refuse = 3
        case ping = 4
        case pong = 5
        case request = 6
        case response = 7
        case blocks = 8

        /// The largest payload a frame of this kind may carry.
        public var maxPayload: Int {
            switch self {
            case .hello: 2 + 2 + 16 + 1 + ReplicationFrame.maxNameBytes
            case .welcome: 2 + 16 + 1 + ReplicationFrame.maxNameBytes
            case .refuse: 2 + 2 + ReplicationFrame.maxReasonBytes
            case .ping, .pong: 8
            case .request: 8 + ReplicationFrame.maxJSONBytes
            case .response: 8 + 1 + ReplicationFrame.maxJSONBytes
            case .blocks: BlockHeader.fixedBytes + 4 * BlockHeader.maxBlocks + BlockHeader.maxDataBytes
            }
        }

        /// The smallest payload a frame of this kind may carry.
        var minPayload: Int {
            switch self {
            case .hello: 2 + 2 + 16 + 1 + 1
            case .welcome: 2 + 16 + 1 + 1
            case .refuse: 2 + 2
            case .ping, .pong: 8
            case .request: 8
            case .response: 9
            case .blocks: BlockHeader.fixedBytes + 4
            }
        }
    }

    static let maxNameBytes = 64
    static let maxJSONBytes = 64 << 10
    static let maxReasonBytes = 1024

    /// Why a frame is refused: one line, naming the field.
    public struct Malformed: Error, Equatable, CustomStringConvertible {
        public let reason: String
        init(_ reason: String) { self.reason = reason }
        public var description: String { reason }
    }

    public enum Decoded: Equatable {
        /// A whole frame: the message and how many bytes it took.
        case frame(ReplicationMessage, bytes: Int)
        /// Not enough bytes yet: at least this many are needed in all.
        case needMore(Int)
    }

    /// Decodes the frame at the start of `bytes`. `version`: the negotiated version every
    /// frame must carry, or nil before negotiation (then only version 1 is accepted).
    public static func decode(_ bytes: UnsafeRawBufferPointer, version: UInt16? = nil) throws(Malformed) -> Decoded {
        guard bytes.count >= headerBytes else { return .needMore(headerBytes) }
        var header = WireReader(bytes)
        let m = try header.u32("magic"), v = try header.u16("version"), t = try header.u16("type")
        let length = try header.u32("length"), reserved = try header.u32("reserved")
        guard m == magic else { throw Malformed("bad magic 0x\(String(m, radix: 16)) (not a replication frame)") }
        guard v == (version ?? 1) else {
            throw Malformed(version == nil ? "frame version \(v) before negotiation (expected 1)" : "frame version \(v), negotiated \(version!)")
        }
        guard let kind = Kind(rawValue: t) else { throw Malformed("unknown frame type \(t)") }
        guard reserved == 0 else { throw Malformed("\(kind) frame: reserved field is \(reserved), not 0") }
        guard Int(length) <= kind.maxPayload else { throw Malformed("\(kind) frame: length \(length) over its limit \(kind.maxPayload)") }
        guard Int(length) >= kind.minPayload else { throw Malformed("\(kind) frame: length \(length) under its minimum \(kind.minPayload)") }
        let total = headerBytes + Int(length)
        guard bytes.count >= total else { return .needMore(total) }
        var r = WireReader(UnsafeRawBufferPointer(rebasing: bytes[headerBytes..<total]))
        let message = try ReplicationMessage.decode(kind, &r)
        guard r.remaining == 0 else { throw Malformed("\(kind) frame: \(r.remaining) byte(s) after its fields") }
        return .frame(message, bytes: total)
    }

    /// The bytes of one frame carrying `message`, written in `version`.
    public static func encode(_ message: ReplicationMessage, version: UInt16 = 1) -> [UInt8] {
        var payload = WireWriter()
        message.encodePayload(&payload)
        var w = WireWriter()
        w.u32(magic)
        w.u16(version)
        w.u16(message.kind.rawValue)
        w.u32(UInt32(payload.bytes.count))
        w.u32(0)
        return w.bytes + payload.bytes
    }
}

/// The messages of the protocol (see `ReplicationFrame` for the wire layout).
public enum ReplicationMessage: Equatable, Sendable {
    /// The connecting side: who it is and which versions it speaks.
    case hello(versions: ClosedRange<UInt16>, domainId: UUID, domainName: String)
    /// The accepting side: who it is and the version both will use.
    case welcome(version: UInt16, domainId: UUID, domainName: String)
    /// The accepting side will not go on; the connection closes after it.
    case refuse(code: RefusalCode, reason: String)
    case ping(nonce: UInt64)
    case pong(nonce: UInt64)
    /// A control operation (JSON body); answered by `response` with the same id.
    case request(id: UInt64, body: [UInt8])
    case response(id: UInt64, ok: Bool, body: [UInt8])
    /// Blocks for the destination: answered by `response` with the same id once durable.
    case blocks(BlockHeader, crcs: [UInt32], data: [UInt8])

    public enum RefusalCode: UInt16, Sendable {
        case noCommonVersion = 1
        case unknownPeer = 2
        case wrongDomain = 3
        case malformed = 4
        case shuttingDown = 5
        case other = 6
    }

    var kind: ReplicationFrame.Kind {
        switch self {
        case .hello: .hello
        case .welcome: .welcome
        case .refuse: .refuse
        case .ping: .ping
        case .pong: .pong
        case .request: .request
        case .response: .response
        case .blocks: .blocks
        }
    }

    fileprivate static func decode(_ kind: ReplicationFrame.Kind, _ r: inout WireReader) throws(ReplicationFrame.Malformed) -> ReplicationMessage {
        switch kind {
        case .hello:
            let low = try r.u16("lowest version"), high = try r.u16("highest version")
            guard low >= 1, low <= high else { throw .init("hello: versions \(low)...\(high) are not a range of versions") }
            let id = try r.uuid("domain id")
            return .hello(versions: low...high, domainId: id, domainName: try r.name("domain name"))
        case .welcome:
            let v = try r.u16("version")
            guard v >= 1 else { throw .init("welcome: version 0") }
            let id = try r.uuid("domain id")
            return .welcome(version: v, domainId: id, domainName: try r.name("domain name"))
        case .refuse:
            let raw = try r.u16("refusal code")
            let n = Int(try r.u16("reason length"))
            guard n <= ReplicationFrame.maxReasonBytes else { throw .init("refuse: reason of \(n) bytes over \(ReplicationFrame.maxReasonBytes)") }
            let reason = try r.utf8(n, "reason")
            return .refuse(code: RefusalCode(rawValue: raw) ?? .other, reason: reason)
        case .ping: return .ping(nonce: try r.u64("nonce"))
        case .pong: return .pong(nonce: try r.u64("nonce"))
        case .request:
            let id = try r.u64("request id")
            return .request(id: id, body: try r.rest("request body", max: ReplicationFrame.maxJSONBytes))
        case .response:
            let id = try r.u64("response id")
            let ok = try r.u8("response status")
            guard ok <= 1 else { throw .init("response: status \(ok) is neither 0 nor 1") }
            return .response(id: id, ok: ok == 1, body: try r.rest("response body", max: ReplicationFrame.maxJSONBytes))
        case .blocks:
            let h = try BlockHeader.decode(&r)
            var crcs: [UInt32] = []
            crcs.reserveCapacity(Int(h.count))
            for _ in 0..<h.count { crcs.append(try r.u32("block crc32c")) }
            let n = Int(try r.u32("data length"))
            let most = h.compressed ? BlockHeader.maxDataBytes : Int(h.count) * Int(h.blockBytes)
            guard n <= most else { throw .init("blocks: data length \(n) over \(most) for \(h.count) block(s)") }
            guard h.compressed || n == Int(h.count) * Int(h.blockBytes) else {
                throw .init("blocks: \(n) bytes of data for \(h.count) uncompressed block(s) of \(h.blockBytes)")
            }
            return .blocks(h, crcs: crcs, data: Array(try r.bytes(n, "block data")))
        }
    }

    fileprivate func encodePayload(_ w: inout WireWriter) {
        switch self {
        case .hello(let versions, let id, let name):
            w.u16(versions.lowerBound)
            w.u16(versions.upperBound)
            w.uuid(id)
            w.name(name)
        case .welcome(let version, let id, let name):
            w.u16(version)
            w.uuid(id)
            w.name(name)
        case .refuse(let code, let reason):
            let text = Array(reason.utf8.prefix(ReplicationFrame.maxReasonBytes))
            w.u16(code.rawValue)
            w.u16(UInt16(text.count))
            w.bytes += text
        case .ping(let nonce), .pong(let nonce):
            w.u64(nonce)
        case .request(let id, let body):
            w.u64(id)
            w.bytes += body.prefix(ReplicationFrame.maxJSONBytes)
        case .response(let id, let ok, let body):
            w.u64(id)
            w.bytes.append(ok ? 1 : 0)
            w.bytes += body.prefix(ReplicationFrame.maxJSONBytes)
        case .blocks(let h, let crcs, let data):
            h.encode(&w)
            for c in crcs { w.u32(c) }
            w.u32(UInt32(data.count))
            w.bytes += data
        }
    }
}

/// Where a `blocks` frame's data goes: a member vdisk of an async group, at a block
/// offset, in one cycle. The crc32c of each uncompressed block follows it on the wire.
public struct BlockHeader: Equatable, Sendable {
    public var id: UInt64
    public var cycle: UInt64
    /// The vdisk's index among the group's members.
    public var member: UInt16
    public var compressed: Bool
    /// Byte offset in the vdisk (a multiple of `blockBytes`).
    public var offset: UInt64
    public var count: UInt32
    public var blockBytes: UInt32

    public static let fixedBytes = 8 + 8 + 2 + 2 + 8 + 4 + 4 + 4 // ... and the data length after the crcs
    public static let maxBlocks = 256
    /// 1 MiB of blocks; compressed data may be a little larger than its input (igzip's bound).
    public static let maxDataBytes = (1 << 20) + (64 << 10)

    public init(id: UInt64, cycle: UInt64, member: UInt16, compressed: Bool, offset: UInt64, count: UInt32, blockBytes: UInt32 = 4096) {
        self.id = id
        self.cycle = cycle
        self.member = member
        self.compressed = compressed
        self.offset = offset
        self.count = count
        self.blockBytes = blockBytes
    }

    fileprivate static func decode(_ r: inout WireReader) throws(ReplicationFrame.Malformed) -> BlockHeader {
        let id = try r.u64("blocks id"), cycle = try r.u64("cycle"), member = try r.u16("member")
        let flags = try r.u16("flags"), offset = try r.u64("offset"), count = try r.u32("block count"), size = try r.u32("block size")
        guard flags & ~1 == 0 else { throw .init("blocks: unknown flags 0x\(String(flags, radix: 16))") }
        guard size == 4096 else { throw .init("blocks: block size \(size), expected 4096") }
        guard (1...UInt32(maxBlocks)).contains(count) else { throw .init("blocks: \(count) blocks (1...\(maxBlocks))") }
        guard offset % UInt64(size) == 0 else { throw .init("blocks: offset \(offset) is not a multiple of \(size)") }
        guard offset <= UInt64.max - UInt64(count) * UInt64(size) else { throw .init("blocks: offset \(offset) overflows") }
        return BlockHeader(id: id, cycle: cycle, member: member, compressed: flags & 1 == 1, offset: offset, count: count, blockBytes: size)
    }

    fileprivate func encode(_ w: inout WireWriter) {
        w.u64(id)
        w.u64(cycle)
        w.u16(member)
        w.u16(compressed ? 1 : 0)
        w.u64(offset)
        w.u32(count)
        w.u32(blockBytes)
    }
}

/// Reads big-endian fields off a buffer; running short names the field.
struct WireReader {
    private let bytes: UnsafeRawBufferPointer
    private var at = 0
    init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }
    var remaining: Int { bytes.count - at }

    private mutating func take(_ n: Int, _ field: String) throws(ReplicationFrame.Malformed) -> UnsafeRawBufferPointer {
        guard remaining >= n else { throw .init("truncated: \(field) needs \(n) byte(s), \(remaining) left") }
        defer { at += n }
        return UnsafeRawBufferPointer(rebasing: bytes[at..<(at + n)])
    }

    private mutating func integer<T: FixedWidthInteger>(_: T.Type, _ field: String) throws(ReplicationFrame.Malformed) -> T {
        let raw = try take(MemoryLayout<T>.size, field)
        return raw.reduce(T(0)) { $0 << 8 | T($1) }
    }

    mutating func u8(_ field: String) throws(ReplicationFrame.Malformed) -> UInt8 { try take(1, field)[0] }
    mutating func u16(_ field: String) throws(ReplicationFrame.Malformed) -> UInt16 { try integer(UInt16.self, field) }
    mutating func u32(_ field: String) throws(ReplicationFrame.Malformed) -> UInt32 { try integer(UInt32.self, field) }
    mutating func u64(_ field: String) throws(ReplicationFrame.Malformed) -> UInt64 { try integer(UInt64.self, field) }

    mutating func uuid(_ field: String) throws(ReplicationFrame.Malformed) -> UUID {
        let raw = try take(16, field)
        var u: uuid_t = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        withUnsafeMutableBytes(of: &u) { $0.copyMemory(from: raw) }
        return UUID(uuid: u)
    }

    mutating func bytes(_ n: Int, _ field: String) throws(ReplicationFrame.Malformed) -> UnsafeRawBufferPointer { try take(n, field) }

    /// Whatever is left (at most `max` bytes).
    mutating func rest(_ field: String, max: Int) throws(ReplicationFrame.Malformed) -> [UInt8] {
        guard remaining <= max else { throw .init("\(field) of \(remaining) bytes over \(max)") }
        return Array(try take(remaining, field))
    }

    mutating func utf8(_ n: Int, _ field: String) throws(ReplicationFrame.Malformed) -> String {
        let raw = try take(n, field)
        guard let s = String(validating: raw, as: UTF8.self) else { throw .init("\(field) is not UTF-8") }
        return s
    }

    /// A length-prefixed (one byte) name: letters, digits, - _ . (1...64).
    mutating func name(_ field: String) throws(ReplicationFrame.Malformed) -> String {
        let n = Int(try take(1, field + " length")[0])
        guard n >= 1, n <= ReplicationFrame.maxNameBytes else { throw .init("\(field) of \(n) bytes (1...\(ReplicationFrame.maxNameBytes))") }
        let s = try utf8(n, field)
        guard Parse.name(s) != nil else { throw .init("\(field) '\(s.prefix(64))' has characters other than letters, digits, - _ .") }
        return s
    }
}

/// Writes big-endian fields.
struct WireWriter {
    var bytes: [UInt8] = []
    private mutating func integer<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v.bigEndian) { bytes += $0 }
    }
    mutating func u16(_ v: UInt16) { integer(v) }
    mutating func u32(_ v: UInt32) { integer(v) }
    mutating func u64(_ v: UInt64) { integer(v) }
    mutating func uuid(_ id: UUID) { withUnsafeBytes(of: id.uuid) { bytes += $0 } }
    mutating func name(_ s: String) {
        let raw = Array(s.utf8.prefix(ReplicationFrame.maxNameBytes))
        bytes.append(UInt8(raw.count))
        bytes += raw
    }
}
