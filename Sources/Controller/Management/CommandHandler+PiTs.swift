import Foundation

/// The `pit.*` and `snapshot.*` management commands.
extension CommandHandler {
    func pitCommand(_ r: MgmtRequest) async throws(DomainError) -> MgmtResponse? {
        switch r.command {
        case "pit.create":
            let made = if let group = r.args["vdg"] {
                try await domain.createGroupPiT(vdg: group, as: r.args["name"])
            } else {
                try await domain.createPiT(vdisk: try arg(r, "vdisk"), as: r.args["name"])
            }
            let views = made.pits.map { PiTView($0, domain: domain) }
            let ms = { (ns: UInt64) in String(format: "%.3f ms", Double(ns) / 1e6) }
            let what = views.map { "PiT '\($0.name)' of vdisk '\($0.vdisk)'" }.joined(separator: ", ")
            let retired = made.retired.isEmpty ? "" : "; retention retired \(made.retired.map { "'\($0)'" }.joined(separator: ", "))"
            return .success(text: "\(what) taken at one instant: host writes held \(ms(made.holdNs)) for the switch, after \(ms(made.drainNs)) for those in flight to land" + retired,
                            json: PiTCreatedView(pits: views, holdMs: Double(made.holdNs) / 1e6, drainMs: Double(made.drainNs) / 1e6, retired: made.retired))
        case "pit.list":
            let m = domain.metadata
            var pits = m.pitList
            if let name = r.args["vdisk"] {
                guard let v = m.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
                pits = m.pits(of: v)
            }
            let views = pits.map { PiTView($0, domain: domain) }
            return .success(text: PiTView.table(views), json: views)
        case "pit.delete":
            let name = try arg(r, "name")
            try await domain.deletePiT(named: name)
            return .success(text: "PiT '\(name)' deleted (what only it held is freed in the background)", json: ["deleted": name])
        case "pit.rollback":
            let vdisk = try arg(r, "vdisk"), pit = try arg(r, "to")
            try await domain.rollback(vdisk: vdisk, to: pit)
            return .success(text: "vdisk '\(vdisk)' rolled back to PiT '\(pit)' (the PiT and any later ones are kept)",
                            json: ["vdisk": vdisk, "pit": pit])
        case "pit.diff":
            let d = try domain.differences(from: try arg(r, "from"), to: r.args["to"])
            let lines = d.ranges.map { "\($0.offset) \($0.length)" }
            let head = "vdisk '\(d.vdisk)': \(d.ranges.count) changed range(s), \(ByteSize.format(d.changedBytes)) from PiT '\(d.from)' to "
                + (d.to.map { "PiT '\($0)'" } ?? "now") + " (extent granularity \(ByteSize.format(d.extentBytes)); OFFSET LENGTH in bytes)"
            return .success(text: ([head] + lines).joined(separator: "\n"), json: d)
        case "vdg.create", "vdg.add", "vdg.remove":
            let name = try arg(r, "name")
            let members = (r.args["vdisks"] ?? "").split(separator: "\n").map(String.init)
            let g = switch r.command {
            case "vdg.create": try await domain.createVDG(name: name, members: members)
            case "vdg.add": try await domain.addToVDG(name, members: members)
            default: try await domain.removeFromVDG(name, members: members)
            }
            let view = VDGView(g, domain: domain)
            return .success(text: "virtual disk group '\(name)': \(view.members.joined(separator: ", "))", json: view)
        case "vdg.delete":
            let name = try arg(r, "name")
            try await domain.deleteVDG(name)
            return .success(text: "virtual disk group '\(name)' deleted (its vdisks and PiTs stay)", json: ["deleted": name])
        case "vdg.list", "vdg.show":
            var groups = domain.metadata.vdgList
            if r.command == "vdg.show" {
                let name = try arg(r, "name")
                guard let g = domain.metadata.vdg(named: name) else { throw DomainError("virtual disk group '\(name)' not found") }
                groups = [g]
            }
            let views = groups.map { VDGView($0, domain: domain) }
            let text = views.isEmpty ? "no virtual disk groups" : Table.render(["GROUP", "MEMBERS", "GROUP PITS"], views.map {
                [$0.name, $0.members.joined(separator: " "), $0.groupPiTs.isEmpty ? "-" : $0.groupPiTs.joined(separator: " ")]
            })
            return .success(text: text, json: r.command == "vdg.show" ? AnyEncodable(views[0]) : AnyEncodable(views))
        case "snapshot.create":
            let writable = r.args["writable"] == "true"
            let v = try await domain.createSnapshot(name: try arg(r, "name"), of: try arg(r, "pit"), writable: writable)
            return .success(text: "snapshot '\(v.name)' created: \(writable ? "a writable clone" : "a read-only view") of PiT '\(v.snapshot!.pitName)'; "
                + "export it with `svsp-ctl vdisk export \(v.name)`", json: VDiskView(v, domain: domain))
        case "snapshot.delete":
            let name = try arg(r, "name")
            guard domain.metadata.vdisk(named: name)?.snapshot != nil else { throw DomainError("snapshot '\(name)' not found") }
            try await domain.deleteVDisk(name: name)
            return .success(text: "snapshot '\(name)' deleted", json: ["deleted": name])
        default:
            return nil
        }
    }
}

struct VDGView: Codable {
    var name: String
    var members: [String]
    /// Group PiTs that still have a member PiT.
    var groupPiTs: [String]

    init(_ g: VDGRecord, domain: Domain) {
        let m = domain.metadata
        name = g.name
        members = g.members.map { id in m.vdisks.first { $0.id == id }?.name ?? "?" }
        var seen: [String] = []
        for p in m.pitList where g.members.contains(p.vdiskId) { if let group = p.group, !seen.contains(group) { seen.append(group) } }
        groupPiTs = seen
    }
}

struct PiTCreatedView: Codable {
    var pits: [PiTView]
    var holdMs: Double
    var drainMs: Double
    var retired: [String]
}

struct PiTView: Codable {
    var name: String
    var kind: String
    var vdisk: String
    var created: String
    var sizeBytes: UInt64
    /// Bytes no other map (the vdisk, other PiTs, snapshots) reaches: what a delete frees.
    var heldBytes: UInt64
    /// Legs the PiT holds (those in sync at its instant), of the vdisk's legs now.
    var completeLegs: Int
    var legs: Int
    var group: String?
    var heldBy: String?

    init(_ p: PiTRecord, domain: Domain) {
        name = p.name
        kind = p.kind.rawValue
        vdisk = domain.metadata.vdisks.first { $0.id == p.vdiskId }?.name ?? "?"
        created = ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: p.createdAt))
        sizeBytes = p.sizeBytes
        heldBytes = domain.bytesHeldOnly(by: p)
        completeLegs = p.maps.filter(\.complete).count
        legs = domain.metadata.vdisks.first { $0.id == p.vdiskId }?.legs.count ?? p.maps.count
        group = p.group
        heldBy = p.heldBy
    }

    static func table(_ views: [PiTView]) -> String {
        if views.isEmpty { return "no PiTs" }
        return Table.render(["PIT", "KIND", "VDISK", "CREATED", "SIZE", "HELD ONLY BY IT", "LEGS", "GROUP PIT"], views.map {
            [$0.name, $0.kind, $0.vdisk, $0.created, ByteSize.format($0.sizeBytes), ByteSize.format($0.heldBytes), "\($0.completeLegs)/\($0.legs)",
             $0.group ?? "-"]
        })
    }
}
