import Foundation
import NIOCore
import NIOPosix
import NIOSSL

/// TLS for the replication link: TLS 1.2 with a pre-shared key (ECDHE-PSK with
/// ChaCha20-Poly1305: the key authenticates both ends, the ephemeral exchange gives
/// forward secrecy, nothing secret crosses the wire). No certificates.
///
/// Each side names itself in the handshake as `svsp/<domain name>/<domain id>`: the
/// client in its PSK identity, the server in its PSK hint. Each checks the other's name
/// against its peers before it hands over a key, so an unknown peer or a wrong domain id
/// is refused inside the handshake, before any state is allocated for the connection.
enum LinkTLS {
    static let cipherSuites = "ECDHE-PSK-CHACHA20-POLY1305"

    static func identity(name: String, id: UUID) -> String { "svsp/\(name)/\(id.uuidString)" }

    static func parseIdentity(_ text: String?) -> (name: String, id: UUID)? {
        guard let parts = text?.split(separator: "/", omittingEmptySubsequences: false), parts.count == 3, parts[0] == "svsp",
              let name = Parse.name(String(parts[1])), let id = UUID(uuidString: String(parts[2])) else { return nil }
        return (name, id)
    }

    /// Why a handshake was refused by our own check (the callbacks throw this; the handshake
    /// error that follows says less).
    struct Refusal: Error, CustomStringConvertible {
        let reason: String
        var description: String { reason }
    }

    /// A server context: `key(identity)` returns the key for a client's identity or throws
    /// a `Refusal`; `refused` is told why (the connection's log line).
    static func serverContext(selfIdentity: String, key: @escaping @Sendable (String) throws -> [UInt8]) throws -> NIOSSLContext {
        var c = TLSConfiguration.makePreSharedKeyConfiguration()
        c.minimumTLSVersion = .tlsv12
        c.maximumTLSVersion = .tlsv12
        c.cipherSuites = cipherSuites
        c.pskHint = selfIdentity
        c.pskServerProvider = { context in
            var bytes = NIOSSLSecureBytes()
            bytes.append(try key(context.clientIdentity))
            return PSKServerIdentityResponse(key: bytes)
        }
        return try NIOSSLContext(configuration: c)
    }

    /// A client context for one peer: `check(hint)` throws a `Refusal` when the server is
    /// not the peer we meant to reach.
    static func clientContext(selfIdentity: String, secret: [UInt8], check: @escaping @Sendable (String?) throws -> Void) throws -> NIOSSLContext {
        var c = TLSConfiguration.makeClientConfiguration()
        c.minimumTLSVersion = .tlsv12
        c.maximumTLSVersion = .tlsv12
        c.cipherSuites = cipherSuites
        c.certificateVerification = .none // the key authenticates the server; there is no certificate
        c.pskClientProvider = { context in
            try check(context.hint)
            var bytes = NIOSSLSecureBytes()
            bytes.append(secret)
            return PSKClientIdentityResponse(key: bytes, identity: selfIdentity)
        }
        return try NIOSSLContext(configuration: c)
    }

    /// One line for a failed handshake or link error. A key mismatch shows as a failed
    /// decryption of the other side's Finished message (or the alert that reports it).
    static func explain(_ error: Error) -> String {
        let text = String(describing: error)
        if let failure = error as? NIOConnectionError {
            if let io = failure.connectionErrors.first?.error as? NIOCore.IOError {
                return "cannot connect: \(String(cString: strerror(io.errnoCode)))"
            }
            return "cannot connect: \(failure.connectionErrors.first.map { "\($0.error)" } ?? "the name does not resolve")"
        }
        if let channel = error as? ChannelError {
            if case .connectTimeout = channel { return "cannot connect: no answer within 5 s" }
            return "\(channel)"
        }
        guard error is NIOSSLError || error is BoringSSLError else { return shortTLS(text) }
        let upper = text.uppercased()
        if upper.contains("DECRYPTION_FAILED_OR_BAD_RECORD_MAC") || upper.contains("BAD_RECORD_MAC") || upper.contains("DECRYPT_ERROR")
            || upper.contains("BAD_DECRYPT")
        {
            return "the secrets differ (TLS could not verify the pre-shared key; both sides need the same secret file)"
        }
        if upper.contains("WRONG_VERSION_NUMBER") || upper.contains("HTTP_REQUEST") || upper.contains("UNKNOWN_PROTOCOL")
            || upper.contains("NO_SHARED_CIPHER") || upper.contains("WRONG_CIPHER")
        {
            return "not an svsp replication client (TLS 1.2 with a pre-shared key expected): \(shortTLS(text))"
        }
        if upper.contains("UNEXPECTED_EOF") || upper.contains("UNCLEANSHUTDOWN") || upper.contains("UNCLEAN_SHUTDOWN") {
            return "the other side closed the connection without closing TLS"
        }
        if upper.contains("ALERT_HANDSHAKE_FAILURE") || upper.contains("ALERT_UNKNOWN_PSK") || upper.contains("PSK_IDENTITY") {
            return "the other side refused the handshake (it does not know this domain as a peer, pinned another domain id, or is not svsp): see its log"
        }
        return shortTLS(text)
    }

    /// BoringSSL's error strings without the numeric prefix noise.
    private static func shortTLS(_ text: String) -> String {
        let line = text.replacingOccurrences(of: "\n", with: " ")
        return line.count > 300 ? String(line.prefix(300)) + "…" : line
    }
}
