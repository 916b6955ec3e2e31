import Foundation
import IOEngine

/// The source side of an async mirror group: every `pit_cycle` of the peer's link
/// profile it takes a standard PiT of the vdisk (held for the group), ships the extents
/// that changed since the PiT the destination last confirmed (everything allocated, the
/// first time), read from the new PiT (so later host writes never mix in), a crc32c per
/// 4 KiB block computed as read, at most `bytes_in_flight` unanswered, then asks the
/// destination to make the cycle its new image. Once confirmed, the previous PiT goes.
/// A cycle cut by a link drop or a restart is retried from its start with the same PiT.
/// Host writes never wait for any of this.
final class AsyncSource: @unchecked Sendable {
    let group: String
    private let service: ReplicationService
    private var domain: Domain { service.domain }
    private let lock = NSLock()
    private var progress = AsyncTaskProgress()
    /// Where a cut cycle goes on (its PiT, and the byte position in its ordered ranges
    /// before which every block was answered, so is durable at the destination). Kept in
    /// memory: a link drop or a destination restart resumes there; a source restart
    /// starts the cycle over (with the same PiT).
    private var resume: (pit: String, position: UInt64)?

    init(group: String, service: ReplicationService) {
        self.group = group
        self.service = service
    }

    var current: AsyncTaskProgress { lock.withLock { progress } }

    /// Runs cycles until cancelled or the group is gone.
    func run() async {
        var lastStart: UInt64 = 0
        while !Task.isCancelled {
            guard let g = domain.metadata.asyncGroup(named: group), g.role == .source else { return }
            guard let peer = domain.metadata.peer(named: g.peer), let link = domain.profiles.links[peer.linkProfile] else {
                await note(error: "peer '\(g.peer)' or its link profile is gone")
                try? await Task.sleep(nanoseconds: 1_000_000_000)
                continue
            }
            let due = lastStart + (g.confirmedPiT == nil ? 0 : link.pitCycleNs)
            let now = DispatchTime.now().uptimeNanoseconds
            if g.state == .paused || !service.isConnected(g.peer) || now < due {
                try? await Task.sleep(nanoseconds: min(200_000_000, max(due > now ? due - now : 0, 10_000_000)))
                continue
            }
            lastStart = now
            do throws(DomainError) {
                try await cycle(g, link: link)
            } catch {
                await note(error: error.message)
                try? await Task.sleep(nanoseconds: 1_000_000_000)
            }
        }
    }

    private func note(error: String) async {
        lock.withLock { progress.lastError = error }
        try? await domain.updateAsyncGroup(group) {
            $0.lastError = error
            if $0.state == .normal { $0.state = .degraded }
        }
    }

    /// One cycle: PiT, difference, blocks, cycle-end, confirm.
    private func cycle(_ g: AsyncGroupRecord, link: LinkProfile) async throws(DomainError) {
        guard let v = domain.metadata.vdisks.first(where: { $0.id == g.vdiskId }) else { throw DomainError("its vdisk is gone") }
        let number = g.cycle + 1
        let pit = "\(g.name).async-\(number)"
        if domain.metadata.pit(named: pit) == nil { // else: a retried cycle ships the PiT it took
            _ = try await domain.createPiT(vdisk: v.name, as: pit, kind: .standard)
        }
        try await domain.holdPiT(named: pit, for: g.name)
        let ranges: [Domain.ByteRange] = if let base = g.confirmedPiT, domain.metadata.pit(named: base) != nil {
            try domain.differences(from: base, to: pit).ranges
        } else {
            try domain.allocatedRanges(ofPiT: pit)
        }
        let total = ranges.reduce(0) { $0 + $1.length }
        lock.withLock {
            let from = resume?.pit == pit ? resume!.position : 0
            progress = AsyncTaskProgress(cycle: number, pit: pit, bytesToSend: total, bytesSent: from, startedAt: Date().timeIntervalSince1970,
                                         lastError: progress.lastError, wireBytes: progress.wireBytes, dataBytes: progress.dataBytes,
                                         resumedAt: from > 0 ? from : nil)
        }
        _ = try await service.call(g.peer, AsyncRequest(op: .cycleBegin, group: g.name, cycle: number, pit: pit))
        let base = g.confirmedPiT.flatMap { domain.metadata.pit(named: $0) != nil ? $0 : nil }
        let from = lock.withLock { resume?.pit == pit ? resume!.position : 0 }
        if from > 0 { service.log("replication: group '\(g.name)' cycle \(number) resumed at \(ByteSize.format(from)) of \(ByteSize.format(total))") }
        let reached = await ship(ranges, of: pit, base: base, from: from, group: g, cycle: number, link: link)
        if case .failure(let cut) = reached {
            lock.withLock { resume = (pit, cut.position) }
            throw cut.error
        }
        lock.withLock { resume = nil }
        let answer = try await service.call(g.peer, AsyncRequest(op: .cycleEnd, group: g.name, cycle: number, pit: pit))
        guard answer.lastComplete == pit else { throw DomainError("peer '\(g.peer)' did not confirm PiT '\(pit)'") }
        let previous = g.confirmedPiT
        let takenAt = domain.metadata.pit(named: pit)?.createdAt
        try await domain.updateAsyncGroup(g.name) {
            $0.confirmedPiT = pit
            $0.cycle = number
            $0.confirmedAt = takenAt
            $0.lastError = nil
            if $0.state == .degraded { $0.state = .normal }
        }
        lock.withLock { progress.lastError = nil }
        if let previous, previous != pit, domain.metadata.pit(named: previous) != nil {
            try? await domain.holdPiT(named: previous, for: nil)
            try? await domain.deletePiT(named: previous)
        }
    }

    /// Sends `ranges` of PiT `pit` in frames of up to 1 MiB: with a `base` PiT (the one
    /// the destination holds), only the 4 KiB blocks whose crc32c differs from the base's
    /// travel. At most the link's `bytes_in_flight` unanswered, paced to its bandwidth.
    /// Starts at byte position `from` of the ranges laid end to end (a resumed cycle). On a
    /// failure returns the position before which every block was answered.
    private func ship(_ ranges: [Domain.ByteRange], of pit: String, base: String?, from: UInt64, group g: AsyncGroupRecord, cycle: UInt64,
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
        }
        guard let current = try? AlignedBuffer(count: piece), let previous = try? AlignedBuffer(count: piece) else {
            return .failure(ShipFailure(error: DomainError("out of memory for replication buffers"), position: from))
        }
        do throws(DomainError) {
            for r in ranges {
                if position + r.length <= from { // wholly answered before the cut
                    position += r.length
                    continue
                }
                var at = r.offset + (from > position ? from - position : 0)
                position = max(position, from)
                while at < r.offset + r.length {
                    let n = Int(min(UInt64(piece), r.offset + r.length - at))
                    try await domain.readPiT(named: pit, offset: at, length: n, into: current.pointer)
                    if let base { try await domain.readPiT(named: base, offset: at, length: n, into: previous.pointer) }
                    for frame in frames(current.pointer, base == nil ? nil : previous.pointer, at: at, length: n, cycle: cycle,
                                        compression: link.compressionLevel)
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
                        cycle: UInt64, compression: Int?) -> [Frame]
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
                             compression: compression))
            i = e
        }
        return out
    }

    private func frame(_ bytes: UnsafeMutableRawPointer, count: Int, crcs: [UInt32], at offset: UInt64, cycle: UInt64, compression: Int?) -> Frame {
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
            .blocks(BlockHeader(id: id, cycle: cycle, member: 0, compressed: packed, offset: offset, count: UInt32(count)), crcs: crcs, data: payload)
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
}
