/// Units of profile values: sizes (`4k`), rates (`100Mbit/s`, `200MiB/s`), durations (`20ms`).
public enum ProfileUnits {
    /// Bytes per second. Bit rates are decimal (`100Mbit/s` = 12.5 MB/s), byte rates
    /// follow ByteSize (`200M/s`, `200MiB/s` = 200 × 2^20 B/s; `200MB/s` is decimal).
    public static func parseRate(_ text: String) -> Double? {
        let t = text.replacingOccurrences(of: " ", with: "")
        guard t.hasSuffix("/s") else { return nil }
        let body = String(t.dropLast(2))
        let digits = body.prefix { $0.isNumber || $0 == "." }
        guard let value = Double(digits), value >= 0 else { return nil }
        let unit = String(body.dropFirst(digits.count))
        let bits: [String: Double] = ["bit": 1, "kbit": 1e3, "Kbit": 1e3, "Mbit": 1e6, "Gbit": 1e9, "Tbit": 1e12,
                                      "bps": 1, "kbps": 1e3, "Mbps": 1e6, "Gbps": 1e9]
        if let m = bits[unit] { return value * m / 8 }
        let decimalBytes: [String: Double] = ["kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12]
        if let m = decimalBytes[unit] { return value * m }
        let mi = 1_048_576.0, gi = mi * 1024
        let binaryBytes: [String: Double] = ["": 1, "B": 1, "k": 1024, "K": 1024, "KiB": 1024, "M": mi, "MiB": mi,
                                             "G": gi, "GiB": gi, "T": gi * 1024, "TiB": gi * 1024]
        if let m = binaryBytes[unit] { return value * m }
        return nil
    }

    /// Nanoseconds from `250us`, `20ms`, `1.5s`, `5m`, `2h` (a bare number is rejected: units are required).
    public static func parseDuration(_ text: String) -> UInt64? {
        let t = text.replacingOccurrences(of: " ", with: "")
        let digits = t.prefix { $0.isNumber || $0 == "." }
        guard let value = Double(digits), value >= 0 else { return nil }
        let units: [String: Double] = ["ns": 1, "us": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "min": 60e9, "h": 3600e9]
        guard let m = units[String(t.dropFirst(digits.count))] else { return nil }
        let ns = value * m
        return ns < 1.8e19 ? UInt64(ns) : nil
    }

    public static func formatRate(_ bytesPerSecond: Double) -> String {
        let bits = bytesPerSecond * 8
        if bits >= 1e9, (bits / 1e9).rounded() == bits / 1e9 { return "\(Int(bits / 1e9))Gbit/s" }
        if bits >= 1e6, (bits / 1e6).rounded() == bits / 1e6 { return "\(Int(bits / 1e6))Mbit/s" }
        let mib = bytesPerSecond / 1_048_576
        if mib >= 1, mib.rounded() == mib { return "\(Int(mib))MiB/s" }
        return "\(Int(bytesPerSecond))B/s"
    }

    public static func formatDuration(_ ns: UInt64) -> String {
        if ns % 3_600_000_000_000 == 0, ns > 0 { return "\(ns / 3_600_000_000_000)h" }
        if ns % 60_000_000_000 == 0, ns > 0 { return "\(ns / 60_000_000_000)m" }
        if ns % 1_000_000_000 == 0, ns > 0 { return "\(ns / 1_000_000_000)s" }
        if ns % 1_000_000 == 0 { return "\(ns / 1_000_000)ms" }
        if ns % 1_000 == 0 { return "\(ns / 1_000)us" }
        return "\(ns)ns"
    }
}

import Foundation
