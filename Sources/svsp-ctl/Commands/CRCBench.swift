import ArgumentParser
import CIOCore
import Foundation
import IOEngine

/// `svsp-ctl bench crc`: crc32c over 4 KiB blocks, once through IOEngine's Swift
/// wrapper (one call per block, as the controller uses it) and once with ISA-L
/// looped in C (`cio_crc32c_blocks`), alternating rounds. The buffer is small
/// enough to stay in cache (the wrapper's cost is what is measured, not memory
/// bandwidth shared with other tenants) and each side's best round is compared.
struct CRCBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "crc", abstract: "Compare crc32c through IOEngine with ISA-L called directly from C.")

    @Option(help: "MiB hashed per round.") var mib: Int = 256
    @Option(help: "Rounds per side.") var rounds: Int = 15
    @Option(help: "KiB of the in-cache buffer hashed over and over.") var bufferKib: Int = 1024
    @Option(help: "Block size.") var blockBytes: Int = 4096
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        guard mib > 0, rounds > 0, blockBytes >= 512, blockBytes % 512 == 0, bufferKib * 1024 % blockBytes == 0 else {
            throw CommandFailure("--mib, --rounds must be > 0, --block-bytes a multiple of 512 dividing --buffer-kib")
        }
        let blockBytes = self.blockBytes // a local: @Option's getter is not free inside the loop
        let bytes = bufferKib << 10
        let passes = max(1, (mib << 20) / bytes)
        let total = Double(passes * bytes)
        let buffer = try AlignedBuffer(count: bytes)
        for i in 0..<(bytes / 8) { buffer.pointer.storeBytes(of: UInt64(i) &* 0x9E37_79B9_7F4A_7C15, toByteOffset: i * 8, as: UInt64.self) }
        let blocks = bytes / blockBytes
        let viaC = UnsafeMutablePointer<UInt32>.allocate(capacity: blocks)
        let viaSwift = UnsafeMutablePointer<UInt32>.allocate(capacity: blocks)
        defer { viaC.deallocate(); viaSwift.deallocate() }

        var cRates: [Double] = [], swiftRates: [Double] = []
        for _ in 0..<rounds {
            var t0 = monotonicNanoseconds()
            for _ in 0..<passes {
                for b in 0..<blocks {
                    viaSwift[b] = Checksum.crc32c(UnsafeRawBufferPointer(start: buffer.pointer + b * blockBytes, count: blockBytes))
                }
            }
            swiftRates.append(total / Double(monotonicNanoseconds() - t0))
            t0 = monotonicNanoseconds()
            for _ in 0..<passes { _ = cio_crc32c_blocks(buffer.pointer, UInt64(bytes), UInt32(blockBytes), viaC) }
            cRates.append(total / Double(monotonicNanoseconds() - t0))
        }
        for b in 0..<blocks where viaC[b] != viaSwift[b] {
            throw CommandFailure("crc mismatch at block \(b): C 0x\(String(viaC[b], radix: 16)) Swift 0x\(String(viaSwift[b], radix: 16))")
        }
        let c = cRates.max()!, s = swiftRates.max()!
        if json {
            print(#"{"block_bytes":\#(blockBytes),"c_gbps":\#(String(format: "%.2f", c)),"ioengine_gbps":\#(String(format: "%.2f", s)),"ratio":\#(String(format: "%.3f", s / c))}"#)
        } else {
            print("crc32c over \(blockBytes)-byte blocks, \(passes * bytes >> 20) MiB x \(rounds) rounds per side (best round)")
            print(String(format: "ISA-L direct from C: %6.2f GB/s\nthrough IOEngine:    %6.2f GB/s\nratio IOEngine/C:    %6.3f (target >= 0.9)", c, s, s / c))
        }
    }
}
