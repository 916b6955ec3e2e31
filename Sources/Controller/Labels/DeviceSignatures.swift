/// Recognizes what already lives on a device, so svsp never overwrites it by accident.
public enum DeviceSignatures {
    /// Magic at byte 0 of every LUN svsp labels.
    public static let svspLabelMagic: [UInt8] = Array("SVSPLUN1".utf8)

    /// Bytes to read from the start of a device for `detect` (covers btrfs at 64 KiB).
    public static let probeBytes = 128 * 1024

    /// The name of the first signature found in the device's first bytes, or nil.
    public static func detect(_ bytes: UnsafeRawBufferPointer) -> String? {
        func matches(_ offset: Int, _ magic: [UInt8]) -> Bool {
            guard offset + magic.count <= bytes.count else { return false }
            return magic.enumerated().allSatisfy { bytes[offset + $0.offset] == $0.element }
        }
        if matches(0, svspLabelMagic) { return "an svsp LUN label" }
        if matches(512, Array("EFI PART".utf8)) { return "a GPT partition table" }
        if matches(0, Array("LUKS".utf8) + [0xBA, 0xBE]) { return "a LUKS header" }
        if matches(0, Array("XFSB".utf8)) { return "an XFS file system" }
        if matches(1080, [0x53, 0xEF]) { return "an ext2/3/4 file system" }
        if matches(65600, Array("_BHRfS_M".utf8)) { return "a btrfs file system" }
        if matches(4086, Array("SWAPSPACE2".utf8)) { return "a swap area" }
        if matches(32769, Array("CD001".utf8)) { return "an ISO 9660 file system" }
        if matches(3, Array("NTFS    ".utf8)) { return "an NTFS file system" }
        if matches(82, Array("FAT32   ".utf8)) || matches(54, Array("FAT1".utf8)) { return "a FAT file system" }
        if matches(24, [0xA9, 0x2B, 0x4E, 0xFC]) || matches(536, Array("LVM2 001".utf8)) { return "an LVM2 physical volume" }
        if matches(510, [0x55, 0xAA]) {
            // An MBR: only a partition table if some partition entry has a type.
            let hasPartition = (0..<4).contains { bytes.count > 446 + $0 * 16 + 4 && bytes[446 + $0 * 16 + 4] != 0 }
            if hasPartition { return "an MBR partition table" }
        }
        return nil
    }
}
