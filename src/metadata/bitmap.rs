//! Bitmap blocks: the on-disk hydrated-region bitmap, and the geometry of the bitmap area.
//!
//! Region `r` is bit `r % 64` of little-endian u64 word `r / 64` of the whole bitmap; the
//! words are cut into bitmap blocks of [`WORDS_PER_BITMAP_BLOCK`] words. Each bitmap block
//! index `i` has two physical slots, A and B, at blocks `BITMAP_START + 2 i` and
//! `BITMAP_START + 2 i + 1`. Each written slot carries the generation of the commit that
//! wrote it; the live copy of block `i` is the valid slot with the highest generation not
//! above the superblock's (slot A on a tie). Invariant kept here: `unpack(pack(b)) == b`
//! and a packed block always validates at the block number it was packed for.

use super::checksum::{
    get_array, get_u32, get_u64, put_u64, stamp, verify, BITMAP_CSUM_XOR, BLOCK_SIZE,
};
use super::superblock::SUPERBLOCK_SLOTS;
use uuid::Uuid;

const OFF_CSUM: usize = 0;
const OFF_RESERVED: usize = 4;
const OFF_BLOCKNR: usize = 8;
const OFF_INDEX: usize = 16;
const OFF_GENERATION: usize = 24;
const OFF_UUID: usize = 32;
/// Size of the bitmap block header; the words follow.
pub const BITMAP_HEADER_SIZE: usize = 48;
/// u64 words of bitmap in one block.
pub const WORDS_PER_BITMAP_BLOCK: usize = (BLOCK_SIZE - BITMAP_HEADER_SIZE) / 8;
/// Regions covered by one bitmap block (32,384).
pub const REGIONS_PER_BITMAP_BLOCK: u64 = WORDS_PER_BITMAP_BLOCK as u64 * 64;
/// Block number of bitmap block 0, slot A (right after the two superblock slots).
pub const BITMAP_START: u64 = SUPERBLOCK_SLOTS;
/// Physical slots per bitmap block.
pub const BITMAP_SLOTS: u64 = 2;

/// Block number of slot `slot` (0 = A, 1 = B) of bitmap block `index`.
pub fn slot_blocknr(index: u64, slot: u8) -> u64 {
    BITMAP_START + BITMAP_SLOTS * index + slot as u64
}

/// Bitmap blocks needed for `nr_regions` regions.
pub fn bitmap_blocks(nr_regions: u64) -> u64 {
    nr_regions.div_ceil(REGIONS_PER_BITMAP_BLOCK)
}

/// Name of a slot for messages: "A" or "B".
pub fn slot_name(slot: u8) -> &'static str {
    if slot == 0 {
        "A"
    } else {
        "B"
    }
}

/// The header of a bitmap block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapHeader {
    /// Physical block number this copy was written to.
    pub blocknr: u64,
    /// Bitmap block index (covers regions `[index * 32384, (index + 1) * 32384)`).
    pub index: u64,
    /// Generation of the commit (or format, 0) that wrote this copy.
    pub generation: u64,
    /// UUID of the clone (copied from the superblock).
    pub uuid: Uuid,
}

/// One decoded bitmap block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapBlock {
    pub header: BitmapHeader,
    /// Exactly [`WORDS_PER_BITMAP_BLOCK`] words.
    pub words: Vec<u64>,
}

impl BitmapHeader {
    /// Writes the header into `b` and stamps the checksum over the header and the words
    /// already in `b[BITMAP_HEADER_SIZE..]`.
    pub fn pack_into(&self, b: &mut [u8]) {
        b[OFF_RESERVED..OFF_RESERVED + 4].fill(0);
        put_u64(b, OFF_BLOCKNR, self.blocknr);
        put_u64(b, OFF_INDEX, self.index);
        put_u64(b, OFF_GENERATION, self.generation);
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(self.uuid.as_bytes());
        stamp(b, BITMAP_CSUM_XOR);
        debug_assert_eq!(OFF_CSUM, 0);
    }

    pub fn unpack(b: &[u8]) -> BitmapHeader {
        BitmapHeader {
            blocknr: get_u64(b, OFF_BLOCKNR),
            index: get_u64(b, OFF_INDEX),
            generation: get_u64(b, OFF_GENERATION),
            uuid: Uuid::from_bytes(get_array(b, OFF_UUID)),
        }
    }
}

impl BitmapBlock {
    pub fn pack(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        for (i, w) in self.words.iter().take(WORDS_PER_BITMAP_BLOCK).enumerate() {
            put_u64(&mut b, BITMAP_HEADER_SIZE + 8 * i, *w);
        }
        self.header.pack_into(&mut b);
        b
    }

    pub fn unpack(b: &[u8]) -> BitmapBlock {
        BitmapBlock {
            header: BitmapHeader::unpack(b),
            words: (0..WORDS_PER_BITMAP_BLOCK)
                .map(|i| get_u64(b, BITMAP_HEADER_SIZE + 8 * i))
                .collect(),
        }
    }
}

/// Why a bitmap slot is not a usable copy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BitmapSlotError {
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("reserved header field is {0:#x}, not 0")]
    Reserved(u32),
    #[error("block number {found} recorded, expected {expected}")]
    Blocknr { expected: u64, found: u64 },
    #[error("bitmap index {found} recorded, expected {expected}")]
    Index { expected: u64, found: u64 },
    #[error("belongs to clone {found}, not {expected}")]
    Uuid { expected: Uuid, found: Uuid },
}

/// Validates slot `slot` of bitmap block `index` of the clone `uuid`: checksum, reserved
/// field, block number, index, UUID. Returns the header.
pub fn validate(
    b: &[u8],
    index: u64,
    slot: u8,
    uuid: &Uuid,
) -> Result<BitmapHeader, BitmapSlotError> {
    verify(b, BITMAP_CSUM_XOR)
        .map_err(|(stored, computed)| BitmapSlotError::Checksum { stored, computed })?;
    let reserved = get_u32(b, OFF_RESERVED);
    if reserved != 0 {
        return Err(BitmapSlotError::Reserved(reserved));
    }
    let h = BitmapHeader::unpack(b);
    let expected = slot_blocknr(index, slot);
    if h.blocknr != expected {
        return Err(BitmapSlotError::Blocknr {
            expected,
            found: h.blocknr,
        });
    }
    if h.index != index {
        return Err(BitmapSlotError::Index {
            expected: index,
            found: h.index,
        });
    }
    if h.uuid != *uuid {
        return Err(BitmapSlotError::Uuid {
            expected: *uuid,
            found: h.uuid,
        });
    }
    Ok(h)
}

/// Word `i` of the payload of a bitmap block.
pub fn payload_word(b: &[u8], i: usize) -> u64 {
    get_u64(b, BITMAP_HEADER_SIZE + 8 * i)
}

/// Copies `words` (at most [`WORDS_PER_BITMAP_BLOCK`]) into the payload, zero-filling the rest.
pub fn put_payload(b: &mut [u8], words: impl Iterator<Item = u64>) {
    b[BITMAP_HEADER_SIZE..].fill(0);
    for (i, w) in words.take(WORDS_PER_BITMAP_BLOCK).enumerate() {
        put_u64(b, BITMAP_HEADER_SIZE + 8 * i, w);
    }
}

/// Which of two slot states is live, given each slot's generation when it validated:
/// the highest generation not above `sb_generation`, slot A on a tie.
pub fn choose_live(gens: [Option<u64>; 2], sb_generation: u64) -> Option<u8> {
    let ok = |g: Option<u64>| g.filter(|g| *g <= sb_generation);
    match (ok(gens[0]), ok(gens[1])) {
        (Some(a), Some(b)) => Some(if b > a { 1 } else { 0 }),
        (Some(_), None) => Some(0),
        (None, Some(_)) => Some(1),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_constants() {
        assert_eq!(WORDS_PER_BITMAP_BLOCK, 506);
        assert_eq!(REGIONS_PER_BITMAP_BLOCK, 32_384);
        assert_eq!(slot_blocknr(0, 0), 2);
        assert_eq!(slot_blocknr(3, 1), 9);
        assert_eq!(bitmap_blocks(0), 0);
        assert_eq!(bitmap_blocks(1), 1);
        assert_eq!(bitmap_blocks(32_384), 1);
        assert_eq!(bitmap_blocks(32_385), 2);
    }

    #[test]
    fn pack_unpack_validate() {
        let uuid = Uuid::from_u128(42);
        let mut words = vec![0u64; WORDS_PER_BITMAP_BLOCK];
        words[0] = 0b1011;
        words[505] = 1 << 63;
        let b = BitmapBlock {
            header: BitmapHeader {
                blocknr: slot_blocknr(5, 1),
                index: 5,
                generation: 9,
                uuid,
            },
            words,
        };
        let bytes = b.pack();
        assert_eq!(BitmapBlock::unpack(&bytes), b);
        assert!(validate(&bytes, 5, 1, &uuid).is_ok());
        assert!(matches!(
            validate(&bytes, 5, 0, &uuid),
            Err(BitmapSlotError::Blocknr { .. })
        ));
        assert!(matches!(
            validate(&bytes, 5, 1, &Uuid::from_u128(1)),
            Err(BitmapSlotError::Uuid { .. })
        ));
    }

    #[test]
    fn live_slot_rule() {
        assert_eq!(choose_live([Some(3), Some(5)], 5), Some(1));
        assert_eq!(choose_live([Some(3), Some(6)], 5), Some(0));
        assert_eq!(choose_live([Some(4), Some(4)], 5), Some(0));
        assert_eq!(choose_live([None, Some(6)], 5), None);
        assert_eq!(choose_live([None, Some(2)], 5), Some(1));
    }
}
