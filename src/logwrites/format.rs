//! The dm-log-writes on-disk format: the super block and the entry header.
//!
//! Byte-compatible with the kernel's `log-writes` target and xfstests' `replay-log`
//! (the kernel's `struct log_write_super` and `struct log_write_entry`). All integers are
//! little-endian:
//!
//! ```text
//! super (one sectorsize block at byte 0):
//!    0  le64 magic = 0x6a736677736872    8  le64 version = 1
//!   16  le64 nr_entries                 24  le32 sectorsize
//!   28  4 bytes C struct padding (ignored on read, zero on write), then zeroes
//! entry (one sectorsize block), then nr_sectors * sectorsize bytes of data (none for DISCARD):
//!    0  le64 sector (sectorsize units)   8  le64 nr_sectors (sectorsize units)
//!   16  le64 flags                      24  le64 data_len (MARK: length of the text)
//!   32  MARK: the text, no NUL; then zeroes to sectorsize
//! ```
//!
//! Invariant: `pack` writes exactly the bytes `unpack` accepts, and `unpack` accepts every
//! block the kernel writes and rejects what replay-log rejects (an all-zero header; a
//! non-MARK entry whose byte 32 is not zero), plus the inline-data form the kernel no longer
//! produces.

/// `WRITE_LOG_MAGIC`: the bytes "rhswfsj\0" read as a little-endian u64.
pub const LOG_MAGIC: u64 = 0x006a_7366_7773_6872;
/// `WRITE_LOG_VERSION`.
pub const LOG_VERSION: u64 = 1;
/// Size of the packed super block fields (the rest of its block is zero).
pub const SUPER_SIZE: usize = 32;
/// Size of the packed entry header; a MARK's text starts here.
pub const ENTRY_HEADER_SIZE: usize = 32;
/// The smallest and largest sectorsize accepted (the logical block sizes Linux supports
/// for the devices dm-log-writes sits on, and the bound replay-log assumes).
pub const MIN_SECTORSIZE: u32 = 512;
pub const MAX_SECTORSIZE: u32 = 4096;

/// Entry flags (`LOG_*_FLAG` in the kernel).
pub const FLAG_FLUSH: u64 = 1;
pub const FLAG_FUA: u64 = 2;
pub const FLAG_DISCARD: u64 = 4;
pub const FLAG_MARK: u64 = 8;
pub const FLAG_METADATA: u64 = 16;
const KNOWN_FLAGS: u64 = FLAG_FLUSH | FLAG_FUA | FLAG_DISCARD | FLAG_MARK | FLAG_METADATA;

/// The mark the kernel writes when the target is removed; every complete log ends with it.
pub const END_MARK: &str = "dm-log-writes-end";

/// Why a block is not a valid super block or entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("bad magic {found:#x} (expected {LOG_MAGIC:#x}): not a dm-log-writes log; check that the path names the log device, not the logged data device")]
    BadMagic { found: u64 },
    #[error("unsupported log version {found} (only version {LOG_VERSION} exists)")]
    BadVersion { found: u64 },
    #[error("unsupported sectorsize {found} (must be a power of two from {MIN_SECTORSIZE} to {MAX_SECTORSIZE})")]
    BadSectorSize { found: u32 },
    #[error("block of {found} bytes is shorter than the sectorsize {sectorsize}")]
    ShortBlock { found: usize, sectorsize: u32 },
    #[error("all-zero entry header: the log ends early or nr_entries counts entries that were never written")]
    ZeroHeader,
    #[error("byte 32 of a non-mark entry is {found:#x}, not zero padding: corrupt entry")]
    NonZeroPadding { found: u8 },
    #[error("mark text of {len} bytes does not fit in a {sectorsize}-byte entry block")]
    MarkTooLong { len: u64, sectorsize: u32 },
    #[error("entry carries {len} bytes of inline data (a removed kernel feature); not supported")]
    InlineData { len: u64 },
    #[error("unknown flags {flags:#x}")]
    UnknownFlags { flags: u64 },
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Checks that `sectorsize` is one the format allows.
pub fn check_sectorsize(sectorsize: u32) -> Result<(), FormatError> {
    if sectorsize.is_power_of_two() && (MIN_SECTORSIZE..=MAX_SECTORSIZE).contains(&sectorsize) {
        Ok(())
    } else {
        Err(FormatError::BadSectorSize { found: sectorsize })
    }
}

/// `struct log_write_super`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSuper {
    /// Number of entries a replayer may read; entries after them may exist but are not valid.
    pub nr_entries: u64,
    /// Logical block size of the logged device; unit of entry sectors and of the log layout.
    pub sectorsize: u32,
}

impl LogSuper {
    /// Parses a super block from the first [`SUPER_SIZE`] bytes of `b`.
    pub fn unpack(b: &[u8]) -> Result<LogSuper, FormatError> {
        if b.len() < SUPER_SIZE {
            return Err(FormatError::ShortBlock {
                found: b.len(),
                sectorsize: SUPER_SIZE as u32,
            });
        }
        let magic = le64(b, 0);
        let version = le64(b, 8);
        let nr_entries = le64(b, 16);
        let sectorsize = le32(b, 24);
        // Bytes 28..32 are struct padding the kernel copies from an uninitialised stack
        // variable: ignored.
        if magic != LOG_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        if version != LOG_VERSION {
            return Err(FormatError::BadVersion { found: version });
        }
        check_sectorsize(sectorsize)?;
        Ok(LogSuper {
            nr_entries,
            sectorsize,
        })
    }

    /// The super block, zero-padded to one sectorsize block.
    pub fn pack(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.sectorsize as usize];
        b[0..8].copy_from_slice(&LOG_MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&LOG_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.nr_entries.to_le_bytes());
        b[24..28].copy_from_slice(&self.sectorsize.to_le_bytes());
        b
    }
}

/// `struct log_write_entry`, with a MARK's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryHeader {
    /// First sector written or discarded, in sectorsize units (0 for flushes and marks).
    pub sector: u64,
    /// Sectors written or discarded, in sectorsize units (0 for flushes and marks).
    pub nr_sectors: u64,
    pub flags: u64,
    /// The mark's text (MARK entries only; empty otherwise). `data_len` on disk is its length.
    pub mark: Vec<u8>,
}

impl EntryHeader {
    /// Parses one entry block of `sectorsize` bytes.
    pub fn unpack(b: &[u8], sectorsize: u32) -> Result<EntryHeader, FormatError> {
        if b.len() < sectorsize as usize {
            return Err(FormatError::ShortBlock {
                found: b.len(),
                sectorsize,
            });
        }
        let sector = le64(b, 0);
        let nr_sectors = le64(b, 8);
        let flags = le64(b, 16);
        let data_len = le64(b, 24);
        if flags == 0 && nr_sectors == 0 {
            return Err(FormatError::ZeroHeader);
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FormatError::UnknownFlags { flags });
        }
        let mark = if flags & FLAG_MARK != 0 {
            let room = (sectorsize as usize - ENTRY_HEADER_SIZE) as u64;
            if data_len > room {
                return Err(FormatError::MarkTooLong {
                    len: data_len,
                    sectorsize,
                });
            }
            b[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + data_len as usize].to_vec()
        } else {
            if b[ENTRY_HEADER_SIZE] != 0 {
                return Err(FormatError::NonZeroPadding {
                    found: b[ENTRY_HEADER_SIZE],
                });
            }
            if data_len != 0 {
                return Err(FormatError::InlineData { len: data_len });
            }
            Vec::new()
        };
        Ok(EntryHeader {
            sector,
            nr_sectors,
            flags,
            mark,
        })
    }

    /// The entry block, zero-padded to `sectorsize` bytes.
    pub fn pack(&self, sectorsize: u32) -> Result<Vec<u8>, FormatError> {
        let mut b = vec![0u8; sectorsize as usize];
        if self.mark.len() > sectorsize as usize - ENTRY_HEADER_SIZE {
            return Err(FormatError::MarkTooLong {
                len: self.mark.len() as u64,
                sectorsize,
            });
        }
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_sectors.to_le_bytes());
        b[16..24].copy_from_slice(&self.flags.to_le_bytes());
        b[24..32].copy_from_slice(&(self.mark.len() as u64).to_le_bytes());
        b[ENTRY_HEADER_SIZE..ENTRY_HEADER_SIZE + self.mark.len()].copy_from_slice(&self.mark);
        Ok(b)
    }

    /// A write (or FUA write) of `nr_sectors` at `sector`; data follows the entry.
    pub fn write(sector: u64, nr_sectors: u64, flags: u64) -> EntryHeader {
        EntryHeader {
            sector,
            nr_sectors,
            flags,
            mark: Vec::new(),
        }
    }

    /// An empty flush.
    pub fn flush() -> EntryHeader {
        Self::write(0, 0, FLAG_FLUSH)
    }

    /// A mark; the text is cut to what the kernel keeps (`sectorsize - 32 - 1` bytes).
    pub fn mark(text: &str, sectorsize: u32) -> EntryHeader {
        let max = sectorsize as usize - ENTRY_HEADER_SIZE - 1;
        let bytes = text.as_bytes();
        EntryHeader {
            sector: 0,
            nr_sectors: 0,
            flags: FLAG_MARK,
            mark: bytes[..bytes.len().min(max)].to_vec(),
        }
    }

    pub fn is_flush(&self) -> bool {
        self.flags & FLAG_FLUSH != 0
    }
    pub fn is_fua(&self) -> bool {
        self.flags & FLAG_FUA != 0
    }
    pub fn is_discard(&self) -> bool {
        self.flags & FLAG_DISCARD != 0
    }
    pub fn is_mark(&self) -> bool {
        self.flags & FLAG_MARK != 0
    }

    /// The mark text, lossily decoded (marks are C strings in the kernel).
    pub fn mark_text(&self) -> String {
        String::from_utf8_lossy(&self.mark).into_owned()
    }

    /// Bytes of data following the entry block in the log.
    pub fn data_bytes(&self, sectorsize: u32) -> u64 {
        if self.is_discard() || self.is_mark() {
            0
        } else {
            self.nr_sectors * sectorsize as u64
        }
    }

    /// Short human-readable form used by `-v` output.
    pub fn describe(&self) -> String {
        let mut names = Vec::new();
        for (f, n) in [
            (FLAG_FLUSH, "FLUSH"),
            (FLAG_FUA, "FUA"),
            (FLAG_DISCARD, "DISCARD"),
            (FLAG_MARK, "MARK"),
            (FLAG_METADATA, "METADATA"),
        ] {
            if self.flags & f != 0 {
                names.push(n);
            }
        }
        let kind = if names.is_empty() {
            "WRITE".to_string()
        } else {
            names.join("|")
        };
        if self.is_mark() {
            format!("{kind} {:?}", self.mark_text())
        } else {
            format!("{kind} sector {} len {}", self.sector, self.nr_sectors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn super_round_trips_and_is_padded() -> Result<(), FormatError> {
        for ss in [512u32, 4096] {
            let s = LogSuper {
                nr_entries: 42,
                sectorsize: ss,
            };
            let b = s.pack();
            assert_eq!(b.len(), ss as usize);
            assert_eq!(&b[0..8], b"rhswfsj\0");
            assert!(b[28..].iter().all(|&x| x == 0));
            assert_eq!(LogSuper::unpack(&b)?, s);
        }
        Ok(())
    }

    #[test]
    fn super_ignores_struct_padding_and_rejects_bad_fields() {
        let mut b = LogSuper {
            nr_entries: 1,
            sectorsize: 512,
        }
        .pack();
        b[28..32].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert!(LogSuper::unpack(&b).is_ok(), "bytes 28..32 are padding");
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(
            LogSuper::unpack(&bad),
            Err(FormatError::BadMagic { .. })
        ));
        let mut bad = b.clone();
        bad[8] = 2;
        assert_eq!(
            LogSuper::unpack(&bad),
            Err(FormatError::BadVersion { found: 2 })
        );
        let mut bad = b;
        bad[24..28].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            LogSuper::unpack(&bad),
            Err(FormatError::BadSectorSize { found: 1000 })
        );
    }

    #[test]
    fn entries_round_trip() -> Result<(), FormatError> {
        for ss in [512u32, 4096] {
            for e in [
                EntryHeader::write(7, 3, 0),
                EntryHeader::write(9, 1, FLAG_FUA | FLAG_METADATA),
                EntryHeader::write(100, 64, FLAG_DISCARD),
                EntryHeader::flush(),
                EntryHeader::mark("mkfs", ss),
            ] {
                let b = e.pack(ss)?;
                assert_eq!(b.len(), ss as usize);
                assert_eq!(EntryHeader::unpack(&b, ss)?, e);
            }
        }
        Ok(())
    }

    #[test]
    fn mark_is_cut_like_the_kernel_and_data_len_is_its_length() -> Result<(), FormatError> {
        let long = "x".repeat(1000);
        let m = EntryHeader::mark(&long, 512);
        assert_eq!(m.mark.len(), 512 - 32 - 1);
        let b = EntryHeader::mark("end", 512).pack(512)?;
        assert_eq!(le64(&b, 24), 3);
        assert_eq!(&b[32..36], b"end\0");
        Ok(())
    }

    #[test]
    fn replay_log_validity_checks() -> Result<(), FormatError> {
        let zero = vec![0u8; 512];
        assert_eq!(
            EntryHeader::unpack(&zero, 512),
            Err(FormatError::ZeroHeader)
        );
        let mut b = EntryHeader::write(1, 1, 0).pack(512)?;
        b[32] = 1;
        assert_eq!(
            EntryHeader::unpack(&b, 512),
            Err(FormatError::NonZeroPadding { found: 1 })
        );
        let mut b = EntryHeader::write(1, 1, 0).pack(512)?;
        b[24] = 8;
        assert_eq!(
            EntryHeader::unpack(&b, 512),
            Err(FormatError::InlineData { len: 8 })
        );
        Ok(())
    }
}
