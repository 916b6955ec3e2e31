import Foundation

/// Entry points for the fuzzers (`svsp-fuzz`, built with `--sanitize=fuzzer`) and for
/// the corpus replay in the tests. Each takes bytes as they arrive from a disk or a
/// client and must never crash, trap or hang on them; the parsers they reach are the
/// ones the daemon runs on untrusted input.
public enum FuzzTargets {
    public static let names = ["setup-record", "bitmap-header", "lun-label", "profile", "mgmt-request", "nbd", "pool-metadata", "replication-frame"]

    /// Runs one input through `target` (one of `names`).
    public static func run(_ target: String, _ data: UnsafeRawBufferPointer) {
        switch target {
        case "setup-record": setupRecord(data)
        case "bitmap-header": _ = DirtyRegionLog.decodeHeader(padded(data, to: DirtyRegionLog.headerBytes))
        case "lun-label": // what `pool create` and startup read at a LUN's start
            padded(data, to: 4096).withUnsafeBytes { _ = LUNLabel.decode($0) }
            _ = DeviceSignatures.detect(data)
        case "profile": profile(data)
        case "mgmt-request": mgmtRequest(data)
        case "nbd": NBDFuzzServer.shared.exchange(data)
        case "pool-metadata": PoolMetadataFuzz.shared.run(data)
        case "replication-frame": replicationFrames(data)
        default: fatalError("unknown fuzz target '\(target)' (known: \(names.joined(separator: ", ")))")
        }
    }

    private static func padded(_ data: UnsafeRawBufferPointer, to count: Int) -> [UInt8] {
        Array(data.prefix(count)) + [UInt8](repeating: 0, count: max(0, count - data.count))
    }

    /// A setup slot: its header as read back, then (checksums aside, which a fuzzer cannot
    /// forge) the payload through decoding and validation.
    private static func setupRecord(_ data: UnsafeRawBufferPointer) {
        let slotBytes = 2 << 20
        let header = padded(data, to: SetupVDiskStore.headerBytes)
        let parsed = header.withUnsafeBytes { SetupVDiskStore.parseHeader($0, slotBytes: slotBytes, at: 0) }
        if case .record(_, let length, _) = parsed { precondition(length <= slotBytes - SetupVDiskStore.headerBytes) }
        let payload = Data(data.dropFirst(min(data.count, 8)))
        _ = try? SetupVDiskStore.decode(payload)
    }

    /// A replication stream as a peer could send it: frames decoded one after another (the
    /// version negotiated by a `welcome` applies to the rest), each re-encoded and decoded
    /// again to the same message.
    private static func replicationFrames(_ data: UnsafeRawBufferPointer) {
        var at = 0
        var version: UInt16?
        while at < data.count {
            let rest = UnsafeRawBufferPointer(rebasing: data[at...])
            guard case .frame(let message, let n)? = try? ReplicationFrame.decode(rest, version: version) else { return }
            precondition(n >= ReplicationFrame.headerBytes && n <= rest.count, "a frame of \(n) bytes out of \(rest.count)")
            let again = ReplicationFrame.encode(message, version: version ?? 1)
            let back = again.withUnsafeBytes { try? ReplicationFrame.decode($0, version: version) }
            precondition(back == .frame(message, bytes: again.count), "\(message) does not survive a round trip")
            if case .welcome(let v, _, _) = message { version = v }
            at += n
        }
    }

    /// First byte: which kind; the rest: the YAML text.
    private static func profile(_ data: UnsafeRawBufferPointer) {
        guard let kind = data.first else { return }
        let yaml = String(decoding: data.dropFirst(), as: UTF8.self)
        switch kind % 3 {
        case 0: _ = ArrayProfile.parse(name: "fuzz", file: "fuzz.yaml", yaml: yaml)
        case 1: _ = PoolProfile.parse(name: "fuzz", file: "fuzz.yaml", yaml: yaml)
        default: _ = LinkProfile.parse(name: "fuzz", file: "fuzz.yaml", yaml: yaml)
        }
    }

    /// A management request line, and every argument through the parsers commands use.
    private static func mgmtRequest(_ data: UnsafeRawBufferPointer) {
        guard data.count <= MgmtLimits.maxMessageBytes,
              let request = try? JSONDecoder().decode(MgmtRequest.self, from: Data(data)) else { return }
        for value in request.args.values {
            _ = try? ByteSize.parse(value)
            _ = Parse.name(value)
            _ = try? NBDServer.parseListen(value)
        }
    }
}
