import Foundation
import IOEngine

/// The buffers of one chunk of a mirror walk: the source's bytes, a target's, their block CRCs.
/// A walk keeps `MirrorService.copyWidth` of them and hands each to one chunk at a time.
final class CopySlot: @unchecked Sendable {
    let src: AlignedBuffer
    let dst: AlignedBuffer
    var srcCRC: [UInt32]
    var dstCRC: [UInt32]

    init?(chunkBytes: Int, compareBlock: Int) {
        guard let s = try? AlignedBuffer(count: chunkBytes), let d = try? AlignedBuffer(count: chunkBytes) else { return nil }
        src = s
        dst = d
        srcCRC = [UInt32](repeating: 0, count: chunkBytes / compareBlock)
        dstCRC = srcCRC
    }
}

/// What one chunk (or a whole walk) compared and copied, in blocks of `MirrorService.compareBlock`.
struct ChunkOutcome: Sendable {
    var compared: UInt64 = 0
    var mismatched: UInt64 = 0
    var copied: UInt64 = 0
    var error: DomainError?

    mutating func add(_ other: ChunkOutcome) {
        compared += other.compared
        mismatched += other.mismatched
        copied += other.copied
    }
}

/// Compares one chunk of the source leg with each target leg and, with `repair`, copies the
/// blocks that differ (host writes to the chunk held meanwhile, so none is overwritten by
/// older data). Copy writes go without FUA: the walk flushes before it reports regions done.
struct ChunkJob: Sendable {
    let domain: Domain
    let port: VDiskPort
    let vdisk: String
    let source: UUID
    let targets: [UUID]
    let repair: Bool
    /// The targets read as zeros where nothing was written to them (a new leg): they are
    /// not read; a block differs when the source's is not all zeros.
    let targetsHoldNothing: Bool

    func run(_ range: Range<UInt64>, _ slot: CopySlot) async -> ChunkOutcome {
        var outcome = ChunkOutcome()
        let n = range.count, block = MirrorService.compareBlock
        let blocks = (n + block - 1) / block
        if repair { await port.closeGate(range) }
        defer { if repair { port.openGate(range) } }
        do throws(DomainError) {
            try await domain.legIO(.read, vdisk: vdisk, leg: source, offset: range.lowerBound, length: n, buffer: slot.src.pointer)
            if !targetsHoldNothing { fillCRCs(slot.src.pointer, n, &slot.srcCRC) }
            for target in targets {
                if !targetsHoldNothing {
                    try await domain.legIO(.read, vdisk: vdisk, leg: target, offset: range.lowerBound, length: n, buffer: slot.dst.pointer)
                    fillCRCs(slot.dst.pointer, n, &slot.dstCRC)
                }
                outcome.compared += UInt64(blocks)
                var b = 0
                while b < blocks {
                    guard differs(b, n, slot) else { b += 1; continue }
                    var e = b
                    while e < blocks && differs(e, n, slot) { e += 1 }
                    outcome.mismatched += UInt64(e - b)
                    if repair {
                        let at = b * block, length = min(e * block, n) - at
                        try await domain.legIO(.write, vdisk: vdisk, leg: target, offset: range.lowerBound + UInt64(at), length: length,
                                               buffer: slot.src.pointer + at, fua: false)
                        outcome.copied += UInt64(e - b)
                    }
                    b = e
                }
            }
        } catch {
            outcome.error = error
        }
        return outcome
    }

    /// Block `b` of the source differs from the target's: by CRC, or (a target holding
    /// nothing) by not being zeros, compared byte for byte so no CRC collision hides data.
    private func differs(_ b: Int, _ n: Int, _ slot: CopySlot) -> Bool {
        let block = MirrorService.compareBlock
        guard targetsHoldNothing else { return slot.srcCRC[b] != slot.dstCRC[b] }
        let length = min(block, n - b * block)
        return memcmp(slot.src.pointer + b * block, SharedZeros.pointer, length) != 0
    }

    private func fillCRCs(_ p: UnsafeMutableRawPointer, _ n: Int, _ out: inout [UInt32]) {
        let block = MirrorService.compareBlock
        var b = 0
        while b * block < n {
            let length = min(block, n - b * block)
            out[b] = Checksum.crc32c(UnsafeRawBufferPointer(start: p + b * block, count: length))
            b += 1
        }
    }
}
