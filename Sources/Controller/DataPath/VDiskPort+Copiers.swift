import Foundation
import IOEngine

/// What works beside host requests on a vdisk's ranges: copiers (resync, add-leg, read
/// repair) take a range as `RangeLock` kind copier, and a delete or leg removal waits
/// for the requests that were in flight with the old mapping.
extension VDiskPort {
    /// The requests in the port now (slot and start time): after a delete or a leg removal
    /// commits, these may still send I/O with the old mapping.
    func requestsInFlight() -> [(slot: Int, startNs: UInt64)] {
        lock.withLock { (0..<capacity).filter { slots[$0].sink != nil }.map { ($0, slots[$0].startNs) } }
    }

    /// Waits until every one of `requests` has finished (later requests, with the new
    /// mapping, do not count). Woken by the requests' own completions; a device that hangs
    /// keeps it waiting.
    func drain(_ requests: [(slot: Int, startNs: UInt64)]) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            lock.lock()
            let pending = Set(requests.filter { slots[$0.slot].sink != nil && slots[$0.slot].startNs == $0.startNs }.map(\.slot))
            if pending.isEmpty {
                lock.unlock()
                c.resume()
            } else {
                drainWaiters.append((pending, c))
                lock.unlock()
            }
        }
    }

    /// Takes `range` for a copier (`RangeLock` kind copier): returns once no host write
    /// into it is in flight and new ones wait, so a copier can read one leg and write
    /// another without losing a host write.
    public func closeGate(_ range: Range<UInt64>) async {
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            lock.lock()
            let (token, now) = ranges.acquireCopier(range)
            copierRanges.append((range, token))
            if now {
                lock.unlock()
                c.resume()
            } else {
                copierWaiters[token] = c
                lock.unlock()
            }
        }
    }

    /// Gives back a range taken by `closeGate`; what waited for it starts.
    public func openGate(_ range: Range<UInt64>) {
        lock.lock()
        guard let i = copierRanges.firstIndex(where: { $0.range == range }) else {
            lock.unlock()
            preconditionFailure("openGate(\(range)) without closeGate")
        }
        ranges.release(.copier(copierRanges.remove(at: i).token), into: &granted)
        let go = takeGranted()
        lock.unlock()
        start(go)
    }

    /// Rewrites a range on legs that failed to read it, from the leg that served it.
    /// Host writes to the range are held meanwhile and the good data is read afresh,
    /// so the rewrite can never put older data over a newer host write. A leg that
    /// cannot take the rewrite is marked failed.
    func repair(legs: [UUID], from good: UUID, offset: UInt64, length: Int) async {
        lock.withLock { repairs += 1 }
        defer { lock.withLock { repairs -= 1 } }
        let range = offset..<(offset + UInt64(length))
        guard let buffer = try? AlignedBuffer(count: length) else { return }
        await closeGate(range)
        defer { openGate(range) }
        do {
            try await domain.legIO(.read, vdisk: vdiskName, leg: good, offset: offset, length: length, buffer: buffer.pointer)
        } catch {
            return // the good leg failed too: its own error handling takes over
        }
        for l in legs {
            do {
                try await domain.legIO(.write, vdisk: vdiskName, leg: l, offset: offset, length: length, buffer: buffer.pointer)
            } catch {
                try? await domain.markLegsFailed(vdisk: vdiskName, legs: [l])
            }
        }
    }
}
