//! The superblock: block 0 and block 1 of the metadata device, two ping-pong slots.
//!
//! The superblock of generation `g` is always written to slot `g % 2`, so a commit never
//! overwrites the superblock it supersedes. Owns the byte layout (see
//! `metadata-format/SPEC.md` §2): `pack` and `unpack` mirror each other field by field, and
//! `validate` decides whether a slot holds a usable superblock. Invariant: for every
//! superblock `s` with a reason of at most `MODE_REASON_LEN` bytes,
//! `unpack(&s.pack()) == s`.

use super::checksum::{
    get_array, get_u32, get_u64, put_u32, put_u64, stamp, verify, BLOCK_SIZE, SUPERBLOCK_CSUM_XOR,
};
use serde::Serialize;
use uuid::Uuid;

/// "UBLKCLON" read as a little-endian u64.
pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"UBLKCLON");
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Number of superblock slots (blocks 0 and 1).
pub const SUPERBLOCK_SLOTS: u64 = 2;
/// `flags` bit: the device was closed cleanly (set by a clean close, cleared by open).
pub const FLAG_CLEAN_SHUTDOWN: u32 = 1;
/// Size of the NUL-padded UTF-8 reason field.
pub const MODE_REASON_LEN: usize = 256;

const OFF_CSUM: usize = 0;
const OFF_FLAGS: usize = 4;
const OFF_BLOCKNR: usize = 8;
const OFF_MAGIC: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_MODE: usize = 28;
const OFF_UUID: usize = 32;
const OFF_GENERATION: usize = 48;
const OFF_REGION_SIZE: usize = 56;
const OFF_NR_REGIONS: usize = 64;
const OFF_SOURCE_SIZE: usize = 72;
const OFF_DEST_SIZE: usize = 80;
const OFF_SOURCE_FINGERPRINT: usize = 88;
const OFF_METADATA_BLOCKS: usize = 120;
const OFF_BITMAP_START: usize = 128;
const OFF_NR_BITMAP_BLOCKS: usize = 136;
const OFF_REGIONS_PER_BITMAP_BLOCK: usize = 144;
const OFF_RESERVED: usize = 148;
const OFF_HYDRATED: usize = 152;
const OFF_MODE_REASON: usize = 160;
/// First byte after the last field; `[END, 4096)` is zero.
pub const SUPERBLOCK_END: usize = OFF_MODE_REASON + MODE_REASON_LEN;

/// The metadata mode recorded on disk (dm-clone's rw / read-only / fail modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetadataMode {
    ReadWrite = 0,
    ReadOnly = 1,
    Fail = 2,
}

impl MetadataMode {
    fn from_u32(v: u32) -> Option<MetadataMode> {
        match v {
            0 => Some(MetadataMode::ReadWrite),
            1 => Some(MetadataMode::ReadOnly),
            2 => Some(MetadataMode::Fail),
            _ => None,
        }
    }
}

impl std::fmt::Display for MetadataMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MetadataMode::ReadWrite => "read-write",
            MetadataMode::ReadOnly => "read-only",
            MetadataMode::Fail => "fail",
        })
    }
}

/// One decoded superblock. `csum` is not kept: it is recomputed by `pack`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Superblock {
    pub flags: u32,
    /// The slot (0 or 1) this superblock was written to.
    pub blocknr: u64,
    pub magic: u64,
    pub version: u32,
    pub mode: MetadataMode,
    pub uuid: Uuid,
    pub generation: u64,
    pub region_size: u64,
    pub nr_regions: u64,
    pub source_size: u64,
    pub dest_size: u64,
    #[serde(serialize_with = "crate::metadata::dump::hex32")]
    pub source_fingerprint: [u8; 32],
    /// Number of metadata blocks in use (superblocks and all bitmap slots).
    pub metadata_blocks: u64,
    /// Block number of bitmap block 0, slot A.
    pub bitmap_start: u64,
    pub nr_bitmap_blocks: u64,
    pub regions_per_bitmap_block: u32,
    /// Number of hydrated regions in the bitmap this superblock commits.
    pub hydrated: u64,
    pub mode_reason: String,
}

/// Why a superblock slot is not usable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("bad magic {0:#018x}")]
    BadMagic(u64),
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("unsupported format version {0}")]
    BadVersion(u32),
    #[error("block number {found} recorded, expected {expected}")]
    BadBlocknr { expected: u64, found: u64 },
    #[error("generation {generation} cannot live in slot {slot} (must be generation % 2)")]
    BadGeneration { slot: u64, generation: u64 },
    #[error("{0}")]
    Undecodable(String),
}

impl Superblock {
    /// Encodes into one block, checksum included.
    pub fn pack(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        put_u32(&mut b, OFF_FLAGS, self.flags);
        put_u64(&mut b, OFF_BLOCKNR, self.blocknr);
        put_u64(&mut b, OFF_MAGIC, self.magic);
        put_u32(&mut b, OFF_VERSION, self.version);
        put_u32(&mut b, OFF_MODE, self.mode as u32);
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(self.uuid.as_bytes());
        put_u64(&mut b, OFF_GENERATION, self.generation);
        put_u64(&mut b, OFF_REGION_SIZE, self.region_size);
        put_u64(&mut b, OFF_NR_REGIONS, self.nr_regions);
        put_u64(&mut b, OFF_SOURCE_SIZE, self.source_size);
        put_u64(&mut b, OFF_DEST_SIZE, self.dest_size);
        b[OFF_SOURCE_FINGERPRINT..OFF_SOURCE_FINGERPRINT + 32]
            .copy_from_slice(&self.source_fingerprint);
        put_u64(&mut b, OFF_METADATA_BLOCKS, self.metadata_blocks);
        put_u64(&mut b, OFF_BITMAP_START, self.bitmap_start);
        put_u64(&mut b, OFF_NR_BITMAP_BLOCKS, self.nr_bitmap_blocks);
        put_u32(
            &mut b,
            OFF_REGIONS_PER_BITMAP_BLOCK,
            self.regions_per_bitmap_block,
        );
        put_u32(&mut b, OFF_RESERVED, 0);
        put_u64(&mut b, OFF_HYDRATED, self.hydrated);
        let reason = truncate_utf8(&self.mode_reason, MODE_REASON_LEN);
        b[OFF_MODE_REASON..OFF_MODE_REASON + reason.len()].copy_from_slice(reason.as_bytes());
        stamp(&mut b, SUPERBLOCK_CSUM_XOR);
        debug_assert_eq!(OFF_CSUM, 0);
        b
    }

    /// Decodes the fields of `b` (no checksum or magic check: see [`validate`]).
    pub fn unpack(b: &[u8]) -> Result<Superblock, SlotError> {
        if b.len() != BLOCK_SIZE {
            return Err(SlotError::Undecodable(format!(
                "superblock is {} bytes, expected {BLOCK_SIZE}",
                b.len()
            )));
        }
        let mode_raw = get_u32(b, OFF_MODE);
        let mode = MetadataMode::from_u32(mode_raw)
            .ok_or_else(|| SlotError::Undecodable(format!("unknown metadata mode {mode_raw}")))?;
        let reason_bytes = &b[OFF_MODE_REASON..OFF_MODE_REASON + MODE_REASON_LEN];
        let reason_len = reason_bytes
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(MODE_REASON_LEN);
        let mode_reason = std::str::from_utf8(&reason_bytes[..reason_len])
            .map_err(|_| SlotError::Undecodable("mode reason is not UTF-8".into()))?
            .to_string();
        Ok(Superblock {
            flags: get_u32(b, OFF_FLAGS),
            blocknr: get_u64(b, OFF_BLOCKNR),
            magic: get_u64(b, OFF_MAGIC),
            version: get_u32(b, OFF_VERSION),
            mode,
            uuid: Uuid::from_bytes(get_array(b, OFF_UUID)),
            generation: get_u64(b, OFF_GENERATION),
            region_size: get_u64(b, OFF_REGION_SIZE),
            nr_regions: get_u64(b, OFF_NR_REGIONS),
            source_size: get_u64(b, OFF_SOURCE_SIZE),
            dest_size: get_u64(b, OFF_DEST_SIZE),
            source_fingerprint: get_array(b, OFF_SOURCE_FINGERPRINT),
            metadata_blocks: get_u64(b, OFF_METADATA_BLOCKS),
            bitmap_start: get_u64(b, OFF_BITMAP_START),
            nr_bitmap_blocks: get_u64(b, OFF_NR_BITMAP_BLOCKS),
            regions_per_bitmap_block: get_u32(b, OFF_REGIONS_PER_BITMAP_BLOCK),
            hydrated: get_u64(b, OFF_HYDRATED),
            mode_reason,
        })
    }

    pub fn is_clean(&self) -> bool {
        self.flags & FLAG_CLEAN_SHUTDOWN != 0
    }
}

/// Validates the block read from superblock slot `slot`, in this order: magic, checksum,
/// version, block number, generation parity, then decodes it.
pub fn validate(b: &[u8], slot: u64) -> Result<Superblock, SlotError> {
    let magic = get_u64(b, OFF_MAGIC);
    if magic != SUPERBLOCK_MAGIC {
        return Err(SlotError::BadMagic(magic));
    }
    verify(b, SUPERBLOCK_CSUM_XOR)
        .map_err(|(stored, computed)| SlotError::Checksum { stored, computed })?;
    let version = get_u32(b, OFF_VERSION);
    if version != FORMAT_VERSION {
        return Err(SlotError::BadVersion(version));
    }
    let sb = Superblock::unpack(b)?;
    if sb.blocknr != slot {
        return Err(SlotError::BadBlocknr {
            expected: slot,
            found: sb.blocknr,
        });
    }
    if sb.generation % SUPERBLOCK_SLOTS != slot {
        return Err(SlotError::BadGeneration {
            slot,
            generation: sb.generation,
        });
    }
    Ok(sb)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
