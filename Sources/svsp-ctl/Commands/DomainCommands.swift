import ArgumentParser
import Controller
import Foundation
import IOEngine
import Logging

/// --dir / $SVSP_DIR and --json, shared by every command that talks to a daemon.
struct DomainOptions: ParsableArguments {
    @Option(help: "Domain state folder (default: $SVSP_DIR).") var dir: String?
    @Flag(help: "Print JSON.") var json = false

    func directory() throws -> String { try Self.resolveDirectory(dir) }

    /// --dir, else $SVSP_DIR (non-empty), else a one-line error; `serve` uses it too.
    static func resolveDirectory(_ dir: String?) throws -> String {
        if let dir { return dir }
        if let env = ProcessInfo.processInfo.environment["SVSP_DIR"], !env.isEmpty { return env }
        throw CommandFailure("no domain given: use --dir STATE or set SVSP_DIR")
    }

    /// Sends one command and prints its answer (table or JSON); failures are one line. With
    /// `failOnWarning` (checks), a warning is the verdict: the answer is printed, then the
    /// warning is the one-line failure.
    func send(_ command: String, _ args: [String: String] = [:], failOnWarning: Bool = false) throws {
        try present(try exchange(command, args), failOnWarning: failOnWarning)
    }

    /// One request and its successful answer; a failure is a CommandFailure.
    func exchange(_ command: String, _ args: [String: String] = [:]) throws -> MgmtResponse {
        let response: MgmtResponse
        do {
            response = try MgmtClient.send(MgmtRequest(command: command, args: args), directory: try directory())
        } catch let error as DomainError {
            throw CommandFailure(error.message)
        }
        guard response.ok else { throw CommandFailure(response.error ?? "failed") }
        return response
    }

    func present(_ response: MgmtResponse, failOnWarning: Bool = false) throws {
        if failOnWarning, let verdict = response.warnings.first {
            print(json ? response.json : response.text)
            throw CommandFailure(verdict)
        }
        for w in response.warnings { FileHandle.standardError.write(Data("svsp-ctl: warning: \(w)\n".utf8)) }
        print(json ? response.json : response.text)
    }
}

struct DomainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "domain", abstract: "Create a domain; manage its setup vdisk.",
        subcommands: [Init.self, SetupVDisk.self])

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create an empty domain in a state folder.")
        @Option(help: "State folder to create.") var dir: String
        @Option(help: "Domain name.") var name: String
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            do {
                let m = try Domain.initialize(directory: dir, name: name)
                print(json ? #"{"domain":"\#(m.name)","domainId":"\#(m.domainId.uuidString)","dir":"\#(dir)"}"#
                    : "domain '\(m.name)' created in \(dir) (id \(m.domainId.uuidString)); start it with `svsp-ctl serve --dir \(dir)`")
            } catch {
                throw CommandFailure(error.message)
            }
        }
    }

    struct SetupVDisk: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "setup-vdisk", abstract: "The setup vdisk (domain metadata mirrored on 3..5 pools).",
            subcommands: [Create.self])

        struct Create: ParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Move the metadata onto a setup vdisk on these pools.")
            @OptionGroup var options: DomainOptions
            @Option(name: .customLong("pool"), help: "A pool for one copy (3..5 times; once for a scratch domain).") var pools: [String] = []
            func run() throws { try options.send("setup.create", ["pools": pools.joined(separator: "\n")]) }
        }
    }
}

struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve", abstract: "Run a domain in the foreground until SIGINT/SIGTERM.")
    @Option(help: "Domain state folder (default: $SVSP_DIR).") var dir: String?
    @Option(name: .customLong("mgmt-socket"), help: "Management socket (default: STATE/mgmt.sock).") var mgmtSocket: String?
    @Option(help: "Hardware profiles folder.") var profiles: String?
    @Option(name: .customLong("metrics-listen"), help: "Serve Prometheus metrics on HOST:PORT (/metrics).") var metricsListen: String?
    @Option(name: .customLong("nbd-listen"),
            help: "Also serve NBD on TCP: PORT (loopback) or HOST:PORT (e.g. 0.0.0.0:10809 for every interface).")
    var nbdListen: String?
    @Option(name: .customLong("nbd-max-connections"),
            help: "Most NBD connections open at once (each may hold 32 MiB of buffers); more are closed at accept.")
    var nbdMaxConnections: Int = NBDServer.defaultMaxConnections
    @Option(name: .customLong("fault-plan"), help: "Tests and drills only: fail LUN I/O as this JSON plan says (see README).")
    var faultPlan: String?
    @Option(name: .customLong("repl-listen"), help: "Accept replication connections from peer domains on HOST:PORT (off unless given).")
    var replListen: String?
    @Option(name: .customLong("reap-poll-us"),
            help: "At low queue depth, poll for a completion up to this many microseconds before sleeping (0: never; default \(defaultPollMicroseconds)).")
    var reapPollMicroseconds: Int = defaultPollMicroseconds
    @Option(name: .customLong("nbd-completions"),
            help: "Who reaps NBD I/O: 'loop' (the NBD event loop, one wake-up per request) or 'thread' (the engine's reaper thread).")
    var nbdCompletions: NBDCompletions = .loop

    enum NBDCompletions: String, ExpressibleByArgument, CaseIterable { case loop, thread }

    func run() throws {
        let dir = try DomainOptions.resolveDirectory(dir)
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        let daemon = Daemon(options: .init(directory: dir, mgmtSocket: mgmtSocket, profilesRoot: profiles, metricsListen: metricsListen,
                                           nbdListen: nbdListen, nbdMaxConnections: nbdMaxConnections, faultPlan: faultPlan,
                                           replListen: replListen, reapPollMicroseconds: reapPollMicroseconds,
                                           nbdReapOnLoop: nbdCompletions == .loop),
                            logger: Logger(label: "svsp"))
        let outcome = RunOutcome()
        let done = DispatchSemaphore(value: 0)
        Task {
            do { try await daemon.run() } catch { outcome.failure = (error as? DomainError)?.message ?? "\(error)" }
            done.signal()
        }
        done.wait()
        if let failure = outcome.failure { throw CommandFailure(failure) }
    }
}

private final class RunOutcome: @unchecked Sendable { var failure: String? }

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "status", abstract: "Domain, setup vdisk, pools, vdisks, health.")
    @OptionGroup var options: DomainOptions
    func run() throws { try options.send("status") }
}

struct PoolCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pool", abstract: "Storage pools.", subcommands: [Create.self, List.self, Show.self, Delete.self, Check.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create a pool from LUNs (files are created with --create-size).")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        @Option(name: .customLong("array-profile")) var arrayProfile: String
        @Option(name: .customLong("pool-profile"), help: "Default: the pool profile named like the array profile.") var poolProfile: String?
        @Option(name: .customLong("lun"), help: "A block device or file (repeat for more LUNs).") var luns: [String] = []
        @Option(name: .customLong("create-size"), help: "Create missing LUN files of this size (preallocated).") var createSize: String?
        @Flag(help: "Take LUNs that carry another label, a partition table or a file system.") var force = false

        func run() throws {
            var args = ["name": name, "array_profile": arrayProfile, "luns": luns.map(absolute).joined(separator: "\n"),
                        "force": force ? "true" : "false"]
            args["pool_profile"] = poolProfile
            args["create_size"] = createSize
            try options.send("pool.create", args)
        }
    }

    struct List: ParsableCommand {
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("pool.list") }
    }

    struct Show: ParsableCommand {
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("pool.show", ["name": name]) }
    }

    struct Delete: ParsableCommand {
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("pool.delete", ["name": name]) }
    }

    struct Check: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check the pool's space accounting and labels (safe on a live pool); exit 1 on any problem.")
        @Argument var name: String
        @Flag(help: "First rebuild a damaged space map from the block maps, and give back leaked extents (counted, referenced by no block map).")
        var repair = false
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("pool.check", ["name": name, "repair": repair ? "true" : "false"], failOnWarning: true) }
    }
}

struct VDiskCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdisk", abstract: "Virtual disks.",
        subcommands: [Create.self, List.self, Show.self, Grow.self, Delete.self, Verify.self, Export.self, Unexport.self])

    struct Create: ParsableCommand {
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        @Option var pool: String
        @Option var size: String
        @Option(name: .customLong("block-size"), help: "512 or 4096.") var blockSize: Int = 512
        @Flag(help: "Allocate extents on first write instead of at create.") var thin = false
        @Option(name: .customLong("mirror-pool"), help: "Another leg of a sync mirror in this pool (1..3 times).") var mirrorPools: [String] = []
        @Option(help: "synchronous-always | automatic-failover (mirrors).") var mode: String = "automatic-failover"
        @Option(name: .customLong("dirty-regions"), help: "on | off (mirrors).") var dirtyRegions: String = "on"
        func run() throws {
            try options.send("vdisk.create", ["name": name, "pool": pool, "size": size, "block_size": "\(blockSize)",
                                              "thin": thin ? "true" : "false", "mirror_pools": mirrorPools.joined(separator: "\n"),
                                              "mode": mode, "dirty_regions": dirtyRegions])
        }
    }

    struct List: ParsableCommand {
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("vdisk.list") }
    }

    struct Show: ParsableCommand {
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("vdisk.show", ["name": name]) }
    }

    struct Grow: ParsableCommand {
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        @Option var size: String
        func run() throws { try options.send("vdisk.grow", ["name": name, "size": size]) }
    }

    struct Delete: ParsableCommand {
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("vdisk.delete", ["name": name]) }
    }

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve the vdisk over NBD (export name = vdisk name); persists across restarts.")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        @Flag(name: .customLong("read-only"), help: "Hosts may read only (writes get EPERM).") var readOnly = false
        func run() throws { try options.send("vdisk.export", ["name": name, "read_only": readOnly ? "true" : "false"]) }
    }

    struct Unexport: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Stop serving the vdisk over NBD (open connections are closed).")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("vdisk.unexport", ["name": name]) }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a checksummed pattern through the data API, read it back, compare (overwrites the vdisk).")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        @Option(help: "Bytes from the start to verify (default: all).") var size: String?
        @Option(help: "both | write (leave the pattern) | read (check a pattern written earlier with the same --seed).") var phase: String = "both"
        @Option(help: "Pattern seed (needed to check an earlier write phase).") var seed: UInt64?
        func run() throws {
            var args = ["name": name, "phase": phase]
            args["size"] = size
            args["seed"] = seed.map(String.init)
            try options.sendShowingProgress("vdisk.verify", args, key: "vdisk.verify:\(name)", label: "verify \(name)")
        }
    }
}

struct MirrorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mirror", abstract: "Sync mirrors: status, resync, verify, copy rate.",
        subcommands: [Status.self, AddLeg.self, RemoveLeg.self, Split.self, Resync.self, Verify.self, SetRate.self])

    struct AddLeg: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "add-leg", abstract: "Add a leg in another pool; it is filled in the background.")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        @Option var pool: String
        func run() throws { try options.send("mirror.add-leg", ["name": name, "pool": pool]) }
    }

    struct RemoveLeg: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "remove-leg", abstract: "Remove a leg (never the last in-sync one).")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        @Option var leg: Int
        func run() throws { try options.send("mirror.remove-leg", ["name": name, "leg": "\(leg)"]) }
    }

    struct Split: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Turn an in-sync leg into an independent vdisk, consistent as of the split.")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        @Option var leg: Int
        @Option(name: .customLong("as")) var newName: String
        func run() throws { try options.send("mirror.split", ["name": name, "leg": "\(leg)", "as": newName]) }
    }

    struct Status: ParsableCommand {
        @Argument var name: String?
        @OptionGroup var options: DomainOptions
        func run() throws {
            var args: [String: String] = [:]
            args["name"] = name
            try options.send("mirror.status", args)
        }
    }

    struct Resync: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Copy blocks that differ from an in-sync leg to failed or copying legs.")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        @Option(name: .customLong("force-from"), help: "Copy from this leg even if the persisted state cannot decide.") var forceFrom: Int?
        @Flag(help: "Start it and return; follow with `mirror status`.") var background = false
        func run() throws {
            var args = ["name": name, "background": background ? "true" : "false"]
            args["force_from"] = forceFrom.map(String.init)
            if background {
                try options.send("mirror.resync", args)
            } else {
                try options.sendShowingProgress("mirror.resync", args, key: "mirror:\(name)", label: "resync \(name)")
            }
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Compare the in-sync legs block by block (crc32c).")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        @Flag(help: "Copy differing blocks from the first in-sync leg.") var repair = false
        func run() throws {
            try options.sendShowingProgress("mirror.verify", ["name": name, "repair": repair ? "true" : "false"],
                                            key: "mirror:\(name)", label: "verify \(name)")
        }
    }

    struct SetRate: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "set-rate", abstract: "Cap background copies of the vdisk's pools (e.g. 50MiB/s, none).")
        @Argument var name: String
        @Argument var rate: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("mirror.set-rate", ["name": name, "rate": rate]) }
    }
}

func absolute(_ path: String) -> String {
    path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
}
