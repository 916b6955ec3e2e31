import ArgumentParser
import Foundation

struct AsyncCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "async", abstract: "Async mirror groups: a vdisk mirrored to a peer domain in write-order consistent cycles.",
        subcommands: [CreateGroup.self, AddTask.self, DeleteTask.self, Status.self, PauseTask.self, ContinueTask.self, DetachTask.self, Failover.self, Recover.self, Merge.self, TransferProduction.self, SplitTask.self, DeleteGroup.self])

    struct CreateGroup: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "create-group", abstract: "Create a group and its task: the destination vdisk is made at the peer, the initial copy starts.")
        @Argument var name: String
        @Option(help: "The vdisk to mirror.") var source: String?
        @Option(name: .customLong("source-snapshot"), help: "A snapshot to mirror (instead of --source).") var sourceSnapshot: String?
        @Option(name: .customLong("source-vdg"), help: "A virtual disk group to mirror, every member at one instant (instead of --source).")
        var sourceVDG: String?
        @OptionGroup var destination: DestinationOptions
        @OptionGroup var options: DomainOptions
        @Flag(help: "Wait until the initial copy is complete at the destination, showing its progress.") var wait = false
        func run() throws {
            var args = destination.args.merging(["name": name]) { $1 }
            if let source { args["source"] = source }
            if let sourceSnapshot { args["source_snapshot"] = sourceSnapshot }
            if let sourceVDG { args["source_vdg"] = sourceVDG }
            try options.send("async.create-group", args)
            if wait { try options.waitForInitialCopy(group: name) }
        }
    }

    struct AddTask: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "add-task", abstract: "Mirror a group's vdisks to one more destination: a task named GROUP.TASK with PiTs and cycles of its own.")
        @Argument var name: String
        @Option(help: "The task's name (default: the peer's name); its record and its group at the peer are GROUP.TASK.") var task: String?
        @OptionGroup var destination: DestinationOptions
        @OptionGroup var options: DomainOptions
        func run() throws {
            var args = destination.args.merging(["name": name]) { $1 }
            if let task { args["task"] = task }
            try options.send("async.add-task", args)
        }
    }

    struct DeleteTask: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "delete-task", abstract: "End a further task of a group (its destination forgets it; vdisks and PiTs stay).")
        @Argument var name: String
        @Option(help: "The task's name (as `async status GROUP` lists it: GROUP.TASK).") var task: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("async.delete-task", ["name": name, "task": task]) }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Groups: state, last complete PiT at the destination and its age, what is left to send.")
        @Argument var name: String?
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("async.status", name.map { ["name": $0] } ?? [:]) }
    }

    struct PauseTask: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "pause-task", abstract: "Stop taking cycles (the one in flight finishes).")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("async.pause-task", ["name": name]) }
    }

    struct ContinueTask: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "continue-task", abstract: "Take cycles again.")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("async.continue-task", ["name": name]) }
    }

    struct DetachTask: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "detach-task",
            abstract: "End the task: at the destination, its vdisks go back to their last complete PiT and become writable; at the source, shipping stops here and at the peer when reachable (prints the plan; --yes does it).")
        @OptionGroup var operation: PlannedOperation
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("async.detach-task", operation.args) }
    }

    struct Failover: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "At the destination, the source site lost: detach, and export the vdisks read-write at their last complete PiT (prints the plan; --yes does it).")
        @OptionGroup var operation: PlannedOperation
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("async.failover", operation.args) }
    }

    struct Recover: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "At the site that failed over, the old source back: mirror back to it from the common PiT, rolling back its writes since (prints the plan; --yes does it).")
        @OptionGroup var operation: PlannedOperation
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("async.recover", operation.args) }
    }

    struct Merge: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "After a fail over (a split brain once the sites reconnect): mirror again from the common PiT, the side --from names winning (prints the plan; --yes does it).")
        @OptionGroup var operation: PlannedOperation
        @Option(help: "The side whose data wins: 'here', this domain's name, or the peer's name.") var from: String
        @Flag(help: "Roll the losing side back to the common PiT (without it, a loser that changed since is refused).") var rollback = false
        @Flag(help: "No common PiT: wipe the losing side and copy everything the winner has allocated.") var full = false
        @OptionGroup var options: DomainOptions
        func run() throws {
            try options.send("async.merge", operation.args.merging(["from": from, "rollback": String(rollback), "full": String(full)]) { $1 })
        }
    }

    struct SplitTask: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "split-task",
            abstract: "At the source, both sites up: hold host writes, ship a last cycle, check both sides are identical, then part (prints the plan; --yes does it).")
        @OptionGroup var handOver: HandOverOperation
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("async.split-task", handOver.args) }
    }

    struct TransferProduction: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "transfer-production",
            abstract: "At the source, both sites up: hold host writes, ship a last cycle, swap the roles, export at the peer (prints the plan; --yes does it).")
        @OptionGroup var handOver: HandOverOperation
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("async.transfer-production", handOver.args) }
    }

    struct DeleteGroup: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "delete-group", abstract: "Delete a group (its vdisks and PiTs stay).")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("async.delete-group", ["name": name]) }
    }
}

/// Where a task mirrors to: the peer and the destination vdisks there (`create-group`, `add-task`).
struct DestinationOptions: ParsableArguments {
    @Option(help: "The peer domain to mirror to.") var peer: String
    @Option(help: "A destination vdisk's name at the peer, once per source vdisk in member order (default: the sources' names).")
    var dest: [String] = []
    @Option(name: .customLong("dest-pool"), help: "The peer's pool for a new destination vdisk (default: its first).") var destPool: String?
    @Flag(name: .customLong("dest-existing"), help: "Mirror onto an existing vdisk at the peer (same size and block size; overwritten).")
    var destExisting = false

    var args: [String: String] {
        var args = ["peer": peer, "dest_existing": destExisting ? "true" : "false"]
        if !dest.isEmpty { args["dest"] = dest.joined(separator: ",") }
        if let destPool { args["dest_pool"] = destPool }
        return args
    }
}

/// The group an operation that prints its plan acts on, and whether to do it.
struct PlannedOperation: ParsableArguments {
    @Argument var name: String
    @Flag(help: "Do it (without: print what would be done).") var yes = false

    var args: [String: String] { ["name": name, "yes": yes ? "true" : "false"] }
}

/// A planned operation that holds host writes while a last cycle ships (`split-task`,
/// `transfer-production`), and how long it may wait for that cycle.
struct HandOverOperation: ParsableArguments {
    @OptionGroup var operation: PlannedOperation
    @Option(help: "How long to wait for the last cycle, in seconds (host writes are held meanwhile).") var seconds: Int = 120

    var args: [String: String] { operation.args.merging(["seconds": String(seconds)]) { $1 } }
}
