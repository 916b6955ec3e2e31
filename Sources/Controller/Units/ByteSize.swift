import Foundation

/// Sizes as people type them: `4096`, `4k`, `1M`, `10G`, `512KiB`, `2T` (binary units: k = 1024).
public enum ByteSize {
    public struct ParseError: Error, CustomStringConvertible, Equatable {
        public let text: String
        public let reason: String
        public var description: String { "'\(text)': \(reason)" }
    }

    private static let multipliers: [String: UInt64] = [
        "": 1, "b": 1,
        "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
        "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
        "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
        "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
    ]

    public static func parse(_ text: String) throws(ParseError) -> UInt64 {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        let digits = trimmed.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, let value = UInt64(digits) else {
            throw ParseError(text: text, reason: "not a size (use e.g. 4096, 4k, 1M, 10G)")
        }
        let unit = trimmed.dropFirst(digits.count).trimmingCharacters(in: .whitespaces).lowercased()
        guard let multiplier = multipliers[unit] else {
            throw ParseError(text: text, reason: "unknown unit '\(unit)' (use k, M, G or T)")
        }
        let (product, overflow) = value.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { throw ParseError(text: text, reason: "too large") }
        return product
    }

    /// Shortest exact rendering: 4096 -> "4k", 1048576 -> "1M", 1000 -> "1000".
    public static func format(_ bytes: UInt64) -> String {
        for (suffix, m) in [("T", UInt64(1) << 40), ("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)]
        where bytes >= m && bytes % m == 0 {
            return "\(bytes / m)\(suffix)"
        }
        return "\(bytes)"
    }
}
