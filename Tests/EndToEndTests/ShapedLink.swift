import Foundation
import XCTest

/// Two network namespaces joined by a veth pair, shaped with `tc tbf` to a rate in both
/// directions: a WAN link between two sites on one machine. Root only.
final class ShapedLink {
    let names: (String, String)
    let addresses = ("10.77.0.1", "10.77.0.2")
    private let veth: (String, String)

    /// nil (with the reason in `why`) when this machine cannot make one.
    init?(rate: String, why: inout String) {
        guard getuid() == 0, FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip"), FileManager.default.isExecutableFile(atPath: "/usr/sbin/tc") else {
            why = "needs root, ip and tc (iproute2)"
            return nil
        }
        let tag = String(UInt32.random(in: 0..<0xFFFFFF), radix: 16)
        names = ("svspA\(tag)", "svspB\(tag)")
        veth = ("va\(tag)", "vb\(tag)")
        let steps: [[String]] = [
            ["ip", "netns", "add", names.0], ["ip", "netns", "add", names.1],
            ["ip", "link", "add", veth.0, "type", "veth", "peer", "name", veth.1],
            ["ip", "link", "set", veth.0, "netns", names.0], ["ip", "link", "set", veth.1, "netns", names.1],
            ["ip", "-n", names.0, "addr", "add", addresses.0 + "/24", "dev", veth.0],
            ["ip", "-n", names.1, "addr", "add", addresses.1 + "/24", "dev", veth.1],
            ["ip", "-n", names.0, "link", "set", veth.0, "up"], ["ip", "-n", names.1, "link", "set", veth.1, "up"],
            ["ip", "-n", names.0, "link", "set", "lo", "up"], ["ip", "-n", names.1, "link", "set", "lo", "up"],
            ["tc", "-n", names.0, "qdisc", "add", "dev", veth.0, "root", "tbf", "rate", rate, "burst", "32kb", "latency", "20ms"],
            ["tc", "-n", names.1, "qdisc", "add", "dev", veth.1, "root", "tbf", "rate", rate, "burst", "32kb", "latency", "20ms"],
        ]
        for step in steps where !Self.run(step) {
            why = "cannot set up the link: `\(step.joined(separator: " "))` failed"
            remove()
            return nil
        }
    }

    /// Takes site A's end of the link down (true) or up again.
    func cut(_ down: Bool) { _ = Self.run(["ip", "-n", names.0, "link", "set", veth.0, down ? "down" : "up"]) }

    func remove() {
        _ = Self.run(["ip", "netns", "del", names.0])
        _ = Self.run(["ip", "netns", "del", names.1])
    }

    @discardableResult
    static func run(_ args: [String]) -> Bool {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        p.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        p.standardError = FileHandle(forWritingAtPath: "/dev/null")
        guard (try? p.run()) != nil else { return false }
        p.waitUntilExit()
        return p.terminationStatus == 0
    }
}
