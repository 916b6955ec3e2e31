import Foundation
import IOEngine

/// Runs management commands against the domain, one at a time, and renders each
/// result twice: a table for people and JSON for scripts.
public actor CommandHandler {
    let domain: Domain

    public init(domain: Domain) { self.domain = domain }

    public func handle(_ request: MgmtRequest) async -> MgmtResponse {
        do {
            return try await dispatch(request)
        } catch {
            return .failure(error.message)
        }
    }

    private func arg(_ r: MgmtRequest, _ key: String) throws(DomainError) -> String {
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
        case "pool.create":
            let luns = try arg(r, "luns").split(separator: "\n").map(String.init)
            let createBytes = try r.args["create_size"].map { t throws(DomainError) in try size(t, "--create-size") }
            let pool = try await domain.createPool(name: try arg(r, "name"), arrayProfile: try arg(r, "array_profile"),
                                                   poolProfile: r.args["pool_profile"], lunPaths: luns,
                                                   createBytes: createBytes, force: r.args["force"] == "true")
            return .success(text: "pool '\(pool.name)' created: \(pool.luns.count) LUN(s), \(pool.extentCount) extents of \(ByteSize.format(pool.extentBytes)) (\(ByteSize.format(pool.capacityBytes)))",
                            json: PoolView(pool, domain: domain))
        case "pool.list":
            let views = domain.metadata.pools.map { PoolView($0, domain: domain) }
            return .success(text: Table.pools(views), json: views)
        case "pool.show":
            let name = try arg(r, "name")
            guard let pool = domain.metadata.pool(named: name) else { throw DomainError("pool '\(name)' not found") }
            let view = PoolView(pool, domain: domain)
            return .success(text: Table.poolDetail(view), json: view)
        case "pool.delete":
            let name = try arg(r, "name")
            try await domain.deletePool(name: name)
            return .success(text: "pool '\(name)' deleted", json: ["deleted": name])
        case "vdisk.create":
            let sizeBytes = try size(try arg(r, "size"), "--size")
            let blockSize = Int(r.args["block_size"] ?? "512") ?? -1
            let v = try await domain.createVDisk(name: try arg(r, "name"), poolName: try arg(r, "pool"), sizeBytes: sizeBytes,
                                                 blockSize: blockSize, thin: r.args["thin"] == "true")
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
        case "vdisk.verify":
            let report = try await VDiskVerifier(domain: domain).run(vdisk: try arg(r, "name"),
                                                                     bytes: try r.args["size"].map { t throws(DomainError) in try size(t, "--size") })
            return .success(text: report.text, json: report)
        case "setup.create":
            let pools = try arg(r, "pools").split(separator: "\n").map(String.init)
            let warnings = try await domain.createSetupVDisk(poolNames: pools)
            return .success(text: "setup vdisk created on \(pools.count) pool(s): \(pools.joined(separator: ", "))",
                            json: ["pools": pools], warnings: warnings)
        default:
            throw DomainError("unknown command '\(r.command)'")
        }
    }

    private func status() -> MgmtResponse {
        let m = domain.metadata
        let pools = m.pools.map { PoolView($0, domain: domain) }
        let vdisks = m.vdisks.map { VDiskView($0, domain: domain) }
        let setup = domain.setupCopyStates.map { SetupCopyView(pool: $0.poolName, generation: $0.generation, problem: $0.problem) }
        let health = domain.problems.isEmpty ? "normal" : "degraded"
        let view = StatusView(domain: m.name, domainId: m.domainId.uuidString, generation: m.generation, health: health,
                              problems: domain.problems, setupVDisk: setup, pools: pools, vdisks: vdisks)
        var lines = ["domain \(m.name) (\(m.domainId.uuidString.prefix(8))), metadata generation \(m.generation), health: \(health)"]
        for p in domain.problems { lines.append("  ! \(p)") }
        if setup.isEmpty {
            lines.append("setup vdisk: none (metadata in \(domain.directory)/domain.json)")
        } else {
            lines.append("setup vdisk: \(setup.count) copies: " + setup.map { "\($0.pool)" + ($0.problem.map { " (\($0))" } ?? " ok") }.joined(separator: ", "))
        }
        lines.append("")
        lines.append(Table.pools(pools))
        lines.append("")
        lines.append(Table.vdisks(vdisks))
        return .success(text: lines.joined(separator: "\n"), json: view)
    }
}

// MARK: views (what JSON consumers see)

struct PoolView: Codable {
    var name: String
    var id: String
    var arrayProfile: String
    var poolProfile: String
    var extentBytes: UInt64
    var capacityBytes: UInt64
    var usedBytes: UInt64
    var freeBytes: UInt64
    var health: String
    var luns: [LUNView]

    struct LUNView: Codable {
        var path: String
        var sizeBytes: UInt64
        var extents: Int
        var present: Bool
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
        usedBytes = p.capacityBytes - free
        health = domain.isPoolHealthy(p) ? "normal" : "degraded"
        luns = p.luns.map { LUNView(path: $0.path, sizeBytes: $0.sizeBytes, extents: $0.extentCount,
                                    present: domain.lunHandle(pool: p.id, index: $0.index) != nil) }
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
        allocatedBytes = UInt64(v.legs[0].extents.compactMap { $0 }.count) * (pool?.extentBytes ?? 0)
        legs = v.legs.map { leg in
            LegView(pool: domain.metadata.pool(id: leg.poolId)?.name ?? "?", state: leg.state.rawValue)
        }
        mode = v.isMirror ? v.mode.rawValue : nil
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
    var problems: [String]
    var setupVDisk: [SetupCopyView]
    var pools: [PoolView]
    var vdisks: [VDiskView]
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
        return render(["POOL", "ARRAY", "LUNS", "EXTENT", "SIZE", "USED", "FREE", "HEALTH"], pools.map {
            [$0.name, $0.arrayProfile, "\($0.luns.count)", ByteSize.format($0.extentBytes), ByteSize.format($0.capacityBytes),
             ByteSize.format($0.usedBytes), ByteSize.format($0.freeBytes), $0.health]
        })
    }

    static func poolDetail(_ p: PoolView) -> String {
        pools([p]) + "\n\n" + render(["LUN", "SIZE", "EXTENTS", "PRESENT"], p.luns.map {
            [$0.path, ByteSize.format($0.sizeBytes), "\($0.extents)", $0.present ? "yes" : "MISSING"]
        })
    }

    static func vdisks(_ vdisks: [VDiskView]) -> String {
        if vdisks.isEmpty { return "no vdisks" }
        return render(["VDISK", "POOL", "SIZE", "BLOCK", "PROVISIONING", "ALLOCATED"], vdisks.map {
            [$0.name, $0.pool, ByteSize.format($0.sizeBytes), "\($0.blockSize)", $0.provisioning, ByteSize.format($0.allocatedBytes)]
        })
    }
}
