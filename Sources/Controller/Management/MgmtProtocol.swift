import Foundation

/// One management request: a command name and its string arguments (`pool.create`, {"name": "p1", ...}).
/// Repeated arguments (several --lun) are joined with "\n".
public struct MgmtRequest: Codable, Sendable {
    public var command: String
    public var args: [String: String]
    public init(command: String, args: [String: String] = [:]) {
        self.command = command
        self.args = args
    }
}

/// The reply: a human rendering and a JSON rendering of the same result, or a one-line error.
public struct MgmtResponse: Codable, Sendable {
    public var ok: Bool
    public var error: String?
    public var text: String
    public var json: String
    public var warnings: [String]

    public static func failure(_ message: String) -> MgmtResponse {
        MgmtResponse(ok: false, error: message, text: "", json: "", warnings: [])
    }

    public static func success(text: String, json: some Encodable, warnings: [String] = []) -> MgmtResponse {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data = (try? encoder.encode(json)) ?? Data("null".utf8)
        return MgmtResponse(ok: true, error: nil, text: text, json: String(decoding: data, as: UTF8.self), warnings: warnings)
    }
}

/// Management messages are bounded: a peer never chooses how much we allocate.
public enum MgmtLimits {
    public static let maxMessageBytes = 1 << 20
}

/// Where a domain's management socket is: recorded by the daemon in STATE/mgmt.path.
public enum MgmtPaths {
    public static func defaultSocket(_ directory: String) -> String { directory + "/mgmt.sock" }
    public static func recorded(_ directory: String) -> String { directory + "/mgmt.path" }

    public static func socket(for directory: String) -> String {
        if let text = try? String(contentsOfFile: recorded(directory), encoding: .utf8) {
            let path = text.trimmingCharacters(in: .whitespacesAndNewlines)
            if !path.isEmpty { return path }
        }
        return defaultSocket(directory)
    }
}
