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

    func run(vdisk name: String, bytes wanted: UInt64?) async throws(DomainError) -> Report {
        guard let v = domain.metadata.vdisk(named: name) else { throw DomainError("vdisk '\(name)' not found") }
        let total = min(wanted ?? v.sizeBytes, v.sizeBytes) / UInt64(v.blockSize) * UInt64(v.blockSize)
        guard total > 0 else { throw DomainError("--size: nothing to verify") }
        let chunk = 1 << 20
        let buffer: AlignedBuffer
        do { buffer = try AlignedBuffer(count: chunk) } catch { throw DomainError("\(error)") }
        let seed = UInt64.random(in: 1...UInt64.max)
        func fill(_ offset: UInt64, _ n: Int) {
            let words = buffer.pointer.assumingMemoryBound(to: UInt64.self)
            for i in 0..<(n / 8) {
                var x = (offset &+ UInt64(i * 8)) ^ seed
                x = (x ^ (x >> 31)) &* 0x9E37_79B9_7F4A_7C15
                words[i] = x ^ (x >> 29)
            }
        }
        var crcs: [UInt32] = []
        let t0 = DispatchTime.now().uptimeNanoseconds
        var offset: UInt64 = 0
        while offset < total {
            let n = Int(min(UInt64(chunk), total - offset))
            fill(offset, n)
            crcs.append(Checksum.crc32c(UnsafeRawBufferPointer(start: buffer.pointer, count: n)))
            try await domain.write(vdisk: name, offset: offset, length: n, from: buffer.pointer)
            offset += UInt64(n)
        }
        try await domain.flush(vdisk: name)
        let t1 = DispatchTime.now().uptimeNanoseconds
        offset = 0
        var index = 0
        while offset < total {
            let n = Int(min(UInt64(chunk), total - offset))
            memset(buffer.pointer, 0, n)
            try await domain.read(vdisk: name, offset: offset, length: n, into: buffer.pointer)
            if Checksum.crc32c(UnsafeRawBufferPointer(start: buffer.pointer, count: n)) != crcs[index] {
                // Keep what was read, regenerate what was written, find the first differing byte.
                let copy = Array(UnsafeRawBufferPointer(start: buffer.pointer, count: n))
                fill(offset, n)
                var at = 0
                while at < n, copy[at] == buffer.pointer.load(fromByteOffset: at, as: UInt8.self) { at += 1 }
                throw DomainError("vdisk '\(name)': verify failed at offset \(offset + UInt64(at)): expected 0x\(String(buffer.pointer.load(fromByteOffset: at, as: UInt8.self), radix: 16)) got 0x\(String(copy[at], radix: 16))")
            }
            offset += UInt64(n)
            index += 1
        }
        let t2 = DispatchTime.now().uptimeNanoseconds
        let mib = Double(total) / 1_048_576
        let w = mib / (Double(t1 - t0) / 1e9), r = mib / (Double(t2 - t1) / 1e9)
        let blocks = total / UInt64(v.blockSize)
        let text = String(format: "vdisk '%@': wrote %@ through the data API (%.1f MiB/s), read it back (%.1f MiB/s): %llu blocks of %d bytes verified",
                          name, ByteSize.format(total), w, r, blocks, v.blockSize)
        return Report(vdisk: name, bytes: total, writeMiBPerSecond: (w * 10).rounded() / 10,
                      readMiBPerSecond: (r * 10).rounded() / 10, blocksChecked: blocks, text: text)
    }
}
