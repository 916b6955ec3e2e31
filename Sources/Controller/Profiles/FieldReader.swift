import Yams

/// Reads the fields of one profile's top-level mapping, recording a problem per
/// bad field instead of stopping, and flags every field it was never asked for.
struct FieldReader {
    let file: String
    private var fields: [String: (value: Node, line: Int?)] = [:]
    private var asked: Set<String> = []
    private(set) var problems: [ProfileProblem] = []

    /// nil when the text is not a YAML mapping (the problem is recorded).
    init?(file: String, yaml: String, problems sink: inout [ProfileProblem]) {
        self.file = file
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch {
            let firstLine = "\(error)".split(separator: "\n").first.map(String.init) ?? "\(error)"
            sink.append(ProfileProblem(file: file, rule: "malformed YAML: \(firstLine)"))
            return nil
        }
        guard let mapping = root?.mapping else {
            sink.append(ProfileProblem(file: file, rule: "must be a YAML mapping of field: value"))
            return nil
        }
        for (key, value) in mapping {
            guard let name = key.string else {
                sink.append(ProfileProblem(file: file, rule: "field names must be strings"))
                continue
            }
            if fields[name] != nil {
                sink.append(ProfileProblem(file: file, field: name, rule: "given twice"))
            }
            fields[name] = (value, key.mark?.line)
        }
    }

    private mutating func scalar(_ name: String) -> String? {
        asked.insert(name)
        guard let node = fields[name]?.value else { return nil }
        guard let s = node.scalar?.string else {
            problems.append(ProfileProblem(file: file, field: name, rule: "must be a single value, not a list or mapping"))
            return nil
        }
        return s
    }

    mutating func problem(_ name: String, _ value: String?, _ rule: String) {
        problems.append(ProfileProblem(file: file, field: name, value: value, rule: rule))
    }

    /// A field that must be present.
    mutating func required<T>(_ name: String, _ parse: (String) -> T?, rule: String) -> T? {
        guard let text = scalar(name) else {
            if fields[name] == nil { problem(name, nil, "required field missing") }
            return nil
        }
        guard let v = parse(text) else { problem(name, text, rule); return nil }
        return v
    }

    /// A field with a default; nil only when present and invalid.
    mutating func optional<T>(_ name: String, default value: T, _ parse: (String) -> T?, rule: String) -> T? {
        guard let text = scalar(name) else { return fields[name] == nil ? value : nil }
        guard let v = parse(text) else { problem(name, text, rule); return nil }
        return v
    }

    /// A field that may be absent altogether (`.some(nil)`); nil when present and invalid.
    mutating func absentable<T>(_ name: String, _ parse: (String) -> T?, rule: String) -> T?? {
        guard let text = scalar(name) else { return fields[name] == nil ? .some(nil) : nil }
        if text == "none" || text == "off" { return .some(nil) }
        guard let v = parse(text) else { problem(name, text, rule); return nil }
        return .some(v)
    }

    /// Call last: every field no reader asked for is a typo or a field of another kind.
    mutating func finish(known: [String]) -> [ProfileProblem] {
        for name in fields.keys.sorted() where !asked.contains(name) {
            let hint = known.first { editDistance($0, name) <= 2 }.map { " (did you mean '\($0)'?)" } ?? ""
            problem(name, nil, "unknown field\(hint)")
        }
        return problems
    }
}

/// Parsers shared by the three kinds, each paired with the rule its error names.
enum Parse {
    static func size(_ range: ClosedRange<UInt64>, powerOfTwo: Bool = false) -> (String) -> UInt64? {
        { text in
            guard let v = try? ByteSize.parse(text), range.contains(v) else { return nil }
            if powerOfTwo, v & (v - 1) != 0 { return nil }
            return v
        }
    }

    static func int(_ range: ClosedRange<Int>) -> (String) -> Int? {
        { text in Int(text).flatMap { range.contains($0) ? $0 : nil } }
    }

    static func bool(_ text: String) -> Bool? {
        switch text.lowercased() {
        case "true", "yes", "on": true
        case "false", "no", "off": false
        default: nil
        }
    }

    static func rate(_ range: ClosedRange<Double>) -> (String) -> Double? {
        { text in ProfileUnits.parseRate(text).flatMap { range.contains($0) ? $0 : nil } }
    }

    static func duration(_ range: ClosedRange<UInt64>) -> (String) -> UInt64? {
        { text in ProfileUnits.parseDuration(text).flatMap { range.contains($0) ? $0 : nil } }
    }

    static func name(_ text: String) -> String? {
        let ok = !text.isEmpty && text.count <= 64
            && text.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == ".") }
        return ok ? text : nil
    }
}

private func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a), b = Array(b)
    var row = Array(0...b.count)
    for i in 1...max(a.count, 1) where !a.isEmpty {
        var prev = row[0]
        row[0] = i
        for j in stride(from: 1, through: b.count, by: 1) {
            let cur = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] == b[j - 1] ? 0 : 1))
            prev = cur
        }
    }
    return row[b.count]
}
