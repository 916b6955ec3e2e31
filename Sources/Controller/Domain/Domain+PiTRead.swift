import Foundation
import IOEngine

/// Reading a PiT's image directly (not through a snapshot): for checks, and for what
/// the async mirror ships. Buffers must be aligned to 4096.
extension Domain {
    /// Reads [offset, offset+length) of PiT `name` as it was at its instant, through the
    /// map of leg `leg` (default: the first leg in sync at the instant).
    public func readPiT(named name: String, leg: UUID? = nil, offset: UInt64, length: Int,
                        into buffer: UnsafeMutableRawPointer) async throws(DomainError)
    {
        let m = metadata
        guard let pit = m.pit(named: name) else { throw DomainError("PiT '\(name)' not found") }
        guard offset <= pit.sizeBytes, UInt64(length) <= pit.sizeBytes - offset else {
            throw DomainError("PiT '\(name)': range \(offset)+\(length) lies beyond its size \(pit.sizeBytes)", code: ERANGE)
        }
        guard let map = leg.map({ pit.map(ofLeg: $0) }) ?? pit.maps.first(where: \.complete) else {
            throw DomainError("PiT '\(name)' holds no in-sync copy" + (leg.map { " of leg \($0)" } ?? ""))
        }
        guard let pool = m.pool(id: map.poolId), let meta = poolMeta(pool.id), let runtime = runtime(of: pool.id) else {
            throw DomainError("PiT '\(name)': its pool is not available")
        }
        let route = LegRoute(map: map.mapId, meta: meta, geometry: PoolGeometry(pool))
        var done = 0
        while done < length {
            let place: (lun: Int, offset: UInt64)?, piece: Int
            do { (place, piece) = try route.piece(at: offset + UInt64(done), length: length - done) } catch {
                throw DomainError("PiT '\(name)': block map: \(error)")
            }
            if let place {
                guard let lun = runtime.luns[place.lun]?.handle else { throw DomainError("PiT '\(name)': LUN \(place.lun) of pool '\(pool.name)' is missing") }
                do { _ = try await engine.read(lun: lun, into: buffer + done, length: piece, offset: place.offset) } catch {
                    throw DomainError("PiT '\(name)': \(error)")
                }
            } else {
                memset(buffer + done, 0, piece)
            }
            done += piece
        }
    }
}

/// `pit diff`: what changed between two PiTs of a vdisk, or a PiT and the live vdisk.
extension Domain {
    public struct PiTDifference: Codable, Sendable {
        public var vdisk: String
        public var from: String
        /// The later PiT, or nil for the live vdisk.
        public var to: String?
        /// The granularity: the maps know extents (a write anywhere in one marks it whole).
        public var extentBytes: UInt64
        public var ranges: [ByteRange]
        public var changedBytes: UInt64
        /// Metadata pages read to find them (the cost, proportional to what changed).
        public var pagesRead: Int
    }

    public struct ByteRange: Codable, Sendable, Equatable {
        public var offset: UInt64
        public var length: UInt64
    }

    /// The byte ranges where PiT `from` and PiT `to` (or, without `to`, the live vdisk)
    /// differ, found by walking both maps of one leg together and skipping what they still
    /// share. The async mirror ships these; `pit diff` prints them.
    public func differences(from: String, to: String?) throws(DomainError) -> PiTDifference {
        let m = metadata
        guard let old = m.pit(named: from) else { throw DomainError("PiT '\(from)' not found") }
        guard let v = m.vdisks.first(where: { $0.id == old.vdiskId }) else { throw DomainError("PiT '\(from)': its vdisk is gone") }
        let new = try to.map { (name: String) throws(DomainError) -> PiTRecord in
            guard let p = m.pit(named: name) else { throw DomainError("PiT '\(name)' not found") }
            guard p.vdiskId == old.vdiskId else { throw DomainError("PiTs '\(from)' and '\(name)' are of different vdisks") }
            return p
        }
        // A leg both sides hold in sync (the live side: a leg in sync now).
        let pair = old.maps.filter(\.complete).lazy.compactMap { (map: PiTMap) -> (PiTMap, UUID)? in
            if let new { return new.map(ofLeg: map.legId).map { (map, $0.mapId) } }
            return v.legs.first { $0.id == map.legId && $0.state == .inSync }.map { (map, $0.id) }
        }.first
        guard let (map, other) = pair, let pool = m.pool(id: map.poolId), let meta = poolMeta(pool.id) else {
            throw DomainError("PiT '\(from)' and \(to.map { "PiT '\($0)'" } ?? "vdisk '\(v.name)'") share no in-sync leg to compare")
        }
        let found: (runs: [Range<UInt64>], pagesRead: Int)
        do { found = try meta.differences(map.mapId, other) } catch { throw DomainError("vdisk '\(v.name)': block map: \(error)") }
        let size = new?.sizeBytes ?? v.sizeBytes
        let ranges = found.runs.compactMap { r -> ByteRange? in
            let start = r.lowerBound * pool.extentBytes, end = min(r.upperBound * pool.extentBytes, max(size, old.sizeBytes))
            return start < end ? ByteRange(offset: start, length: end - start) : nil
        }
        return PiTDifference(vdisk: v.name, from: from, to: to, extentBytes: pool.extentBytes, ranges: ranges,
                             changedBytes: ranges.reduce(0) { $0 + $1.length }, pagesRead: found.pagesRead)
    }
}

extension Domain {
    /// The byte ranges PiT `name` has extents for (through its first in-sync map): what an
    /// initial copy must send; the rest reads as zeros.
    public func allocatedRanges(ofPiT name: String) throws(DomainError) -> [ByteRange] {
        let m = metadata
        guard let pit = m.pit(named: name) else { throw DomainError("PiT '\(name)' not found") }
        guard let map = pit.maps.first(where: \.complete), let pool = m.pool(id: map.poolId), let meta = poolMeta(pool.id) else {
            throw DomainError("PiT '\(name)' holds no in-sync copy")
        }
        let runs: [(Range<UInt64>, UInt64?)]
        do { runs = try meta.mapRuns(map.mapId) } catch { throw DomainError("PiT '\(name)': block map: \(error)") }
        var out: [ByteRange] = []
        for (r, chunk) in runs where chunk != nil {
            let start = r.lowerBound * pool.extentBytes, end = min(r.upperBound * pool.extentBytes, pit.sizeBytes)
            guard start < end else { continue }
            if let last = out.last, last.offset + last.length == start {
                out[out.count - 1].length += end - start
            } else {
                out.append(ByteRange(offset: start, length: end - start))
            }
        }
        return out
    }
}
