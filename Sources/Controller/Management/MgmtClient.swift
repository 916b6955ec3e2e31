import Foundation

/// Talks to a running domain daemon over its management socket.
public enum MgmtClient {
    /// How long a command waits for the daemon's answer: $SVSP_TIMEOUT seconds, default 300
    /// (long enough for a foreground resync of a few GiB; a hung daemon still ends in a message).
    public static func timeoutSeconds() throws(DomainError) -> Int {
        guard let text = ProcessInfo.processInfo.environment["SVSP_TIMEOUT"] else { return 300 }
        guard let seconds = Int(text), seconds > 0 else { throw DomainError("SVSP_TIMEOUT '\(text)': expected a number of seconds above 0") }
        return seconds
    }

    public static func send(_ request: MgmtRequest, directory: String) throws(DomainError) -> MgmtResponse {
        let timeout = try timeoutSeconds()
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
        UnixSocket.setTimeouts(fd, seconds: timeout)
        let tooSlow = DomainError("the daemon at \(path) did not answer within \(timeout) s (set SVSP_TIMEOUT=SECONDS to wait longer)")
        guard UnixSocket.writeAll(fd, payload) else {
            throw errno == EAGAIN || errno == EWOULDBLOCK ? tooSlow : DomainError("lost the daemon while sending")
        }
        guard let line = UnixSocket.readLine(fd, limit: 64 << 20) else {
            if errno == EAGAIN || errno == EWOULDBLOCK { throw tooSlow }
            throw DomainError("the daemon closed the connection without an answer")
        }
        do {
            return try JSONDecoder().decode(MgmtResponse.self, from: line)
        } catch {
            throw DomainError("malformed answer from the daemon: \(error)")
        }
    }
}
