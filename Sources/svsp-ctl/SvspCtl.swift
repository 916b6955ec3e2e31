import ArgumentParser
import Foundation

@main
struct SvspCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "svsp-ctl",
        abstract: "svsp storage virtualization controller: benchmarks, profiles, domains, pools, vdisks.",
        version: BuildIdentity.description,
        subcommands: [DomainCommand.self, ServeCommand.self, StatusCommand.self, PoolCommand.self, VDiskCommand.self, MirrorCommand.self,
                      PiTCommand.self, SnapshotCommand.self, VDGCommand.self, PeerCommand.self, AsyncCommand.self,
                      BenchCommand.self, ProfileCommand.self]
    )

    /// Our failures print as one line, `svsp-ctl: <reason>`, exit 1; usage errors stay ArgumentParser's.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch let failure as CommandFailure {
            FileHandle.standardError.write(Data("svsp-ctl: \(failure.message)\n".utf8))
            Foundation.exit(1)
        } catch {
            exit(withError: error)
        }
    }
}

/// A one-line failure: `svsp-ctl: <reason>` and exit status 1.
struct CommandFailure: Error, CustomStringConvertible {
    let message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}
