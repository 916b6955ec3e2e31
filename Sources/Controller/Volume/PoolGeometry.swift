import Foundation

/// How a pool's chunks lie on its LUNs. A chunk is one extent of the pool profile's
/// extent size; chunks are numbered across the pool: LUN by LUN for concatenated pools,
/// round-robin over the LUNs for striped ones (as far as the smallest LUN goes, then
/// LUN by LUN for what the larger ones have left). Every translation from a pool chunk
/// to a LUN offset goes through here.
struct PoolGeometry: Sendable {
    let chunkBytes: UInt64
    let dataStart: [UInt64]
    let extentCounts: [Int]
    let stripe: Bool
    /// Chunks in the interleaved part (stripe) or 0; then the LUNs' remaining extents in order.
    private let interleaved: UInt64
    private let tailStarts: [UInt64]

    init(_ pool: PoolRecord) {
        chunkBytes = pool.extentBytes
        dataStart = pool.luns.map(\.dataStartBytes)
        extentCounts = pool.luns.map(\.extentCount)
        stripe = pool.stripe && pool.luns.count > 1
        let shared = stripe ? UInt64(extentCounts.min() ?? 0) : 0
        interleaved = shared * UInt64(extentCounts.count)
        var starts: [UInt64] = []
        var at = interleaved
        for n in extentCounts {
            starts.append(at)
            at += UInt64(n) - shared
        }
        tailStarts = starts
    }

    var chunkCount: UInt64 { UInt64(extentCounts.reduce(0, +)) }
    private var shared: UInt64 { stripe ? interleaved / UInt64(extentCounts.count) : 0 }

    /// The LUN and extent of pool chunk `chunk`.
    func locate(_ chunk: UInt64) -> ExtentRef {
        if chunk < interleaved {
            let n = UInt64(extentCounts.count)
            return ExtentRef(lun: Int(chunk % n), extent: Int(chunk / n))
        }
        let lun = tailStarts.lastIndex { $0 <= chunk }!
        return ExtentRef(lun: lun, extent: Int(shared + chunk - tailStarts[lun]))
    }

    /// The pool chunk at a LUN's extent.
    func chunk(of ref: ExtentRef) -> UInt64 {
        if UInt64(ref.extent) < shared { return UInt64(ref.extent) * UInt64(extentCounts.count) + UInt64(ref.lun) }
        return tailStarts[ref.lun] + UInt64(ref.extent) - shared
    }

    /// The byte offset of pool chunk `chunk` on its LUN.
    func lunOffset(_ chunk: UInt64) -> (lun: Int, offset: UInt64) {
        let ref = locate(chunk)
        return (ref.lun, dataStart[ref.lun] + UInt64(ref.extent) * chunkBytes)
    }

    /// How many chunks from `chunk` (at most `limit`) lie back to back on one LUN.
    func contiguous(from chunk: UInt64, limit: UInt64) -> UInt64 {
        if chunk < interleaved { return 1 }
        let lun = tailStarts.lastIndex { $0 <= chunk }!
        let end = lun + 1 < tailStarts.count ? tailStarts[lun + 1] : chunkCount
        return min(limit, end - chunk)
    }
}

/// Where one leg's data is: its block map in its pool's metadata, laid on the pool's LUNs.
struct LegRoute: Sendable {
    let map: UUID
    let meta: PoolMetadata
    let geometry: PoolGeometry

    /// The piece of vdisk bytes [at, at+length) that lies in one place: on a LUN (index and
    /// byte offset) or unmapped (nil: reads as zeros), and its length.
    func piece(at: UInt64, length: Int) throws(TreeError) -> (place: (lun: Int, offset: UInt64)?, length: Int) {
        let cb = geometry.chunkBytes
        let chunk = at / cb, within = at % cb
        let wanted = (within + UInt64(length) + cb - 1) / cb
        let (poolChunk, run) = try meta.lookup(map: map, chunk: chunk, limit: wanted)
        guard let poolChunk else { return (nil, Int(min(UInt64(length), run * cb - within))) }
        // A map entry past the pool (a damaged map that passed its checksums) must not
        // send I/O elsewhere on a LUN.
        guard poolChunk < geometry.chunkCount, run <= geometry.chunkCount - poolChunk else {
            throw TreeError(page: nil, why: "block map \(map) maps extent \(chunk) to pool extent \(poolChunk), outside the pool")
        }
        let together = geometry.contiguous(from: poolChunk, limit: run)
        let place = geometry.lunOffset(poolChunk)
        return ((place.lun, place.offset + within), Int(min(UInt64(length), together * cb - within)))
    }
}
