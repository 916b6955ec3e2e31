import Foundation
import IOEngine

/// PiTs in a vdisk's data path: a write into a chunk a leg shares with a PiT or a
/// snapshot is redirected first (`Domain.redirectShared`), keeping its range meanwhile,
/// then dispatched as usual (to the new chunk). Checked only while the domain has PiTs
/// or snapshots (`Domain.sharingActive`), so a domain without them pays nothing.
extension VDiskPort {
    /// Whether a leg the write goes to maps a chunk of the range that is shared. Caller holds the lock.
    func touchesShared(offset: UInt64, length: Int) -> Bool {
        mapping.legs.contains { leg in
            guard leg.state != .failed, let route = leg.route, length > 0 else { return false }
            let cb = leg.extentBytes
            var c = offset / cb
            let last = (offset + UInt64(length) - 1) / cb
            while c <= last {
                if (try? route.meta.isShared(map: route.map, chunk: c)) == true { return true }
                c += 1
            }
            return false
        }
    }

    /// Slow path, once per shared chunk: redirect it on every leg, then go on. A host
    /// write's bytes go into the new chunks with the redirect; when that covers the whole
    /// request on every leg, it is answered without writing again.
    func redirectThenProceed(_ index: Int) {
        let (r, legs) = lock.withLock { (slots[index], mapping.writeLegs) }
        let data = r.op == .write ? Domain.HostData(offset: r.offset, length: r.length, bytes: UnsafeRawPointer(r.buffer!)) : nil
        Task {
            let complete: Bool
            do throws(DomainError) {
                complete = try await domain.redirectShared(vdisk: vdiskName, offset: r.offset, length: r.length, data: data)
            } catch {
                self.pieceDone(index, leg: -1, lun: -1, result: -Int64(error.code))
                return
            }
            if complete {
                lock.withLock { slots[index].targetLegs |= legs }
                self.pieceDone(index, leg: -1, lun: -1, result: 0) // the write is in place on every leg
            } else {
                self.dispatch(index)
            }
        }
    }
}
