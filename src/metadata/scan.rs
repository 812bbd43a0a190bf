//! Reading the metadata device: both superblock slots, and the whole bitmap area in large
//! sequential chunks with checksums verified in parallel.
//!
//! Shared by open (which stops at the first fatal problem) and check (which collects them
//! all). Never writes. Invariant: the visitor sees every bitmap block index exactly once, in
//! order, with both slots' raw bytes and validation results.

use super::bitmap::{self, BitmapHeader, BitmapSlotError, BITMAP_SLOTS};
use super::checksum::BLOCK_SIZE;
use super::superblock::{self, SlotError, Superblock, SUPERBLOCK_SLOTS};
use crate::io::BlockDev;
use std::io;
use uuid::Uuid;

/// Bitmap block pairs read per I/O (1024 pairs = 8 MiB).
const PAIRS_PER_CHUNK: u64 = 1024;
/// Below this many pairs a chunk is validated on the calling thread.
const PARALLEL_MIN_PAIRS: usize = 128;

/// Reads and validates both superblock slots.
pub fn read_superblocks(dev: &dyn BlockDev) -> io::Result<[Result<Superblock, SlotError>; 2]> {
    let mut buf = vec![0u8; BLOCK_SIZE * SUPERBLOCK_SLOTS as usize];
    dev.read_at(&mut buf, 0)?;
    Ok([
        superblock::validate(&buf[..BLOCK_SIZE], 0),
        superblock::validate(&buf[BLOCK_SIZE..], 1),
    ])
}

/// The slot to use: the valid one with the highest generation.
pub fn pick_superblock(slots: &[Result<Superblock, SlotError>; 2]) -> Option<usize> {
    match (&slots[0], &slots[1]) {
        (Ok(a), Ok(b)) => Some(if b.generation > a.generation { 1 } else { 0 }),
        (Ok(_), Err(_)) => Some(0),
        (Err(_), Ok(_)) => Some(1),
        (Err(_), Err(_)) => None,
    }
}

/// One bitmap block index as read from disk.
pub struct Pair<'a> {
    pub index: u64,
    pub slots: [Result<BitmapHeader, BitmapSlotError>; 2],
    pub bytes: [&'a [u8]; 2],
}

/// Reads the bitmap area of `nr_bitmap_blocks` blocks and calls `visit` for each index.
/// Stops at the first error of `visit`; a read error of the chunk starting at bitmap block
/// `first` becomes `map_io(error, first)`.
pub fn scan_bitmap<E>(
    dev: &dyn BlockDev,
    nr_bitmap_blocks: u64,
    uuid: &Uuid,
    map_io: impl Fn(io::Error, u64) -> E,
    mut visit: impl FnMut(Pair<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let pair_bytes = BLOCK_SIZE * BITMAP_SLOTS as usize;
    let mut buf = vec![0u8; pair_bytes * PAIRS_PER_CHUNK.min(nr_bitmap_blocks) as usize];
    let mut first = 0u64;
    while first < nr_bitmap_blocks {
        let n = PAIRS_PER_CHUNK.min(nr_bitmap_blocks - first) as usize;
        let chunk = &mut buf[..n * pair_bytes];
        dev.read_at(chunk, bitmap::slot_blocknr(first, 0) * BLOCK_SIZE as u64)
            .map_err(|e| map_io(e, first))?;
        let results = validate_chunk(chunk, first, uuid);
        for (i, slots) in results.into_iter().enumerate() {
            let pair = &chunk[i * pair_bytes..(i + 1) * pair_bytes];
            visit(Pair {
                index: first + i as u64,
                slots,
                bytes: [&pair[..BLOCK_SIZE], &pair[BLOCK_SIZE..]],
            })?;
        }
        first += n as u64;
    }
    Ok(())
}

type SlotResults = [Result<BitmapHeader, BitmapSlotError>; 2];

/// Validates every slot of a chunk of pairs starting at index `first`, in parallel when the
/// chunk is large (checksumming 8 MiB is the dominant cost of open after the read itself).
fn validate_chunk(chunk: &[u8], first: u64, uuid: &Uuid) -> Vec<SlotResults> {
    let pair_bytes = BLOCK_SIZE * BITMAP_SLOTS as usize;
    let n = chunk.len() / pair_bytes;
    let one = |i: usize| -> SlotResults {
        let p = &chunk[i * pair_bytes..(i + 1) * pair_bytes];
        let index = first + i as u64;
        [
            bitmap::validate(&p[..BLOCK_SIZE], index, 0, uuid),
            bitmap::validate(&p[BLOCK_SIZE..], index, 1, uuid),
        ]
    };
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(8);
    if n < PARALLEL_MIN_PAIRS || threads < 2 {
        return (0..n).map(one).collect();
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| {
                let one = &one;
                s.spawn(move || (start..(start + per).min(n)).map(one).collect::<Vec<_>>())
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        for (k, h) in handles.into_iter().enumerate() {
            match h.join() {
                Ok(v) => out.extend(v),
                // A panic in a checksum thread is a bug; redo that part here rather than
                // propagate a panic into an I/O path.
                Err(_) => {
                    let start = k * per;
                    out.extend((start..(start + per).min(n)).map(one));
                }
            }
        }
        out
    })
}
