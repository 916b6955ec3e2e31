import CIOCore

/// What `svsp-ctl --version` prints. `number` is the one place the version lives
/// (scripts/build-release reads it from here); the commit is compiled in by a release build.
enum BuildIdentity {
    static let number = "0.9.0"
    static var commit: String { String(cString: cio_build_commit()) }
    static var description: String {
        commit == "unknown" ? "svsp-ctl \(number) (development build, commit unknown)" : "svsp-ctl \(number) (commit \(commit))"
    }
}
