import Foundation
import IOEngine

/// Runs management commands against the domain, one at a time, and renders each
/// result twice: a table for people and JSON for scripts.
public actor CommandHandler {
    let domain: Domain
    let nbd: NBDServer?
    let replication: ReplicationService?

    public init(domain: Domain, nbd: NBDServer? = nil, replication: ReplicationService? = nil) {
        self.domain = domain
        self.nbd = nbd
        self.replication = replication
    }

    public func handle(_ request: MgmtRequest) async -> MgmtResponse {
        do {
            return try await dispatch(request)
        } catch {
            return .failure(error.message)
        }
    }

    func arg(_ r: MgmtRequest, _ key: String) throws(DomainError) -> String {
        guard let v = r.args[key], !v.isEmpty else { throw DomainError("missing argument '\(key)'") }
        return v
    }

    private func size(_ text: String, _ what: String) throws(DomainError) -> UInt64 {
        do { return try ByteSize.parse(text) } catch { throw DomainError("\(what) \(error)") }
    }

    private func dispatch(_ r: MgmtRequest) async throws(DomainError) -> MgmtResponse {
        switch r.command {
        case "status":
            return status()
        case "progress":
            let entries = progressEntries()
            return .success(text: entries.map { "\($0.key): \($0.operation) \($0.doneBytes)/\($0.totalBytes)" }.joined(separator: "\n"),
                            json: entries)
        case "pool.create":
            let luns = try arg(r, "luns").split(separator: "\n").map(String.init)
            let createBytes = try r.args["create_size"].map { t throws(DomainError) in try size(t, "--create-size") }
            let pool = try await domain.createPool(name: try arg(r, "name"), arrayProfile: try arg(r, "array_profile"),
                                                   poolProfile: r.args["pool_profile"], lunPaths: luns,
                                                   createBytes: createBytes, force: r.args["force"] == "true")
            let area = pool.metadataArea.map { "; metadata area (block maps, space map, journal): \($0.extentCount) extent(s), \(ByteSize.format(UInt64($0.extentCount) * pool.extentBytes)), sized from the pool's capacity" } ?? ""
            return .success(text: "pool '\(pool.name)' created: \(pool.luns.count) LUN(s), \(pool.extentCount) extents of \(ByteSize.format(pool.extentBytes)) (\(ByteSize.format(pool.capacityBytes)))" + area,
                            json: PoolView(pool, domain: domain))
        case "pool.list":
            let views = domain.metadata.pools.map { PoolView($0, domain: domain) }
            return .success(text: Table.pools(views), json: views)
        case "pool.show":
            let name = try arg(r, "name")
            guard let pool = domain.metadata.pool(named: name) else { throw DomainError("pool '\(name)' not found") }
            let view = PoolView(pool, domain: domain)
            return .success(text: Table.poolDetail(view), json: view)
        case "pool.check":
            let repaired = r.args["repair"] == "true" ? try await domain.repairPool(name: try arg(r, "name")) : nil
            var report = try await domain.checkPool(name: try arg(r, "name"))
            report.repair = repaired
            let head = (repaired.map { "repair: \($0)\n" } ?? "")
                + "pool '\(report.pool)': \(report.extents) extents, \(report.mapped) mapped, \(report.beingZeroed) being zeroed, "
                + "\(report.free) free, \(report.heldBack) held by removed legs or PiTs, \(report.beingRedirected) being redirected, \(report.metadataPages) metadata pages checked, "
                + "\(report.journalPagesInUse) journal page(s) not yet checkpointed: "
            let text = report.clean ? head + "clean"
                : head + "\(report.problems.count) problem(s)\n" + report.problems.map { "  ! \($0)" }.joined(separator: "\n")
            return .success(text: text, json: report, warnings: report.clean ? [] : ["pool '\(report.pool)' check found \(report.problems.count) problem(s)"])
        case "pool.delete":
            let name = try arg(r, "name")
            try await domain.deletePool(name: name)
            return .success(text: "pool '\(name)' deleted", json: ["deleted": name])
        case "vdisk.create":
            let sizeBytes = try size(try arg(r, "size"), "--size")
            let blockSize = Int(r.args["block_size"] ?? "512") ?? -1
            let mirrorPools = (r.args["mirror_pools"] ?? "").split(separator: "\n").map(String.init)
            let modeText = r.args["mode"] ?? MirrorMode.automaticFailover.rawValue
            guard let mode = MirrorMode(rawValue: modeText) else {
                throw DomainError("--mode '\(modeText)': must be synchronous-always or automatic-failover")
            }
            let dirty = r.args["dirty_regions"] ?? "on"
            guard dirty == "on" || dirty == "off" else { throw DomainError("--dirty-regions '\(dirty)': must be on or off") }
            let v = try await domain.createVDisk(name: try arg(r, "name"), poolName: try arg(r, "pool"), mirrorPools: mirrorPools,
                                                 sizeBytes: sizeBytes, blockSize: blockSize, thin: r.args["thin"] == "true",
                                                 mode: mode, dirtyRegions: dirty == "on")
            return .success(text: "vdisk '\(v.name)' created: \(ByteSize.format(v.sizeBytes)), block size \(v.blockSize), \(v.thin ? "thin" : "thick")",
                            json: VDiskView(v, domain: domain))
        case "vdisk.list":
            let views = domain.metadata.vdisks.map { VDiskView($0, domain: domain) }
            return .success(text: Table.vdisks(views), json: views)
        case "vdisk.show":
            let name = try arg(r, "name")
            guard let v = domain.metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
            let view = VDiskView(v, domain: domain)
            return .success(text: Table.vdisks([view]), json: view)
        case "vdisk.grow":
            let v = try await domain.growVDisk(name: try arg(r, "name"), sizeBytes: try size(try arg(r, "size"), "--size"))
            return .success(text: "vdisk '\(v.name)' is now \(ByteSize.format(v.sizeBytes))", json: VDiskView(v, domain: domain))
        case "vdisk.delete":
            let name = try arg(r, "name")
            try await domain.deleteVDisk(name: name)
            return .success(text: "vdisk '\(name)' deleted", json: ["deleted": name])
        case "vdisk.export":
            let name = try arg(r, "name")
            let mode: ExportMode = r.args["read_only"] == "true" ? .readOnly : .readWrite
            // Clients of another mode are dropped: they reconnect and negotiate the new one.
            let (previous, dropped) = try await domain.setExport(vdisk: name, mode: mode)
            let v = domain.metadata.vdisk(named: name)!
            let changed = previous == nil ? "exported" : previous == mode ? "already exported" : "now exported"
            return .success(text: "vdisk '\(name)' \(changed) \(mode.rawValue) as NBD export '\(name)'"
                + (dropped > 0 ? " (\(dropped) connection(s) closed to renegotiate)" : ""), json: VDiskView(v, domain: domain))
        case "vdisk.unexport":
            let name = try arg(r, "name")
            let (previous, dropped) = try await domain.setExport(vdisk: name, mode: nil)
            let v = domain.metadata.vdisk(named: name)!
            return .success(text: previous == nil ? "vdisk '\(name)' was not exported"
                : "vdisk '\(name)' unexported" + (dropped > 0 ? " (\(dropped) connection(s) closed)" : ""),
                json: VDiskView(v, domain: domain))
        case "vdisk.verify":
            let seed = try r.args["seed"].map { t throws(DomainError) -> UInt64 in
                guard let v = UInt64(t) else { throw DomainError("--seed '\(t)': must be a number") }
                return v
            }
            let report = try await VDiskVerifier(domain: domain).run(vdisk: try arg(r, "name"),
                                                                     bytes: try r.args["size"].map { t throws(DomainError) in try size(t, "--size") },
                                                                     phase: r.args["phase"] ?? "both", seed: seed)
            return .success(text: report.text, json: report)
        case "mirror.status":
            let names = r.args["name"].map { [$0] } ?? domain.metadata.vdisks.filter(\.isMirror).map(\.name)
            var views: [MirrorView] = []
            for n in names {
                guard let v = domain.metadata.vdisk(named: n) else { throw DomainError("vdisk '\(n)' not found") }
                guard v.isMirror else { throw DomainError("vdisk '\(n)' is not a mirror") }
                views.append(MirrorView(v, domain: domain))
            }
            return .success(text: Table.mirrors(views), json: r.args["name"] != nil ? AnyEncodable(views[0]) : AnyEncodable(views))
        case "mirror.resync":
            let name = try arg(r, "name")
            let forceFrom = try r.args["force_from"].map { t throws(DomainError) -> Int in
                guard let v = Int(t) else { throw DomainError("--force-from '\(t)': must be a leg number") }
                return v
            }
            if r.args["background"] == "true" {
                domain.mirrors.resyncInBackground(vdisk: name, forceFrom: forceFrom, why: "background resync")
                return .success(text: "resync of '\(name)' started (see `svsp-ctl mirror status \(name)`)", json: ["started": name])
            }
            let report = try await domain.mirrors.resync(vdisk: name, forceFrom: forceFrom)
            return .success(text: report.targets.isEmpty ? "vdisk '\(name)': every leg is in sync, nothing to copy"
                                : "vdisk '\(name)': leg(s) \(report.targets.map(String.init).joined(separator: ",")) resynchronized from leg \(report.source): \(report.blocksCompared) blocks compared, \(report.copiedBlocks) copied in \(report.seconds)s",
                            json: report)
        case "mirror.verify":
            let name = try arg(r, "name")
            let report = try await domain.mirrors.verify(vdisk: name, repair: r.args["repair"] == "true")
            let fixed = r.args["repair"] == "true" ? ", \(report.copiedBlocks) repaired from leg \(report.source)" : ""
            return .success(text: "vdisk '\(name)': \(report.blocksCompared) blocks compared, \(report.mismatchedBlocks) differ\(fixed)", json: report)
        case "mirror.add-leg":
            let name = try arg(r, "name")
            let leg = try await domain.mirrors.addLeg(vdisk: name, poolName: try arg(r, "pool"))
            return .success(text: "vdisk '\(name)': leg \(leg) added in pool '\(r.args["pool"]!)', copying (see `svsp-ctl mirror status \(name)`)",
                            json: ["leg": leg])
        case "mirror.remove-leg":
            let name = try arg(r, "name")
            guard let leg = Int(try arg(r, "leg")) else { throw DomainError("--leg: must be a leg number") }
            try await domain.removeLeg(vdisk: name, leg: leg)
            return .success(text: "vdisk '\(name)': leg \(leg) removed", json: ["removed": leg])
        case "mirror.split":
            let name = try arg(r, "name")
            guard let leg = Int(try arg(r, "leg")) else { throw DomainError("--leg: must be a leg number") }
            let newName = try arg(r, "as")
            try await domain.mirrors.split(vdisk: name, leg: leg, as: newName)
            return .success(text: "vdisk '\(name)': leg \(leg) split off as vdisk '\(newName)'", json: ["vdisk": newName])
        case "mirror.set-rate":
            let name = try arg(r, "name")
            guard let v = domain.metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
            let text = try arg(r, "rate")
            let rate: Double? = text == "none" ? nil : ProfileUnits.parseRate(text)
            guard text == "none" || (rate ?? 0) > 0 else { throw DomainError("rate '\(text)': use e.g. 50MiB/s, 400Mbit/s or none") }
            for leg in v.legs { domain.runtime(of: leg.poolId)?.scheduler?.setBackgroundRate(rate) }
            return .success(text: "vdisk '\(name)': background copy rate \(rate.map(ProfileUnits.formatRate) ?? "unlimited")", json: ["rate": text])
        case "setup.create":
            let pools = try arg(r, "pools").split(separator: "\n").map(String.init)
            let warnings = try await domain.createSetupVDisk(poolNames: pools)
            return .success(text: "setup vdisk created on \(pools.count) pool(s): \(pools.joined(separator: ", "))",
                            json: ["pools": pools], warnings: warnings)
        default:
            if let response = try await pitCommand(r) { return response }
            if let response = try await peerCommand(r) { return response }
            if let response = try await asyncCommand(r) { return response }
            throw DomainError("unknown command '\(r.command)'")
        }
    }

    private func status() -> MgmtResponse {
        let m = domain.metadata
        let pools = m.pools.map { PoolView($0, domain: domain) }
        let vdisks = m.vdisks.map { VDiskView($0, domain: domain) }
        let setup = domain.setupCopyStates.map { SetupCopyView(pool: $0.poolName, generation: $0.generation, problem: $0.problem) }
        let health = domain.health
        let nbdView = nbd.map { NBDStatusView($0, domain: domain) }
        let view = StatusView(domain: m.name, domainId: m.domainId.uuidString, generation: m.generation, health: health,
                              readOnly: domain.readOnlyReason, problems: domain.problems, setupVDisk: setup, pools: pools,
                              vdisks: vdisks, nbd: nbdView, replicationListen: replication?.listenAddress,
                              peers: m.peerList.map { PeerView($0, replication?.status(of: $0.name)) },
                              asyncGroups: m.asyncGroupList.map { AsyncGroupView($0, domain: domain, progress: replication?.progress(ofGroup: $0.name)) })
        var lines = ["domain \(m.name) (\(m.domainId.uuidString.prefix(8))), metadata generation \(m.generation), health: \(health)"]
        for p in domain.problems { lines.append("  ! \(p)") }
        if setup.isEmpty {
            lines.append("setup vdisk: none (metadata in \(domain.directory)/domain.json)")
        } else {
            lines.append("setup vdisk: \(setup.count) configured copies: " + setup.map { "\($0.pool)" + ($0.problem.map { " (\($0))" } ?? " ok") }.joined(separator: ", "))
        }
        lines.append("")
        lines.append(Table.pools(pools))
        lines.append("")
        lines.append(Table.vdisks(vdisks))
        if let nbdView {
            lines.append("")
            lines.append(Table.nbd(nbdView))
        }
        if !view.peers.isEmpty || replication?.listenAddress != nil {
            lines.append("")
            lines.append(PeerView.table(view.peers, listening: replication?.listenAddress))
        }
        if !view.asyncGroups.isEmpty {
            lines.append("")
            lines.append(AsyncGroupView.table(view.asyncGroups))
        }
        return .success(text: lines.joined(separator: "\n"), json: view)
    }
}

// MARK: views (what JSON consumers see)

struct AnyEncodable: Encodable {
    let value: any Encodable
    init(_ value: any Encodable) { self.value = value }
    func encode(to encoder: Encoder) throws { try value.encode(to: encoder) }
}

struct MirrorView: Codable {
    var vdisk: String
    var state: String
    var mode: String
    var dirtyRegions: Bool
    var legs: [Leg]
    var copy: MirrorService.Progress?
    var percent: Double?
    var rateMiBPerSecond: Double?
    /// While a copy runs: what the background class of the copy's pools may use now.
    var copyAllowance: String?
    var dirtyRegionCount: Int?
    /// Regions whose legs may differ until a copy levels them (crash, failed reconcile, partial write).
    var unreconciledRegionCount: Int?
    /// Writes that reached some legs and not others since the daemon started (each pinned its regions).
    var partialWrites: Int?
    var regionCount: Int?
    var regionBytes: UInt64?
    var bitmapWrites: Int?
    var lastStartupResync: MirrorService.Report?
    /// Why the last copy nobody waited for (add-leg, automatic retry, --background) failed.
    var lastBackgroundError: String?

    struct Leg: Codable {
        var leg: Int
        var pool: String
        var state: String
    }

    init(_ v: VDiskRecord, domain: Domain) {
        vdisk = v.name
        mode = v.mode.rawValue
        dirtyRegions = v.dirtyRegions
        legs = v.legs.enumerated().map { Leg(leg: $0.offset, pool: domain.metadata.pool(id: $0.element.poolId)?.name ?? "?", state: $0.element.state.rawValue) }
        state = v.mirrorState
        copy = domain.mirrors.progress(v.name)
        if let log = (try? domain.port(for: v.name))?.dirtyLog {
            dirtyRegionCount = log.dirtyCount
            unreconciledRegionCount = log.pinnedCount
            partialWrites = log.partialWrites
            bitmapWrites = log.persistCount
            regionBytes = log.regionBytes
            regionCount = Int((v.sizeBytes + log.regionBytes - 1) / log.regionBytes)
        }
        lastStartupResync = domain.mirrors.lastRecoveryReport(v.name)
        lastBackgroundError = domain.mirrors.lastBackgroundError(v.name)
        if let c = copy, c.totalBytes > 0 {
            percent = (Double(c.doneBytes) / Double(c.totalBytes) * 1000).rounded() / 10
            let elapsed = max(Date().timeIntervalSince(c.startedAt), 0.001)
            rateMiBPerSecond = (Double(c.doneBytes) / 1_048_576 / elapsed * 10).rounded() / 10
            // The pool the copy writes to (a leg behind), else the vdisk's own.
            let target = v.legs.first { $0.state != .inSync }?.poolId ?? v.poolId
            copyAllowance = domain.runtime(of: target)?.scheduler?.backgroundAllowance
        }
    }
}

struct PoolView: Codable {
    var name: String
    var id: String
    var arrayProfile: String
    var poolProfile: String
    var extentBytes: UInt64
    var capacityBytes: UInt64
    var usedBytes: UInt64
    var freeBytes: UInt64
    /// Freed by a delete, trim or leg removal, being overwritten with zeros: free once done.
    var zeroingBytes: UInt64
    /// Held by the pool's metadata area (counted in used).
    var metadataBytes: UInt64
    var health: String
    var luns: [LUNView]

    struct LUNView: Codable {
        var path: String
        var sizeBytes: UInt64
        var extents: Int
        var present: Bool
        /// An I/O outlived the array profile's `io_timeout`: requests to it fail until it answers.
        var stuck: Bool
    }

    init(_ p: PoolRecord, domain: Domain) {
        name = p.name
        id = p.id.uuidString
        arrayProfile = p.arrayProfile
        poolProfile = p.poolProfile
        extentBytes = p.extentBytes
        capacityBytes = p.capacityBytes
        let free = UInt64(domain.freeExtents(of: p)) * p.extentBytes
        freeBytes = free
        zeroingBytes = UInt64(domain.zeroingExtents(of: p)) * p.extentBytes
        metadataBytes = UInt64(p.metadataArea?.extentCount ?? 0) * p.extentBytes
        usedBytes = p.capacityBytes - free - zeroingBytes
        let stuck = Set(domain.stuckLUNs(of: p))
        health = !domain.isPoolHealthy(p) ? "degraded" : (stuck.isEmpty ? "normal" : "LUN stuck")
        luns = p.luns.map { LUNView(path: $0.path, sizeBytes: $0.sizeBytes, extents: $0.extentCount,
                                    present: domain.lunHandle(pool: p.id, index: $0.index) != nil, stuck: stuck.contains($0.path)) }
    }
}

struct VDiskView: Codable {
    var name: String
    var id: String
    var pool: String
    var sizeBytes: UInt64
    var blockSize: Int
    var provisioning: String
    var allocatedBytes: UInt64
    var legs: [LegView] = []
    var mode: String?
    var mirrorState: String?
    var export: String?
    var pits: Int
    /// For a snapshot: "read-only of PIT" or "writable clone of PIT".
    var snapshotOf: String?

    struct LegView: Codable {
        var pool: String
        var state: String
    }

    init(_ v: VDiskRecord, domain: Domain) {
        name = v.name
        id = v.id.uuidString
        let pool = domain.metadata.pool(id: v.poolId)
        self.pool = pool?.name ?? "?"
        sizeBytes = v.sizeBytes
        blockSize = v.blockSize
        provisioning = v.thin ? "thin" : "thick"
        allocatedBytes = domain.mappedChunks(of: v.legs[0]) * (pool?.extentBytes ?? 0)
        legs = v.legs.map { leg in
            LegView(pool: domain.metadata.pool(id: leg.poolId)?.name ?? "?", state: leg.state.rawValue)
        }
        mode = v.isMirror ? v.mode.rawValue : nil
        export = v.export?.rawValue
        mirrorState = v.isMirror ? v.mirrorState : nil
        pits = domain.metadata.pits(of: v).count
        snapshotOf = v.snapshot.map { "\($0.writable ? "writable clone" : "read-only view") of PiT '\($0.pitName)' of '\($0.vdiskName)'" }
    }
}

struct SetupCopyView: Codable {
    var pool: String
    var generation: UInt64?
    var problem: String?
}

struct StatusView: Codable {
    var domain: String
    var domainId: String
    var generation: UInt64
    var health: String
    /// Why no change is committed (no majority of the setup copies), or nil.
    var readOnly: String?
    var problems: [String]
    var setupVDisk: [SetupCopyView]
    var pools: [PoolView]
    var vdisks: [VDiskView]
    var nbd: NBDStatusView?
    /// Where replication connections are accepted (serve --repl-listen), or nil.
    var replicationListen: String?
    var peers: [PeerView]
    var asyncGroups: [AsyncGroupView]
}

enum Table {
    static func render(_ header: [String], _ rows: [[String]]) -> String {
        let widths = header.indices.map { i in ([header[i]] + rows.map { $0[i] }).map(\.count).max()! }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }
                .joined(separator: "  ").trimmingCharacters(in: .whitespaces)
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n")
    }

    static func pools(_ pools: [PoolView]) -> String {
        if pools.isEmpty { return "no pools" }
        return render(["POOL", "ARRAY", "LUNS", "EXTENT", "SIZE", "USED", "FREE", "BEING ZEROED", "HEALTH"], pools.map {
            [$0.name, $0.arrayProfile, "\($0.luns.count)", ByteSize.format($0.extentBytes), ByteSize.format($0.capacityBytes),
             ByteSize.format($0.usedBytes), ByteSize.format($0.freeBytes), ByteSize.format($0.zeroingBytes), $0.health]
        })
    }

    static func poolDetail(_ p: PoolView) -> String {
        pools([p]) + "\n\n" + render(["LUN", "SIZE", "EXTENTS", "PRESENT"], p.luns.map {
            [$0.path, ByteSize.format($0.sizeBytes), "\($0.extents)", !$0.present ? "MISSING" : ($0.stuck ? "yes, STUCK (io_timeout)" : "yes")]
        })
    }

    static func mirrors(_ mirrors: [MirrorView]) -> String {
        if mirrors.isEmpty { return "no mirrors" }
        return render(["VDISK", "STATE", "MODE", "LEGS", "DIRTY", "COPY"], mirrors.map { m in
            [m.vdisk, m.state + (m.percent.map { " \($0)%" } ?? ""), m.mode,
             m.legs.map { "\($0.leg):\($0.pool)=\($0.state)" }.joined(separator: " "),
             m.dirtyRegionCount.map { "\($0)/\(m.regionCount ?? 0)" } ?? "off",
             m.copy.map { "\($0.operation) \(ByteSize.format($0.doneBytes))/\(ByteSize.format($0.totalBytes))" + (m.rateMiBPerSecond.map { " at \($0) MiB/s" } ?? "")
                 + (m.copyAllowance.map { ", background: \($0)" } ?? "") } ?? "-"]
        })
    }

    static func vdisks(_ vdisks: [VDiskView]) -> String {
        if vdisks.isEmpty { return "no vdisks" }
        return render(["VDISK", "POOL", "SIZE", "BLOCK", "PROVISIONING", "ALLOCATED", "EXPORT", "MIRROR", "PITS", "SNAPSHOT OF"], vdisks.map { v in
            let legs = v.legs.map { "\($0.pool)=\($0.state)" }.joined(separator: " ")
            return [v.name, v.pool, ByteSize.format(v.sizeBytes), "\(v.blockSize)", v.provisioning, ByteSize.format(v.allocatedBytes),
                    v.export ?? "-", v.mirrorState.map { "\($0) (\(legs))" } ?? "-", "\(v.pits)", v.snapshotOf ?? "-"]
        })
    }
}
