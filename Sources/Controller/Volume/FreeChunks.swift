/// The pool's free chunks (space-map value 0: free and zeroed) as sorted, disjoint runs:
/// an in-memory index rebuilt from the space map at open, so allocation never scans pages.
struct FreeChunks: Equatable, Sendable {
    private(set) var runs: [Range<UInt64>] = []

    var count: UInt64 { runs.reduce(0) { $0 + UInt64($1.count) } }

    /// Adds a run (merging with neighbours).
    mutating func insert(_ r: Range<UInt64>) {
        guard !r.isEmpty else { return }
        var i = runs.partitionPoint { $0.lowerBound >= r.lowerBound }
        var merged = r
        if i > 0, runs[i - 1].upperBound >= merged.lowerBound {
            precondition(runs[i - 1].upperBound == merged.lowerBound, "chunk run \(r) freed twice")
            merged = runs[i - 1].lowerBound..<merged.upperBound
            runs.remove(at: i - 1)
            i -= 1
        }
        if i < runs.count, runs[i].lowerBound <= merged.upperBound {
            precondition(runs[i].lowerBound == merged.upperBound, "chunk run \(r) freed twice")
            merged = merged.lowerBound..<runs[i].upperBound
            runs.remove(at: i)
        }
        runs.insert(merged, at: i)
    }

    /// Removes a run that is free (adoption of chunks already in use).
    mutating func remove(_ r: Range<UInt64>) {
        guard !r.isEmpty, let i = runs.firstIndex(where: { $0.lowerBound <= r.lowerBound && $0.upperBound >= r.upperBound }) else { return }
        let whole = runs[i]
        runs.remove(at: i)
        if r.upperBound < whole.upperBound { runs.insert(r.upperBound..<whole.upperBound, at: i) }
        if whole.lowerBound < r.lowerBound { runs.insert(whole.lowerBound..<r.lowerBound, at: i) }
    }

    /// Takes `n` chunks: the first run that holds them all, else the fewest runs from the
    /// largest down. Nil (nothing taken) when fewer than `n` are free.
    mutating func take(_ n: UInt64) -> [Range<UInt64>]? {
        guard n > 0 else { return [] }
        if let i = runs.firstIndex(where: { UInt64($0.count) >= n }) {
            let r = runs[i]
            let taken = r.lowerBound..<(r.lowerBound + n)
            if UInt64(r.count) == n { runs.remove(at: i) } else { runs[i] = taken.upperBound..<r.upperBound }
            return [taken]
        }
        guard count >= n else { return nil }
        var out: [Range<UInt64>] = []
        var left = n
        while left > 0 {
            let i = runs.indices.max { runs[$0].count < runs[$1].count }!
            let r = runs[i]
            let k = min(left, UInt64(r.count))
            out.append(r.lowerBound..<(r.lowerBound + k))
            if UInt64(r.count) == k { runs.remove(at: i) } else { runs[i] = (r.lowerBound + k)..<r.upperBound }
            left -= k
        }
        return out.sorted { $0.lowerBound < $1.lowerBound }
    }
}

extension Array {
    /// The first index whose element satisfies `belongsAfter` (the array is partitioned by it).
    func partitionPoint(_ belongsAfter: (Element) -> Bool) -> Int {
        var lo = 0, hi = count
        while lo < hi {
            let mid = (lo + hi) / 2
            if belongsAfter(self[mid]) { hi = mid } else { lo = mid + 1 }
        }
        return lo
    }
}
