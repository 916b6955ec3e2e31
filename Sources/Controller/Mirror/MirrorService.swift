import Foundation
import IOEngine

/// Resync and verify of sync mirrors. Both walk the vdisk in 1 MiB chunks in the
/// schedulers' background class (host I/O keeps priority), compare per-block
/// crc32c of the legs, and copy only blocks that differ. While a chunk is being
/// copied the vdisk's port holds host writes to it (`closeGate`), so a host write
/// is never overwritten by older data.
public final class MirrorService: @unchecked Sendable {
    public struct Progress: Codable, Sendable {
        public var operation: String
        public var doneBytes: UInt64
        public var totalBytes: UInt64
        public var copiedBlocks: UInt64
        public var mismatchedBlocks: UInt64
        public var startedAt: Date
    }

    public struct Report: Codable, Sendable {
        public var vdisk: String
        public var operation: String
        public var source: Int
        public var targets: [Int]
        public var blocksCompared: UInt64
        public var mismatchedBlocks: UInt64
        public var copiedBlocks: UInt64
        public var seconds: Double
        /// Dirty regions walked (nil: the whole vdisk was walked).
        public var regions: Int? = nil
        public var regionsTotal: Int? = nil
    }

    let domain: Domain
    private let lock = NSLock()
    private var running: [String: Progress] = [:]
    static let chunkBytes = 1 << 20
    static let compareBlock = 4096

    /// Legs copying at once across the domain (the appliance allowed 8); the rest wait their turn.
    public static let maxConcurrentCopies = 8
    private let copySlots = AsyncSemaphore(permits: MirrorService.maxConcurrentCopies)

    public init(domain: Domain) { self.domain = domain }

    /// add-leg: a new leg in `poolName`, filled in the background while the vdisk stays in use.
    /// The leg is committed with `copyAll` (a restart copies all of it); once the bitmap
    /// carries every region durably the flag goes, and the copy resumes region by region.
    public func addLeg(vdisk name: String, poolName: String) async throws(DomainError) -> Int {
        let (leg, legId) = try await domain.addLeg(vdisk: name, poolName: poolName)
        let port = try domain.port(for: name)
        port.refresh() // it is a mirror now: the port starts its bitmap before the copy
        CrashPoint.hit("add-leg-committed")
        if let log = port.dirtyLog {
            guard log.markAll(sizeBytes: domain.metadata.vdisk(named: name)?.sizeBytes ?? 0) else {
                // Without the bits on disk the copy could not resume region by region: undo.
                try? await domain.removeLeg(vdisk: name, id: legId)
                throw DomainError("add-leg on vdisk '\(name)': cannot write the dirty-region bitmap; the new leg was removed")
            }
            try await domain.clearCopyAll(vdisk: name, legs: [legId])
        }
        resyncInBackground(vdisk: name, why: "add-leg copy", freshLeg: legId)
        return leg
    }

    /// split: hold host writes, turn the leg into its own vdisk, let writes go.
    public func split(vdisk name: String, leg: Int, as newName: String) async throws(DomainError) {
        let port = try domain.port(for: name)
        await port.closeGate(0..<UInt64.max)
        defer { port.openGate(0..<UInt64.max) }
        try await domain.splitLeg(vdisk: name, leg: leg, as: newName)
    }

    public func progress(_ vdisk: String) -> Progress? { lock.withLock { running[vdisk] } }

    /// Brings failed or copying legs back in sync from an in-sync leg (or `forceFrom`).
    /// With dirty-region tracking only the regions whose bits are set are walked;
    /// `afterCrash` also brings the other in-sync legs level in those regions.
    ///
    /// Legs are named by their ids from here on: a leg removed or split off meanwhile
    /// (refused while the copy runs, but a copy may start behind such a change) stops the
    /// copy instead of letting an index name another leg.
    ///
    /// `freshLeg`: the leg add-leg has just made (nothing copied into it yet).
    ///
    /// `--force-from LEG` declares that leg the truth: it becomes in-sync at once (so it
    /// takes every host write during the copy and serves reads), and every other leg
    /// becomes a copying target that receives the whole vdisk from it.
    public func resync(vdisk name: String, forceFrom: Int? = nil, afterCrash: Bool = false,
                       freshLeg: UUID? = nil) async throws(DomainError) -> Report {
        // One copy per vdisk at a time: wait for a running one (an automatic retry, say) first.
        while progress(name) != nil { try? await Task.sleep(nanoseconds: 50_000_000) }
        guard let v = domain.metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        guard v.isMirror else { throw DomainError("vdisk '\(name)' is not a mirror") }
        let source: Int
        if let forceFrom {
            guard v.legs.indices.contains(forceFrom) else { throw DomainError("--force-from \(forceFrom): vdisk '\(name)' has legs 0..\(v.legs.count - 1)") }
            source = forceFrom
        } else {
            // Direction comes from persisted state: copy from a leg that never failed.
            guard let s = v.legs.firstIndex(where: { $0.state == .inSync }) else {
                throw DomainError("vdisk '\(name)': no in-sync leg to copy from; nothing copied (choose one with --force-from LEG)")
            }
            source = s
        }
        let targets = v.legs.indices.filter {
            $0 != source && (forceFrom != nil || afterCrash || v.legs[$0].state != .inSync)
        }
        guard !targets.isEmpty else {
            return Report(vdisk: name, operation: "resync", source: source, targets: [], blocksCompared: 0, mismatchedBlocks: 0,
                          copiedBlocks: 0, seconds: 0)
        }
        let sourceId = v.legs[source].id
        let targetIds = targets.map { v.legs[$0].id }
        let port = try domain.port(for: name)
        let log = port.dirtyLog
        try begin(name, "resync", total: v.sizeBytes)
        defer { end(name) }
        await copySlots.acquire()
        defer { copySlots.release() }
        // The legs that are behind: they become `copying` (they take host writes, serve no reads).
        let behindIds = forceFrom != nil ? targetIds : targets.filter { v.legs[$0].state != .inSync }.map { v.legs[$0].id }
        var starting = Dictionary(uniqueKeysWithValues: behindIds.map { ($0, LegState.copying) })
        if forceFrom != nil { starting[sourceId] = .inSync }
        try await domain.setLegStates(vdisk: name, starting)
        port.refresh() // from here on host writes reach the targets (and a forced source) too
        // A whole-leg copy (forced, or a new leg whose bitmap does not carry it yet): with a
        // bitmap, every region is set durably first, so a copy cut short resumes region by region.
        let wholeLeg = forceFrom != nil || targets.contains { v.legs[$0].copyAll == true }
        // The leg add-leg has just made reads as zeros wherever nothing was written to it: no
        // compare-read (what a host wrote to it meanwhile is in the source too). Known only to
        // this first copy: one resumed after a crash or a failure (which may have left a write
        // on the target alone) compares.
        let freshTargets = forceFrom == nil && freshLeg != nil && targetIds == [freshLeg!]
        if wholeLeg, let log {
            guard log.markAll(sizeBytes: v.sizeBytes) else {
                throw DomainError("vdisk '\(name)': cannot write the dirty-region bitmap; nothing copied")
            }
            try await domain.clearCopyAll(vdisk: name, legs: targetIds)
        }
        let regions = log?.dirtyRegions()
        let pinMark = log?.pinMark ?? 0
        // Only a copy to every leg but the source levels the legs: otherwise (a failed leg's
        // resync) in-sync legs were not compared, and regions pinned for them stay pinned.
        let levelsEveryLeg = targets.count == v.legs.count - 1
        if let regions, let log { lock.withLock { running[name]?.totalBytes = UInt64(regions.count) * log.regionBytes } }
        var report: Report
        do {
            let ranges = regions.map { rs in
                rs.filter { UInt64($0) * log!.regionBytes < v.sizeBytes }
                    .map { r in UInt64(r) * log!.regionBytes..<min(UInt64(r + 1) * log!.regionBytes, v.sizeBytes) }
            }
            report = try await walk(name, source: sourceId, targets: targetIds, repair: true, operation: "resync", ranges: ranges,
                                    targetsHoldNothing: freshTargets, regionDone: { [domain] range in
                                        // Every leg that takes writes now has this region: its bit may go,
                                        // so an interrupted copy resumes after it (not when a target
                                        // failed meanwhile: it may have missed a write here).
                                        guard let log, let now = domain.metadata.vdisk(named: name),
                                              targetIds.allSatisfy({ now.legIndex($0) != nil }),
                                              now.legs.allSatisfy({ $0.state == .inSync || targetIds.contains($0.id) && $0.state == .copying })
                                        else { return }
                                        let first = Int(range.lowerBound / log.regionBytes)
                                        let last = Int((range.upperBound - 1) / log.regionBytes)
                                        if levelsEveryLeg {
                                            log.copied(Array(first...last), since: pinMark)
                                        } else {
                                            log.clean(idleSeconds: 0, only: Array(first...last))
                                        }
                                    })
        } catch {
            // The copy stopped: those legs are still behind.
            do throws(DomainError) {
                try await domain.setLegStates(vdisk: name, Dictionary(uniqueKeysWithValues: behindIds.map { ($0, LegState.failed) }))
            } catch let recording {
                throw DomainError("\(error); and the legs it copied to could not be marked failed: \(recording)")
            }
            throw error
        }
        report.source = source
        report.targets = targets
        report.regions = regions?.count
        report.regionsTotal = log.map { Int((v.sizeBytes + $0.regionBytes - 1) / $0.regionBytes) }
        // A target that a host write failed during the copy missed that write: it stays failed.
        let stillFailed = try await domain.setLegStates(vdisk: name, Dictionary(uniqueKeysWithValues: behindIds.map { ($0, LegState.inSync) }),
                                                        keepFailed: Set(behindIds))
        guard stillFailed.isEmpty else {
            throw DomainError("vdisk '\(name)': \(stillFailed.count) leg(s) failed during the resync "
                + "(a host write could not reach them); they stay failed: run the resync again")
        }
        if let log, let after = domain.metadata.vdisk(named: name), after.legs.allSatisfy({ $0.state == .inSync }) {
            if levelsEveryLeg { log.copied(regions ?? [], since: pinMark) } else { log.clean(idleSeconds: 0, only: regions ?? []) }
        }
        return report
    }

    /// At startup: every mirror whose write-intent bitmap has bits set was written
    /// when the daemon stopped; bring its legs level in those regions only.
    public func recoverAfterRestart(log: (String) -> Void) async {
        for v in domain.metadata.vdisks where v.isMirror {
            guard let port = try? domain.port(for: v.name) else { continue }
            let dirty = port.dirtyLog?.dirtyCount ?? 0
            let copying = v.legs.contains { $0.state == .copying } // a copy the stop cut short
            guard dirty > 0 || copying, v.legs.contains(where: { $0.state == .inSync }) else { continue }
            do {
                let r = try await resync(vdisk: v.name, afterCrash: true)
                lock.withLock { lastRecovery[v.name] = r }
                log("startup resync of '\(v.name)': \(r.regions ?? 0) dirty region(s) of \(r.regionsTotal ?? 0), \(r.copiedBlocks) block(s) copied")
            } catch {
                // Its regions stay pinned: upkeep retries the reconcile, the bits never go uncopied.
                log("startup resync of '\(v.name)' failed: \(error); retried every leg_retry_interval")
            }
        }
    }

    public func lastRecoveryReport(_ vdisk: String) -> Report? { lock.withLock { lastRecovery[vdisk] } }
    private var lastRecovery: [String: Report] = [:]

    /// Where background copies report (the daemon's log); nil: nowhere but `mirror status`.
    public nonisolated(unsafe) var log: (@Sendable (String) -> Void)?

    /// The last background copy's failure per vdisk, for `mirror status` (cleared by a success).
    public func lastBackgroundError(_ vdisk: String) -> String? { lock.withLock { backgroundErrors[vdisk] } }
    private var backgroundErrors: [String: String] = [:]

    /// Runs a resync nobody waits for (add-leg, an automatic retry, `--background`): its
    /// error is never dropped but logged and kept for `mirror status`.
    public func resyncInBackground(vdisk name: String, forceFrom: Int? = nil, afterCrash: Bool = false, why: String,
                                   freshLeg: UUID? = nil) {
        Task {
            do throws(DomainError) {
                _ = try await self.resync(vdisk: name, forceFrom: forceFrom, afterCrash: afterCrash, freshLeg: freshLeg)
                _ = self.lock.withLock { self.backgroundErrors.removeValue(forKey: name) }
            } catch {
                let line = "\(why) of '\(name)' failed: \(error)"
                self.lock.withLock { self.backgroundErrors[name] = line }
                self.log?(line)
            }
        }
    }
    private var lastRetry: [String: Date] = [:]

    /// Background upkeep, once a second: clear idle dirty bits of mirrors whose legs
    /// are all in sync, and retry failed legs every `leg_retry_interval`.
    public func runUpkeep() async {
        while !Task.isCancelled {
            try? await Task.sleep(nanoseconds: 1_000_000_000)
            for v in domain.metadata.vdisks where v.isMirror {
                let log = (try? domain.port(for: v.name))?.dirtyLog
                // Regions where the legs may differ (a failed reconcile, a write that reached
                // only some legs) are copied, not cleared: they are retried like a failed leg.
                let unreconciled = (log?.pinnedCount ?? 0) > 0
                if v.legs.allSatisfy({ $0.state == .inSync }) && !unreconciled {
                    // Re-read: a leg may have failed since this pass began.
                    guard let fresh = domain.metadata.vdisk(named: v.name), fresh.legs.allSatisfy({ $0.state == .inSync }),
                          progress(v.name) == nil else { continue }
                    log?.clean()
                    _ = lock.withLock { lastRetry.removeValue(forKey: v.name) }
                    continue
                }
                guard v.legs.contains(where: { $0.state == .failed }) || unreconciled, progress(v.name) == nil,
                      let pool = domain.metadata.pool(id: v.poolId) else { continue }
                let interval = Double(domain.profiles.pools[pool.poolProfile]?.legRetryIntervalNs ?? 60_000_000_000) / 1e9
                // The first retry comes one interval after the failure was seen, then every interval.
                let due = lock.withLock { () -> Bool in
                    guard let last = lastRetry[v.name] else { lastRetry[v.name] = Date(); return false }
                    if Date().timeIntervalSince(last) < interval { return false }
                    lastRetry[v.name] = Date()
                    return true
                }
                if due {
                    let name = v.name
                    let afterCrash = !v.legs.contains(where: { $0.state == .failed })
                    resyncInBackground(vdisk: name, afterCrash: afterCrash, why: "automatic resync")
                }
            }
        }
    }

    /// Compares every in-sync leg with the first in-sync leg; `repair` copies differing blocks from it.
    public func verify(vdisk name: String, repair: Bool) async throws(DomainError) -> Report {
        guard let v = domain.metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        guard v.isMirror else { throw DomainError("vdisk '\(name)' is not a mirror") }
        let inSync = v.legs.indices.filter { v.legs[$0].state == .inSync }
        guard inSync.count >= 2 else { throw DomainError("vdisk '\(name)': fewer than two in-sync legs to compare") }
        try begin(name, repair ? "verify+repair" : "verify", total: v.sizeBytes)
        defer { end(name) }
        var report = try await walk(name, source: v.legs[inSync[0]].id, targets: inSync.dropFirst().map { v.legs[$0].id }, repair: repair,
                                    operation: repair ? "verify+repair" : "verify", ranges: nil, regionDone: nil)
        report.source = inSync[0]
        report.targets = Array(inSync.dropFirst())
        return report
    }

    private func begin(_ name: String, _ op: String, total: UInt64) throws(DomainError) {
        let busy: String? = lock.withLock {
            if let p = running[name] { return p.operation }
            running[name] = Progress(operation: op, doneBytes: 0, totalBytes: total, copiedBlocks: 0, mismatchedBlocks: 0, startedAt: Date())
            return nil
        }
        if let busy { throw DomainError("vdisk '\(name)': a \(busy) is already running") }
    }

    private func end(_ name: String) { lock.withLock { running[name] = nil } }

    /// Compares (and with `repair` copies) `ranges` of the vdisk, or all of it, `copyWidth`
    /// chunks at a time. `targetsHoldNothing` (a whole-leg copy onto legs that read as zeros
    /// where nothing was written): no compare-read of the targets; every non-zero block of
    /// the source is written (zero blocks are skipped, so a thin leg stays thin).
    ///
    /// Copy writes go without FUA; the vdisk's legs are flushed before a region is reported
    /// done (its dirty bit may then go) and before returning (the legs may then be marked in
    /// sync), so a crash loses nothing that was declared copied.
    private func walk(_ name: String, source: UUID, targets: [UUID], repair: Bool, operation: String,
                      ranges: [Range<UInt64>]?, targetsHoldNothing: Bool = false,
                      regionDone: ((Range<UInt64>) -> Void)?) async throws(DomainError) -> Report {
        let port = try domain.port(for: name)
        guard let v = domain.metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        let spans = ranges ?? [0..<v.sizeBytes]
        var slots: [CopySlot] = []
        for _ in 0..<Self.copyWidth {
            guard let slot = CopySlot(chunkBytes: Self.chunkBytes, compareBlock: Self.compareBlock) else {
                throw DomainError("out of memory for copy buffers")
            }
            slots.append(slot)
        }
        var totals = ChunkOutcome()
        let started = Date()
        var walked: UInt64 = 0
        // Regions whose chunks are all copied, waiting for the flush that lets their bits go.
        var finishedSpans: [Range<UInt64>] = []
        var chunksLeft = [Int](repeating: 0, count: spans.count)
        var issuedAll = [Bool](repeating: false, count: spans.count)
        var copiedAtFlush: UInt64 = 0
        var lastSettled = Date()
        var failure: DomainError?
        let job = ChunkJob(domain: domain, port: port, vdisk: name, source: source, targets: targets, repair: repair,
                           targetsHoldNothing: targetsHoldNothing)

        let schedulers = Set(([source] + targets).compactMap { id in v.legs.first { $0.id == id }?.poolId })
            .compactMap { domain.runtime(of: $0)?.scheduler }
        func hostsIdle() -> Bool { schedulers.allSatisfy(\.hostsIdle) }

        func settle() async throws(DomainError) {
            if totals.copied > copiedAtFlush {
                try await domain.flushLegs(vdisk: name, legs: targets)
                copiedAtFlush = totals.copied
            }
            if let regionDone { for span in finishedSpans { regionDone(span) } }
            finishedSpans.removeAll(keepingCapacity: true)
            lastSettled = Date()
        }

        await withTaskGroup(of: (slot: Int, span: Int, bytes: Int, outcome: ChunkOutcome).self) { group in
            var free = Array(slots.indices)
            var spanIndex = 0
            var offset = spans.first?.lowerBound ?? 0
            while true {
                // Keep `copyWidth` chunks going while there is work and nothing failed; one
                // while hosts use the pools (each chunk holds host writes to it until copied,
                // and the scheduler gives the copy a small share then anyway).
                let width = hostsIdle() ? slots.count : 1
                while failure == nil, spanIndex < spans.count, slots.count - free.count < width, let slot = free.popLast() {
                    let span = spanIndex, end = min(offset + UInt64(Self.chunkBytes), spans[span].upperBound)
                    let range = offset..<end
                    chunksLeft[span] += 1
                    if end == spans[span].upperBound {
                        issuedAll[span] = true
                        spanIndex += 1
                        if spanIndex < spans.count { offset = spans[spanIndex].lowerBound }
                    } else {
                        offset = end
                    }
                    let buffers = slots[slot]
                    group.addTask { (slot, span, range.count, await job.run(range, buffers)) }
                }
                guard let done = await group.next() else { break }
                free.append(done.slot)
                totals.add(done.outcome)
                if let error = done.outcome.error, failure == nil { failure = error }
                walked += UInt64(done.bytes)
                chunksLeft[done.span] -= 1
                if chunksLeft[done.span] == 0 && issuedAll[done.span] { finishedSpans.append(spans[done.span]) }
                let w = walked, t = totals
                lock.withLock {
                    running[name]?.doneBytes = w
                    running[name]?.copiedBlocks = t.copied
                    running[name]?.mismatchedBlocks = t.mismatched
                }
                if failure == nil, !finishedSpans.isEmpty,
                   finishedSpans.count >= Self.regionsPerFlush || Date().timeIntervalSince(lastSettled) >= Self.settleSeconds {
                    do throws(DomainError) { try await settle() } catch { failure = error }
                }
            }
        }
        if let failure { throw failure }
        try await settle()
        return Report(vdisk: name, operation: operation, source: -1, targets: [], blocksCompared: totals.compared,
                      mismatchedBlocks: totals.mismatched, copiedBlocks: totals.copied,
                      seconds: (Date().timeIntervalSince(started) * 100).rounded() / 100)
    }

    /// Chunks a copy keeps in flight (each a read of the source, maybe of the targets, and writes).
    static let copyWidth = 4
    /// Regions copied between two flushes of the target legs (each flush lets their bits go),
    /// or fewer when a slow copy reaches `settleSeconds`: a copy cut short then repeats at most
    /// that much.
    static let regionsPerFlush = 64
    static let settleSeconds = 0.5

}

/// Leg-level I/O in the background class, for copiers: one leg, bypassing the port's fan-out.
extension Domain {
    /// Reads or writes one leg, named by its id (resolved now: a leg removed or split off
    /// since the caller looked is an error, never another leg that took its index).
    /// `fua: false` for copies that flush before they declare anything copied.
    func legIO(_ op: IOScheduler.Operation, vdisk name: String, leg id: UUID, offset: UInt64, length: Int,
               buffer: UnsafeMutableRawPointer, fua: Bool = true) async throws(DomainError)
    {
        guard let v = metadata.vdisk(named: name), let l = v.legIndex(id) else {
            throw DomainError("vdisk '\(name)': a leg of the copy was removed or split off meanwhile; the copy stops")
        }
        let m = metadata
        guard let pool = m.pool(id: v.legs[l].poolId), let runtime = runtime(of: pool.id), let scheduler = runtime.scheduler,
              let route = route(v.legs[l], in: m)
        else { throw DomainError("vdisk '\(name)': leg \(l) is not available") }
        if op == .write, sharingActive.load(ordering: .acquiring) { // never into a chunk a PiT or snapshot shares (the caller holds the range)
            try await redirectShared(vdisk: name, offset: offset, length: length, only: id)
        }
        var done = 0
        while done < length {
            let at = offset + UInt64(done)
            let piece: Int
            let place: (lun: Int, offset: UInt64)?
            do { (place, piece) = try route.piece(at: at, length: length - done) } catch {
                throw DomainError("vdisk '\(name)' leg \(l): block map: \(error)")
            }
            guard let place else {
                if op == .read {
                    memset(buffer + done, 0, piece)
                } else { // a thin leg that missed the allocation (it was failed): map it, then write
                    try await allocateExtents(vdisk: name, offset: at, length: piece, only: id)
                    continue
                }
                done += piece
                continue
            }
            guard let slot = runtime.slots[place.lun] else { throw DomainError("vdisk '\(name)': leg \(l) LUN \(place.lun) is missing") }
            let lunOffset = place.offset
            while true {
                var refused: IOError?
                let result = await withCheckedContinuation { (c: CheckedContinuation<Int64, Never>) in
                    do throws(IOError) {
                        try scheduler.submit(op, lun: slot, buffer: buffer + done, length: piece, offset: lunOffset,
                                             fua: fua && op == .write, ioClass: .background, sink: ContinuationSink(c), cookie: 0)
                        scheduler.kick()
                    } catch {
                        refused = error
                        c.resume(returning: -Int64(error.code))
                    }
                }
                if refused?.code == EBUSY { // full: wait for a completion to make room, then again
                    await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in scheduler.whenRoom { c.resume() } }
                    continue
                }
                if result < 0 {
                    throw DomainError("vdisk '\(name)' leg \(l): \(IOError(result: result, operation: op == .read ? .read : .write, lun: pool.luns[place.lun].path, offset: lunOffset))")
                }
                break
            }
            done += piece
        }
    }

    /// Makes the copies written to legs `ids` durable: a flush of every LUN of their pools,
    /// in the background class (a copy's flush must not count as host I/O, which would hold
    /// the copy to its share for a while after each flush).
    func flushLegs(vdisk name: String, legs ids: [UUID]) async throws(DomainError) {
        let m = metadata
        guard let v = m.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        let pools = Set(ids.compactMap { id in v.legs.first { $0.id == id }?.poolId })
        for poolId in pools {
            guard let pool = m.pool(id: poolId), let runtime = runtime(of: poolId), let scheduler = runtime.scheduler else {
                throw DomainError("vdisk '\(name)': a pool of the copy is not available")
            }
            for (lun, slot) in runtime.slots.enumerated() {
                guard let slot else { throw DomainError("vdisk '\(name)': pool '\(pool.name)' LUN \(lun) is missing") }
                while true {
                    var refused: IOError?
                    let result = await withCheckedContinuation { (c: CheckedContinuation<Int64, Never>) in
                        do throws(IOError) {
                            try scheduler.submit(.flush, lun: slot, buffer: nil, length: 0, offset: 0, ioClass: .background,
                                                 sink: ContinuationSink(c), cookie: 0)
                            scheduler.kick()
                        } catch {
                            refused = error
                            c.resume(returning: -Int64(error.code))
                        }
                    }
                    if refused?.code == EBUSY {
                        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in scheduler.whenRoom { c.resume() } }
                        continue
                    }
                    if result < 0 {
                        throw DomainError("vdisk '\(name)': flushing pool '\(pool.name)' LUN \(lun) after a copy: "
                            + "\(IOError(result: result, operation: .flush, lun: pool.luns[lun].path, offset: 0))")
                    }
                    break
                }
            }
        }
    }
}
