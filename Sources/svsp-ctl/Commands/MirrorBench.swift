import ArgumentParser
import Controller
import Foundation
import IOEngine

/// `svsp-ctl bench mirror`: a sync mirror over preallocated files, driven through
/// the Controller data API in-process (no daemon, no front end).
struct MirrorBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mirror",
        abstract: "Benchmark a sync mirror (one leg per file) through the data API.",
        discussion: "Builds a scratch domain (in --state, default a temp folder) with one pool per --leg file and a thick mirror vdisk over them. Overwrites the files.")

    @Option(name: .customLong("leg"), help: "A preallocated file for one leg (2..4).") var legs: [String] = []
    @Option(help: "randwrite|write|randread|read|randrw") var rw: String = "randwrite"
    @Option var bs: String = "4k"
    @Option var qd: Int = 32
    @Option var seconds: Double = 10
    @Option(help: "vdisk size (default: what the smallest leg holds).") var size: String?
    @Option(help: "Hardware profiles folder.") var profiles: String?
    @Option(name: .customLong("array-profile")) var arrayProfile: String = "file-backed"
    @Flag var json = false

    func run() throws {
        guard (2...4).contains(legs.count) else { throw CommandFailure("--leg: give 2..4 leg files") }
        guard let pattern = AccessPattern(rawValue: rw) else { throw CommandFailure("--rw '\(rw)': not a workload") }
        let blockBytes: UInt64
        do { blockBytes = try ByteSize.parse(bs) } catch { throw CommandFailure("invalid size \(error)") }
        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        let state = NSTemporaryDirectory() + "svsp-bench-mirror-\(getpid())"
        let legs = self.legs, profilesRoot = profiles, arrayProfile = self.arrayProfile, qd = self.qd
        let seconds = self.seconds, sizeText = size
        Task {
            defer { try? FileManager.default.removeItem(atPath: state); done.signal() }
            do {
                _ = try Domain.initialize(directory: state, name: "bench")
                let catalog = try ProfileLookup.catalog(profilesRoot)
                let domain = try await Domain.open(directory: state, profiles: catalog)
                var pools: [String] = []
                for (i, file) in legs.enumerated() {
                    let pool = try await domain.createPool(name: "leg\(i)", arrayProfile: arrayProfile, poolProfile: nil,
                                                           lunPaths: [file], createBytes: nil, force: true)
                    pools.append(pool.name)
                }
                // What a pool can give a vdisk: its capacity less its metadata area.
                let capacity = domain.metadata.pools.map { $0.capacityBytes - UInt64($0.metadataArea?.extentCount ?? 0) * $0.extentBytes }.min() ?? 0
                let wanted = try sizeText.map { try ByteSize.parse($0) } ?? capacity
                // The leg files held data before: their space is zeroed before it is handed out.
                let zeroer = Task { await domain.runZeroer { _ in } }
                defer { zeroer.cancel() }
                _ = try await domain.createVDisk(name: "m", poolName: pools[0], mirrorPools: Array(pools.dropFirst()),
                                                 sizeBytes: wanted / blockBytes * blockBytes, blockSize: 512, thin: false)
                let port = try domain.port(for: "m")
                let buffers = try BufferPool(bufferBytes: Int(blockBytes), count: qd)
                var config = RawWorkloadConfig(pattern: pattern, blockBytes: Int(blockBytes), queueDepth: qd,
                                                             areaBytes: port.sizeBytes / blockBytes * blockBytes)
                config.seconds = seconds
                let w = RawWorkload(config: config, target: VDiskTarget(port: port), lunPath: "vdisk m", buffers: buffers.handle)
                try w.run()
                outcome.report = BenchReport(target: legs.joined(separator: "+"), rw: pattern.rawValue, blockBytes: Int(blockBytes),
                                             queueDepth: qd, seconds: (Double(w.elapsedNs) / 1e7).rounded() / 100, phase: "mirror-\(legs.count)",
                                             read: BenchReport.direction(w.reads, elapsedNs: w.elapsedNs),
                                             write: BenchReport.direction(w.writes, elapsedNs: w.elapsedNs))
            } catch {
                outcome.failure = "\(error)"
            }
        }
        done.wait()
        if let failure = outcome.failure { throw CommandFailure(failure) }
        guard let report = outcome.report else { throw CommandFailure("no result") }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print("svsp bench mirror: \(legs.count) legs (\(legs.joined(separator: ", "))) rw=\(rw) bs=\(bs) qd=\(qd)")
            print(BenchReport.tableHeader())
            report.tableRows().forEach { print($0) }
        }
    }
}

private final class Outcome: @unchecked Sendable {
    var report: BenchReport?
    var failure: String?
}
