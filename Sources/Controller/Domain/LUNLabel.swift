import Foundation
import IOEngine

/// The 4 KiB label at the start of every LUN svsp uses:
/// magic "SVSPLUN1", version, domain id, pool id, LUN index, LUN count, size, crc32c of the rest.
public struct LUNLabel: Equatable, Sendable {
    public static let bytes = 4096
    public static let version: UInt32 = 1

    public var domainId: UUID
    public var poolId: UUID
    public var lunIndex: UInt32
    public var lunCount: UInt32
    public var sizeBytes: UInt64

    public init(domainId: UUID, poolId: UUID, lunIndex: UInt32, lunCount: UInt32, sizeBytes: UInt64) {
        self.domainId = domainId
        self.poolId = poolId
        self.lunIndex = lunIndex
        self.lunCount = lunCount
        self.sizeBytes = sizeBytes
    }

    /// Writes the label into `out` (at least 4096 bytes, zero-filled first).
    public func encode(into out: UnsafeMutableRawBufferPointer) {
        precondition(out.count >= Self.bytes)
        memset(out.baseAddress!, 0, Self.bytes)
        var o = 0
        func put(_ bytes: [UInt8]) { for b in bytes { out[o] = b; o += 1 } }
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { put(Array($0)) } }
        put(DeviceSignatures.svspLabelMagic)
        put(Self.version)
        withUnsafeBytes(of: domainId.uuid) { put(Array($0)) }
        withUnsafeBytes(of: poolId.uuid) { put(Array($0)) }
        put(lunIndex)
        put(lunCount)
        put(sizeBytes)
        let crc = Checksum.crc32c(UnsafeRawBufferPointer(rebasing: out[0..<(Self.bytes - 4)]))
        o = Self.bytes - 4
        put(crc)
    }

    public enum DecodeResult: Equatable, Sendable {
        case label(LUNLabel)
        case none
        case damaged(String)
    }

    /// Reads a label from the first 4096 bytes of a LUN.
    public static func decode(_ bytes: UnsafeRawBufferPointer) -> DecodeResult {
        guard bytes.count >= Self.bytes else { return .none }
        guard Array(bytes[0..<8]) == DeviceSignatures.svspLabelMagic else { return .none }
        let stored = bytes.loadUnaligned(fromByteOffset: Self.bytes - 4, as: UInt32.self).littleEndian
        let crc = Checksum.crc32c(UnsafeRawBufferPointer(rebasing: bytes[0..<(Self.bytes - 4)]))
        guard stored == crc else { return .damaged("label checksum mismatch") }
        let version = bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian
        guard version == Self.version else { return .damaged("label version \(version) unknown") }
        func uuid(at o: Int) -> UUID {
            var u = UUID().uuid
            withUnsafeMutableBytes(of: &u) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[o..<(o + 16)])) }
            return UUID(uuid: u)
        }
        return .label(LUNLabel(
            domainId: uuid(at: 12), poolId: uuid(at: 28),
            lunIndex: bytes.loadUnaligned(fromByteOffset: 44, as: UInt32.self).littleEndian,
            lunCount: bytes.loadUnaligned(fromByteOffset: 48, as: UInt32.self).littleEndian,
            sizeBytes: bytes.loadUnaligned(fromByteOffset: 52, as: UInt64.self).littleEndian))
    }
}
