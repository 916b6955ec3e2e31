import Foundation
import IOEngine
import Logging

/// `svsp-ctl serve`: runs one domain in the foreground until SIGINT/SIGTERM.
/// Holds STATE/lock (a second daemon on the same STATE is refused), serves the
/// management socket, and on a signal stops accepting, lets the running command
/// finish (up to `commandGraceSeconds`), and exits 0 (metadata is persisted at every commit).
public final class Daemon: @unchecked Sendable {
    public struct Options: Sendable {
        public var directory: String
        public var mgmtSocket: String?
        public var profilesRoot: String?
        public var metricsListen: String?
        public var nbdListen: String?
        public var nbdMaxConnections: Int
        public var faultPlan: String?
        /// HOST:PORT for replication connections from peer domains (nil: none accepted).
        public var replListen: String?
        /// The engine's polling budget at low depth (nil: the engine's default).
        public var reapPollMicroseconds: Int?
        /// NBD completions reaped on the NBD event loop (its own engine), or by the domain engine's reaper thread.
        public var nbdReapOnLoop: Bool
        public init(directory: String, mgmtSocket: String? = nil, profilesRoot: String? = nil, metricsListen: String? = nil,
                    nbdListen: String? = nil, nbdMaxConnections: Int = NBDServer.defaultMaxConnections, faultPlan: String? = nil,
                    replListen: String? = nil, reapPollMicroseconds: Int? = nil, nbdReapOnLoop: Bool = true)
        {
            self.nbdReapOnLoop = nbdReapOnLoop
            self.reapPollMicroseconds = reapPollMicroseconds
            self.replListen = replListen
            self.faultPlan = faultPlan
            self.nbdMaxConnections = nbdMaxConnections
            self.directory = directory
            self.mgmtSocket = mgmtSocket
            self.profilesRoot = profilesRoot
            self.metricsListen = metricsListen
            self.nbdListen = nbdListen
        }
    }

    private let options: Options
    private var lockFD: Int32 = -1
    private let stopping = DispatchSemaphore(value: 0)
    private let running = RunningCommands()
    private let logger: Logger
    static let commandGraceSeconds = 30.0

    public init(options: Options, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    private func log(_ message: String) { logger.info("\(message)") }

    /// Runs until a signal; returns normally after a clean shutdown.
    public func run() async throws(DomainError) {
        let dir = options.directory
        try NBDServer.validate(maxConnections: options.nbdMaxConnections)
        if let us = options.reapPollMicroseconds, !(0...maxPollMicroseconds).contains(us) {
            throw DomainError("--reap-poll-us \(us): must be 0 to \(maxPollMicroseconds) (microseconds)")
        }
        if let listen = options.replListen { _ = try HostPort.parse(listen, option: "--repl-listen", listening: true) }
        let faultPlan = try options.faultPlan.map { path throws(DomainError) in try FaultPlan.load(path) }
        guard BootstrapStore(directory: dir).exists else {
            throw DomainError("\(dir): no domain here (run `svsp-ctl domain init --dir \(dir) --name NAME`)")
        }
        try takeLock()
        let catalog: ProfileCatalog
        do {
            catalog = try ProfileCatalog(root: ProfileCatalog.defaultRoot(explicit: options.profilesRoot))
        } catch {
            throw DomainError("hardware profiles: \(error.problems.first?.description ?? "\(error)")")
        }
        let domain = try await Domain.open(directory: dir, profiles: catalog, faultPlan: faultPlan,
                                           reapPollMicroseconds: options.reapPollMicroseconds)
        if let path = options.faultPlan, let plan = faultPlan {
            logger.critical("FAULT PLAN ACTIVE (\(path)): \(plan.rules.count) rule(s) for LUN I/O and \(plan.linkRules.count) for the replication link fail on purpose; never use this in production")
        }
        domain.mirrors.log = { [logger] in logger.warning("\($0)") }
        domain.eventLog = { [logger] in logger.error("\($0)") }
        // Mirrors written when the daemon last stopped: level their dirty regions first.
        await domain.mirrors.recoverAfterRestart { [logger] in logger.notice("\($0)") }
        // Async role changes a crash cut short, finished before hosts or the peer are served.
        for line in await domain.finishAsyncTransitions() { logger.notice("\(line)") }
        let upkeep = Task { await domain.mirrors.runUpkeep() }
        // Freed extents are zeroed in the background before they can be handed out again.
        let zeroer = Task { [logger] in await domain.runZeroer { logger.warning("\($0)") } }
        let checkpointer = Task { [logger] in await domain.runCheckpointer { logger.warning("\($0)") } }
        let nbd = try NBDServer(domain: domain, socketPath: dir + "/nbd.sock", tcpListen: options.nbdListen,
                                maxConnections: options.nbdMaxConnections, reapOnLoop: options.nbdReapOnLoop) { [logger] in
            logger.notice("\($0)")
        }
        domain.exportClosed = { [nbd] name in await nbd.dropConnections(export: name) }
        let replication = ReplicationService(domain: domain) { [logger] in logger.notice("\($0)") }
        try replication.start(listen: options.replListen)
        let handler = CommandHandler(domain: domain, nbd: nbd, replication: replication)
        let socketPath = options.mgmtSocket ?? MgmtPaths.defaultSocket(dir)
        let mgmt = try MgmtServer(socketPath: socketPath, running: running, logger: logger) { await handler.handle($0) }
        try BootstrapStore.writeAtomically(Data(socketPath.utf8), to: MgmtPaths.recorded(dir))
        log("serving domain '\(domain.metadata.name)' from \(dir), generation \(domain.metadata.generation), "
            + "health \(domain.health), management socket \(socketPath), NBD on \(nbd.socketPath)"
            + (nbd.tcpAddress.map { " and tcp \($0)" } ?? "")
            + (replication.listenAddress.map { ", replication on \($0)" } ?? ""))
        for p in domain.problems { logger.warning("degraded: \(p)") }
        if let n = TestKnobs.schedulerCapacity { logger.critical("TEST KNOB SET (SVSP_SCHEDULER_CAPACITY=\(n)): pool schedulers hold \(n) requests") }
        if let point = CrashPoint.armed { logger.critical("TEST CRASH POINT ARMED (SVSP_CRASH_AT=\(point)): this daemon will exit there on purpose") }
        var metricsServer: MetricsServer?
        if let listen = options.metricsListen {
            let server = try MetricsServer(hostPort: listen) { [domain] in
                let pools = domain.metadata.pools.map {
                    (name: $0.name, capacity: $0.capacityBytes, free: UInt64(domain.freeExtents(of: $0)) * $0.extentBytes,
                     healthy: domain.isPoolHealthy($0), stuckLUNs: domain.stuckLUNs(of: $0).count)
                }
                domain.metrics.updatePools(pools)
                let m = domain.metadata
                domain.metrics.updatePiTs(m.vdisks.filter { $0.snapshot == nil }.map { v in
                    let pits = m.pits(of: v)
                    return (vdisk: v.name, pits: pits.count, heldBytes: pits.reduce(0) { $0 + domain.bytesHeldOnly(by: $1) },
                            snapshots: m.vdisks.filter { $0.snapshot?.vdiskName == v.name }.count)
                })
                domain.metrics.updateNBD(exports: nbd.registry.exportTotals(), connections: nbd.registry.connections())
                domain.metrics.updateReplication(
                    peers: m.peerList.map { p in
                        let link = replication.status(of: p.name)
                        return (name: p.name, up: link?.outbound == .connected, rttMs: link?.rttMs)
                    },
                    groups: m.asyncGroupList.map { g in
                        let progress = replication.progress(ofGroup: g.name)
                        return (name: g.name, role: g.role.rawValue, ageSeconds: g.confirmedAt.map { Date().timeIntervalSince1970 - $0 },
                                toSend: progress.map { $0.bytesToSend - min($0.bytesSent, $0.bytesToSend) } ?? 0,
                                dataBytes: progress?.dataBytes ?? 0, wireBytes: progress?.wireBytes ?? 0)
                    })
                return domain.metrics.exposition()
            }
            metricsServer = server
            log("Prometheus metrics on http://\(listen)/metrics")
        }

        let signals = installSignalHandlers()
        ServiceManagerNotify.send("READY=1\nSTATUS=serving domain '\(domain.metadata.name)', health \(domain.health)")
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            DispatchQueue.global().async { self.stopping.wait(); c.resume() }
        }
        log("signal received: stopping")
        ServiceManagerNotify.send("STOPPING=1")
        mgmt.stopAccepting()
        metricsServer?.stop()
        replication.stop()
        // Both waits block and what they wait for may need Tasks to finish: they run on a
        // thread of their own, not on one of the concurrency pool's. nbd.stop() waits for
        // the NBD requests in flight; then the commands in progress finish and answer (the
        // handler is a reentrant actor, so only counting them tells when they are done). A
        // long one (a foreground resync) is cut off after the grace time; it stopped at a
        // committed generation and resumes.
        let unfinished = await withCheckedContinuation { (c: CheckedContinuation<Int, Never>) in
            Thread { [running] in
                nbd.stop()
                c.resume(returning: running.closeAndWait(seconds: Self.commandGraceSeconds))
            }.start()
        }
        upkeep.cancel()
        zeroer.cancel()
        checkpointer.cancel()
        if unfinished > 0 {
            // Their writes may still be in flight: leave the dirty regions for the next start.
            logger.warning("stopping with \(unfinished) command(s) still running after \(Int(Self.commandGraceSeconds))s")
        } else {
            // A clean stop: no write is in flight, so mirrors whose legs agree start clean.
            for v in domain.metadata.vdisks where v.isMirror && v.legs.allSatisfy({ $0.state == .inSync }) {
                (try? domain.port(for: v.name))?.dirtyLog?.clean(idleSeconds: 0)
            }
        }
        // Pool metadata written in place: the next start replays no journal.
        for (pool, why) in await domain.checkpointPools() { logger.warning("pool '\(pool.name)': metadata checkpoint at stop failed: \(why)") }
        mgmt.shutdown()
        unlink(socketPath)
        unlink(MgmtPaths.recorded(dir))
        for s in signals { s.cancel() }
        log("stopped cleanly at generation \(domain.metadata.generation)")
    }

    private func takeLock() throws(DomainError) {
        let path = options.directory + "/lock"
        lockFD = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard lockFD >= 0 else { throw DomainError("\(path): \(String(cString: strerror(errno)))") }
        if flock(lockFD, LOCK_EX | LOCK_NB) != 0 {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
            throw DomainError("domain in \(options.directory) is already being served (pid \(holder))")
        }
        ftruncate(lockFD, 0)
        let pid = Data("\(getpid())\n".utf8)
        _ = UnixSocket.writeAll(lockFD, pid)
    }

    private func installSignalHandlers() -> [DispatchSourceSignal] {
        [SIGINT, SIGTERM].map { sig in
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { [stopping] in stopping.signal() }
            source.resume()
            return source
        }
    }
}
