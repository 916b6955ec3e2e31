import ArgumentParser
import Controller
import Foundation

struct ProfileCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "profile", abstract: "Validate, show, compare and measure hardware profiles.",
        subcommands: [Validate.self, Show.self, Diff.self, TuneCommand.self])

    struct Validate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check profile files; list every problem (exit 1) or print OK.",
            discussion: "With no FILE, validates the whole profiles folder.")
        @Argument(help: "Profile files under arrays/, pools/ or links/.") var files: [String] = []
        @Option(help: "Hardware profiles folder.") var profiles: String?
        @Option(help: "Kind of the files when they are not under arrays/, pools/ or links/ (arrays|pools|links).")
        var kind: String?

        func run() throws {
            var forcedKind: ProfileCatalog.Kind?
            if let kind {
                guard let k = ProfileCatalog.Kind(rawValue: kind) else { throw CommandFailure("--kind '\(kind)': must be arrays, pools or links") }
                forcedKind = k
            }
            if files.isEmpty {
                let root = ProfileCatalog.defaultRoot(explicit: profiles)
                do {
                    let c = try ProfileCatalog(root: root)
                    print("OK: \(root): \(c.arrays.count) arrays, \(c.pools.count) pools, \(c.links.count) links")
                } catch {
                    throw CommandFailure("\(error.problems.count) problem(s):\n" + error.description)
                }
                return
            }
            let problems = ProfileCatalog.validate(files: files, kind: forcedKind)
            guard problems.isEmpty else {
                throw CommandFailure("\(problems.count) problem(s):\n" + problems.map(\.description).joined(separator: "\n"))
            }
            print("OK: \(files.count) file(s)")
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a profile with every default resolved.")
        @Argument(help: "Profile name (arrays are searched first, then pools, then links), or KIND/NAME.") var name: String
        @Option(help: "Hardware profiles folder.") var profiles: String?

        func run() throws {
            let catalog = try ProfileLookup.catalog(profiles)
            print(try resolve(name, in: catalog), terminator: "")
        }
    }

    struct Diff: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Compare two profiles field by field (resolved values).")
        @Argument var a: String
        @Argument var b: String
        @Option(help: "Hardware profiles folder.") var profiles: String?

        func run() throws {
            let catalog = try ProfileLookup.catalog(profiles)
            let left = fields(try resolve(a, in: catalog)), right = fields(try resolve(b, in: catalog))
            let keys = (left.map(\.0) + right.map(\.0).filter { k in !left.contains { $0.0 == k } })
            var differences = 0
            let width = max(keys.map(\.count).max() ?? 0, 5) + 2
            print("field".padding(toLength: width, withPad: " ", startingAt: 0) + a + "  ->  " + b)
            for key in keys {
                let l = left.first { $0.0 == key }?.1 ?? "(absent)", r = right.first { $0.0 == key }?.1 ?? "(absent)"
                guard l != r else { continue }
                differences += 1
                print(key.padding(toLength: width, withPad: " ", startingAt: 0) + l + "  ->  " + r)
            }
            if differences == 0 { print("(identical)") }
        }

        private func fields(_ yaml: String) -> [(String, String)] {
            yaml.split(separator: "\n").compactMap { line in
                guard let colon = line.firstIndex(of: ":") else { return nil }
                return (String(line[..<colon]), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces))
            }
        }
    }
}

/// `NAME` or `arrays/NAME`, `pools/NAME`, `links/NAME` → resolved YAML.
private func resolve(_ name: String, in catalog: ProfileCatalog) throws -> String {
    let parts = name.split(separator: "/").map(String.init)
    let kind = parts.count == 2 ? ProfileCatalog.Kind(rawValue: parts[0]) : nil
    let bare = parts.last ?? name
    if parts.count == 2, kind == nil { throw CommandFailure("'\(name)': kind must be arrays, pools or links") }
    if kind == nil || kind == .array, let p = catalog.arrays[bare] { return "# arrays/\(bare)\n" + p.yaml() }
    if kind == nil || kind == .pool, let p = catalog.pools[bare] { return "# pools/\(bare)\n" + p.yaml() }
    if kind == nil || kind == .link, let p = catalog.links[bare] { return "# links/\(bare)\n" + p.yaml() }
    throw CommandFailure("profile '\(name)' not found in \(catalog.root)")
}
