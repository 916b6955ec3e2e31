import Controller
import Foundation

/// Finds profiles for commands: by name in the catalog, or by a path to one .yaml file.
enum ProfileLookup {
    static func catalog(_ root: String?) throws -> ProfileCatalog {
        try ProfileCatalog(root: ProfileCatalog.defaultRoot(explicit: root))
    }

    static func array(_ nameOrPath: String, profilesRoot: String?) throws -> ArrayProfile {
        if nameOrPath.hasSuffix(".yaml") {
            guard let data = FileManager.default.contents(atPath: nameOrPath) else {
                throw CommandFailure("\(nameOrPath): cannot be read")
            }
            let name = URL(fileURLWithPath: nameOrPath).deletingPathExtension().lastPathComponent
            let (profile, problems) = ArrayProfile.parse(name: name, file: nameOrPath, yaml: String(decoding: data, as: UTF8.self))
            guard let profile else { throw ProfileProblems(problems: problems) }
            return profile
        }
        let catalog = try catalog(profilesRoot)
        guard let profile = catalog.arrays[nameOrPath] else {
            throw CommandFailure("array profile '\(nameOrPath)' not found in \(catalog.root)/arrays")
        }
        return profile
    }
}
