import Foundation
import IOEngine

/// A sync mirror's write-intent bitmap: one bit per region, persisted in
/// STATE/dirty/<vdisk id>.bitmap.
///
/// - The file starts with a checksummed 4 KiB header that records the region size and
///   count the bits were written with; the bits follow. The geometry comes from the
///   header, never from today's profile (the pool profile's `dirty_region_size` only
///   sizes a new bitmap), so removing a leg or editing the profile cannot make a bit
///   name another range. A file without a valid header (the format before headers, or
///   damage) cannot be trusted region by region: every region is taken as dirty.
/// - `grow` extends the bitmap (and its header) when the vdisk grows.
/// - Regions that must be copied before their bit may go are *pinned*: the bits found
///   set at open (the legs may differ there after a crash) and the regions of a write
///   that reached some legs and not others. Idle clean-up leaves pinned regions; only
///   `copied` (a successful copy of the region to every leg) clears them.
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
    public var regionCount: Int { lock.withLock { count } }
    private var count: Int
    private let fd: Int32
    private let lock = NSLock()
    private let persistLock = NSLock()
    private var bits: [UInt8]
    /// Regions whose bit may go only after a copy made the legs agree (see the type's comment).
    private var pinned: [UInt8]
    /// When each region was last pinned (`pinCounter` then; 0 = at open): a copy that began
    /// before a pin does not lift it.
    private var pinnedAt: [UInt32]
    /// How many regions are pinned (kept as they change: upkeep asks every second).
    private var pinnedTotal = 0
    private var pinCounter: UInt32 = 0
    /// Why the file's contents were not usable region by region at open (every region taken as dirty), or nil.
    public private(set) var openProblem: String?
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
    /// Writes that reached some legs and not others (`pin` calls) since open.
    public var partialWrites: Int { lock.withLock { partialWritesCount } }
    private var partialWritesCount = 0

    static let magic = Array("SVSPDRL1".utf8)
    static let headerBytes = 4096

    /// Opens (or creates, with `regionBytes`) the bitmap at `path`, covering at least `sizeBytes`.
    public init(path: String, regionBytes newRegionBytes: UInt64, sizeBytes: UInt64) throws(DomainError) {
        try? FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        let file = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard file >= 0 else { throw DomainError("\(path): \(String(cString: strerror(errno)))") }
        var st = stat()
        fstat(file, &st)
        let existing = Int(st.st_size)
        var header = [UInt8](repeating: 0, count: Self.headerBytes)
        let got = existing > 0 ? header.withUnsafeMutableBytes { pread(file, $0.baseAddress, Self.headerBytes, 0) } : 0
        var regionBytes = newRegionBytes
        var count = Int((sizeBytes + newRegionBytes - 1) / newRegionBytes)
        var loaded: [UInt8]
        var problem: String?
        var upToDate = false // the file already holds this geometry and these bits
        if got == Self.headerBytes, let geometry = Self.decodeHeader(header) {
            regionBytes = geometry.regionBytes
            let stored = geometry.regionCount
            let storedBytes = Self.bitsBytes(stored)
            loaded = [UInt8](repeating: 0, count: storedBytes)
            let n = loaded.withUnsafeMutableBytes { pread(file, $0.baseAddress, storedBytes, off_t(Self.headerBytes)) }
            if n != storedBytes { problem = "bitmap \(path) is short (\(n) of \(storedBytes) bytes)" }
            count = max(stored, Int((sizeBytes + regionBytes - 1) / regionBytes))
            upToDate = problem == nil && count == stored
        } else {
            loaded = []
            if existing > 0 { problem = "bitmap \(path) has no valid header (older format or damaged)" }
        }
        let bytes = Self.bitsBytes(count)
        if loaded.count < bytes { loaded += [UInt8](repeating: 0, count: bytes - loaded.count) }
        if problem != nil {
            // Which ranges the bits named is unknown: every region may differ between legs.
            loaded = [UInt8](repeating: 0xFF, count: bytes)
        }
        fd = file
        self.regionBytes = regionBytes
        self.count = count
        bits = loaded
        durable = upToDate ? loaded : [UInt8](repeating: 0, count: bytes)
        pinned = loaded
        pinnedTotal = (0..<count).reduce(0) { $0 + (loaded[$1 >> 3] >> UInt8($1 & 7) & 1 == 1 ? 1 : 0) }
        pinnedAt = [UInt32](repeating: 0, count: count)
        inflight = [UInt16](repeating: 0, count: count)
        lastWriteMs = [UInt32](repeating: 0, count: count)
        openProblem = problem
        if upToDate { return } // nothing to write at start-up
        // The bits first, the header last: a crash in between leaves no valid header, which
        // the next open takes as "every region dirty", never old bits under a new geometry.
        guard persist(0...max(0, (bytes - 1) / 4096)), writeHeader() else {
            close(file)
            throw DomainError("\(path): cannot write the bitmap: \(String(cString: strerror(errno)))")
        }
    }

    private static func bitsBytes(_ regions: Int) -> Int { ((regions + 7) / 8 + 4095) / 4096 * 4096 }

    static func decodeHeader(_ h: [UInt8]) -> (regionBytes: UInt64, regionCount: Int)? {
        guard Array(h[0..<8]) == magic else { return nil }
        return h.withUnsafeBytes { raw in
            let crc = raw.loadUnaligned(fromByteOffset: 32, as: UInt32.self).littleEndian
            guard Checksum.crc32c(UnsafeRawBufferPointer(rebasing: raw[0..<32])) == crc else { return nil }
            let regionBytes = raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self).littleEndian
            let regionCount = raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self).littleEndian
            // Bounded: at most 2^31 regions (a 256 MiB bitmap), regions of 4 KiB..64 GiB.
            guard (4096...(64 << 30)).contains(regionBytes), regionCount <= 1 << 31 else { return nil }
            return (regionBytes, Int(regionCount))
        }
    }

    /// Writes the header (geometry as it is now) durably. Caller holds no lock but `persistLock` or is in init.
    private func writeHeader() -> Bool {
        var h = [UInt8](repeating: 0, count: Self.headerBytes)
        for (i, b) in Self.magic.enumerated() { h[i] = b }
        let regions = UInt64(lock.withLock { count })
        h.withUnsafeMutableBytes { raw in
            raw.storeBytes(of: UInt32(1).littleEndian, toByteOffset: 8, as: UInt32.self) // version
            raw.storeBytes(of: regionBytes.littleEndian, toByteOffset: 16, as: UInt64.self)
            raw.storeBytes(of: regions.littleEndian, toByteOffset: 24, as: UInt64.self)
            let crc = Checksum.crc32c(UnsafeRawBufferPointer(rebasing: raw[0..<32]))
            raw.storeBytes(of: crc.littleEndian, toByteOffset: 32, as: UInt32.self)
        }
        let n = h.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        return n == Self.headerBytes && fdatasync(fd) == 0
    }

    /// Extends the bitmap to cover `sizeBytes` (a grown vdisk); the new regions start clean.
    /// False when the header could not be written (the caller must not write past the old size).
    @discardableResult
    public func grow(sizeBytes: UInt64) -> Bool {
        persistLock.lock()
        defer { persistLock.unlock() }
        let needed = Int((sizeBytes + regionBytes - 1) / regionBytes)
        lock.lock()
        guard needed > count else { lock.unlock(); return true }
        let bytes = Self.bitsBytes(needed)
        if bytes > bits.count {
            let extra = bytes - bits.count
            bits += [UInt8](repeating: 0, count: extra)
            durable += [UInt8](repeating: 0, count: extra)
            pinned += [UInt8](repeating: 0, count: extra)
        }
        inflight += [UInt16](repeating: 0, count: needed - count)
        lastWriteMs += [UInt32](repeating: 0, count: needed - count)
        pinnedAt += [UInt32](repeating: 0, count: needed - count)
        count = needed
        lock.unlock()
        return writeHeader()
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
        for r in regions(offset, length) where r < count {
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
        for r in regions(offset, length) where r < count && inflight[r] > 0 { inflight[r] -= 1 }
        lock.unlock()
    }

    /// Sets every region covering `sizeBytes` (a new leg must receive everything), durably.
    /// False when the bitmap could not be written.
    public func markAll(sizeBytes: UInt64) -> Bool {
        lock.lock()
        let last = min(count, Int((sizeBytes + regionBytes - 1) / regionBytes))
        for r in 0..<last { bits[r >> 3] |= 1 << UInt8(r & 7) }
        lock.unlock()
        guard last > 0 else { return true }
        return persist(0...(((last - 1) >> 3) / 4096))
    }

    /// Sets the regions covering [offset, offset+length) durably and counts them in flight
    /// like a write (so `clean` leaves them) until `endWrite`: a failed leg got new extents
    /// it could not be given zeroes on, and its resync must copy them whole. Call
    /// `endWrite` with the same range afterwards, whatever this returns.
    public func markDirty(offset: UInt64, length: Int) -> Bool {
        let covered = regions(offset, length)
        let regionCount = self.regionCount
        guard covered.lowerBound < regionCount else { return true }
        if beginWrite(offset: offset, length: length) { return true } // durable already
        let last = min(covered.upperBound, regionCount - 1)
        return persist((covered.lowerBound >> 3) / 4096...(last >> 3) / 4096)
    }

    /// Regions whose bit is set.
    public func dirtyRegions() -> [Int] {
        lock.lock()
        defer { lock.unlock() }
        return (0..<count).filter { isSet($0) }
    }

    public var dirtyCount: Int { dirtyRegions().count }

    /// Regions that must be copied before their bits may go (see the type's comment).
    public var pinnedCount: Int {
        lock.lock()
        defer { lock.unlock() }
        return pinnedTotal
    }

    /// A write reached some legs and not others: its regions stay dirty (their bits were
    /// made durable before the write went) until a copy makes the legs agree.
    public func pin(offset: UInt64, length: Int) {
        lock.lock()
        partialWritesCount += 1
        pinCounter &+= 1
        for r in regions(offset, length) where r < count {
            bits[r >> 3] |= 1 << UInt8(r & 7)
            if pinned[r >> 3] & (1 << UInt8(r & 7)) == 0 { pinnedTotal += 1 }
            pinned[r >> 3] |= 1 << UInt8(r & 7)
            pinnedAt[r] = pinCounter
        }
        lock.unlock()
    }

    /// Marks the start of a copy: pass it to `copied`, so pins made after it stay.
    public var pinMark: UInt32 { lock.withLock { pinCounter } }

    /// A copy that began at `mark` brought every leg level in `regions`: those not pinned
    /// again since are no longer pinned, and their bits go unless a write is in flight there.
    public func copied(_ regions: [Int], since mark: UInt32) {
        lock.lock()
        for r in regions where r < count && pinnedAt[r] <= mark && pinned[r >> 3] & (1 << UInt8(r & 7)) != 0 {
            pinned[r >> 3] &= ~(1 << UInt8(r & 7))
            pinnedTotal -= 1
        }
        lock.unlock()
        clean(idleSeconds: 0, only: regions)
    }

    /// Clears idle regions' bits that are not pinned (call only while every leg is in sync). Returns how many were cleared.
    @discardableResult
    public func clean(idleSeconds: UInt32 = 1, only: [Int]? = nil) -> Int {
        let now = nowMs
        var cleared = 0
        var pages: ClosedRange<Int>?
        func clearIfIdle(_ r: Int) {
            guard r < count, isSet(r), inflight[r] == 0, pinned[r >> 3] & (1 << UInt8(r & 7)) == 0 else { return }
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
        let written = snapshot.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(Self.headerBytes + start)) }
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
