import Foundation
import IOEngine
import Synchronization

/// The fuzz target for a pool's metadata area: a small area on a scratch file, formatted
/// once with two block maps, scattered mappings and journal records not yet written in
/// place. Each input is a list of edits to page slots (12 bytes each: page, slot, value);
/// the edited pages are checksummed again, since a fuzzer cannot forge crc32c, so the
/// edits reach the trees, the root table and the journal's headers. The area is then
/// opened, read and changed (clones, redirects, swaps and differences as PiTs make
/// them): damage may be refused, never trap, hang or route I/O outside the pool.
final class PoolMetadataFuzz: @unchecked Sendable {
    static let shared = PoolMetadataFuzz()

    private let path: String
    private let engine: EngineBox
    private let lun: LUNBox
    private let poolId = UUID()
    /// A 64-page journal, as pools of 4096 chunks had before journals grew to 1/16 page per
    /// chunk: the seeds (scripts/make-fuzz-seeds.py) edit tree pages from page 82 on, and a
    /// small ring wraps within the baseline's commits.
    private let layout: MetaLayout = {
        let sized = MetaLayout.sized(forChunks: 4096)
        return MetaLayout(journalPages: 64, pageCount: sized.pageCount - sized.journalPages + 64)
    }()
    private let chunks: UInt64 = 4096
    /// The formatted area, as the edits start from it.
    private let baseline: [UInt8]

    private init() {
        path = NSTemporaryDirectory() + "svsp-fuzz-meta-\(getpid()).img"
        try? FileManager.default.removeItem(atPath: path)
        try! LUN.createFile(path: path, sizeBytes: UInt64(layout.pageCount) * UInt64(MetaPage.bytes))
        engine = EngineBox(try! Engine(queueDepth: 64))
        lun = LUNBox(try! LUN(path: path, readWrite: true))
        let area = MetaArea(lun: lun.handle, engine: engine.engine.handle, startBytes: 0, pageCount: layout.pageCount)
        let (layout, poolId, chunks) = (layout, poolId, chunks)
        Self.blocking {
            let meta = try await PoolMetadata.format(area: area, layout: layout, poolId: poolId, chunkCount: chunks, reserved: [0..<16])
            let a = UUID(), b = UUID()
            try await meta.change { v throws(PageStore.Failure) in
                try v.createMap(a, chunks: 2000)
                try v.createMap(b, chunks: 100)
                try v.map(b, at: 0, to: try v.allocate(100))
            }
            try await meta.store.checkpoint()
            for i in stride(from: UInt64(0), to: 2000, by: 37) { // journalled only
                try await meta.change { v throws(PageStore.Failure) in try v.map(a, at: i, to: try v.allocate(1)) }
            }
            try await meta.change { v throws(PageStore.Failure) in try v.unmap(b, 10..<20) }
        }
        baseline = [UInt8](try! Data(contentsOf: URL(fileURLWithPath: path)))
    }

    func run(_ data: UnsafeRawBufferPointer) {
        var image = baseline
        var at = 0
        while at + 12 <= data.count {
            let page = Int(data.loadUnaligned(fromByteOffset: at, as: UInt16.self)) % Int(layout.pageCount)
            let slot = Int(data.loadUnaligned(fromByteOffset: at + 2, as: UInt16.self)) % MetaPage.slotCount
            let value = data.loadUnaligned(fromByteOffset: at + 4, as: UInt64.self)
            at += 12
            image.withUnsafeMutableBytes { raw in
                let p = raw.baseAddress! + page * MetaPage.bytes
                guard case .success(var decoded) = MetaPage.decode(p, number: UInt32(page), kind: nil) else { return }
                decoded.slots[slot] = value
                decoded.encode(into: p)
            }
        }
        try! Data(image).write(to: URL(fileURLWithPath: path))
        let area = MetaArea(lun: lun.handle, engine: engine.engine.handle, startBytes: 0, pageCount: layout.pageCount)
        let (poolId, chunks) = (poolId, chunks)
        Self.blocking {
            guard let meta = try? await PoolMetadata.open(area: area, poolId: poolId) else { return }
            for id in meta.mapIds {
                guard let runs = try? meta.mapRuns(id) else { continue }
                for (range, first) in runs where first != nil {
                    _ = try? meta.lookup(map: id, chunk: range.lowerBound, limit: UInt64(range.count))
                }
            }
            _ = try? meta.spaceRuns()
            let id = meta.mapIds.first
            _ = try? await meta.change { v throws(PageStore.Failure) in
                let runs = try v.allocate(2)
                if let id { try v.map(id, at: 0, to: runs) }
                if let id, let gone = meta.mapIds.last, gone != id { try v.deleteMap(gone) }
            }
            if let id { // a clone (shared pages), edited on both sides, then released
                let clone = UUID()
                _ = try? await meta.change { v throws(PageStore.Failure) in
                    try v.cloneMap(id, as: clone)
                    try v.map(clone, at: 1, to: try v.allocate(1))
                    try v.unmap(id, 0..<2)
                }
                // What PiTs read and do: sharing, differences, what only the clone holds, a
                // redirect (reserve, remap, a spare given back), a rollback's swap.
                for c in 0..<min(64, meta.mapCount(id) ?? 0) { _ = try? meta.isShared(map: id, chunk: c) }
                _ = try? meta.differences(id, clone)
                _ = try? meta.chunksOnlyIn(clone, comparedWith: meta.mapIds.filter { $0 != clone })
                _ = try? meta.referencesAndSpace(first: [id], excluding: [])
                _ = try? meta.reservedChunks()
                _ = try? await meta.change { v throws(PageStore.Failure) in
                    let reserved = try v.reserve(2).flatMap { Array($0) }
                    if let old = try v.poolChunk(id, 1) { try v.redirect(id, chunk: 1, from: old, to: reserved[0]) }
                    try v.returnSpare(reserved[1]..<(reserved[1] + 1))
                    try v.swapMaps(id, clone)
                    _ = try v.releaseReservations()
                }
                _ = try? await meta.change { v throws(PageStore.Failure) -> Bool in try v.deleteMapStep(clone, pageBudget: 16) }
            }
            _ = try? await meta.store.checkpoint()
            _ = chunks
        }
    }

    private static func blocking(_ body: @escaping @Sendable () async throws -> Void) {
        let done = DispatchSemaphore(value: 0)
        let failure = Mutex<String?>(nil)
        Task {
            do { try await body() } catch { failure.withLock { $0 = "\(error)" } }
            done.signal()
        }
        done.wait()
        if let why = failure.withLock({ $0 }) { fatalError("pool-metadata fuzz setup failed: \(why)") }
    }
}
