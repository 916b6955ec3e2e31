import Foundation
import IOEngine
import Synchronization

/// Keeps a noncopyable LUN owner in collections.
final class LUNBox: @unchecked Sendable {
    let lun: LUN
    init(_ lun: consuming LUN) { self.lun = lun }
    var handle: LUNHandle { lun.handle }
}

/// Keeps the engine owner alive for the domain's lifetime.
final class EngineBox: @unchecked Sendable {
    let engine: Engine
    init(_ engine: consuming Engine) { self.engine = engine }
}

/// One running domain: its metadata, open LUNs, schedulers, and every management
/// operation. Operations are serialized by the caller (the management server runs
/// one at a time); each either commits a new metadata generation or changes nothing.
public final class Domain: @unchecked Sendable {
    public let directory: String
    public let profiles: ProfileCatalog
    /// Guards what the I/O path reads while management commands change it.
    private let stateLock = NSLock()
    private var storedMetadata: DomainMetadata
    public private(set) var metadata: DomainMetadata {
        get { stateLock.lock(); defer { stateLock.unlock() }; return storedMetadata }
        set { stateLock.lock(); storedMetadata = newValue; stateLock.unlock() }
    }
    /// The metadata generation alone: what the data path checks per I/O, without
    /// copying (and retaining) the whole metadata.
    var generation: UInt64 { stateLock.withLock { storedMetadata.generation } }
    /// Why the domain is degraded (missing LUNs, damaged setup copies...); empty = healthy.
    public private(set) var problems: [String] {
        get { stateLock.withLock { storedProblems } }
        set { stateLock.withLock { storedProblems = newValue } }
    }
    private var storedProblems: [String] = []

    /// read-only (no majority of setup copies), degraded (a problem listed) or normal.
    public var health: String { readOnlyReason != nil ? "read-only" : (problems.isEmpty ? "normal" : "degraded") }

    /// Records a problem found at run time (shown by `status`, logged by the daemon).
    func report(_ problem: String) {
        stateLock.withLock { if !storedProblems.contains(problem) { storedProblems.append(problem) } }
    }

    /// Forgets the problems starting with `prefix` (repaired).
    func clearProblems(startingWith prefix: String) {
        stateLock.withLock { storedProblems.removeAll { $0.hasPrefix(prefix) } }
    }
    public private(set) var setupCopyStates: [SetupVDiskStore.CopyState] = []
    /// Why no metadata change may be committed (fewer than a majority of the configured
    /// setup copies readable), or nil. Every change is refused while it is set.
    public private(set) var readOnlyReason: String? {
        get { stateLock.withLock { storedReadOnlyReason } }
        set {
            stateLock.withLock { storedReadOnlyReason = newValue }
            refusesWrites.store(newValue != nil, ordering: .releasing)
        }
    }
    /// The data path's view of read-only (one atomic load per write): the metadata may be a
    /// stale minority copy, so no write may reach a LUN through its mappings.
    let refusesWrites = Atomic<Bool>(false)
    /// Whether host writes check for chunks shared with PiTs and snapshots (see `updateSharing`).
    let sharingActive = Atomic<Bool>(false)
    private var storedReadOnlyReason: String?
    /// Old records' replaced pool runtimes: ports may still send I/O through their
    /// schedulers, so their LUNs stay open (a regained quorum reopens a setup pool).
    private var retiredRuntimes: [PoolRuntime] = []
    public let metrics = DomainMetrics()
    /// Long operations' progress for the CLI's bars (mirror copies and async cycles keep their own).
    public let progressBoard = ProgressBoard()
    let mutation = AsyncSemaphore(permits: 1)
    public private(set) lazy var mirrors = MirrorService(domain: self)

    let bootstrap: BootstrapStore
    let engineBox: EngineBox
    var engine: EngineHandle { engineBox.engine.handle }
    private var storedPorts: [String: VDiskPort] = [:]
    /// Drops the NBD clients of an export and waits until nothing of theirs is in flight
    /// (set by the daemon once its NBD server runs); how many there were.
    public var exportClosed: (@Sendable (String) async -> Int)?
    private var storedPools: [UUID: PoolRuntime] = [:]

    /// The open pool's LUNs and scheduler (nil for a pool not open).
    func runtime(of pool: UUID) -> PoolRuntime? { stateLock.withLock { storedPools[pool] } }

    private func setRuntime(_ runtime: PoolRuntime?, of pool: UUID) { stateLock.withLock { storedPools[pool] = runtime } }

    /// The pool's block maps and space map (nil: not open, see `problems`).
    func poolMeta(_ pool: UUID) -> PoolMetadata? { stateLock.withLock { storedPoolMeta[pool] } }
    func setPoolMeta(_ meta: PoolMetadata?, of pool: UUID) {
        meta?.flushData = { [weak self] in
            guard let self else { return .damaged("the domain is closed") }
            return await self.flushLUNs(of: pool)
        }
        stateLock.withLock { storedPoolMeta[pool] = meta }
    }
    private var storedPoolMeta: [UUID: PoolMetadata] = [:]
    private var setupStore: SetupVDiskStore?
    /// Seeded LUN faults (`serve --fault-plan`), applied to the pools it names.
    private(set) var faultPlan: FaultPlan?
    /// Where the data path reports what an admin must see (a LUN declared stuck); the
    /// daemon points it at its log. Until then such lines go to standard error.
    private var storedEventLog: (@Sendable (String) -> Void)?
    public var eventLog: (@Sendable (String) -> Void)? {
        get { stateLock.withLock { storedEventLog } }
        set { stateLock.withLock { storedEventLog = newValue } }
    }

    func reportEvent(_ line: String) {
        if let log = eventLog { log(line) } else { FileHandle.standardError.write(Data((line + "\n").utf8)) }
    }

    /// Reports a pool scheduler's LUN events, named by pool.
    func lunEvents(pool name: String) -> @Sendable (String) -> Void {
        { [weak self] line in self?.reportEvent("pool '\(name)': \(line)") }
    }
    /// Wakes the zeroer (extents freed or let out of quarantine) and those waiting for it.
    let zeroingWork = WakeSignal()
    let zeroingProgress = WakeSignal()
    /// Shared chunks being redirected now (one redirect per chunk at a time).
    let redirects = RedirectTable()
    /// Chunks reserved ahead for redirects (see `takeReserved`).
    let spareChunks = SpareChunks()

    /// `svsp-ctl domain init`: an empty domain in `directory`.
    public static func initialize(directory: String, name: String) throws(DomainError) -> DomainMetadata {
        guard Parse.name(name) != nil else { throw DomainError("domain name '\(name)': use letters, digits, - _ . (at most 64)") }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw DomainError("\(directory): cannot create: \(error.localizedDescription)")
        }
        let store = BootstrapStore(directory: directory)
        if store.exists { throw DomainError("\(directory): already holds a domain") }
        let metadata = DomainMetadata(name: name)
        try store.save(metadata)
        return metadata
    }

    private init(directory: String, profiles: ProfileCatalog, metadata: DomainMetadata, engine: consuming Engine) {
        self.directory = directory
        self.profiles = profiles
        storedMetadata = metadata
        bootstrap = BootstrapStore(directory: directory)
        engineBox = EngineBox(engine)
    }

    /// Opens the domain in `directory`: bootstrap file, LUNs (recognized by their labels),
    /// the setup vdisk when there is one. Missing or foreign LUNs leave the domain degraded.
    public static func open(directory: String, profiles: ProfileCatalog, faultPlan: FaultPlan? = nil,
                            reapPollMicroseconds: Int? = nil) async throws(DomainError) -> Domain {
        let boot = try BootstrapStore(directory: directory).load()
        let engine: Engine
        do { engine = try Engine(queueDepth: 1024, pollMaxMicroseconds: reapPollMicroseconds) } catch { throw DomainError("\(error)") }
        let domain = Domain(directory: directory, profiles: profiles, metadata: boot, engine: engine)
        domain.faultPlan = faultPlan
        for pool in boot.pools where boot.setupPools.contains(pool.id) { domain.openLUNs(of: pool) }
        if !boot.setupPools.isEmpty { try await domain.loadSetupVDisk(boot) }
        for pool in domain.metadata.pools where domain.runtime(of: pool.id) == nil { domain.openLUNs(of: pool) }
        await domain.openBlockMaps()
        try await domain.convertOldFormat()
        domain.updateSharing()
        await domain.releaseOrphanMaps()
        await domain.releaseReservations()
        await domain.finishRollbacks()
        await domain.recoverLostMaps()
        return domain
    }

    /// Reads the setup vdisk's copies (every configured one counts towards the majority);
    /// without a readable majority the domain opens read-only.
    private func loadSetupVDisk(_ boot: DomainMetadata) async throws(DomainError) {
        let store = makeSetupStore(boot.setupPools, in: boot)
        let loaded = try await store.load()
        metadata = loaded.metadata
        setupStore = store
        setupCopyStates = loaded.states
        problems.removeAll { $0.hasPrefix("setup vdisk") }
        for s in loaded.states where s.problem != nil { problems.append("setup vdisk copy on pool '\(s.poolName)': \(s.problem!)") }
        for why in loaded.ignored { problems.append("setup vdisk: ignored a record that is not usable: \(why)") }
        if loaded.hasQuorum {
            readOnlyReason = nil
        } else {
            let missing = loaded.states.filter { $0.problem != nil }.map(\.poolName)
            readOnlyReason = "setup vdisk: only \(loaded.readableCopies) of \(store.copies.count) configured copies readable "
                + "(\(store.majority) needed; missing or damaged: \(missing.joined(separator: ", "))): "
                + "the domain is read-only and no change will be committed until a majority is back"
            problems.insert(readOnlyReason!, at: 0)
        }
    }

    /// A read-only domain tries again to reach a majority of its setup copies (LUNs that
    /// were missing may be back): reopens their pools and reloads. Caller holds `mutation`.
    private func regainQuorum() async {
        let m = metadata
        for pool in m.pools where m.setupPools.contains(pool.id) && runtime(of: pool.id)?.firstLUN == nil {
            problems.removeAll { $0.hasPrefix("pool '\(pool.name)': ") }
            // Ports may still hold this runtime's scheduler and LUN handles: keep them open.
            if let old = runtime(of: pool.id) { stateLock.withLock { retiredRuntimes.append(old) } }
            openLUNs(of: pool)
        }
        do throws(DomainError) {
            try await loadSetupVDisk(m)
        } catch {
            problems.removeAll { $0.hasPrefix("setup vdisk") }
            problems.insert(readOnlyReason ?? "setup vdisk: \(error)", at: 0)
        }
    }

    /// Takes the mutation lock for a metadata change; refused (lock released) while the
    /// domain is read-only and a majority of its setup copies is still not readable.
    func beginChange() async throws(DomainError) {
        await mutation.acquire()
        if readOnlyReason != nil { await regainQuorum() }
        if let why = readOnlyReason {
            mutation.release()
            throw DomainError(why, code: EROFS)
        }
    }

    /// Records of an earlier format are converted once, committed: legs get ids (so they
    /// stay stable), extent lists move into block maps in the pools.
    private func convertOldFormat() async throws(DomainError) {
        guard (metadata.format ?? 0) < DomainMetadata.currentFormat else { return }
        guard readOnlyReason == nil else {
            report("the domain's record is of format \(metadata.format ?? 1): it is converted when a majority of its setup copies is readable")
            return
        }
        await mutation.acquire()
        defer { mutation.release() }
        var next = metadata
        try await convertExtentLists(&next)
        next.format = DomainMetadata.currentFormat
        try await commit(next)
    }

    /// The port NBD serves export `name` through: for a vdisk an async group feeds, a port
    /// of the connection's own that reads the PiT last complete when it connected, pinned
    /// until the port goes (a host reads one image from start to end, never one that
    /// changes under it when the next cycle completes); otherwise the vdisk's own port.
    public func exportPort(for name: String) throws(DomainError) -> VDiskPort {
        let m = metadata
        guard let v = m.vdisk(named: name), let g = m.asyncGroup(of: v), g.isFed else { return try port(for: name) }
        guard let base = g.confirmedPiT, let i = g.members.firstIndex(where: { $0.vdiskId == v.id }) else {
            throw DomainError("vdisk '\(name)' has no complete PiT yet: there is no image to serve")
        }
        return try VDiskPort(domain: self, vdisk: name, reading: PiTReaderPin(domain: self, pit: g.memberPiT(base, i)))
    }

    /// Host connections reading each PiT (by name): a pinned PiT is not retired.
    private var storedReaderPins: [String: Int] = [:]
    func pinForReaders(_ pit: String) { stateLock.withLock { storedReaderPins[pit, default: 0] += 1 } }
    func unpinForReaders(_ pit: String) {
        stateLock.withLock {
            storedReaderPins[pit, default: 1] -= 1
            if storedReaderPins[pit] == 0 { storedReaderPins.removeValue(forKey: pit) }
        }
    }
    /// How many host connections read PiT `pit` now.
    public func readers(of pit: String) -> Int { stateLock.withLock { storedReaderPins[pit] ?? 0 } }

    /// The vdisk's data port (created on first use, shared by every user of the vdisk; one
    /// wins a race).
    public func port(for name: String) throws(DomainError) -> VDiskPort {
        if let existing = stateLock.withLock({ storedPorts[name] }) { return existing }
        let port = try VDiskPort(domain: self, vdisk: name)
        return stateLock.withLock {
            if let raced = storedPorts[name] { return raced }
            storedPorts[name] = port
            return port
        }
    }

    // MARK: LUNs

    private func openLUNs(of pool: PoolRecord) {
        var boxes: [LUNBox?] = []
        for record in pool.luns {
            do {
                let lun = try LUN(path: record.path, readWrite: true)
                let label = try probe(lun.handle, signature: false).label
                guard case .label(let l) = label, l.domainId == metadata.domainId, l.poolId == pool.id,
                      Int(l.lunIndex) == record.index
                else {
                    problems.append("pool '\(pool.name)': LUN \(record.path) does not carry this pool's label")
                    boxes.append(nil)
                    continue
                }
                boxes.append(LUNBox(lun))
            } catch {
                problems.append("pool '\(pool.name)': LUN \(record.path) missing: \(error)")
                boxes.append(nil)
            }
        }
        let array = profiles.arrays[pool.arrayProfile]
        if array == nil { problems.append("pool '\(pool.name)': array profile '\(pool.arrayProfile)' not found") }
        setRuntime(PoolRuntime(luns: boxes, engine: engine, array: array,
                               backgroundSharePercent: profiles.pools[pool.poolProfile]?.backgroundSharePercent ?? 20,
                               faults: faultPlan?.faults(forPool: pool.name), onLUNEvent: lunEvents(pool: pool.name)),
                   of: pool.id)
    }

    /// The paths of the pool's LUNs declared stuck (an I/O outlived `io_timeout`).
    public func stuckLUNs(of pool: PoolRecord) -> [String] { runtime(of: pool.id)?.scheduler?.stuckLUNs ?? [] }

    /// Whether every LUN of the pool is present.
    public func isPoolHealthy(_ pool: PoolRecord) -> Bool { runtime(of: pool.id)?.isHealthy ?? false }

    func lunHandle(pool: UUID, index: Int) -> LUNHandle? { runtime(of: pool)?.luns[index]?.handle }

    /// Reads a LUN's first bytes once and decodes its label and, when asked, the
    /// signature of a foreign format there (a LUN under 4 KiB has neither).
    func probe(_ lun: LUNHandle, signature wanted: Bool) throws -> (label: LUNLabel.DecodeResult, signature: String?) {
        let buffer = try AlignedBuffer(count: DeviceSignatures.probeBytes)
        let length = min(DeviceSignatures.probeBytes, Int(lun.info.sizeBytes / 4096 * 4096))
        guard length >= 4096 else { return (.none, nil) }
        let sink = SyncSink()
        try engine.prepRead(lun: lun, buffer: buffer.pointer, length: length, offset: 0, sink: sink, cookie: 0)
        engine.submit()
        let result = sink.wait()
        if result < 0 { throw IOError(result: result, operation: .read, lun: lun.path, offset: 0) }
        let bytes = UnsafeRawBufferPointer(buffer.bytes)
        return (LUNLabel.decode(bytes), wanted ? DeviceSignatures.detect(UnsafeRawBufferPointer(rebasing: bytes[0..<length])) : nil)
    }

    // MARK: persistence

    /// Persists `next` as the new generation: on the setup vdisk (majority) when it exists,
    /// else atomically in the bootstrap file. The in-memory state changes only after.
    func commit(_ next: DomainMetadata) async throws(DomainError) {
        if let why = readOnlyReason { throw DomainError(why, code: EROFS) }
        var next = next
        // Past any generation a failed commit may have left on a minority of copies, so
        // two different records never share a generation number.
        next.generation = max(metadata.generation, lastAttemptedGeneration) + 1
        next.format = DomainMetadata.currentFormat
        lastAttemptedGeneration = next.generation
        if let setupStore {
            do {
                setupCopyStates = try await setupStore.commit(next)
            } catch {
                await supersedeFailedCommit(store: setupStore)
                throw error
            }
        } else {
            try bootstrap.save(next)
        }
        metadata = next
    }

    /// A commit reported as failed may still sit on a minority of copies, where a later
    /// load (which takes the newest readable generation) would find it. Writing the
    /// unchanged metadata again at a higher generation buries it; when even that misses
    /// a majority, what a restart would load is unknown, so nothing more is committed.
    private func supersedeFailedCommit(store: SetupVDiskStore) async {
        var again = metadata
        again.generation = lastAttemptedGeneration + 1
        again.format = DomainMetadata.currentFormat
        lastAttemptedGeneration = again.generation
        do throws(DomainError) {
            setupCopyStates = try await store.commit(again)
            metadata = again
        } catch {
            let why = "setup vdisk: a change failed and could not be undone on a majority of the copies (\(error)); "
                + "the domain is read-only until it is restarted with its copies readable"
            readOnlyReason = why
            report(why)
        }
    }

    private var lastAttemptedGeneration: UInt64 = 0

    private func makeSetupStore(_ poolIds: [UUID], in metadata: DomainMetadata) -> SetupVDiskStore {
        // Every configured copy, present or not: the majority is of the configured copies.
        let copies = poolIds.map { id -> SetupVDiskStore.Copy in
            let pool = metadata.pool(id: id)
            return SetupVDiskStore.Copy(poolName: pool?.name ?? id.uuidString, lun: runtime(of: id)?.firstLUN,
                                        metadataReserveBytes: pool?.metadataReserveBytes ?? (4 << 20))
        }
        return SetupVDiskStore(copies: copies, engine: engine)
    }

    // MARK: pools

    public func createPool(name: String, arrayProfile: String, poolProfile: String?, lunPaths: [String],
                           createBytes: UInt64?, force: Bool) async throws(DomainError) -> PoolRecord
    {
        try await beginChange()
        defer { mutation.release() }
        guard Parse.name(name) != nil else { throw DomainError("pool name '\(name)': use letters, digits, - _ . (at most 64)") }
        guard metadata.pool(named: name) == nil else { throw DomainError("pool '\(name)' already exists") }
        guard let array = profiles.arrays[arrayProfile] else { throw DomainError("array profile '\(arrayProfile)' not found") }
        let poolProfileName = poolProfile ?? arrayProfile
        guard let profile = profiles.pools[poolProfileName] else { throw DomainError("pool profile '\(poolProfileName)' not found") }
        guard profile.arrayProfile == arrayProfile else {
            throw DomainError("pool profile '\(poolProfileName)' is for array '\(profile.arrayProfile)', not '\(arrayProfile)'")
        }
        guard !lunPaths.isEmpty else { throw DomainError("a pool needs at least one --lun") }
        guard Set(lunPaths).count == lunPaths.count else { throw DomainError("the same --lun is given twice") }
        let used = Set(metadata.pools.flatMap { $0.luns.map(\.path) })
        if let taken = lunPaths.first(where: { used.contains($0) }) { throw DomainError("LUN \(taken) already belongs to a pool of this domain") }

        let poolId = UUID()
        var created: [String] = []
        var boxes: [LUNBox] = []
        var records: [LUNRecord] = []
        func cleanUp() { for path in created { try? FileManager.default.removeItem(atPath: path) } }
        let reserve = max(profile.metadataReserveBytes, 128 << 10)
        for (index, path) in lunPaths.enumerated() {
            do {
                if !FileManager.default.fileExists(atPath: path) {
                    guard let createBytes else { throw DomainError("LUN \(path) does not exist (give --create-size to create a file)") }
                    try LUN.createFile(path: path, sizeBytes: createBytes)
                    created.append(path)
                }
                let lun = try LUN(path: path, readWrite: true)
                guard lun.info.logicalBlockSize <= array.logicalBlockSize || lun.info.logicalBlockSize <= 4096 else {
                    throw DomainError("LUN \(path): logical block size \(lun.info.logicalBlockSize) not supported")
                }
                if !force {
                    let probed = try probe(lun.handle, signature: true) // one read for both checks
                    switch probed.label {
                    case .label(let l) where l.domainId != metadata.domainId:
                        throw DomainError("LUN \(path) belongs to another domain (\(l.domainId)); use --force to take it")
                    case .label:
                        throw DomainError("LUN \(path) carries a label of another pool of this domain; use --force to take it")
                    case .damaged(let why):
                        throw DomainError("LUN \(path) carries a damaged svsp label (\(why)); use --force to take it")
                    case .none:
                        if let found = probed.signature {
                            throw DomainError("LUN \(path) holds \(found); use --force to overwrite it")
                        }
                    }
                }
                let dataStart = (reserve + profile.extentBytes - 1) / profile.extentBytes * profile.extentBytes
                let extents = lun.info.sizeBytes > dataStart ? Int((lun.info.sizeBytes - dataStart) / profile.extentBytes) : 0
                guard extents > 0 else {
                    throw DomainError("LUN \(path) (\(ByteSize.format(lun.info.sizeBytes))) is smaller than its metadata reserve plus one extent (\(ByteSize.format(dataStart + profile.extentBytes)))")
                }
                records.append(LUNRecord(path: path, index: index, sizeBytes: lun.info.sizeBytes, dataStartBytes: dataStart, extentCount: extents))
                boxes.append(LUNBox(lun))
            } catch let error as DomainError {
                cleanUp()
                throw error
            } catch {
                cleanUp()
                throw DomainError("\(error)")
            }
        }
        // Labels first, metadata second: a crash in between leaves labelled LUNs that no
        // pool references, which a later create with --force (or the same pool id) may take.
        do {
            for (index, box) in boxes.enumerated() {
                let label = LUNLabel(domainId: metadata.domainId, poolId: poolId, lunIndex: UInt32(index),
                                     lunCount: UInt32(boxes.count), sizeBytes: box.handle.info.sizeBytes)
                let buffer = try AlignedBuffer(count: 4096)
                label.encode(into: buffer.bytes)
                _ = try await engine.write(lun: box.handle, from: buffer.pointer, length: 4096, offset: 0, fua: true)
            }
        } catch {
            cleanUp()
            throw DomainError("cannot label LUNs: \(error)")
        }
        var pool = PoolRecord(id: poolId, name: name, arrayProfile: arrayProfile, poolProfile: poolProfileName,
                              extentBytes: profile.extentBytes, metadataReserveBytes: reserve,
                              stripe: profile.placement == .stripe, luns: records)
        guard let (area, _) = Self.plannedMetadataArea(for: pool) else {
            cleanUp()
            let needs = ByteSize.format(MetaLayout.sized(forChunks: pool.extentCount).bytes)
            throw DomainError("LUN \(lunPaths[0]) (\(records[0].extentCount) extents of \(ByteSize.format(pool.extentBytes))) is too small "
                + "for the pool's metadata area (\(needs)) plus one extent of data")
        }
        pool.metadataArea = area
        setRuntime(PoolRuntime(luns: boxes, engine: engine, array: array, backgroundSharePercent: profile.backgroundSharePercent,
                               faults: faultPlan?.faults(forPool: name), onLUNEvent: lunEvents(pool: name)),
                   of: poolId)
        do {
            // LUNs svsp just made are sparse files, zeros throughout; any other may hold old data.
            let meta = try await formatBlockMaps(of: pool, area: area, unzeroed: created.count != lunPaths.count)
            var next = metadata
            next.pools.append(pool)
            try await commit(next)
            setPoolMeta(meta, of: poolId)
        } catch {
            setRuntime(nil, of: poolId)
            cleanUp()
            throw error
        }
        if created.count != lunPaths.count { zeroingWork.signal() }
        return pool
    }

    public func deletePool(name: String) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        guard let pool = metadata.pool(named: name) else { throw DomainError("pool '\(name)' not found") }
        let users = metadata.vdisks.filter { $0.legs.contains { $0.poolId == pool.id } }.map(\.name)
        guard users.isEmpty else { throw DomainError("pool '\(name)' is used by vdisk(s) \(users.joined(separator: ", "))") }
        guard !metadata.setupPools.contains(pool.id) else { throw DomainError("pool '\(name)' holds a copy of the setup vdisk") }
        // Zero writes may still be on their way to its LUNs: a pool made on them next must not get them.
        guard zeroingExtents(of: pool) == 0 else {
            throw DomainError("pool '\(name)' still has \(zeroingExtents(of: pool)) freed extents being zeroed; try again when `pool show \(name)` shows none")
        }
        var next = metadata
        next.pools.removeAll { $0.id == pool.id }
        try await commit(next)
        setPoolMeta(nil, of: pool.id)
        // Clear the labels so the LUNs can be reused without --force.
        if let boxes = runtime(of: pool.id)?.luns, let zero = try? AlignedBuffer(count: 4096) {
            memset(zero.pointer, 0, 4096)
            for box in boxes.compactMap({ $0 }) { _ = try? await engine.write(lun: box.handle, from: zero.pointer, length: 4096, offset: 0, fua: true) }
        }
        setRuntime(nil, of: pool.id)
    }

    /// Extents of the pool free to allocate now (none being zeroed).
    public func freeExtents(of pool: PoolRecord) -> Int { Int(poolMeta(pool.id)?.freeChunks ?? 0) }

    // MARK: vdisks

    public func createVDisk(name: String, poolName: String, mirrorPools: [String] = [], sizeBytes: UInt64, blockSize: Int,
                            thin: Bool, mode: MirrorMode = .automaticFailover, dirtyRegions: Bool = true)
        async throws(DomainError) -> VDiskRecord
    {
        try await retryingAfterZeroing { () async throws(DomainError) -> VDiskRecord in
            try await createVDiskOnce(name: name, poolName: poolName, mirrorPools: mirrorPools, sizeBytes: sizeBytes,
                                      blockSize: blockSize, thin: thin, mode: mode, dirtyRegions: dirtyRegions)
        }
    }

    /// Runs `change`; when it lacks free extents (ENOSPC) while freed extents are still
    /// being zeroed, waits for the zeroing and tries again.
    func retryingAfterZeroing<T>(_ change: () async throws(DomainError) -> T) async throws(DomainError) -> T {
        while true {
            do {
                return try await change()
            } catch where error.code == ENOSPC {
                guard await waitForZeroing(in: metadata.pools.map(\.id)) else { throw error }
            }
        }
    }

    private func createVDiskOnce(name: String, poolName: String, mirrorPools: [String], sizeBytes: UInt64, blockSize: Int,
                                 thin: Bool, mode: MirrorMode, dirtyRegions: Bool) async throws(DomainError) -> VDiskRecord
    {
        try await beginChange()
        defer { mutation.release() }
        guard Parse.name(name) != nil else { throw DomainError("vdisk name '\(name)': use letters, digits, - _ . (at most 64)") }
        guard metadata.vdisk(named: name) == nil else { throw DomainError("vdisk '\(name)' already exists") }
        guard blockSize == 512 || blockSize == 4096 else { throw DomainError("--block-size \(blockSize): must be 512 or 4096") }
        guard sizeBytes > 0, sizeBytes % UInt64(blockSize) == 0 else {
            throw DomainError("size \(sizeBytes): must be a positive multiple of the block size \(blockSize)")
        }
        let poolNames = [poolName] + mirrorPools
        guard poolNames.count <= 4 else { throw DomainError("a sync mirror has at most 4 legs, got \(poolNames.count)") }
        guard Set(poolNames).count == poolNames.count else { throw DomainError("each mirror leg must be in a different pool") }
        var pools: [PoolRecord] = []
        for name in poolNames {
            guard let pool = metadata.pool(named: name) else { throw DomainError("pool '\(name)' not found") }
            pools.append(pool)
        }
        let legs = try await newLegs(in: pools, sizeBytes: sizeBytes, thin: thin, vdisk: name)
        let vdisk = VDiskRecord(id: UUID(), name: name, sizeBytes: sizeBytes, blockSize: blockSize, thin: thin, legs: legs,
                                mode: mode, dirtyRegions: dirtyRegions)
        var next = metadata
        next.vdisks.append(vdisk)
        do {
            try await commit(next)
        } catch {
            releaseLegMaps(legs, after: nil)
            throw error
        }
        return vdisk
    }

    /// New legs of `sizeBytes`, one per pool, their block maps made (every chunk allocated
    /// when thick). Maps made before a failure are released again.
    func newLegs(in pools: [PoolRecord], sizeBytes: UInt64, thin: Bool, vdisk: String) async throws(DomainError) -> [LegRecord] {
        var legs: [LegRecord] = []
        for pool in pools {
            let leg = LegRecord(poolId: pool.id)
            do {
                try await makeLegMap(leg, in: pool, sizeBytes: sizeBytes, thin: thin, vdisk: vdisk)
            } catch {
                releaseLegMaps(legs, after: nil)
                throw error
            }
            legs.append(leg)
        }
        return legs
    }

    public func growVDisk(name: String, sizeBytes: UInt64) async throws(DomainError) -> VDiskRecord {
        try await retryingAfterZeroing { () async throws(DomainError) -> VDiskRecord in try await growVDiskOnce(name: name, sizeBytes: sizeBytes) }
    }

    private func growVDiskOnce(name: String, sizeBytes: UInt64) async throws(DomainError) -> VDiskRecord {
        try await beginChange()
        defer { mutation.release() }
        guard let index = metadata.vdisks.firstIndex(where: { $0.name == name }) else { throw DomainError("vdisk '\(name)' not found") }
        var vdisk = metadata.vdisks[index]
        guard sizeBytes >= vdisk.sizeBytes else { throw DomainError("vdisk '\(name)': cannot shrink from \(vdisk.sizeBytes) to \(sizeBytes) bytes") }
        guard sizeBytes % UInt64(vdisk.blockSize) == 0 else {
            throw DomainError("size \(sizeBytes): must be a multiple of the block size \(vdisk.blockSize)")
        }
        // The maps grow first (thick: their new chunks allocated); a failure shrinks back those grown.
        var grown: [(PoolRecord, LegRecord, UInt64)] = []
        func shrinkBack() async {
            for (pool, leg, old) in grown {
                _ = try? await changeBlockMaps(pool) { (v: inout VolumeTransaction) throws(PageStore.Failure) in try v.resizeMap(leg.id, chunks: old) }
            }
        }
        for leg in vdisk.legs {
            guard let pool = metadata.pool(id: leg.poolId) else { throw DomainError("vdisk '\(name)': a leg's pool is gone") }
            let old = poolMeta(pool.id)?.mapCount(leg.id) ?? 0
            let wanted = Self.chunkCount(sizeBytes, pool)
            guard wanted > old else { continue }
            let thin = vdisk.thin, zeroing = zeroingExtents(of: pool)
            do {
                try await changeBlockMaps(pool) { (v: inout VolumeTransaction) throws(PageStore.Failure) in
                    try v.resizeMap(leg.id, chunks: wanted)
                    if !thin { try v.map(leg.id, at: old, to: try v.allocate(wanted - old)) }
                }
            } catch {
                await shrinkBack()
                guard error.code == ENOSPC else { throw error }
                throw DomainError("pool '\(pool.name)' has \(freeExtents(of: pool)) free extents"
                    + (zeroing > 0 ? " (\(zeroing) more being zeroed)" : "") + "; growing '\(name)' needs \(wanted - old)", code: ENOSPC)
            }
            grown.append((pool, leg, old))
        }
        vdisk.sizeBytes = sizeBytes
        // The write-intent bitmap covers the new size before any write can reach it.
        if let log = stateLock.withLock({ storedPorts[name] })?.dirtyLog, !log.grow(sizeBytes: sizeBytes) {
            await shrinkBack()
            throw DomainError("vdisk '\(name)': cannot extend its dirty-region bitmap; not grown")
        }
        var next = metadata
        next.vdisks[index] = vdisk
        do {
            try await commit(next)
        } catch {
            await shrinkBack()
            throw error
        }
        return vdisk
    }

    public func deleteVDisk(name: String) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        guard let v = metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        if let mode = v.export {
            throw DomainError("vdisk '\(name)' is exported over NBD (\(mode.rawValue)); run `svsp-ctl vdisk unexport \(name)` first")
        }
        try refuseWhileCopying(name, "its delete")
        if let g = metadata.asyncGroup(of: v) {
            throw DomainError("vdisk '\(name)' is in async group '\(g.name)'; run `svsp-ctl async delete-group \(g.name)` first")
        }
        if let g = metadata.vdg(of: v) {
            throw DomainError("vdisk '\(name)' is in virtual disk group '\(g.name)'; run `svsp-ctl vdg remove \(g.name) --vdisk \(name)` first")
        }
        let pits = metadata.pits(of: v)
        if !pits.isEmpty {
            throw DomainError("vdisk '\(name)' has \(pits.count) PiT(s) (\(pits.prefix(3).map(\.name).joined(separator: ", "))\(pits.count > 3 ? ", ..." : "")); "
                + "delete them first with `svsp-ctl pit delete NAME`")
        }
        var next = metadata
        next.vdisks.removeAll { $0.name == name }
        try await commit(next)
        updateSharing()
        let port = stateLock.withLock { storedPorts.removeValue(forKey: name) }
        releaseLegMaps(v.legs, after: port)
    }

    /// Adds a leg in `poolName` (state copying); the caller starts the copy.
    func addLeg(vdisk name: String, poolName: String) async throws(DomainError) -> (index: Int, id: UUID) {
        try await retryingAfterZeroing { () async throws(DomainError) -> (index: Int, id: UUID) in
            try await addLegOnce(vdisk: name, poolName: poolName)
        }
    }

    private func addLegOnce(vdisk name: String, poolName: String) async throws(DomainError) -> (index: Int, id: UUID) {
        try await beginChange()
        defer { mutation.release() }
        guard let vi = metadata.vdisks.firstIndex(where: { $0.name == name }) else { throw DomainError("vdisk '\(name)' not found") }
        let v = metadata.vdisks[vi]
        guard v.legs.count < 4 else { throw DomainError("vdisk '\(name)' already has 4 legs") }
        guard let pool = metadata.pool(named: poolName) else { throw DomainError("pool '\(poolName)' not found") }
        guard !v.legs.contains(where: { $0.poolId == pool.id }) else { throw DomainError("vdisk '\(name)' already has a leg in pool '\(poolName)'") }
        guard v.legs.contains(where: { $0.state == .inSync }) else { throw DomainError("vdisk '\(name)' has no in-sync leg to copy from") }
        var leg = try await newLegs(in: [pool], sizeBytes: v.sizeBytes, thin: false, vdisk: name)[0]
        leg.state = .copying
        leg.copyAll = true // cleared once the bitmap carries the whole copy
        var next = metadata
        next.vdisks[vi].legs.append(leg)
        do {
            try await commit(next)
        } catch {
            releaseLegMaps([leg], after: nil)
            throw error
        }
        return (next.vdisks[vi].legs.count - 1, leg.id)
    }

    /// Removes the leg with this id (an add-leg undone), wherever it is now.
    func removeLeg(vdisk name: String, id: UUID) async throws(DomainError) {
        guard let index = metadata.vdisk(named: name)?.legIndex(id) else { return }
        try await removeLeg(vdisk: name, leg: index)
    }

    /// Removes leg `leg` (never the last in-sync one); its extents return to the pool.
    func removeLeg(vdisk name: String, leg: Int) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        guard let vi = metadata.vdisks.firstIndex(where: { $0.name == name }) else { throw DomainError("vdisk '\(name)' not found") }
        let v = metadata.vdisks[vi]
        guard v.legs.indices.contains(leg) else { throw DomainError("vdisk '\(name)' has legs 0..\(v.legs.count - 1), not \(leg)") }
        guard v.legs.count > 1 else { throw DomainError("vdisk '\(name)' has only one leg") }
        try refuseWhileCopying(name, "removing a leg")
        let othersInSync = v.legs.indices.contains { $0 != leg && v.legs[$0].state == .inSync }
        guard othersInSync else { throw DomainError("leg \(leg) is the last in-sync leg of '\(name)'") }
        var next = metadata
        next.vdisks[vi].legs.remove(at: leg)
        try await commit(next)
        releaseLegMaps([v.legs[leg]], after: stateLock.withLock { storedPorts[name] })
    }

    /// Turns in-sync leg `leg` into an independent vdisk `newName`, consistent as of now
    /// (the caller holds host writes out while this commits).
    func splitLeg(vdisk name: String, leg: Int, as newName: String) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        guard Parse.name(newName) != nil else { throw DomainError("vdisk name '\(newName)': use letters, digits, - _ . (at most 64)") }
        guard metadata.vdisk(named: newName) == nil else { throw DomainError("vdisk '\(newName)' already exists") }
        guard let vi = metadata.vdisks.firstIndex(where: { $0.name == name }) else { throw DomainError("vdisk '\(name)' not found") }
        let v = metadata.vdisks[vi]
        guard v.legs.indices.contains(leg) else { throw DomainError("vdisk '\(name)' has legs 0..\(v.legs.count - 1), not \(leg)") }
        guard v.legs[leg].state == .inSync else { throw DomainError("leg \(leg) of '\(name)' is \(v.legs[leg].state.rawValue), not in-sync") }
        try refuseWhileCopying(name, "a split")
        guard v.legs.indices.contains(where: { $0 != leg && v.legs[$0].state == .inSync }) else {
            throw DomainError("leg \(leg) is the last in-sync leg of '\(name)'")
        }
        var next = metadata
        var split = next.vdisks[vi].legs.remove(at: leg)
        split.failedAtGeneration = nil
        next.vdisks.append(VDiskRecord(id: UUID(), name: newName, sizeBytes: v.sizeBytes, blockSize: v.blockSize, thin: v.thin,
                                       legs: [split], mode: v.mode, dirtyRegions: v.dirtyRegions))
        try await commit(next)
    }

    /// Marks legs failed (persisted before the host hears of the write that failed them).
    /// A leg no longer in the vdisk (removed meanwhile) has nothing left to mark.
    func markLegsFailed(vdisk name: String, legs ids: [UUID]) async throws(DomainError) {
        try await changeLegs(vdisk: name, ids) { leg, nextGeneration in
            guard leg.state != .failed else { return false }
            leg.markFailed(atGeneration: nextGeneration)
            return true
        }
    }

    /// Applies `change` to the legs with these ids (gone ones are skipped; it also gets the
    /// generation the commit will have) and commits when it changed any. A deleted vdisk
    /// has nothing to change.
    private func changeLegs(vdisk name: String, _ ids: [UUID], _ change: (inout LegRecord, UInt64) -> Bool) async throws(DomainError) {
        try await beginChange()
        defer { mutation.release() }
        guard let vi = metadata.vdisks.firstIndex(where: { $0.name == name }) else { return }
        var next = metadata
        var changed = false
        for id in ids {
            guard let l = next.vdisks[vi].legIndex(id) else { continue }
            if change(&next.vdisks[vi].legs[l], metadata.generation + 1) { changed = true }
        }
        if changed { try await commit(next) }
    }

    /// Sets leg states (resync start and end), legs named by id. Legs in `keepFailed` that
    /// are failed now stay failed (a host write failed them during the copy); returns those.
    /// A leg set in sync has nothing left to copy (`copyAll` goes too).
    @discardableResult
    func setLegStates(vdisk name: String, _ states: [UUID: LegState], keepFailed: Set<UUID> = []) async throws(DomainError) -> [UUID] {
        try await beginChange()
        defer { mutation.release() }
        guard let vi = metadata.vdisks.firstIndex(where: { $0.name == name }) else { throw DomainError("vdisk '\(name)' not found") }
        var next = metadata
        var kept: [UUID] = []
        for (id, st) in states {
            guard let l = next.vdisks[vi].legIndex(id) else {
                throw DomainError("vdisk '\(name)': a leg of the copy was removed or split off meanwhile")
            }
            if keepFailed.contains(id), next.vdisks[vi].legs[l].state == .failed {
                kept.append(id)
                continue
            }
            next.vdisks[vi].legs[l].state = st
            if st == .inSync {
                next.vdisks[vi].legs[l].failedAtGeneration = nil
                next.vdisks[vi].legs[l].copyAll = nil
            }
        }
        try await commit(next)
        return kept
    }

    /// The bitmap now carries the whole-leg copy of these legs (every bit set durably).
    func clearCopyAll(vdisk name: String, legs ids: [UUID]) async throws(DomainError) {
        try await changeLegs(vdisk: name, ids) { leg, _ in
            guard leg.copyAll != nil else { return false }
            leg.copyAll = nil
            return true
        }
    }

    /// Refuses a change that would remove or re-index legs under a running copy or verify.
    func refuseWhileCopying(_ name: String, _ what: String) throws(DomainError) {
        if let running = mirrors.progress(name) {
            throw DomainError("vdisk '\(name)': a \(running.operation) is running; \(what) waits until it ends (see `svsp-ctl mirror status \(name)`)",
                              code: EBUSY)
        }
        if let port = stateLock.withLock({ storedPorts[name] }), port.repairsRunning > 0 {
            throw DomainError("vdisk '\(name)': a read repair is rewriting a leg; \(what) waits until it ends (try again in a moment)", code: EBUSY)
        }
    }

    // MARK: setup vdisk

    /// Moves the metadata onto a setup vdisk mirrored on `poolNames` (3..5, or 1 for a scratch domain).
    public func createSetupVDisk(poolNames: [String]) async throws(DomainError) -> [String] {
        try await beginChange()
        defer { mutation.release() }
        guard metadata.setupPools.isEmpty else { throw DomainError("the setup vdisk already exists") }
        guard poolNames.count == 1 || (3...5).contains(poolNames.count) else {
            throw DomainError("the setup vdisk needs 3..5 pools (or 1 for a scratch domain), got \(poolNames.count)")
        }
        guard Set(poolNames).count == poolNames.count else { throw DomainError("a pool is given twice") }
        var ids: [UUID] = []
        for name in poolNames {
            guard let pool = metadata.pool(named: name) else { throw DomainError("pool '\(name)' not found") }
            guard runtime(of: pool.id)?.firstLUN != nil else { throw DomainError("pool '\(name)' is missing its first LUN") }
            ids.append(pool.id)
        }
        var next = metadata
        next.setupPools = ids
        next.generation = metadata.generation + 1
        let store = makeSetupStore(ids, in: next)
        try await store.commit(next)
        // The bootstrap file keeps pointing at the setup pools so startup can find the copies.
        try bootstrap.save(next)
        metadata = next
        setupStore = store
        setupCopyStates = store.copies.map { .init(poolName: $0.poolName, generation: next.generation, problem: nil) }
        return poolNames.count == 1 ? ["a setup vdisk on one pool is for scratch domains: losing that pool loses the domain"] : []
    }
}

/// Waits for one completion (control-plane helper outside async contexts).
final class SyncSink: CompletionSink, @unchecked Sendable {
    private let semaphore = DispatchSemaphore(value: 0)
    private var result: Int64 = 0
    override func ioCompleted(cookie: UInt64, result: Int64) {
        self.result = result
        semaphore.signal()
    }
    func wait() -> Int64 {
        semaphore.wait()
        return result
    }
}
