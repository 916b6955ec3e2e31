import ArgumentParser
import Foundation

struct PeerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "peer", abstract: "Peer domains: the other sites this domain mirrors to or from, over an authenticated link.",
        subcommands: [Add.self, List.self, Show.self, Remove.self])

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Add a peer domain (run it on both sides, each naming the other, with the same secret file).")
        @Argument(help: "The peer domain's name (its `domain init --name`).") var name: String
        @Option(help: "HOST:PORT where the peer's `serve --repl-listen` accepts.") var address: String
        @Option(name: .customLong("secret-file"),
                help: "A file holding the shared secret (16..256 bytes, e.g. `head -c 32 /dev/urandom | base64`); copied into the state folder.")
        var secretFile: String
        @Option(name: .customLong("link-profile"), help: "The link profile of the connection (hardware-profiles/links).") var linkProfile: String
        @Option(name: .customLong("domain-id"), help: "The peer's domain id, if known (else learned at first contact, then pinned).")
        var domainId: String?
        @OptionGroup var options: DomainOptions
        func run() throws {
            var args = ["name": name, "address": address, "secret_file": absolute(secretFile), "link_profile": linkProfile]
            if let domainId { args["domain_id"] = domainId }
            try options.send("peer.add", args)
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Peers and the state of their links.")
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("peer.list") }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One peer: its link, round trip, and the last thing refused or failed.")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("peer.show", ["name": name]) }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a peer (its connections close and its secret is deleted).")
        @Argument var name: String
        @OptionGroup var options: DomainOptions
        func run() throws { try options.send("peer.remove", ["name": name]) }
    }
}
