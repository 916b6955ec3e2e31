/// Which vdisks hosts may reach over NBD, and how: a persisted part of the metadata.
extension Domain {
    /// Exports `name` (or changes its mode); nil unexports. An unexport or a change of mode
    /// drops the export's clients and waits for their requests in flight (`exportClosed`):
    /// once it returns, no host write of the old export reaches the vdisk (a role change
    /// of an async group relies on that). Returns the previous mode and the clients dropped.
    @discardableResult
    public func setExport(vdisk name: String, mode: ExportMode?) async throws(DomainError) -> (previous: ExportMode?, dropped: Int) {
        let previous = try await commitExport(vdisk: name, mode: mode)
        guard previous != nil, previous != mode, let close = exportClosed else { return (previous, 0) }
        return (previous, await close(name))
    }

    private func commitExport(vdisk name: String, mode: ExportMode?) async throws(DomainError) -> ExportMode? {
        try await beginChange()
        defer { mutation.release() }
        guard let index = metadata.vdisks.firstIndex(where: { $0.name == name }) else {
            throw DomainError("vdisk '\(name)' not found")
        }
        let previous = metadata.vdisks[index].export
        if previous == mode { return previous }
        if mode == .readWrite, let g = metadata.asyncGroup(of: metadata.vdisks[index]), g.isFed {
            // Its live blocks are a cycle being applied: hosts read its last complete PiT, and never write.
            throw DomainError("vdisk '\(name)' is fed by async group '\(g.name)': export it --read-only (hosts then read its last complete PiT, "
                + "\(g.confirmedPiT ?? "none yet")) or end the group first")
        }
        var next = metadata
        next.vdisks[index].export = mode
        try await commit(next)
        return previous
    }
}
