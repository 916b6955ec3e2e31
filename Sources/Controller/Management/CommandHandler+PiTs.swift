import Foundation

/// The `pit.*` and `snapshot.*` management commands.
extension CommandHandler {
    func pitCommand(_ r: MgmtRequest) async throws(DomainError) -> MgmtResponse? {
        switch r.command {
        case "pit.create":
            let made = try await domain.createPiT(vdisk: try arg(r, "vdisk"), as: r.args["name"])
            let view = PiTView(made.pit, domain: domain)
            return .success(text: "PiT '\(made.pit.name)' of vdisk '\(view.vdisk)' taken (host writes held \(String(format: "%.3f", Double(made.holdNs) / 1e6)) ms)",
                            json: view)
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

struct PiTView: Codable {
    var name: String
    var kind: String
    var vdisk: String
    var created: String
    var sizeBytes: UInt64
    /// Bytes no other map (the vdisk, other PiTs, snapshots) reaches: what a delete frees.
    var heldBytes: UInt64
    /// Legs with an in-sync copy in the PiT, of all legs at the instant.
    var completeLegs: Int
    var legs: Int

    init(_ p: PiTRecord, domain: Domain) {
        name = p.name
        kind = p.kind.rawValue
        vdisk = domain.metadata.vdisks.first { $0.id == p.vdiskId }?.name ?? "?"
        created = ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: p.createdAt))
        sizeBytes = p.sizeBytes
        heldBytes = domain.bytesHeldOnly(by: p)
        completeLegs = p.maps.filter(\.complete).count
        legs = p.maps.count
    }

    static func table(_ views: [PiTView]) -> String {
        if views.isEmpty { return "no PiTs" }
        return Table.render(["PIT", "KIND", "VDISK", "CREATED", "SIZE", "HELD ONLY BY IT", "LEGS"], views.map {
            [$0.name, $0.kind, $0.vdisk, $0.created, ByteSize.format($0.sizeBytes), ByteSize.format($0.heldBytes), "\($0.completeLegs)/\($0.legs)"]
        })
    }
}
