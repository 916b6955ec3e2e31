import Foundation

/// Talks to a running domain daemon over its management socket.
public enum MgmtClient {
    public static func send(_ request: MgmtRequest, directory: String) throws(DomainError) -> MgmtResponse {
        let path = MgmtPaths.socket(for: directory)
        guard FileManager.default.fileExists(atPath: path) else {
            throw DomainError("daemon not running for \(directory) (no socket at \(path)); start it with `svsp-ctl serve --dir \(directory)`")
        }
        let (fd, err) = UnixSocket.connect(to: path)
        guard fd >= 0 else {
            if err == ECONNREFUSED {
                throw DomainError("stale socket \(path): the daemon for \(directory) is not running; start it with `svsp-ctl serve --dir \(directory)`")
            }
            throw DomainError("cannot reach the daemon at \(path): \(String(cString: strerror(err)))")
        }
        defer { close(fd) }
        guard var payload = try? JSONEncoder().encode(request) else { throw DomainError("cannot encode request") }
        payload.append(UInt8(ascii: "\n"))
        guard UnixSocket.writeAll(fd, payload) else { throw DomainError("lost the daemon while sending") }
        guard let line = UnixSocket.readLine(fd, limit: 64 << 20) else {
            throw DomainError("the daemon closed the connection without an answer")
        }
        do {
            return try JSONDecoder().decode(MgmtResponse.self, from: line)
        } catch {
            throw DomainError("malformed answer from the daemon: \(error)")
        }
    }
}
