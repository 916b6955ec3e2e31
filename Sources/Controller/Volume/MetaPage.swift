import IOEngine

/// One 4 KiB page of a pool's metadata area: a 32-byte header and 508 little-endian
/// 64-bit slots. The header names the page (so a write that landed at the wrong place
/// is caught), the journal sequence that last wrote it, and a crc32c of the whole page.
///
///     0  magic "SVPG"   4  kind   8  page number   16  sequence   24  crc32c   28  reserved
public struct MetaPage: Equatable, Sendable {
    public static let bytes = 4096
    static let headerBytes = 32
    /// Slots per page: the fan-out of every tree.
    public static let slotCount = (bytes - headerBytes) / 8
    static let magic: UInt32 = 0x4750_5653 // "SVPG"

    public enum Kind: UInt32, Sendable {
        case superblock = 1, journalHeader = 2, rootTable = 3, treeNode = 4
    }

    public var kind: Kind
    public var number: UInt32
    public var sequence: UInt64
    public var slots: [UInt64]

    public init(kind: Kind, number: UInt32, sequence: UInt64 = 0, slots: [UInt64]? = nil) {
        self.kind = kind
        self.number = number
        self.sequence = sequence
        self.slots = slots ?? Array(repeating: 0, count: Self.slotCount)
    }

    /// Writes the page, crc included, into `out` (4096 bytes).
    public func encode(into out: UnsafeMutableRawPointer) {
        out.initializeMemory(as: UInt8.self, repeating: 0, count: Self.bytes)
        out.storeBytes(of: Self.magic.littleEndian, toByteOffset: 0, as: UInt32.self)
        out.storeBytes(of: kind.rawValue.littleEndian, toByteOffset: 4, as: UInt32.self)
        out.storeBytes(of: UInt64(number).littleEndian, toByteOffset: 8, as: UInt64.self)
        out.storeBytes(of: sequence.littleEndian, toByteOffset: 16, as: UInt64.self)
        for (i, s) in slots.enumerated() {
            out.storeBytes(of: s.littleEndian, toByteOffset: Self.headerBytes + i * 8, as: UInt64.self)
        }
        let crc = Checksum.crc32c(UnsafeRawBufferPointer(start: out, count: Self.bytes))
        out.storeBytes(of: crc.littleEndian, toByteOffset: 24, as: UInt32.self)
    }

    /// Why a page read back is not usable.
    public enum Problem: Error, Equatable, CustomStringConvertible {
        case blank, badMagic, badChecksum, misplaced(found: UInt32), wrongKind(found: UInt32)
        public var description: String {
            switch self {
            case .blank: "never written"
            case .badMagic: "not a metadata page"
            case .badChecksum: "checksum mismatch"
            case .misplaced(let found): "holds page \(found) (written to the wrong place)"
            case .wrongKind(let found): "is of kind \(found)"
            }
        }
    }

    /// Reads a page back, checking magic, crc, its number and (when given) its kind.
    public static func decode(_ raw: UnsafeRawPointer, number: UInt32, kind: Kind?) -> Result<MetaPage, Problem> {
        let magic = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        if magic != Self.magic {
            let blank = UnsafeRawBufferPointer(start: raw, count: bytes).allSatisfy { $0 == 0 }
            return .failure(blank ? .blank : .badMagic)
        }
        let stored = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 24, as: UInt32.self))
        var crc = Checksum.crc32c(UnsafeRawBufferPointer(start: raw, count: 24))
        let zero: UInt32 = 0 // the crc field counts as zero
        crc = withUnsafeBytes(of: zero) { Checksum.crc32c($0, seed: crc) }
        crc = Checksum.crc32c(UnsafeRawBufferPointer(start: raw + 28, count: bytes - 28), seed: crc)
        guard crc == stored else { return .failure(.badChecksum) }
        let found = UInt32(truncatingIfNeeded: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
        guard found == number else { return .failure(.misplaced(found: found)) }
        let rawKind = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        guard let k = Kind(rawValue: rawKind), kind == nil || kind == k else { return .failure(.wrongKind(found: rawKind)) }
        let sequence = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        var slots = [UInt64](repeating: 0, count: slotCount)
        for i in 0..<slotCount {
            slots[i] = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: headerBytes + i * 8, as: UInt64.self))
        }
        return .success(MetaPage(kind: k, number: number, sequence: sequence, slots: slots))
    }
}
