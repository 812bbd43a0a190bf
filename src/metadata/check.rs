//! `check`: verifies every block of the metadata without writing, collecting every problem.
//!
//! Invariant: `check` never stops at the first problem (only an unreadable device stops it)
//! and every problem names the block it was found in, when there is one.

use super::bitmap::{self, WORDS_PER_BITMAP_BLOCK};
use super::scan;
use super::superblock::Superblock;
use super::{check_geometry, valid_mask};
use crate::io::BlockDev;
use serde::Serialize;
use std::fmt;

/// One problem found by [`check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Metadata block number, when the problem is in one block.
    pub block: Option<u64>,
    /// Which structure: "superblock slot 0", "bitmap block 3 slot B", "bitmap".
    pub location: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.block {
            Some(b) => write!(f, "block {b} ({}): {}", self.location, self.message),
            None => write!(f, "{}: {}", self.location, self.message),
        }
    }
}

/// Everything [`check`] found.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub device: String,
    /// Superblock slot in use, if any is valid.
    pub live_superblock: Option<u64>,
    pub generation: Option<u64>,
    pub nr_regions: Option<u64>,
    /// Hydrated regions in the live bitmap.
    pub hydrated: Option<u64>,
    pub blocks_checked: u64,
    /// The device could not be read (as opposed to: it was read and has problems).
    pub unreadable: bool,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty() && !self.unreadable
    }

    fn problem(&mut self, block: Option<u64>, location: String, message: String) {
        self.problems.push(Problem {
            block,
            location,
            message,
        });
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "metadata device: {}", self.device)?;
        if let (Some(s), Some(g)) = (self.live_superblock, self.generation) {
            writeln!(f, "live superblock: slot {s}, generation {g}")?;
        }
        if let (Some(n), Some(h)) = (self.nr_regions, self.hydrated) {
            writeln!(f, "regions: {n}, hydrated: {h}")?;
        }
        writeln!(f, "blocks checked: {}", self.blocks_checked)?;
        if self.is_healthy() {
            writeln!(f, "no problems found")
        } else {
            writeln!(f, "{} problem(s):", self.problems.len())?;
            for p in &self.problems {
                writeln!(f, "  {p}")?;
            }
            Ok(())
        }
    }
}

/// Checks the metadata on `dev`: both superblock slots, every bitmap slot, and the
/// consistency between them. Never writes.
pub fn check(dev: &dyn BlockDev) -> CheckReport {
    let mut r = CheckReport {
        device: dev.name().to_string(),
        live_superblock: None,
        generation: None,
        nr_regions: None,
        hydrated: None,
        blocks_checked: 0,
        unreadable: false,
        problems: Vec::new(),
    };
    let slots = match scan::read_superblocks(dev) {
        Ok(s) => s,
        Err(e) => {
            r.unreadable = true;
            r.problem(None, "superblocks".into(), format!("cannot read: {e}"));
            return r;
        }
    };
    r.blocks_checked = 2;
    for (i, s) in slots.iter().enumerate() {
        let loc = format!("superblock slot {i}");
        match s {
            Err(e) => r.problem(Some(i as u64), loc, e.to_string()),
            Ok(sb) => {
                if let Err(e) = check_geometry(sb, dev.size()) {
                    r.problem(Some(i as u64), loc, e);
                }
            }
        }
    }
    let Some(live) = scan::pick_superblock(&slots) else {
        return r;
    };
    let Ok(sb) = &slots[live] else { return r };
    if let Ok(other) = &slots[1 - live] {
        if !same_clone(sb, other) {
            r.problem(
                Some(1 - live as u64),
                format!("superblock slot {}", 1 - live),
                format!(
                    "describes a different clone or geometry than the live slot {live} \
                     (uuid {} vs {})",
                    other.uuid, sb.uuid
                ),
            );
        }
    }
    r.live_superblock = Some(live as u64);
    r.generation = Some(sb.generation);
    r.nr_regions = Some(sb.nr_regions);
    if check_geometry(sb, dev.size()).is_err() {
        // Geometry unusable: the bitmap area cannot be located reliably.
        return r;
    }
    let mut hydrated = 0u64;
    let mut problems = Vec::new();
    let nr_regions = sb.nr_regions;
    let sb_gen = sb.generation;
    let scanned = scan::scan_bitmap(
        dev,
        sb.nr_bitmap_blocks,
        &sb.uuid,
        |e, first| format!("cannot read bitmap blocks from {first}: {e}"),
        |pair| -> Result<(), String> {
            let mut gens = [None, None];
            for slot in 0..2u8 {
                let block = bitmap::slot_blocknr(pair.index, slot);
                let loc = format!(
                    "bitmap block {} slot {}",
                    pair.index,
                    bitmap::slot_name(slot)
                );
                match &pair.slots[slot as usize] {
                    Err(e) => problems.push((block, loc, e.to_string())),
                    Ok(h) if h.generation > sb_gen => problems.push((
                        block,
                        loc,
                        format!(
                            "generation {} is newer than the superblock's {sb_gen} (left by an \
                             interrupted commit; opening read-write rewrites it)",
                            h.generation
                        ),
                    )),
                    Ok(h) => gens[slot as usize] = Some(h.generation),
                }
            }
            let Some(l) = bitmap::choose_live(gens, sb_gen) else {
                problems.push((
                    bitmap::slot_blocknr(pair.index, 0),
                    format!("bitmap block {}", pair.index),
                    "no valid copy in either slot: the hydration state of its regions is lost"
                        .into(),
                ));
                return Ok(());
            };
            if gens[0] == gens[1] && pair.bytes[0][48..] != pair.bytes[1][48..] {
                problems.push((
                    bitmap::slot_blocknr(pair.index, 1),
                    format!("bitmap block {} slot B", pair.index),
                    "same generation as slot A but different contents".into(),
                ));
            }
            let block = pair.bytes[l as usize];
            let first_word = pair.index * WORDS_PER_BITMAP_BLOCK as u64;
            let mut stray = 0u32;
            for i in 0..WORDS_PER_BITMAP_BLOCK {
                let w = bitmap::payload_word(block, i);
                let m = valid_mask(nr_regions, first_word + i as u64);
                hydrated += (w & m).count_ones() as u64;
                stray += (w & !m).count_ones();
            }
            if stray != 0 {
                problems.push((
                    bitmap::slot_blocknr(pair.index, l),
                    format!("bitmap block {} slot {}", pair.index, bitmap::slot_name(l)),
                    format!(
                        "{stray} bit(s) set beyond the last region {}",
                        nr_regions - 1
                    ),
                ));
            }
            Ok(())
        },
    );
    r.blocks_checked += 2 * sb.nr_bitmap_blocks;
    for (block, loc, msg) in problems {
        r.problem(Some(block), loc, msg);
    }
    match scanned {
        Err(e) => {
            r.unreadable = true;
            r.problem(None, "bitmap".into(), e);
        }
        Ok(()) => {
            r.hydrated = Some(hydrated);
            if hydrated != sb.hydrated {
                r.problem(
                    Some(live as u64),
                    format!("superblock slot {live}"),
                    format!(
                        "records {} hydrated regions but the live bitmap has {hydrated}",
                        sb.hydrated
                    ),
                );
            }
        }
    }
    r
}

fn same_clone(a: &Superblock, b: &Superblock) -> bool {
    a.uuid == b.uuid
        && a.region_size == b.region_size
        && a.nr_regions == b.nr_regions
        && a.source_size == b.source_size
        && a.dest_size == b.dest_size
        && a.metadata_blocks == b.metadata_blocks
        && a.nr_bitmap_blocks == b.nr_bitmap_blocks
}
