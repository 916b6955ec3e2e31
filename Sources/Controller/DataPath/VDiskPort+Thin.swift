import Foundation
import IOEngine

/// Thin provisioning in a vdisk's data path: a write into a chunk no leg has mapped yet
/// commits the mapping first (every leg, one group commit), a trim that covers whole
/// mapped chunks releases them instead of writing zeroes. Both keep the request's range
/// meanwhile, so no trim can release what a write maps and no write lands in a chunk
/// being released.
extension VDiskPort {
    /// Slow path, once per thin extent: commit the allocation on every leg, then go on
    /// (the request keeps its range meanwhile, so no trim can release what it maps).
    func allocateThenProceed(_ index: Int) {
        let (offset, length) = lock.withLock { (slots[index].offset, slots[index].length) }
        Task {
            do throws(DomainError) {
                try await domain.allocateExtents(vdisk: vdiskName, offset: offset, length: length)
            } catch {
                self.pieceDone(index, leg: -1, lun: -1, result: -Int64(error.code))
                return
            }
            self.dispatch(index)
        }
    }

    /// A trim of a thin vdisk that covers whole allocated extents releases them instead of
    /// writing zeroes: it holds its range as a trim (nothing else touches it meanwhile),
    /// commits the release, then zeroes only the partly covered extents at its ends.
    func deallocate(_ index: Int, _ r: Request) {
        Task {
            do throws(DomainError) {
                try await self.domain.deallocateExtents(vdisk: self.vdiskName, offset: r.offset, length: r.length)
            } catch { // nothing released: answer the error (zero-filling GiBs in one go is no fallback)
                self.pieceDone(index, leg: -1, lun: -1, result: -Int64(error.code))
                return
            }
            self.dispatch(index) // the released extents are skipped; partly covered ones are zeroed
        }
    }

    /// Whether some leg maps a whole chunk inside the range (a trim can release it). Caller holds the lock.
    func coversAllocatedExtent(offset: UInt64, length: Int) -> Bool {
        let end = offset + UInt64(length)
        return mapping.legs.contains { leg in
            let first = (offset + leg.extentBytes - 1) / leg.extentBytes * leg.extentBytes, last = end / leg.extentBytes * leg.extentBytes
            return first < last && anyPiece(of: leg, first, Int(last - first)) { $0 != nil }
        }
    }

    /// Whether a leg the write goes to (not failed) has a chunk of the range unmapped (the
    /// write allocates first). Caller holds the lock.
    func touchesUnallocated(offset: UInt64, length: Int) -> Bool {
        mapping.legs.contains { $0.state != .failed && anyPiece(of: $0, offset, length) { $0 == nil } }
    }

    /// Whether a piece of the leg's range satisfies `test` (a map that cannot be read counts as mapped:
    /// the dispatch then fails the leg's I/O with the reason).
    func anyPiece(of leg: LegMap, _ offset: UInt64, _ length: Int, _ test: ((lun: Int, offset: UInt64)?) -> Bool) -> Bool {
        guard let route = leg.route else { return false }
        var done = 0
        while done < length {
            guard let (place, n) = try? route.piece(at: offset + UInt64(done), length: length - done) else { return false }
            if test(place) { return true }
            done += n
        }
        return false
    }
}
