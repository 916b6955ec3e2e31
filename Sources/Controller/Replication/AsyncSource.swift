import Foundation
import IOEngine

/// The source side of an async mirror group. Every `pit_cycle` of the peer's link profile
/// it takes a standard PiT of all the group's vdisks at one instant (held for the group,
/// queued as pending), whether or not the link is up. While the link is up it ships the
/// oldest pending PiT: the blocks that changed since the PiT the destination last confirmed
/// (everything allocated, the first time), read from the PiT (so later host writes never
/// mix in), a crc32c per 4 KiB block computed as read, at most `bytes_in_flight`
/// unanswered, then asks the destination to make the cycle its new image. Once confirmed,
/// the previous PiT goes. When pending PiTs reach the link profile's `retention`, the group
/// is suspended (no new PiTs); when the link is back it drops them and ships one coalesced
/// difference to a fresh PiT. A cut cycle resumes, with its PiT, where the destination's
/// answers reached (saved every few seconds, so a source restart resumes there too).
/// Host writes never wait for any of this.
final class AsyncSource: @unchecked Sendable {
    let group: String
    private let service: ReplicationService
    private var domain: Domain { service.domain }
    private let lock = NSLock()
    private var progress = AsyncTaskProgress()
    /// The newest answered position of a cut cycle (fresher than the saved one).
    private var resume: AsyncGroupRecord.ResumePoint?
    /// When the newest cycle PiT was taken (uptime ns): the next is due a cycle later.
    private var lastCaptureNs = DispatchTime.now().uptimeNanoseconds
    private var lastResumeSaveNs: UInt64 = 0
    /// Held while the task decides on and runs a capture or a cycle (see `waitIdle`).
    private let shipping = AsyncSemaphore(permits: 1)

    init(group: String, service: ReplicationService) {
        self.group = group
        self.service = service
    }

    var current: AsyncTaskProgress { lock.withLock { progress } }

    /// Returns once no capture or cycle begun before the call is under way: after the group
    /// was paused, none starts again, so the confirmed PiT stays as it is then.
    func waitIdle() async {
        await shipping.acquire()
        shipping.release()
    }

    /// The next cycle PiT is due now.
    func captureNow() { lock.withLock { captureAsap = true } }
    private var captureAsap = false

    /// Runs until cancelled or the group is gone.
    func run() async {
        while !Task.isCancelled {
            guard let g = domain.metadata.asyncGroup(named: group), g.role == .source else { return }
            if [.detaching, .detached, .splitBrain].contains(g.state) { // turning into a destination, ended, or waiting for a merge
                if g.peerDetach != nil, service.isConnected(g.peer) { // a split or detach-task the peer has not answered yet
                    do throws(DomainError) {
                        try await domain.detachPeer(group) { (request: AsyncRequest) async throws(DomainError) -> AsyncResponse in
                            try await service.call(g.peer, request)
                        }
                        service.log("replication: group '\(group)': peer '\(g.peer)' detached its side (owed by a split or detach-task here)")
                    } catch {
                        await note(error: "peer '\(g.peer)' did not detach its side: \(error.message)")
                        try? await Task.sleep(nanoseconds: 1_000_000_000)
                    }
                    continue
                }
                try? await Task.sleep(nanoseconds: 200_000_000)
                continue
            }
            guard let peer = domain.metadata.peer(named: g.peer), let link = domain.profiles.links[peer.linkProfile] else {
                await note(error: "peer '\(g.peer)' or its link profile is gone")
                try? await Task.sleep(nanoseconds: 1_000_000_000)
                continue
            }
            do throws(DomainError) {
                await shipping.acquire()
                defer { shipping.release() }
                try await capture(g, link: link)
                guard let g = domain.metadata.asyncGroup(named: group) else { return }
                if g.state != .paused, service.isConnected(g.peer) {
                    if g.state == .suspended, g.resumeAt == nil, g.confirmedPiT != nil {
                        try await coalesce(g)
                        continue
                    }
                    if let next = g.pendingList.first {
                        try await cycle(g, pit: next, link: link)
                        continue
                    }
                }
            } catch where error.code == AsyncResponse.splitBrain {
                await splitBrain(error.message)
                try? await Task.sleep(nanoseconds: 1_000_000_000)
                continue
            } catch {
                await note(error: error.message)
                try? await Task.sleep(nanoseconds: 1_000_000_000)
                continue
            }
            try? await Task.sleep(nanoseconds: 200_000_000)
        }
    }

    private func note(error: String) async {
        lock.withLock { progress.lastError = error }
        try? await domain.updateAsyncGroup(group) {
            $0.lastError = error
            if $0.state == .normal { $0.state = .degraded }
        }
    }

    /// Takes the next cycle's PiT when one is due (at once before the initial copy), unless
    /// the task is paused or suspended; at the retention limit, suspends the group instead.
    private func capture(_ g: AsyncGroupRecord, link: LinkProfile) async throws(DomainError) {
        guard g.state != .paused, g.state != .suspended, g.state != .splitBrain else { return }
        let now = DispatchTime.now().uptimeNanoseconds
        let initial = g.confirmedPiT == nil && g.pendingList.isEmpty
        let asked = lock.withLock { captureAsap }
        guard initial || asked || now >= lastCaptureNs + link.pitCycleNs else { return }
        lock.withLock { captureAsap = false }
        let held = g.pendingList.count + (g.confirmedPiT == nil ? 0 : 1)
        let limit = max(link.retention, 2)
        if held >= limit {
            try await suspend("\(g.pendingList.count) cycle PiT(s) wait for the link and the link profile keeps \(limit) (retention)")
            return
        }
        do throws(DomainError) {
            try await takeCyclePiT(g)
            lastCaptureNs = now
        } catch where error.code == ENOSPC {
            try await suspend(error.message) // the pool's pit_retention, with every PiT held
        }
    }

    /// The destination failed over: this side stops (no PiTs, nothing shipped) until a merge.
    private func splitBrain(_ why: String) async {
        service.log("replication: group '\(group)': split brain: \(why)")
        lock.withLock { progress.lastError = why }
        try? await domain.updateAsyncGroup(group) {
            $0.state = .splitBrain
            $0.lastError = why
        }
    }

    private func suspend(_ why: String) async throws(DomainError) {
        service.log("replication: group '\(group)' suspended: \(why); host writes go on, one coalesced difference catches up when the link is back")
        try await domain.updateAsyncGroup(group) {
            $0.state = .suspended
            $0.lastError = "suspended: \(why)"
        }
    }

    /// A standard PiT of every member at one instant, held by the group, queued as pending.
    private func takeCyclePiT(_ g: AsyncGroupRecord) async throws(DomainError) {
        let number = (g.pitsTaken ?? g.cycle) + 1
        let base = "\(g.name).async-\(number)"
        // After a crash between the PiT and the group's update, the PiT exists: adopt it.
        if !domain.metadata.hasPiT(orGroup: base) {
            let names = g.members.indices.map { g.memberPiT(base, $0) }
            _ = try await domain.createPiTs(of: g.members.map(\.vdiskId), names: names, group: g.members.count > 1 ? base : nil, kind: .standard)
        }
        try await domain.holdPiT(named: base, for: g.name)
        try await domain.updateAsyncGroup(g.name) {
            $0.pitsTaken = number
            if !$0.pendingList.contains(base) { $0.pendingList.append(base) }
        }
    }

    /// Suspended, the link back and no cycle half-shipped: the waiting PiTs go, and one
    /// fresh PiT carries everything since the confirmed one (a block written in many of
    /// them travels once). A half-shipped cycle is finished first: its blocks are already
    /// in the destination's pending layer, and only its own PiT accounts for them.
    private func coalesce(_ g: AsyncGroupRecord) async throws(DomainError) {
        let dropped = g.pendingList
        try await domain.dropCyclePiTs(dropped)
        try await domain.updateAsyncGroup(g.name) {
            $0.pendingList = []
            $0.state = .normal
            $0.lastError = nil
        }
        guard let g = domain.metadata.asyncGroup(named: group) else { return }
        try await takeCyclePiT(g)
        lastCaptureNs = DispatchTime.now().uptimeNanoseconds
        service.log("replication: group '\(g.name)' catches up with one coalesced difference (\(dropped.count) waiting PiT(s) dropped)")
    }

    /// Ships pending PiT `pit` (blocks, then cycle-end) and makes it the confirmed one.
    private func cycle(_ g: AsyncGroupRecord, pit: String, link: LinkProfile) async throws(DomainError) {
        let number = UInt64(pit.dropFirst("\(g.name).async-".count)) ?? g.cycle + 1
        let members = g.members
        let base = g.confirmedPiT.flatMap { domain.metadata.hasPiT(orGroup: $0) ? $0 : nil }
        var work: [Piece] = []
        for i in members.indices {
            let ranges = if let base {
                try domain.differences(from: g.memberPiT(base, i), to: g.memberPiT(pit, i)).ranges
            } else {
                try domain.allocatedRanges(ofPiT: g.memberPiT(pit, i))
            }
            work += ranges.map { Piece(member: i, range: $0) }
        }
        let total = work.reduce(0) { $0 + $1.range.length }
        // Where to go on from: this run's newest answer, else the saved one.
        let saved = g.resumeAt?.pit == pit ? g.resumeAt!.position : 0
        let from = lock.withLock { resume?.pit == pit ? max(resume!.position, saved) : saved }
        if g.resumeAt?.pit != pit { // recorded before any block travels: this PiT must be finished
            try await domain.updateAsyncGroup(g.name) { $0.resumeAt = .init(pit: pit, position: 0) }
        }
        lock.withLock {
            progress = AsyncTaskProgress(cycle: number, pit: pit, bytesToSend: total, bytesSent: from, startedAt: Date().timeIntervalSince1970,
                                         lastError: progress.lastError, wireBytes: progress.wireBytes, dataBytes: progress.dataBytes,
                                         resumedAt: from > 0 ? from : nil, pendingPiTs: g.pendingList.count, lastThroughput: progress.lastThroughput)
        }
        _ = try await service.call(g.peer, AsyncRequest(op: .cycleBegin, group: g.name, cycle: number, pit: pit))
        if from > 0 { service.log("replication: group '\(g.name)' cycle \(number) resumed at \(ByteSize.format(from)) of \(ByteSize.format(total))") }
        let reached = await ship(work, of: pit, base: base, from: from, group: g, cycle: number, link: link)
        if case .failure(let cut) = reached {
            lock.withLock { resume = .init(pit: pit, position: cut.position) }
            try? await domain.updateAsyncGroup(g.name) { $0.resumeAt = .init(pit: pit, position: cut.position) }
            throw cut.error
        }
        let takenAt = domain.metadata.pitList.first { $0.name == pit || $0.group == pit }?.createdAt
        var end = AsyncRequest(op: .cycleEnd, group: g.name, cycle: number, pit: pit)
        end.takenAt = takenAt
        let answer = try await service.call(g.peer, end)
        guard answer.lastComplete == pit else { throw DomainError("peer '\(g.peer)' did not confirm PiT '\(pit)'") }
        let previous = g.confirmedPiT
        try await domain.updateAsyncGroup(g.name) {
            $0.confirmedPiT = pit
            $0.cycle = number
            $0.confirmedAt = takenAt
            $0.pendingList.removeAll { $0 == pit }
            $0.resumeAt = nil
            $0.lastError = nil
            if $0.state == .degraded { $0.state = .normal }
        }
        lock.withLock {
            resume = nil
            progress.lastError = nil
            let now = Date().timeIntervalSince1970
            progress.finishedAt = now
            let shipped = progress.bytesSent - min(progress.resumedAt ?? 0, progress.bytesSent)
            if shipped > 0, let started = progress.startedAt, now > started { progress.lastThroughput = (Double(shipped) / (now - started)).rounded() }
        }
        if let previous, previous != pit, domain.metadata.hasPiT(orGroup: previous) {
            try? await domain.holdPiT(named: previous, for: nil)
            try? await domain.deletePiT(named: previous)
        }
    }

    /// A range of one member's PiT to ship.
    struct Piece {
        var member: Int
        var range: Domain.ByteRange
    }

    /// Saves the answered position of the cycle in flight, at most every 2 s (a catalog
    /// commit), so a source restart resumes near it.
    private func saveResume(_ pit: String, _ position: UInt64) async {
        let now = DispatchTime.now().uptimeNanoseconds
        guard now > lastResumeSaveNs + 2_000_000_000 else { return }
        lastResumeSaveNs = now
        try? await domain.updateAsyncGroup(group) { $0.resumeAt = .init(pit: pit, position: position) }
    }

    /// Sends `work` (ranges of the members' PiTs of cycle `pit`) in frames of up to 1 MiB:
    /// with a `base` PiT (the one the destination holds), only the 4 KiB blocks that differ
    /// from the base's travel. At most the link's `bytes_in_flight` unanswered, paced to its
    /// bandwidth. Starts at byte position `from` of the pieces laid end to end (a resumed
    /// cycle). On a failure returns the position before which every block was answered.
    private func ship(_ work: [Piece], of pit: String, base: String?, from: UInt64, group g: AsyncGroupRecord, cycle: UInt64,
                      link: LinkProfile) async -> Result<Void, ShipFailure>
    {
        let piece = BlockHeader.maxBlocks * 4096
        let window = max(Int(link.bytesInFlight), piece)
        var pacer = Pacer(bytesPerSecond: link.bandwidthBytesPerSecond)
        var inFlight: [(task: Task<Result<Void, DomainError>, Never>, bytes: Int, position: UInt64)] = []
        var inFlightBytes = 0
        var answered = from // every block before this position was answered
        var position: UInt64 = 0 // of the piece being read
        func settleOldest() async throws(DomainError) {
            let oldest = inFlight.removeFirst()
            inFlightBytes -= oldest.bytes
            if case .failure(let e) = await oldest.task.value { throw e }
            answered = inFlight.first?.position ?? position
            await saveResume(pit, answered)
        }
        guard let current = try? AlignedBuffer(count: piece), let previous = try? AlignedBuffer(count: piece) else {
            return .failure(ShipFailure(error: DomainError("out of memory for replication buffers"), position: from))
        }
        do throws(DomainError) {
            for w in work {
                let r = w.range
                if position + r.length <= from { // wholly answered before the cut
                    position += r.length
                    continue
                }
                var at = r.offset + (from > position ? from - position : 0)
                position = max(position, from)
                let memberPiT = g.memberPiT(pit, w.member), memberBase = base.map { g.memberPiT($0, w.member) }
                while at < r.offset + r.length {
                    let n = Int(min(UInt64(piece), r.offset + r.length - at))
                    try await domain.readPiT(named: memberPiT, offset: at, length: n, into: current.pointer)
                    if let memberBase { try await domain.readPiT(named: memberBase, offset: at, length: n, into: previous.pointer) }
                    for frame in frames(current.pointer, memberBase == nil ? nil : previous.pointer, at: at, length: n, cycle: cycle,
                                        member: UInt16(w.member), compression: link.compressionLevel)
                    {
                        while !inFlight.isEmpty, inFlightBytes + frame.wireBytes > window { try await settleOldest() }
                        let wait = pacer.delay(forBytes: frame.wireBytes + ReplicationFrame.headerBytes, nowNs: DispatchTime.now().uptimeNanoseconds)
                        if wait > 0 { try? await Task.sleep(nanoseconds: wait) }
                        let peer = g.peer, service = service, build = frame.build, start = frame.offset, framePosition = position + (frame.offset - at)
                        inFlight.append((Task { @Sendable () -> Result<Void, DomainError> in
                            do throws(DomainError) {
                                let (ok, body) = try await service.send(peer) { id in build(id) }
                                guard ok else {
                                    let why = (try? JSONDecoder().decode(AsyncResponse.self, from: Data(body)))?.reason ?? "no reason given"
                                    return .failure(DomainError("peer '\(peer)' refused blocks at \(start): \(why)"))
                                }
                                return .success(())
                            } catch { return .failure(error) }
                        }, frame.wireBytes, framePosition))
                        inFlightBytes += frame.wireBytes
                    }
                    lock.withLock { progress.bytesSent += UInt64(n) }
                    at += UInt64(n)
                    position += UInt64(n)
                    if inFlight.isEmpty { answered = position }
                }
            }
            while !inFlight.isEmpty { try await settleOldest() }
            return .success(())
        } catch {
            for f in inFlight { _ = await f.task.value } // every call answers or fails with the link
            return .failure(ShipFailure(error: error, position: answered))
        }
    }

    struct ShipFailure: Error {
        var error: DomainError
        var position: UInt64
    }

    struct Frame {
        var offset: UInt64
        var wireBytes: Int
        var build: @Sendable (UInt64) -> ReplicationMessage
    }

    /// The frames for `length` bytes at `offset` (in `current`): a frame per run of blocks
    /// that differ from `previous` (all of them without it). The id is the link's to give.
    private func frames(_ current: UnsafeMutableRawPointer, _ previous: UnsafeMutableRawPointer?, at offset: UInt64, length: Int,
                        cycle: UInt64, member: UInt16, compression: Int?) -> [Frame]
    {
        let blocks = length / 4096
        var crcs = [UInt32](repeating: 0, count: blocks)
        var changed = [Bool](repeating: true, count: blocks)
        for i in 0..<blocks {
            crcs[i] = Checksum.crc32c(UnsafeRawBufferPointer(start: current + i * 4096, count: 4096))
            // The same bytes as the confirmed PiT's: the destination has it already.
            if let previous { changed[i] = memcmp(previous + i * 4096, current + i * 4096, 4096) != 0 }
        }
        var out: [Frame] = []
        var i = 0
        while i < blocks {
            guard changed[i] else { i += 1; continue }
            var e = i
            while e < blocks && changed[e] { e += 1 }
            out.append(frame(current + i * 4096, count: e - i, crcs: Array(crcs[i..<e]), at: offset + UInt64(i * 4096), cycle: cycle,
                             member: member, compression: compression))
            i = e
        }
        return out
    }

    private func frame(_ bytes: UnsafeMutableRawPointer, count: Int, crcs: [UInt32], at offset: UInt64, cycle: UInt64, member: UInt16,
                       compression: Int?) -> Frame
    {
        let length = count * 4096
        var data = [UInt8](UnsafeRawBufferPointer(start: bytes, count: length))
        var compressed = false
        if let level = compression {
            var out = [UInt8](repeating: 0, count: Compression.bound(length))
            let input = UnsafeRawBufferPointer(start: bytes, count: length)
            let n = out.withUnsafeMutableBytes { output in try? Compression.compress(level: level, input, into: output) }
            if let n, n < length, n <= BlockHeader.maxDataBytes {
                out.removeSubrange(n..<out.count)
                data = out
                compressed = true
            }
        }
        let wire = data.count
        lock.withLock {
            progress.dataBytes += UInt64(length)
            progress.wireBytes += UInt64(wire)
        }
        let payload = data, packed = compressed
        return Frame(offset: offset, wireBytes: wire) { id in
            .blocks(BlockHeader(id: id, cycle: cycle, member: member, compressed: packed, offset: offset, count: UInt32(count)), crcs: crcs, data: payload)
        }
    }
}

/// Spaces sends so the link profile's bandwidth is not exceeded on average (a virtual
/// clock: each send moves it on by its bytes at the rate; a frame larger than any burst
/// simply waits longer).
struct Pacer {
    let bytesPerSecond: Double
    private var nextNs: UInt64 = 0

    init(bytesPerSecond: Double) { self.bytesPerSecond = bytesPerSecond }

    /// How long to wait before sending `bytes` now; accounts them.
    mutating func delay(forBytes bytes: Int, nowNs: UInt64) -> UInt64 {
        guard bytesPerSecond > 0 else { return 0 }
        let start = max(nextNs, nowNs)
        nextNs = start + UInt64(Double(bytes) / bytesPerSecond * 1e9)
        return start - nowNs
    }
}

/// What a source task is doing now (not persisted: `async status` shows it with the group).
public struct AsyncTaskProgress: Codable, Sendable {
    public var cycle: UInt64 = 0
    public var pit: String?
    public var bytesToSend: UInt64 = 0
    public var bytesSent: UInt64 = 0
    public var startedAt: Double?
    public var lastError: String?
    /// Since the daemon started: bytes of blocks read, and bytes put on the wire for them.
    public var wireBytes: UInt64 = 0
    public var dataBytes: UInt64 = 0
    /// A cycle resumed after a cut: the byte position it went on from.
    public var resumedAt: UInt64?
    /// Cycle PiTs waiting to be shipped (this one included).
    public var pendingPiTs: Int = 0
    /// When the cycle was confirmed (nil while it runs).
    public var finishedAt: Double?
    /// The blocks per second of the last cycle that shipped any.
    public var lastThroughput: Double?
}
