/// Where things are in a pool's metadata area (in 4 KiB pages):
///
///     0, 1            superblock, written alternately at each checkpoint
///     2 ..< 18        the root table: one entry per tree (the space map and each leg's block map)
///     18 ..< 18+J     the journal: a ring of committed transactions not yet written in place
///     18+J ..< end    tree pages, allocated as the trees grow
///
/// The area is sized from the pool's chunk count when the pool is made: enough tree
/// pages for the space map and for block maps covering every chunk twice over (shared
/// chunks: PiTs), plus the journal. A full area is refused with an error, never overrun.
public struct MetaLayout: Equatable, Sendable {
    static let superblockPages: UInt32 = 2
    public static let rootTablePages: UInt32 = 16
    public var journalPages: UInt32
    public var pageCount: UInt32

    public var rootTableStart: UInt32 { Self.superblockPages }
    public var journalStart: UInt32 { rootTableStart + Self.rootTablePages }
    public var treeStart: UInt32 { journalStart + journalPages }
    public var treePages: UInt32 { pageCount - treeStart }

    public init(journalPages: UInt32, pageCount: UInt32) {
        self.journalPages = journalPages
        self.pageCount = pageCount
    }

    /// The layout for a pool of `chunks` chunks.
    public static func sized(forChunks chunks: Int) -> MetaLayout {
        let f = MetaPage.slotCount
        let leaves = (chunks + f - 1) / f
        let interior = (leaves + f - 1) / f + 2
        // Space map once, block maps twice (a chunk can be held by a vdisk and its PiTs),
        // and as many again of headroom for pages split by partial runs.
        let trees = 3 * (leaves + interior) * 2 + 64
        // The journal: when it fills, a checkpoint (every changed page written in place)
        // stalls the commits behind it, and the first writes after a PiT change a map page
        // per redirect. 1/16 page per chunk (4 KiB per MiB of 64 KiB extents, at most 16 MiB)
        // keeps those stalls rare: a 6 GiB pool of 64 KiB extents had 652 KiB.
        let journal = UInt32(min(max(64, trees / 8, min(4096, chunks / 16)), 16_384)) // 256 KiB .. 64 MiB
        return MetaLayout(journalPages: journal, pageCount: Self.superblockPages + Self.rootTablePages + journal + UInt32(trees))
    }

    public var bytes: UInt64 { UInt64(pageCount) * UInt64(MetaPage.bytes) }
}
