import Foundation

/// The profiles of one `hardware-profiles/` tree, loaded and cross-checked.
public struct ProfileCatalog: Sendable {
    public enum Kind: String, CaseIterable, Sendable {
        case array = "arrays", pool = "pools", link = "links"
    }

    public let root: String
    public private(set) var arrays: [String: ArrayProfile] = [:]
    public private(set) var pools: [String: PoolProfile] = [:]
    public private(set) var links: [String: LinkProfile] = [:]

    /// Loads every `*.yaml` under root/arrays, root/pools, root/links; throws every problem found.
    public init(root: String) throws(ProfileProblems) {
        self.root = root
        var problems: [ProfileProblem] = []
        var any = false
        for kind in Kind.allCases {
            let dir = root + "/" + kind.rawValue
            let names = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".yaml") }.sorted()
            for file in names {
                any = true
                problems += load(kind: kind, path: dir + "/" + file, label: kind.rawValue + "/" + file)
            }
        }
        if !any { problems.append(ProfileProblem(file: root, rule: "no profiles found (expected arrays/, pools/, links/ with *.yaml)")) }
        problems += crossCheck()
        if !problems.isEmpty { throw ProfileProblems(problems: problems) }
    }

    /// Validates individual files (kind from their folder: arrays/, pools/ or links/). A pool's array is
    /// looked up among the files given and in the sibling arrays/ folder.
    public static func validate(files: [String], kind forcedKind: Kind? = nil) -> [ProfileProblem] {
        var catalog = ProfileCatalog(empty: "")
        var problems: [ProfileProblem] = []
        for path in files {
            let url = URL(fileURLWithPath: path)
            let folder = url.deletingLastPathComponent().lastPathComponent
            guard let kind = forcedKind ?? Kind(rawValue: folder) else {
                problems.append(ProfileProblem(file: path, rule: "cannot tell the kind: put it under arrays/, pools/ or links/"))
                continue
            }
            let label = forcedKind == nil ? folder + "/" + url.lastPathComponent : path
            problems += catalog.load(kind: kind, path: path, label: label)
        }
        for (name, pool) in catalog.pools where catalog.arrays[pool.arrayProfile] == nil {
            let sibling = URL(fileURLWithPath: files.first { $0.hasSuffix("/" + name + ".yaml") } ?? "")
                .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("arrays/\(pool.arrayProfile).yaml").path
            var scratch = ProfileCatalog(empty: "")
            if FileManager.default.fileExists(atPath: sibling), scratch.load(kind: .array, path: sibling, label: "arrays/\(pool.arrayProfile).yaml").isEmpty {
                continue
            }
            problems.append(ProfileProblem(file: "pools/\(name).yaml", field: "array", value: pool.arrayProfile,
                                           rule: "no array profile of that name"))
        }
        return problems
    }

    private init(empty root: String) { self.root = root }

    private mutating func load(kind: Kind, path: String, label: String) -> [ProfileProblem] {
        guard let data = FileManager.default.contents(atPath: path) else {
            return [ProfileProblem(file: label, rule: "cannot be read")]
        }
        guard let yaml = String(data: data, encoding: .utf8) else {
            return [ProfileProblem(file: label, rule: "is not UTF-8 text")]
        }
        let name = URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
        guard Parse.name(name) != nil else {
            return [ProfileProblem(file: label, rule: "file name must be letters, digits, - _ . (it is the profile's name)")]
        }
        switch kind {
        case .array:
            let (p, problems) = ArrayProfile.parse(name: name, file: label, yaml: yaml)
            if let p { arrays[name] = p }
            return problems
        case .pool:
            let (p, problems) = PoolProfile.parse(name: name, file: label, yaml: yaml)
            if let p { pools[name] = p }
            return problems
        case .link:
            let (p, problems) = LinkProfile.parse(name: name, file: label, yaml: yaml)
            if let p { links[name] = p }
            return problems
        }
    }

    private func crossCheck() -> [ProfileProblem] {
        pools.values.sorted { $0.name < $1.name }.compactMap { pool in
            arrays[pool.arrayProfile] == nil
                ? ProfileProblem(file: "pools/\(pool.name).yaml", field: "array", value: pool.arrayProfile,
                                 rule: "no array profile of that name in \(root)/arrays")
                : nil
        }
    }

    /// Where profiles live: an explicit folder, $SVSP_PROFILES, ./hardware-profiles,
    /// <prefix>/share/svsp/hardware-profiles beside the binary, or the source tree above a build folder.
    public static func defaultRoot(explicit: String? = nil) -> String {
        if let explicit { return explicit }
        if let env = ProcessInfo.processInfo.environment["SVSP_PROFILES"] { return env }
        let fm = FileManager.default
        if fm.fileExists(atPath: "hardware-profiles/arrays") { return "hardware-profiles" }
        // The running binary's own path (argv[0] is a bare name when found through $PATH).
        let executable = (try? fm.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var dir = URL(fileURLWithPath: executable).resolvingSymlinksInPath().deletingLastPathComponent()
        let installed = dir.deletingLastPathComponent().appendingPathComponent("share/svsp/hardware-profiles").path
        if fm.fileExists(atPath: installed + "/arrays") { return installed }
        for _ in 0..<5 {
            let candidate = dir.appendingPathComponent("hardware-profiles").path
            if fm.fileExists(atPath: candidate + "/arrays") { return candidate }
            dir = dir.deletingLastPathComponent()
        }
        return "hardware-profiles"
    }
}
