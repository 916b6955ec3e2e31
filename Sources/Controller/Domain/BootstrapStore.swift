import Foundation

/// The domain's metadata in STATE/domain.json until the setup vdisk exists (and,
/// after that, the list of setup pools' LUNs so startup can find the copies).
/// Written atomically: temp file, fsync, rename, fsync of the folder.
public struct BootstrapStore: Sendable {
    public let directory: String
    public var path: String { directory + "/domain.json" }

    public init(directory: String) { self.directory = directory }

    public var exists: Bool { FileManager.default.fileExists(atPath: path) }

    public func load() throws(DomainError) -> DomainMetadata {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw DomainError("\(directory): no domain here (run `svsp-ctl domain init --dir \(directory) --name NAME`)")
        }
        let metadata: DomainMetadata
        do {
            metadata = try JSONDecoder().decode(DomainMetadata.self, from: data)
        } catch {
            throw DomainError("\(path): damaged metadata: \(error)")
        }
        if let problem = metadata.consistencyProblem { throw DomainError("\(path): damaged metadata: \(problem)") }
        return metadata.withLegacyLegIds()
    }

    public func save(_ metadata: DomainMetadata) throws(DomainError) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let data: Data
        do { data = try encoder.encode(metadata) } catch { throw DomainError("cannot encode metadata: \(error)") }
        try Self.writeAtomically(data, to: path)
    }

    /// write, fsync, rename, fsync(dir): after a crash the file is the old or the new one, never torn.
    public static func writeAtomically(_ data: Data, to path: String) throws(DomainError) {
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw DomainError("\(tmp): cannot create: \(String(cString: strerror(errno)))") }
        let ok = UnixSocket.writeAll(fd, data) && fsync(fd) == 0
        close(fd)
        guard ok, rename(tmp, path) == 0 else {
            throw DomainError("\(path): cannot write: \(String(cString: strerror(errno)))")
        }
        let dir = open((path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 { fsync(dir); close(dir) }
    }
}
