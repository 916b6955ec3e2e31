import Foundation

/// A sync mirror's write-intent bitmap: one bit per region (the pool profile's
/// `dirty_region_size`), persisted in STATE/dirty/<vdisk id>.bitmap.
///
/// - A region's bit is on disk (pwrite + fdatasync of its 4 KiB page) before the
///   first write into it goes to any leg; writes into a region whose bit is already
///   set cost no metadata I/O (hot regions stay set while they are written).
/// - Bits are cleared lazily by `clean`: only while every leg is in sync, only for
///   regions with no write in flight and none for `idleSeconds`.
/// - After a crash the set bits are exactly the regions that may differ between
///   legs; while a leg is failed its missed regions simply stay set.
///
/// Persisting is serialized and always writes the page as it is in memory at that
/// moment, so a later persist can never drop a bit a write is relying on. A write
/// whose bit is not durable yet waits off the caller's thread (`whenDurable`), and
/// every write waiting then shares one pwrite + fdatasync (group commit).
public final class DirtyRegionLog: @unchecked Sendable {
    public let regionBytes: UInt64
    public let regionCount: Int
    private let fd: Int32
    private let lock = NSLock()
    private let persistLock = NSLock()
    private var bits: [UInt8]
    /// The bitmap as last made durable: a write may go once its regions are set here.
    private var durable: [UInt8]
    private var inflight: [UInt16]
    /// Pages holding bits set but not yet durable (so a waiting write need not scan the bitmap).
    private var pendingPages: ClosedRange<Int>?
    /// Milliseconds (wrapping) of each region's last write: idleness is measured to the
    /// millisecond, not to a second boundary that may be a moment away.
    private var lastWriteMs: [UInt32]
    private let epoch = DispatchTime.now().uptimeNanoseconds
    private let persistQueue = DispatchQueue(label: "svsp.dirty-region-log")
    /// Bitmap writes so far (each a pwrite + fdatasync): hot regions must not add to it.
    public private(set) var persistCount = 0

    public init(path: String, regionBytes: UInt64, sizeBytes: UInt64) throws(DomainError) {
        self.regionBytes = regionBytes
        regionCount = Int((sizeBytes + regionBytes - 1) / regionBytes)
        let fileBytes = ((regionCount + 7) / 8 + 4095) / 4096 * 4096
        try? FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        let file = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard file >= 0 else { throw DomainError("\(path): \(String(cString: strerror(errno)))") }
        var loaded = [UInt8](repeating: 0, count: fileBytes)
        let n = loaded.withUnsafeMutableBytes { pread(file, $0.baseAddress, fileBytes, 0) }
        if n < fileBytes { ftruncate(file, off_t(fileBytes)) }
        fd = file
        bits = loaded
        durable = loaded
        inflight = [UInt16](repeating: 0, count: regionCount)
        lastWriteMs = [UInt32](repeating: 0, count: regionCount)
    }

    deinit { close(fd) }

    private func regions(_ offset: UInt64, _ length: Int) -> ClosedRange<Int> {
        Int(offset / regionBytes)...Int((offset + UInt64(max(length, 1)) - 1) / regionBytes)
    }

    private func isSet(_ r: Int) -> Bool { bits[r >> 3] & (1 << UInt8(r & 7)) != 0 }

    private var nowMs: UInt32 { UInt32(truncatingIfNeeded: (DispatchTime.now().uptimeNanoseconds - epoch) / 1_000_000) }

    /// Before a write: counts it in flight and sets its regions' bits. True when they
    /// are durable already (the write may go now); false when the caller must wait
    /// for `whenDurable` (set by this write, or by another one not yet persisted).
    public func beginWrite(offset: UInt64, length: Int) -> Bool {
        var ready = true
        let now = nowMs
        lock.lock()
        for r in regions(offset, length) where r < regionCount {
            inflight[r] &+= 1
            lastWriteMs[r] = now
            bits[r >> 3] |= 1 << UInt8(r & 7)
            if durable[r >> 3] & (1 << UInt8(r & 7)) == 0 {
                ready = false
                pendingPages = Self.merging(pendingPages, (r >> 3) / 4096...(r >> 3) / 4096)
            }
        }
        lock.unlock()
        return ready
    }

    /// Runs `then` (on the log's queue) once every bit set so far is durable: true, or
    /// false when the bitmap could not be written (the write must then fail).
    public func whenDurable(then: @escaping @Sendable (Bool) -> Void) {
        persistQueue.async { [self] in then(persistPending()) }
    }

    /// Persists the pages holding set-but-not-durable bits, if any (earlier waiters'
    /// persist usually covered them already). False when that failed.
    private func persistPending() -> Bool {
        lock.lock()
        let pages = pendingPages
        pendingPages = nil
        // An earlier waiter's persist may have covered these bits already.
        let needed = pages.map { p in (p.lowerBound * 4096..<min(bits.count, (p.upperBound + 1) * 4096)).contains { bits[$0] & ~durable[$0] != 0 } }
        lock.unlock()
        guard let pages, needed == true else { return true }
        if persist(pages) { return true }
        // Not durable: the next waiter (this queue is serial) must try these pages again.
        lock.lock()
        pendingPages = Self.merging(pendingPages, pages)
        lock.unlock()
        return false
    }

    /// The smallest page range covering both.
    private static func merging(_ a: ClosedRange<Int>?, _ b: ClosedRange<Int>) -> ClosedRange<Int> {
        a.map { min($0.lowerBound, b.lowerBound)...max($0.upperBound, b.upperBound) } ?? b
    }

    /// After a write completed (on every leg it went to).
    public func endWrite(offset: UInt64, length: Int) {
        lock.lock()
        for r in regions(offset, length) where r < regionCount && inflight[r] > 0 { inflight[r] -= 1 }
        lock.unlock()
    }

    /// Sets every region covering `sizeBytes` (a new leg must receive everything), durably.
    /// False when the bitmap could not be written.
    public func markAll(sizeBytes: UInt64) -> Bool {
        let last = min(regionCount, Int((sizeBytes + regionBytes - 1) / regionBytes))
        guard last > 0 else { return true }
        lock.lock()
        for r in 0..<last { bits[r >> 3] |= 1 << UInt8(r & 7) }
        lock.unlock()
        return persist(0...(((last - 1) >> 3) / 4096))
    }

    /// Sets the regions covering [offset, offset+length) durably and counts them in flight
    /// like a write (so `clean` leaves them) until `endWrite`: a failed leg got new extents
    /// it could not be given zeroes on, and its resync must copy them whole. Call
    /// `endWrite` with the same range afterwards, whatever this returns.
    public func markDirty(offset: UInt64, length: Int) -> Bool {
        let covered = regions(offset, length)
        guard covered.lowerBound < regionCount else { return true }
        if beginWrite(offset: offset, length: length) { return true } // durable already
        let last = min(covered.upperBound, regionCount - 1)
        return persist((covered.lowerBound >> 3) / 4096...(last >> 3) / 4096)
    }

    /// Regions whose bit is set.
    public func dirtyRegions() -> [Int] {
        lock.lock()
        defer { lock.unlock() }
        return (0..<regionCount).filter { isSet($0) }
    }

    public var dirtyCount: Int { dirtyRegions().count }

    /// Clears idle regions' bits (call only while every leg is in sync). Returns how many were cleared.
    @discardableResult
    public func clean(idleSeconds: UInt32 = 1, only: [Int]? = nil) -> Int {
        let now = nowMs
        var cleared = 0
        var pages: ClosedRange<Int>?
        func clearIfIdle(_ r: Int) {
            guard r < regionCount, isSet(r), inflight[r] == 0 else { return }
            guard idleSeconds == 0 || now &- lastWriteMs[r] >= idleSeconds &* 1000 else { return }
            bits[r >> 3] &= ~(1 << UInt8(r & 7))
            // No longer known durable-set: a new write into it persists again instead of
            // trusting a page that this clearing is about to overwrite.
            durable[r >> 3] &= ~(1 << UInt8(r & 7))
            cleared += 1
            pages = Self.merging(pages, (r >> 3) / 4096...(r >> 3) / 4096)
        }
        lock.lock()
        if let only {
            for r in only { clearIfIdle(r) }
        } else {
            // Only the set bits: the pass costs what is dirty, not the vdisk's size.
            for i in bits.indices where bits[i] != 0 {
                for b in 0..<8 { clearIfIdle(i << 3 | b) }
            }
        }
        lock.unlock()
        if let pages { persist(pages) }
        return cleared
    }

    /// Writes the pages as they are now and waits until they are durable. False (and
    /// nothing counted durable) when the write or the sync failed.
    @discardableResult
    private func persist(_ pages: ClosedRange<Int>) -> Bool {
        persistLock.lock()
        defer { persistLock.unlock() }
        lock.lock()
        let start = pages.lowerBound * 4096, end = (pages.upperBound + 1) * 4096
        let snapshot = Array(bits[start..<end])
        lock.unlock()
        let written = snapshot.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(start)) }
        guard written == snapshot.count, fdatasync(fd) == 0 else { return false }
        lock.lock()
        // Durable = what reached the disk AND is still set: a bit that `clean` cleared
        // meanwhile is about to be written clear, so no write may rely on it.
        for i in start..<end { durable[i] = snapshot[i - start] & bits[i] }
        persistCount += 1
        lock.unlock()
        return true
    }
}
