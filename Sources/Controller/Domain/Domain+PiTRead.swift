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
