import Foundation

/// Another domain this one mirrors to or from (`svsp-ctl peer add`). Both domains add
/// each other, with the same secret file: the link is TLS with that pre-shared key, so
/// the secret authenticates both ends and never crosses the wire.
public struct PeerRecord: Codable, Equatable, Sendable {
    /// The peer domain's name (its `domain init --name`): it identifies itself by it.
    public var name: String
    /// Where its `serve --repl-listen` accepts: HOST:PORT.
    public var address: String
    /// The link profile that paces and shapes what crosses to it.
    public var linkProfile: String
    /// The peer domain's id: given at `peer add --domain-id`, else learned at the first
    /// authenticated contact. From then on a domain of that name with another id is refused.
    public var domainId: UUID?
}

extension DomainMetadata {
    public var peerList: [PeerRecord] {
        get { peers ?? [] }
        set { peers = newValue.isEmpty ? nil : newValue }
    }

    public func peer(named name: String) -> PeerRecord? { peerList.first { $0.name == name } }
}

/// The peers' secrets, one file each under STATE/peers/ (owner-only), never in the
/// catalog: the catalog is copied onto every setup pool, a secret should not be.
public struct PeerSecrets: Sendable {
    public let folder: String
    public static let minBytes = 16
    /// BoringSSL's limit for a pre-shared key.
    public static let maxBytes = 256

    public init(stateDirectory: String) { folder = stateDirectory + "/peers" }

    func path(_ peer: String) -> String { folder + "/\(peer).secret" }

    /// The secret in `file` (surrounding white space removed), or why it cannot be one.
    public static func read(file: String) throws(DomainError) -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: file) else {
            throw DomainError("--secret-file \(file): cannot read it (\(String(cString: strerror(errno))))")
        }
        var bytes = Array(data)
        while let last = bytes.last, last == 0x0A || last == 0x0D || last == 0x20 || last == 0x09 { bytes.removeLast() }
        while let first = bytes.first, first == 0x0A || first == 0x0D || first == 0x20 || first == 0x09 { bytes.removeFirst() }
        guard bytes.count >= minBytes else {
            throw DomainError("--secret-file \(file): \(bytes.count) byte(s); a secret needs at least \(minBytes) (e.g. `head -c 32 /dev/urandom | base64 > FILE`)")
        }
        guard bytes.count <= maxBytes else { throw DomainError("--secret-file \(file): \(bytes.count) bytes; at most \(maxBytes)") }
        return bytes
    }

    /// Keeps `secret` for `peer` (replacing any), readable by the owner only.
    func store(_ secret: [UInt8], for peer: String) throws(DomainError) {
        do {
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch { throw DomainError("\(folder): \(error.localizedDescription)") }
        let tmp = path(peer) + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw DomainError("\(tmp): \(String(cString: strerror(errno)))") }
        let written = secret.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd) == 0
        close(fd)
        guard written == secret.count, synced, rename(tmp, path(peer)) == 0 else {
            unlink(tmp)
            throw DomainError("\(path(peer)): cannot write the secret (\(String(cString: strerror(errno))))")
        }
    }

    /// The stored secret of `peer`, or nil when it has none (or it cannot be read).
    func load(_ peer: String) -> [UInt8]? {
        FileManager.default.contents(atPath: path(peer)).map(Array.init)
    }

    func remove(_ peer: String) { unlink(path(peer)) }
}

/// HOST:PORT as `peer add --address` and `serve --repl-listen` take it.
public enum HostPort {
    /// `listening`: port 0 (any free port) is allowed.
    public static func parse(_ text: String, option: String, listening: Bool = false) throws(DomainError) -> (host: String, port: Int) {
        let ports = listening ? 0...65535 : 1...65535
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), ports.contains(port) else {
            throw DomainError("\(option) '\(text)': expected HOST:PORT with a port \(ports.lowerBound)..65535 (e.g. 192.0.2.10:7790)")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty, host.allSatisfy({ $0.isLetter || $0.isNumber || ".-:_".contains($0) }) else {
            throw DomainError("\(option) '\(text)': '\(host)' is not a host name or address")
        }
        return (host, port)
    }
}
