import ArgumentParser
import Controller
import Foundation
import IOEngine

/// `svsp-ctl profile tune`: sweep queue depth × block size on a LUN and write an array profile.
struct TuneCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tune",
        abstract: "Measure a device or file and write an array profile from the sweep.",
        discussion: """
            Sweeps random reads (and random writes with --allow-write) over queue depths 1..256 and block
            sizes 4k..1M, finds each size's knee (the smallest depth within 5% of that size's best
            throughput) and writes an array profile with the measured values and the sweep as comments.
            Refuses a target holding an svsp label, a partition table or a file system unless --force.
            Measure a file whose blocks were written (a fresh preallocated file reads as zeros without I/O).
            """)

    @Option(help: "Device or file to measure.") var lun: String
    @Option(help: "Where to write the array profile (its file name is the profile's name).") var out: String
    @Option(name: .customLong("seconds-per-step"), help: "Seconds per depth/size step.") var secondsPerStep: Double = 1
    @Flag(name: .customLong("allow-write"), help: "Also sweep random writes (destroys the target's data).") var allowWrite = false
    @Flag(help: "Measure even a target that holds a label, partition table or file system.") var force = false
    @Option(help: "Queue depths to sweep (comma separated).") var depths: String = "1,2,4,8,16,32,64,128,256"
    @Option(help: "Block sizes to sweep (comma separated).") var sizes: String = "4k,16k,64k,256k,1M"

    struct Step: Sendable, Encodable {
        let write: Bool
        let blockBytes: Int
        let depth: Int
        let iops: Double
        let mibPerSecond: Double
        let p99Us: Double
    }

    func run() throws {
        let depthList = try parseList(depths, name: "--depths") { Int($0).flatMap { (1...4096).contains($0) ? $0 : nil } }
        let sizeList = try parseList(sizes, name: "--sizes") { text -> Int? in
            guard let v = try? ByteSize.parse(text), v >= 512, v <= 32 << 20, v % 512 == 0 else { return nil }
            return Int(v)
        }
        guard secondsPerStep > 0 else { throw CommandFailure("--seconds-per-step \(secondsPerStep): must be > 0") }
        let name = URL(fileURLWithPath: out).deletingPathExtension().lastPathComponent
        guard out.hasSuffix(".yaml"), !name.isEmpty else { throw CommandFailure("--out \(out): must be a NAME.yaml path") }

        try refuseIfOccupied()
        let target: LUN
        do { target = try LUN(path: lun, readWrite: allowWrite) } catch { throw CommandFailure(error.description) }
        let info = target.info
        let areaBytes = info.sizeBytes / UInt64(sizeList.max()!) * UInt64(sizeList.max()!)
        guard areaBytes > 0 else { throw CommandFailure("\(lun): smaller than one block of \(ByteSize.format(UInt64(sizeList.max()!)))") }

        let engine = try Engine(queueDepth: depthList.max()!)
        let pool = try BufferPool(bufferBytes: sizeList.max()!, count: depthList.max()!, alignment: Int(info.alignment))
        let passes: [Bool] = allowWrite ? [false, true] : [false]
        let total = passes.count * depthList.count * sizeList.count
        var steps: [Step] = []
        // A bar on a terminal; in a log the line per step below is the progress.
        let display = ProgressDisplay(label: "profile tune", unit: .steps, json: false)
        for write in passes {
            for size in sizeList {
                for depth in depthList {
                    let config = RawWorkloadConfig(
                        pattern: write ? .randwrite : .randread, blockBytes: size, queueDepth: depth,
                        areaBytes: areaBytes, seconds: secondsPerStep)
                    let w = RawWorkload(config: config, target: EngineTarget(engine: engine.handle, lun: target.handle),
                                        lunPath: lun, buffers: pool.handle)
                    do { try w.run() } catch { throw CommandFailure("\(error)") }
                    let stats = write ? w.writes : w.reads
                    let seconds = Double(w.elapsedNs) / 1e9
                    let step = Step(write: write, blockBytes: size, depth: depth, iops: Double(stats.ios) / seconds,
                                    mibPerSecond: Double(stats.bytes) / seconds / 1_048_576,
                                    p99Us: Double(stats.latency.valueAtPercentile(99)) / 1000)
                    steps.append(step)
                    let line = String(format: "%@ bs=%@ qd=%d: %.0f IOPS %.1f MiB/s p99 %.0f us",
                                      write ? "randwrite" : "randread", ByteSize.format(UInt64(size)), depth, step.iops,
                                      step.mibPerSecond, step.p99Us)
                    if display.isTerminal {
                        display.update(done: UInt64(steps.count), total: UInt64(total), note: line)
                    } else {
                        FileHandle.standardError.write(Data("[\(steps.count)/\(total)] \(line)\n".utf8))
                    }
                }
            }
        }
        display.finishIfShown()
        let yaml = render(name: name, info: info, steps: steps, sizes: sizeList)
        // What we write must load: check it before it replaces anything.
        let (parsed, problems) = ArrayProfile.parse(name: name, file: out, yaml: yaml)
        guard let profile = parsed else {
            throw CommandFailure("internal: tuned profile does not validate: \(problems.map(\.description).joined(separator: "; "))")
        }
        do {
            try yaml.write(toFile: out, atomically: true, encoding: .utf8)
        } catch {
            throw CommandFailure("\(out): cannot write: \(error.localizedDescription)")
        }
        // The sweep beside the profile, for a plot (`benchmarks/report --from NAME.sweep.json`).
        let sweepPath = String(out.dropLast(".yaml".count)) + ".sweep.json"
        let sweep = TuneSweep(lun: lun, date: ISO8601DateFormatter().string(from: Date()), secondsPerStep: secondsPerStep,
                              queueDepthPerLUN: profile.queueDepthPerLUN, optimalIOBytes: profile.optimalIOBytes, steps: steps)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        do {
            try encoder.encode(sweep).write(to: URL(fileURLWithPath: sweepPath))
        } catch {
            throw CommandFailure("\(sweepPath): cannot write: \(error.localizedDescription)")
        }
        print("wrote \(out) and its sweep \(sweepPath)")
        print(yaml, terminator: "")
    }

    private func parseList<T>(_ text: String, name: String, _ parse: (String) -> T?) throws -> [T] {
        let items = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        let values = items.compactMap(parse)
        guard !items.isEmpty, values.count == items.count else { throw CommandFailure("\(name) '\(text)': not a valid list") }
        return values
    }

    private func refuseIfOccupied() throws {
        guard !force else { return }
        guard let handle = FileHandle(forReadingAtPath: lun) else {
            throw CommandFailure("\(lun): cannot be opened for reading")
        }
        defer { try? handle.close() }
        let head = handle.readData(ofLength: DeviceSignatures.probeBytes)
        if let found = head.withUnsafeBytes({ DeviceSignatures.detect($0) }) {
            throw CommandFailure("\(lun) holds \(found); profile tune refuses it without --force")
        }
    }

    /// The knee of one size: smallest depth within 5% of that size's best throughput.
    static func knee(_ steps: [Step]) -> Step? {
        guard let best = steps.map(\.mibPerSecond).max() else { return nil }
        return steps.sorted { $0.depth < $1.depth }.first { $0.mibPerSecond >= best * 0.95 }
    }

    private func render(name: String, info: LUNInfo, steps: [Step], sizes: [Int]) -> String {
        let reads = steps.filter { !$0.write }
        let smallest = sizes.min()!
        let smallKnee = Self.knee(reads.filter { $0.blockBytes == smallest })!
        let bestBandwidth = reads.map(\.mibPerSecond).max() ?? 0
        let optimal = sizes.sorted().first { size in
            (reads.filter { $0.blockBytes == size }.map(\.mibPerSecond).max() ?? 0) >= bestBandwidth * 0.95
        } ?? sizes.max()!
        var profile = ArrayProfile(name: name)
        profile.description = "tuned on \(lun) by svsp-ctl profile tune"
        profile.logicalBlockSize = info.logicalBlockSize == 4096 ? 4096 : 512
        profile.optimalIOBytes = UInt64(max(optimal, Int(profile.logicalBlockSize)))
        profile.maxIOBytes = UInt64(max(sizes.max()!, 4096, optimal))
        profile.queueDepthPerLUN = smallKnee.depth
        profile.queueDepthPerArray = min(65536, smallKnee.depth * 4)
        // Twice the knee's p99, in 100 µs steps, at least 100 µs.
        let latencyUs = max(100, Int((smallKnee.p99Us * 2 / 100).rounded(.up)) * 100)
        profile.latencyTargetNs = UInt64(min(latencyUs, 60_000_000)) * 1000
        profile.rotational = info.rotational
        profile.volatileWriteCache = volatileWriteCache(info)

        var lines = [
            "# Array profile measured by `svsp-ctl profile tune` on \(lun)",
            "# (\(info.isBlockDevice ? "block device" : "file"), \(ByteSize.format(info.sizeBytes)), "
                + "logical block \(info.logicalBlockSize), physical \(info.physicalBlockSize)), \(secondsPerStep)s per step.",
            "# queue_depth_per_lun = knee of \(ByteSize.format(UInt64(smallest))) random reads (smallest depth within 5% of the best);",
            "# optimal_io_size = smallest size reaching 95% of the best bandwidth; queue_depth_per_array = 4 LUNs at that depth.",
            "#",
            "# op         bs       qd        IOPS     MiB/s   p99 us   knee",
        ]
        for size in sizes {
            for write in [false, true] {
                let group = steps.filter { $0.write == write && $0.blockBytes == size }
                let k = Self.knee(group)
                for s in group {
                    let op = (write ? "randwrite" : "randread").padding(toLength: 10, withPad: " ", startingAt: 0)
                    let bs = ByteSize.format(UInt64(size))
                    lines.append("# " + op + String(repeating: " ", count: max(0, 5 - bs.count)) + bs
                        + String(format: " %5d %11.0f %9.1f %8.0f", s.depth, s.iops, s.mibPerSecond, s.p99Us)
                        + (s.depth == k?.depth ? "   <-" : ""))
                }
            }
        }
        return lines.joined(separator: "\n") + "\n" + profile.yaml()
    }

    /// Block devices say whether their cache is volatile in sysfs; for files assume it is.
    private func volatileWriteCache(_ info: LUNInfo) -> Bool {
        guard info.isBlockDevice else { return true }
        let device = URL(fileURLWithPath: lun).resolvingSymlinksInPath().lastPathComponent
        let candidates = ["/sys/class/block/\(device)/queue/write_cache", "/sys/class/block/\(device)/../queue/write_cache"]
        guard let text = candidates.lazy.compactMap({ try? String(contentsOfFile: $0, encoding: .utf8) }).first else { return true }
        return !text.contains("write through")
    }
}

/// What `profile tune` measured, written beside the profile as NAME.sweep.json.
struct TuneSweep: Encodable {
    let benchmark = "profile-tune"
    let lun: String
    let date: String
    let secondsPerStep: Double
    let queueDepthPerLUN: Int
    let optimalIOBytes: UInt64
    let steps: [TuneCommand.Step]
}
