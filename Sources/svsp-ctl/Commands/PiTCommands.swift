import ArgumentParser
import Controller
import Foundation

struct PiTCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pit", abstract: "Point-in-time copies of vdisks (no data copied when taken).",
        subcommands: [Create.self, List.self, Delete.self, Rollback.self, Diff.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Take a user PiT of a vdisk now.")
        @Argument(help: "The vdisk (or use --vdg).") var vdisk: String?
        @Option(help: "A virtual disk group: one PiT of every member at one instant, named NAME.<vdisk>.") var vdg: String?
        @Option(help: "The PiT's name (default: VDISK.pit-<UTC time>).") var name: String?
        @OptionGroup var options: DomainOptions
        func validate() throws {
            guard (vdisk == nil) != (vdg == nil) else { throw ValidationError("name a vdisk or --vdg GROUP (one of them)") }
        }
        func run() throws {
            var args: [String: String] = [:]
            if let vdisk { args["vdisk"] = vdisk }
            if let vdg { args["vdg"] = vdg }
            if let name { args["name"] = name }
            try options.send("pit.create", args)
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "PiTs (of one vdisk, or all), oldest first, with the bytes only each holds.")
        @Argument var vdisk: String?
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("pit.list", vdisk.map { ["vdisk": $0] } ?? [:]) }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a PiT; what only it held is freed in the background.")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("pit.delete", ["name": name]) }
    }

    struct Diff: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "The byte ranges that changed from PiT OLD to PiT NEW (or to the live vdisk), at extent granularity.")
        @Argument var old: String
        @Argument var new: String?
        @OptionGroup var options: DomainOptions
        func run() throws {
            var args = ["from": old]
            if let new { args["to"] = new }
            try options.send("pit.diff", args)
        }
    }

    struct Rollback: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Make the vdisk the PiT's image again (unexported first). The PiT and later PiTs are kept.")
        @Argument var vdisk: String
        @Option(help: "The PiT to roll back to.") var to: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("pit.rollback", ["vdisk": vdisk, "to": to]) }
    }
}

struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot", abstract: "Snapshots: vdisks made from PiTs (export, list and delete them as vdisks).",
        subcommands: [Create.self, Delete.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "A read-only view of a PiT, or with --writable a clone sharing its chunks.")
        @Argument var name: String
        @Option(help: "The PiT it shows.") var pit: String
        @Flag(help: "Hosts may write to it (writes are redirected; the PiT never changes).") var writable = false
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("snapshot.create", ["name": name, "pit": pit, "writable": writable ? "true" : "false"]) }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete a snapshot (what only it held is freed).")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("snapshot.delete", ["name": name]) }
    }
}

struct VDGCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdg", abstract: "Virtual disk groups: vdisks whose PiTs are taken at one instant (`pit create --vdg`).",
        subcommands: [Create.self, Add.self, Remove.self, List.self, Show.self, Delete.self])

    struct Create: ParsableCommand {
        @Argument var name: String
        @Option(name: .customLong("vdisk"), help: "A member (repeat).") var vdisks: [String] = []
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("vdg.create", ["name": name, "vdisks": vdisks.joined(separator: "\n")]) }
    }

    struct Add: ParsableCommand {
        @Argument var name: String
        @Option(name: .customLong("vdisk"), help: "A vdisk to add (repeat).") var vdisks: [String] = []
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("vdg.add", ["name": name, "vdisks": vdisks.joined(separator: "\n")]) }
    }

    struct Remove: ParsableCommand {
        @Argument var name: String
        @Option(name: .customLong("vdisk"), help: "A member to remove (repeat).") var vdisks: [String] = []
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("vdg.remove", ["name": name, "vdisks": vdisks.joined(separator: "\n")]) }
    }

    struct List: ParsableCommand {
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("vdg.list") }
    }

    struct Show: ParsableCommand {
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("vdg.show", ["name": name]) }
    }

    struct Delete: ParsableCommand {
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("vdg.delete", ["name": name]) }
    }
}
