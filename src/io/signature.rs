//! What a device holds before we overwrite it: the magic numbers of file systems, partition
//! tables, RAID and volume-manager labels, encryption headers and swap (the part of blkid's
//! probes that matters before a format), and whether the device is blank.
//!
//! Owns the table of known signatures. Invariant: only reads; a device is "blank" only if every
//! byte of the span asked for is zero and no known signature is found anywhere we look (some
//! live at the end of the device).

use super::BlockDev;
use std::fmt;
use std::io;

/// Bytes read from the start of the device: every head signature below lies inside them
/// (btrfs's magic at 65600, swap's at page size - 10 for pages up to 64 KiB).
pub const HEAD_BYTES: u64 = 128 << 10;

/// What kind of content a signature marks; used to word messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    FileSystem,
    PartitionTable,
    Raid,
    VolumeManager,
    Encryption,
    Swap,
}

/// A signature found on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// blkid's name for it ("ext4", "xfs", "gpt", "LVM2_member", ...).
    pub name: &'static str,
    pub kind: Kind,
    /// Byte offset of the magic number on the device.
    pub offset: u64,
}

impl fmt::Display for Signature {
    /// "an ext4 file system (signature at byte 1080)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            Kind::FileSystem => "file system",
            Kind::PartitionTable => "partition table",
            Kind::Raid => "RAID member superblock",
            Kind::VolumeManager => "volume manager label",
            Kind::Encryption => "encryption header",
            Kind::Swap => "swap area",
        };
        let article = match self.name.as_bytes().first() {
            Some(b'a' | b'e' | b'i' | b'o' | b'u' | b'x' | b'L' | b'M') => "an",
            _ => "a",
        };
        write!(
            f,
            "{article} {} {what} (signature at byte {})",
            self.name, self.offset
        )
    }
}

/// Looks for a known signature on `dev`: in its first [`HEAD_BYTES`] and, for md RAID
/// superblocks kept at the end, in its last 128 KiB. Returns the first one found.
pub fn detect(dev: &dyn BlockDev) -> io::Result<Option<Signature>> {
    let size = dev.size();
    let mut head = vec![0u8; HEAD_BYTES.min(size) as usize];
    dev.read_at(&mut head, 0)?;
    if let Some(sig) = detect_head(&head) {
        return Ok(Some(sig));
    }
    detect_tail(dev)
}

/// The first non-zero byte in `[0, len)` of `dev` (clamped to its size), if any.
pub fn first_nonzero(dev: &dyn BlockDev, len: u64) -> io::Result<Option<u64>> {
    let end = len.min(dev.size());
    let mut buf = vec![0u8; (1 << 20).min(end) as usize];
    let mut off = 0;
    while off < end {
        let n = (end - off).min(buf.len() as u64) as usize;
        dev.read_at(&mut buf[..n], off)?;
        if let Some(i) = buf[..n].iter().position(|b| *b != 0) {
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

fn at(buf: &[u8], offset: usize, magic: &[u8]) -> bool {
    buf.get(offset..offset + magic.len()) == Some(magic)
}

fn le16(buf: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        buf.get(offset..offset + 2)?.try_into().ok()?,
    ))
}

fn le32(buf: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        buf.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

/// md RAID superblock magic (little-endian on disk for versions 1.x, native for 0.90).
const MD_MAGIC: u32 = 0xa92b_4efc;

/// Signatures found in the first bytes of a device, most specific first (a file system that
/// also carries a boot sector is named before the partition table it looks like).
fn detect_head(h: &[u8]) -> Option<Signature> {
    let sig = |name, kind, offset: usize| {
        Some(Signature {
            name,
            kind,
            offset: offset as u64,
        })
    };
    if at(h, 0, b"LUKS\xba\xbe") {
        return sig("crypto_LUKS", Kind::Encryption, 0);
    }
    if at(h, 0, b"XFSB") {
        return sig("xfs", Kind::FileSystem, 0);
    }
    if at(h, 0, b"hsqs") {
        return sig("squashfs", Kind::FileSystem, 0);
    }
    for off in [0, 4096] {
        // md 1.1 (at 0) and 1.2 (at 4 KiB).
        if le32(h, off) == Some(MD_MAGIC) {
            return sig("linux_raid_member", Kind::Raid, off);
        }
    }
    for sector in 0..4 {
        // LVM2 physical volume label in one of the first four sectors.
        let off = sector * 512;
        if at(h, off, b"LABELONE") && at(h, off + 24, b"LVM2 001") {
            return sig("LVM2_member", Kind::VolumeManager, off);
        }
    }
    for off in [512, 4096] {
        // GPT header in LBA 1 (512-byte or 4 KiB sectors).
        if at(h, off, b"EFI PART") {
            return sig("gpt", Kind::PartitionTable, off);
        }
    }
    if le16(h, 1080) == Some(0xef53) {
        return sig(ext_flavour(h), Kind::FileSystem, 1080);
    }
    if le32(h, 1024) == Some(0xf2f5_2010) {
        return sig("f2fs", Kind::FileSystem, 1024);
    }
    if at(h, 32768, b"JFS1") {
        return sig("jfs", Kind::FileSystem, 32768);
    }
    if at(h, 32769, b"CD001") {
        return sig("iso9660", Kind::FileSystem, 32769);
    }
    if at(h, 65600, b"_BHRfS_M") {
        return sig("btrfs", Kind::FileSystem, 65600);
    }
    for off in [65536 + 52, 8192 + 52] {
        if at(h, off, b"ReIsEr") {
            return sig("reiserfs", Kind::FileSystem, off);
        }
    }
    for page in [4096usize, 8192, 16384, 65536] {
        let off = page - 10;
        if at(h, off, b"SWAPSPACE2") || at(h, off, b"SWAP-SPACE") {
            return sig("swap", Kind::Swap, off);
        }
    }
    if at(h, 3, b"NTFS    ") {
        return sig("ntfs", Kind::FileSystem, 3);
    }
    if at(h, 3, b"EXFAT   ") {
        return sig("exfat", Kind::FileSystem, 3);
    }
    let boot_sector = le16(h, 510) == Some(0xaa55);
    if boot_sector && (at(h, 54, b"FAT1") || at(h, 82, b"FAT32   ")) {
        return sig(
            "vfat",
            Kind::FileSystem,
            if at(h, 54, b"FAT1") { 54 } else { 82 },
        );
    }
    if boot_sector {
        return sig("dos", Kind::PartitionTable, 510);
    }
    None
}

/// ext2, ext3 or ext4, from the feature flags of the superblock at 1024 (as blkid decides:
/// a journal makes ext3, features ext3 lacks make ext4).
fn ext_flavour(h: &[u8]) -> &'static str {
    const SB: usize = 1024;
    let compat = le32(h, SB + 0x5c).unwrap_or(0);
    let incompat = le32(h, SB + 0x60).unwrap_or(0);
    let ro_compat = le32(h, SB + 0x64).unwrap_or(0);
    // ext3 knows FILETYPE, RECOVER and META_BG (incompat) and SPARSE_SUPER, LARGE_FILE,
    // BTREE_DIR (ro_compat); anything else is ext4.
    const EXT3_INCOMPAT: u32 = 0x0002 | 0x0004 | 0x0010;
    const EXT3_RO_COMPAT: u32 = 0x0001 | 0x0002 | 0x0004;
    if incompat & !EXT3_INCOMPAT != 0 || ro_compat & !EXT3_RO_COMPAT != 0 {
        "ext4"
    } else if compat & 0x0004 != 0 {
        "ext3"
    } else {
        "ext2"
    }
}

/// md 0.90 and 1.0 superblocks, which live near the end of the device.
fn detect_tail(dev: &dyn BlockDev) -> io::Result<Option<Signature>> {
    let size = dev.size();
    let mut candidates = Vec::new();
    // 0.90: the last 64 KiB-aligned 64 KiB block.
    if size >= 128 << 10 {
        candidates.push((size & !0xffff) - (64 << 10));
    }
    // 1.0: 8 KiB from the end, 4 KiB aligned.
    if size >= 12 << 10 {
        candidates.push((size - (8 << 10)) & !0xfff);
    }
    let mut word = [0u8; 4];
    for off in candidates {
        if off < HEAD_BYTES.min(size) {
            // Already covered by the head, where a match would be md 1.1/1.2.
            continue;
        }
        dev.read_at(&mut word, off)?;
        if u32::from_le_bytes(word) == MD_MAGIC || u32::from_be_bytes(word) == MD_MAGIC {
            return Ok(Some(Signature {
                name: "linux_raid_member",
                kind: Kind::Raid,
                offset: off,
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemDev;

    fn dev_with(size: u64, pokes: &[(u64, &[u8])]) -> MemDev {
        let dev = MemDev::new("test", size);
        for (off, bytes) in pokes {
            dev.write_at(bytes, *off).expect("poke");
        }
        dev
    }

    fn found(size: u64, pokes: &[(u64, &[u8])]) -> Option<&'static str> {
        detect(&dev_with(size, pokes))
            .expect("detect")
            .map(|s| s.name)
    }

    #[test]
    fn blank_device_has_no_signature() {
        let dev = dev_with(1 << 20, &[]);
        assert_eq!(detect(&dev).expect("detect"), None);
        assert_eq!(first_nonzero(&dev, 1 << 20).expect("scan"), None);
        // Smaller than the head: no read past the end.
        assert_eq!(found(4096, &[]), None);
    }

    #[test]
    fn first_nonzero_finds_the_first_byte_and_respects_the_span() {
        let dev = dev_with(3 << 20, &[(2 << 20 | 17, &[1])]);
        assert_eq!(first_nonzero(&dev, 2 << 20).expect("scan"), None);
        assert_eq!(
            first_nonzero(&dev, 3 << 20).expect("scan"),
            Some(2 << 20 | 17)
        );
        assert_eq!(
            first_nonzero(&dev, 1 << 40).expect("clamped"),
            Some(2 << 20 | 17)
        );
    }

    #[test]
    fn file_systems_by_magic() {
        let m = 1 << 20;
        assert_eq!(found(m, &[(0, b"XFSB")]), Some("xfs"));
        assert_eq!(found(m, &[(0, b"hsqs")]), Some("squashfs"));
        assert_eq!(found(m, &[(65600, b"_BHRfS_M")]), Some("btrfs"));
        assert_eq!(found(m, &[(32769, b"CD001")]), Some("iso9660"));
        assert_eq!(found(m, &[(32768, b"JFS1")]), Some("jfs"));
        assert_eq!(found(m, &[(65536 + 52, b"ReIsEr2Fs")]), Some("reiserfs"));
        assert_eq!(
            found(m, &[(1024, &0xf2f5_2010u32.to_le_bytes())]),
            Some("f2fs")
        );
        assert_eq!(found(m, &[(3, b"NTFS    ")]), Some("ntfs"));
        assert_eq!(found(m, &[(3, b"EXFAT   ")]), Some("exfat"));
        let fat32: &[(u64, &[u8])] = &[(82, b"FAT32   "), (510, &[0x55, 0xaa])];
        assert_eq!(found(m, fat32), Some("vfat"));
        let fat16: &[(u64, &[u8])] = &[(54, b"FAT16   "), (510, &[0x55, 0xaa])];
        assert_eq!(found(m, fat16), Some("vfat"));
    }

    #[test]
    fn ext_flavours_from_feature_flags() {
        let magic: &[u8] = &[0x53, 0xef];
        assert_eq!(found(1 << 20, &[(1080, magic)]), Some("ext2"));
        let journal = 0x4u32.to_le_bytes();
        assert_eq!(
            found(1 << 20, &[(1080, magic), (1024 + 0x5c, &journal)]),
            Some("ext3")
        );
        let extents = 0x40u32.to_le_bytes();
        assert_eq!(
            found(
                1 << 20,
                &[
                    (1080, magic),
                    (1024 + 0x5c, &journal),
                    (1024 + 0x60, &extents)
                ]
            ),
            Some("ext4")
        );
    }

    #[test]
    fn swap_at_every_page_size() {
        for page in [4096u64, 8192, 16384, 65536] {
            assert_eq!(found(1 << 20, &[(page - 10, b"SWAPSPACE2")]), Some("swap"));
        }
        assert_eq!(found(1 << 20, &[(4086, b"SWAP-SPACE")]), Some("swap"));
    }

    #[test]
    fn partition_tables_volume_managers_raid_and_luks() {
        let m = 1 << 20;
        let mbr: &[(u64, &[u8])] = &[(510, &[0x55, 0xaa])];
        assert_eq!(found(m, mbr), Some("dos"));
        // A GPT disk also has a protective MBR: GPT is named.
        assert_eq!(
            found(m, &[(510, &[0x55, 0xaa]), (512, b"EFI PART")]),
            Some("gpt")
        );
        assert_eq!(found(m, &[(4096, b"EFI PART")]), Some("gpt"));
        assert_eq!(
            found(m, &[(512, b"LABELONE"), (512 + 24, b"LVM2 001")]),
            Some("LVM2_member")
        );
        assert_eq!(found(m, &[(0, b"LUKS\xba\xbe")]), Some("crypto_LUKS"));
        let md = MD_MAGIC.to_le_bytes();
        assert_eq!(found(m, &[(4096, &md)]), Some("linux_raid_member"));
        assert_eq!(found(m, &[(0, &md)]), Some("linux_raid_member"));
        // 0.90 near the end (64 KiB aligned, one block before the last), and 1.0 (8 KiB from
        // the end).
        let size = (8 << 20) + 12345;
        let v090 = (size & !0xffff) - 65536;
        assert_eq!(found(size, &[(v090, &md)]), Some("linux_raid_member"));
        let v10 = (size - 8192) & !0xfff;
        assert_eq!(found(size, &[(v10, &md)]), Some("linux_raid_member"));
    }

    #[test]
    fn messages_name_the_content() {
        let sig = Signature {
            name: "ext4",
            kind: Kind::FileSystem,
            offset: 1080,
        };
        assert_eq!(
            sig.to_string(),
            "an ext4 file system (signature at byte 1080)"
        );
        let lvm = Signature {
            name: "LVM2_member",
            kind: Kind::VolumeManager,
            offset: 512,
        };
        assert!(lvm
            .to_string()
            .starts_with("an LVM2_member volume manager label"));
    }
}
