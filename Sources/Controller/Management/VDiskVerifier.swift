import Foundation
import IOEngine

/// Writes a checksummed pattern over a vdisk through the data API, reads it back,
/// and compares every block: the main job's proof that data lands where it should.
struct VDiskVerifier {
    let domain: Domain

    struct Report: Codable {
        var vdisk: String
        var bytes: UInt64
        var writeMiBPerSecond: Double
        var readMiBPerSecond: Double
        var blocksChecked: UInt64
        var text: String
    }

    /// - Parameters:
    ///   - phase: "both" (write then read back), "write" (leave the pattern), "read" (check a pattern written earlier).
    ///   - seed: the pattern's seed; give the same one to check an earlier write phase.
    func run(vdisk name: String, bytes wanted: UInt64?, phase: String = "both", seed given: UInt64? = nil) async throws(DomainError) -> Report {
        guard let v = domain.metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        guard ["both", "write", "read"].contains(phase) else { throw DomainError("--phase '\(phase)': must be both, write or read") }
        let total = min(wanted ?? v.sizeBytes, v.sizeBytes) / UInt64(v.blockSize) * UInt64(v.blockSize)
        guard total > 0 else { throw DomainError("--size: nothing to verify") }
        let chunk = 1 << 20
        guard let buffer = try? AlignedBuffer(count: chunk), let expected = try? AlignedBuffer(count: chunk) else {
            throw DomainError("out of memory for verify buffers")
        }
        let seed = given ?? UInt64.random(in: 1...UInt64.max)
        func fill(_ target: UnsafeMutableRawPointer, _ offset: UInt64, _ n: Int) {
            let words = target.assumingMemoryBound(to: UInt64.self)
            for i in 0..<(n / 8) {
                var x = (offset &+ UInt64(i * 8)) ^ seed
                x = (x ^ (x >> 31)) &* 0x9E37_79B9_7F4A_7C15
                words[i] = x ^ (x >> 29)
            }
        }
        // The CLI's progress bar: both phases count, the write first.
        let board = domain.progressBoard, key = "vdisk.verify:\(name)"
        let passes: UInt64 = phase == "both" ? 2 : 1
        board.begin(key, operation: phase == "read" ? "read back" : "write", totalBytes: total * passes)
        defer { board.end(key) }
        let t0 = DispatchTime.now().uptimeNanoseconds
        var offset: UInt64 = 0
        if phase != "read" {
            while offset < total {
                let n = Int(min(UInt64(chunk), total - offset))
                fill(buffer.pointer, offset, n)
                try await domain.write(vdisk: name, offset: offset, length: n, from: buffer.pointer)
                offset += UInt64(n)
                board.update(key, doneBytes: offset)
            }
            try await domain.flush(vdisk: name)
        }
        let t1 = DispatchTime.now().uptimeNanoseconds
        offset = 0
        let readBase = phase == "both" ? total : 0
        if phase == "both" { board.update(key, doneBytes: total, operation: "read back") }
        while phase != "write" && offset < total {
            let n = Int(min(UInt64(chunk), total - offset))
            memset(buffer.pointer, 0, n)
            try await domain.read(vdisk: name, offset: offset, length: n, into: buffer.pointer)
            fill(expected.pointer, offset, n)
            if memcmp(buffer.pointer, expected.pointer, n) != 0 {
                var at = 0
                while at < n, buffer.pointer.load(fromByteOffset: at, as: UInt8.self) == expected.pointer.load(fromByteOffset: at, as: UInt8.self) { at += 1 }
                let want = expected.pointer.load(fromByteOffset: at, as: UInt8.self), got = buffer.pointer.load(fromByteOffset: at, as: UInt8.self)
                throw DomainError("vdisk '\(name)': verify failed at offset \(offset + UInt64(at)): expected 0x\(String(want, radix: 16)) got 0x\(String(got, radix: 16))")
            }
            offset += UInt64(n)
            board.update(key, doneBytes: readBase + offset)
        }
        let t2 = DispatchTime.now().uptimeNanoseconds
        let mib = Double(total) / 1_048_576
        let w = phase == "read" ? 0 : mib / (Double(t1 - t0) / 1e9), r = phase == "write" ? 0 : mib / (Double(t2 - t1) / 1e9)
        let blocks = total / UInt64(v.blockSize)
        let text: String
        switch phase {
        case "write": text = "vdisk '\(name)': wrote \(ByteSize.format(total)) of pattern (seed \(seed)) through the data API"
        case "read": text = "vdisk '\(name)': read back \(ByteSize.format(total)) and matched the pattern of seed \(seed): \(blocks) blocks verified"
        default:
            text = String(format: "vdisk '%@': wrote %@ through the data API (%.1f MiB/s), read it back (%.1f MiB/s): %llu blocks of %d bytes verified",
                          name, ByteSize.format(total), w, r, blocks, v.blockSize)
        }
        return Report(vdisk: name, bytes: total, writeMiBPerSecond: (w * 10).rounded() / 10,
                      readMiBPerSecond: (r * 10).rounded() / 10, blocksChecked: blocks, text: text)
    }
}
