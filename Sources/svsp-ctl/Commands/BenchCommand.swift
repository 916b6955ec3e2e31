import ArgumentParser
import Controller
import Foundation
import IOEngine

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench", abstract: "Measure I/O performance.", subcommands: [RawBench.self, CRCBench.self, MirrorBench.self])
}

/// `svsp-ctl bench raw`: the IOEngine straight against a file or block device.
struct RawBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "raw",
        abstract: "Benchmark a raw file or block device through the AIO engine (O_DIRECT).",
        discussion: """
            Sizes accept 4k, 1M, 10G. A missing target file is created (and preallocated) when --size is given.
            --verify writes checksummed patterned blocks over the whole area, then reads every block back and
            fails on the first mismatch (offset, expected, got).
            """)

    @Option(help: "File or block device to benchmark.") var target: String
    @Option(help: "read|write|randread|randwrite|randrw") var rw: String = "randread"
    @Option(help: "Block size per request.") var bs: String = "4k"
    @Option(help: "Queue depth (requests in flight).") var qd: Int = 32
    @Option(help: "Seconds to run (timed runs).") var seconds: Double = 10
    @Option(help: "Bytes of the target to use (default: all of it).") var size: String?
    @Option(name: .customLong("rwmix-read"), help: "Percent reads for randrw.") var rwmixRead: Int = 50
    @Flag(help: "Write patterned blocks over the area, read them back, compare.") var verify = false
    @Option(name: .customLong("verify-phase"), help: "write|read|both: write the pattern, check it, or both.")
    var verifyPhase: String = "both"
    @Option(help: "Pattern seed for --verify (the same seed checks an earlier run's pattern).") var seed: UInt64?
    @Flag(help: "Print JSON instead of a table.") var json = false
    @Option(name: .customLong("array-profile"),
            help: "Send I/O through the scheduler driven by this array profile (a name or a .yaml path).")
    var arrayProfile: String?
    @Option(help: "Hardware profiles folder (default: $SVSP_PROFILES or ./hardware-profiles).") var profiles: String?
    @Option(help: "A curve instead of one point: qd=1,2,4,...,128 runs each queue depth for --seconds (--bs may be a list).")
    var sweep: String?

    mutating func run() throws {
        do {
            if let sweep {
                try runSweep(sweep)
            } else {
                let (reports, info, areaBytes) = try measure()
                print(render(reports, info: info, areaBytes: areaBytes))
            }
        } catch let error as VerifyFailure {
            throw CommandFailure("\(target): \(error)")
        } catch let error as IOError {
            throw CommandFailure(error.description)
        } catch let error as ByteSize.ParseError {
            throw CommandFailure("invalid size \(error)")
        } catch let error as ProfileProblems {
            throw CommandFailure(error.description)
        }
    }

    /// One timed run per (block size, queue depth): the curve that `benchmarks/report` plots.
    private func runSweep(_ text: String) throws {
        guard text.hasPrefix("qd="), !verify else {
            throw CommandFailure("--sweep '\(text)': must be qd=LIST (e.g. qd=1,2,4,8,16,32,64,128), without --verify")
        }
        let depths = text.dropFirst(3).split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !depths.isEmpty, depths.allSatisfy({ $0 != nil && (1...65536).contains($0!) }) else {
            throw CommandFailure("--sweep '\(text)': every depth must be a number in 1..65536")
        }
        let sizes = bs.split(separator: ",").map(String.init)
        var points: [BenchReport] = []
        var info: LUNInfo?
        for size in sizes {
            for depth in depths.compactMap({ $0 }) {
                var point = self
                point.sweep = nil
                point.bs = size
                point.qd = depth
                let (reports, lunInfo, _) = try point.measure()
                info = lunInfo
                points += reports
                if !json {
                    FileHandle.standardError.write(Data("  \(rw) bs=\(size) qd=\(depth) done\n".utf8))
                }
            }
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
            print(String(decoding: try encoder.encode(points), as: UTF8.self))
            return
        }
        print("svsp bench raw --sweep: \(target) (\(info?.isBlockDevice == true ? "block device" : "file")) rw=\(rw), \(seconds)s per point")
        print(BenchReport.sweepHeader())
        for point in points { print(point.sweepRow()) }
    }

    private func measure() throws -> ([BenchReport], LUNInfo, UInt64) {
        guard let pattern = AccessPattern(rawValue: rw) else {
            throw CommandFailure("--rw '\(rw)': must be one of \(AccessPattern.allCases.map(\.rawValue).joined(separator: "|"))")
        }
        guard (1...65536).contains(qd) else { throw CommandFailure("--qd \(qd): must be 1..65536") }
        guard seconds > 0 else { throw CommandFailure("--seconds \(seconds): must be > 0") }
        guard (0...100).contains(rwmixRead) else { throw CommandFailure("--rwmix-read \(rwmixRead): must be 0..100") }
        let blockBytes = try ByteSize.parse(bs)
        guard blockBytes >= 512, blockBytes <= 64 << 20, blockBytes % 512 == 0 else {
            throw CommandFailure("--bs \(bs): must be a multiple of 512 between 512 and 64M")
        }
        let wantedBytes = try size.map { try ByteSize.parse($0) }
        guard ["write", "read", "both"].contains(verifyPhase) else {
            throw CommandFailure("--verify-phase '\(verifyPhase)': must be write, read or both")
        }

        if !FileManager.default.fileExists(atPath: target) {
            guard let wantedBytes else { throw CommandFailure("\(target): does not exist (give --size to create it)") }
            try LUN.createFile(path: target, sizeBytes: wantedBytes)
        }
        let writes = verify ? verifyPhase != "read" : (pattern != .read && pattern != .randread)
        let lun = try LUN(path: target, readWrite: writes)
        let info = lun.info
        let areaBytes = wantedBytes ?? info.sizeBytes
        guard areaBytes <= info.sizeBytes else {
            throw CommandFailure("\(target): is \(info.sizeBytes) bytes, smaller than --size \(areaBytes)")
        }
        guard blockBytes % UInt64(info.logicalBlockSize) == 0 else {
            throw CommandFailure("--bs \(bs): not a multiple of \(target)'s logical block size \(info.logicalBlockSize)")
        }
        guard areaBytes >= blockBytes else { throw CommandFailure("--size: smaller than one block of \(bs)") }

        let profile = try arrayProfile.map { try ProfileLookup.array($0, profilesRoot: profiles) }
        let engine = try Engine(queueDepth: qd)
        let pool = try BufferPool(bufferBytes: Int(blockBytes), count: qd, alignment: Int(info.alignment))
        let config = RawWorkloadConfig(pattern: pattern, blockBytes: Int(blockBytes), queueDepth: qd,
                                       areaBytes: areaBytes / blockBytes * blockBytes, readPercent: rwmixRead)
        let reports: [BenchReport]
        if let profile {
            let scheduler = IOScheduler(engine: engine.handle, profile: profile, capacity: max(qd, 64))
            let index = scheduler.addLUN(lun.handle)
            reports = try runPhases(target: SchedulerTarget(scheduler: scheduler, lun: index), config: config, pool: pool.handle)
        } else {
            reports = try runPhases(target: EngineTarget(engine: engine.handle, lun: lun.handle), config: config, pool: pool.handle)
        }
        return (reports, info, config.areaBytes)
    }

    /// Runs `workload` with a progress display: bytes of a verify pass, or the time of a timed run.
    private func runShowingProgress<T: BenchTarget>(_ workload: RawWorkload<T>, label: String, totalBytes: UInt64 = 0,
                                                    seconds: Double? = nil) throws {
        let display = ProgressDisplay(label: label, unit: seconds == nil ? .bytes : .milliseconds, json: json)
        let started = Date()
        let completed = workload.completed
        do {
            let poller = ProgressPoller(every: display.pollSeconds) {
                let bytes = completed.bytes.load(ordering: .relaxed)
                guard let seconds else { return display.update(done: bytes, total: totalBytes) }
                let elapsed = Date().timeIntervalSince(started)
                display.update(done: UInt64(elapsed * 1000), total: UInt64(seconds * 1000),
                               note: ProgressDisplay.bytes(Double(bytes) / max(elapsed, 0.001)) + "/s")
            }
            defer { poller.stop() }
            try workload.run()
        }
        display.finishIfShown()
    }

    /// Runs the verify passes or the timed run against `target`.
    private func runPhases<T: BenchTarget>(target: T, config base: RawWorkloadConfig,
                                           pool: BufferPoolHandle) throws -> [BenchReport] {
        var config = base
        var reports: [BenchReport] = []
        func report(_ w: RawWorkload<T>, phase: String) -> BenchReport {
            BenchReport(target: self.target, rw: rw, blockBytes: config.blockBytes, queueDepth: qd,
                        seconds: (Double(w.elapsedNs) / 1e7).rounded() / 100, phase: phase, seed: verify ? config.seed : nil,
                        read: BenchReport.direction(w.reads, elapsedNs: w.elapsedNs),
                        write: BenchReport.direction(w.writes, elapsedNs: w.elapsedNs))
        }
        if verify {
            let blocks = Int(config.areaBytes / UInt64(config.blockBytes))
            let crcs = UnsafeMutablePointer<UInt32>.allocate(capacity: blocks)
            defer { crcs.deallocate() }
            config.seconds = nil
            config.seed = seed ?? (UInt64(UInt32.random(in: 1...UInt32.max)) << 8 | 0x5A)
            if verifyPhase != "read" {
                config.verifyWrite = true
                let writer = RawWorkload(config: config, target: target, lunPath: self.target, buffers: pool, blockCRCs: crcs)
                try runShowingProgress(writer, label: "verify write", totalBytes: config.areaBytes)
                reports.append(report(writer, phase: "verify-w"))
                config.verifyWrite = false
            }
            if verifyPhase != "write" {
                config.verifyRead = true
                let reader = RawWorkload(config: config, target: target, lunPath: self.target, buffers: pool,
                                         blockCRCs: verifyPhase == "read" ? nil : crcs)
                try runShowingProgress(reader, label: "verify read", totalBytes: config.areaBytes)
                reports.append(report(reader, phase: "verify-r"))
            }
        } else {
            config.seconds = seconds
            let workload = RawWorkload(config: config, target: target, lunPath: self.target, buffers: pool)
            try runShowingProgress(workload, label: "\(rw) \(bs) qd=\(qd)", seconds: seconds)
            reports.append(report(workload, phase: "timed"))
        }
        return reports
    }

    private func render(_ reports: [BenchReport], info: LUNInfo, areaBytes: UInt64) -> String {
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
            let value: Data = reports.count == 1 ? try! encoder.encode(reports[0]) : try! encoder.encode(reports)
            return String(decoding: value, as: UTF8.self)
        }
        var lines = ["svsp bench raw: \(target) (\(info.isBlockDevice ? "block device" : "file"), \(ByteSize.format(areaBytes)) used, "
            + "lbs \(info.logicalBlockSize)) rw=\(rw) bs=\(bs) qd=\(qd)"]
        lines.append(BenchReport.tableHeader())
        for r in reports { lines += r.tableRows() }
        if verify {
            let blocks = areaBytes / (UInt64(reports[0].blockBytes))
            let what = ["write": "written (seed \(reports[0].seed ?? 0))", "read": "read back and matched the pattern",
                        "both": "written and read back, every crc32c matched"][verifyPhase]!
            lines.append("verify: OK, \(blocks) blocks of \(bs) \(what)")
        }
        return lines.joined(separator: "\n")
    }
}
