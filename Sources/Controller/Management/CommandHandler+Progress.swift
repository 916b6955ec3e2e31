import Foundation

extension CommandHandler {
    /// Everything long that is running, keyed for the CLI's progress bars:
    /// "mirror:VDISK" (resync, verify), "vdisk.verify:VDISK", "async:GROUP" (the cycle
    /// being shipped; `complete` once the group's destination holds a PiT).
    func progressEntries() -> [ProgressBoard.Entry] {
        var entries = domain.progressBoard.all
        let m = domain.metadata
        for v in m.vdisks where v.isMirror {
            guard let p = domain.mirrors.progress(v.name) else { continue }
            entries.append(.init(key: "mirror:\(v.name)", operation: p.operation, doneBytes: p.doneBytes, totalBytes: p.totalBytes))
        }
        for g in m.asyncGroupList where g.role == .source {
            let p = replication?.progress(ofGroup: g.name)
            let running = p.map { $0.finishedAt == nil && $0.startedAt != nil } ?? false
            let operation = g.confirmedPiT == nil ? "initial copy" : (running ? "cycle \(p?.cycle ?? 0)" : "idle")
            entries.append(.init(key: "async:\(g.name)", operation: operation, doneBytes: min(p?.bytesSent ?? 0, p?.bytesToSend ?? 0),
                                 totalBytes: p?.bytesToSend ?? 0, complete: g.confirmedPiT != nil))
        }
        return entries.sorted { $0.key < $1.key }
    }
}
