/// One thing wrong with a profile, printed as one line:
/// `arrays/eva.yaml: queue_depth_per_lun: -3: must be 1..4096`.
public struct ProfileProblem: Error, Equatable, Sendable, CustomStringConvertible {
    public let file: String
    public let field: String?
    public let value: String?
    public let rule: String

    public init(file: String, field: String? = nil, value: String? = nil, rule: String) {
        self.file = file
        self.field = field
        self.value = value
        self.rule = rule
    }

    public var description: String {
        [file, field, value].compactMap { $0 }.joined(separator: ": ") + ": " + rule
    }
}

/// Every problem found in one or more profiles (validation never stops at the first).
public struct ProfileProblems: Error, Sendable, CustomStringConvertible {
    public let problems: [ProfileProblem]
    public init(problems: [ProfileProblem]) { self.problems = problems }
    public var description: String { problems.map(\.description).joined(separator: "\n") }
}
