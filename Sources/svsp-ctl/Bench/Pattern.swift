/// Deterministic block contents for --verify: every 8-byte word is a hash of its
/// byte offset and the run's seed, so a misplaced or stale block cannot pass.
enum Pattern {
    @inline(__always)
    static func word(at byteOffset: UInt64, seed: UInt64) -> UInt64 {
        var x = byteOffset ^ seed
        x = (x ^ (x >> 33)) &* 0xFF51_AFD7_ED55_8CCD
        x = (x ^ (x >> 33)) &* 0xC4CE_B9FE_1A85_EC53
        return x ^ (x >> 33)
    }

    static func fill(_ buffer: UnsafeMutableRawPointer, count: Int, offset: UInt64, seed: UInt64) {
        let words = buffer.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(count / 8) { words[i] = word(at: offset &+ UInt64(i * 8), seed: seed) }
    }

    /// First byte that differs from the pattern: (index, expected, got), or nil.
    static func firstDifference(_ buffer: UnsafeRawPointer, count: Int, offset: UInt64, seed: UInt64)
        -> (index: Int, expected: UInt8, got: UInt8)?
    {
        // Word by word (as `fill` wrote them, little-endian); bytes only inside the first bad word.
        for w in 0..<(count / 8) {
            let expectedWord = word(at: offset &+ UInt64(w * 8), seed: seed)
            let gotWord = buffer.loadUnaligned(fromByteOffset: w * 8, as: UInt64.self)
            if gotWord == expectedWord { continue }
            for b in 0..<8 {
                let expected = UInt8(truncatingIfNeeded: expectedWord >> (UInt64(b) * 8))
                let got = UInt8(truncatingIfNeeded: gotWord >> (UInt64(b) * 8))
                if got != expected { return (w * 8 + b, expected, got) }
            }
        }
        return nil
    }
}
