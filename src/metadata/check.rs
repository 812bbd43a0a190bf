//! `check`: verifies every block of the metadata without writing, collecting every finding.
//!
//! Findings are of two kinds (like thin_check and e2fsck): **problems** are damage (exit 1);
//! **notes** are what a write cut by a crash leaves by design and a read-write open repairs
//! (SPEC.md §4.4): a non-live bitmap slot newer than the superblock or torn, a torn
//! superblock copy next to a valid one. They do not make the metadata unhealthy (exit 0).
//!
//! Invariant: `check` never stops at the first finding (only an unreadable device stops it)
//! and every finding names the block it was found in, when there is one.

use super::bitmap::{self, BitmapSlotError, WORDS_PER_BITMAP_BLOCK};
use super::scan;
use super::superblock::{SlotError, Superblock};
use super::{check_geometry, valid_mask};
use crate::io::BlockDev;
use serde::Serialize;
use std::fmt;

/// One finding of [`check`]: a problem (damage) or a note (repaired by opening).
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
    /// Damage: the metadata is not what any (interrupted) sequence of writes leaves.
    pub problems: Vec<Problem>,
    /// Left by a write cut by a crash, by design; ignored by open, and a read-write open
    /// rewrites them. Not damage.
    pub notes: Vec<Problem>,
}

impl CheckReport {
    /// No damage (notes allowed) and the device was readable.
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty() && !self.unreadable
    }

    /// Exit status of `ublk-clone check`: 0 healthy (notes allowed), 1 damage, 2 unreadable.
    pub fn exit_code(&self) -> u8 {
        if self.unreadable {
            2
        } else if self.is_healthy() {
            0
        } else {
            1
        }
    }

    fn problem(&mut self, block: Option<u64>, location: String, message: String) {
        self.problems.push(Problem {
            block,
            location,
            message,
        });
    }

    fn note(&mut self, block: Option<u64>, location: String, message: String) {
        self.notes.push(Problem {
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
            writeln!(f, "no problems found")?;
        } else {
            writeln!(f, "{} problem(s):", self.problems.len())?;
            for p in &self.problems {
                writeln!(f, "  {p}")?;
            }
        }
        if !self.notes.is_empty() {
            writeln!(
                f,
                "{} note(s) (left by a write cut by a crash; not damage, a read-write open \
                 repairs them):",
                self.notes.len()
            )?;
            for n in &self.notes {
                writeln!(f, "  {n}")?;
            }
        }
        Ok(())
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
        notes: Vec::new(),
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
    let live = scan::pick_superblock(&slots);
    for (i, s) in slots.iter().enumerate() {
        let loc = format!("superblock slot {i}");
        match (s, live) {
            // A torn write of the next superblock (SPEC.md §4.4): open uses the other copy
            // and a read-write open overwrites this one with its next generation. A bit flip
            // in the newest copy looks the same; only the absence of a crash tells them apart.
            (Err(e @ SlotError::Checksum { .. }), Some(l)) => {
                let g = slots[l].as_ref().map(|sb| sb.generation).unwrap_or(0);
                r.note(
                    Some(i as u64),
                    loc,
                    format!(
                        "{e}: probably a superblock write cut by a crash; the copy in block {l} \
                         (generation {g}) is in use and a read-write open overwrites this \
                         one (without a crash, this is corruption and the newest commit may \
                         be lost)"
                    ),
                );
            }
            (Err(e), _) => r.problem(Some(i as u64), loc, e.to_string()),
            (Ok(sb), _) => {
                if let Err(e) = check_geometry(sb, dev.size()) {
                    r.problem(Some(i as u64), loc, e);
                }
            }
        }
    }
    let Some(live) = live else {
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
    let mut notes = Vec::new();
    let nr_regions = sb.nr_regions;
    let sb_gen = sb.generation;
    let scanned = scan::scan_bitmap(
        dev,
        sb.nr_bitmap_blocks,
        &sb.uuid,
        |e, first| format!("cannot read bitmap blocks from {first}: {e}"),
        |pair| -> Result<(), String> {
            let at = |slot: u8| {
                (
                    bitmap::slot_blocknr(pair.index, slot),
                    format!(
                        "bitmap block {} slot {}",
                        pair.index,
                        bitmap::slot_name(slot)
                    ),
                )
            };
            // Copies this superblock can use: valid, and not newer than it.
            let gens = [0, 1].map(|slot| match &pair.slots[slot] {
                Ok(h) if h.generation <= sb_gen => Some(h.generation),
                _ => None,
            });
            let Some(l) = bitmap::choose_live(gens, sb_gen) else {
                for slot in 0..2u8 {
                    let (block, loc) = at(slot);
                    let why = match &pair.slots[slot as usize] {
                        Err(e) => e.to_string(),
                        Ok(h) => format!(
                            "generation {} is newer than the superblock's {sb_gen}",
                            h.generation
                        ),
                    };
                    problems.push((block, loc, why));
                }
                problems.push((
                    bitmap::slot_blocknr(pair.index, 0),
                    format!("bitmap block {}", pair.index),
                    "no valid copy in either slot: the hydration state of its regions is lost"
                        .into(),
                ));
                return Ok(());
            };
            let other = 1 - l;
            let live_gen = gens[l as usize].unwrap_or(0);
            let (block, loc) = at(other);
            match &pair.slots[other as usize] {
                Ok(h) if h.generation > sb_gen => notes.push((
                    block,
                    loc,
                    format!(
                        "generation {} is newer than the superblock's {sb_gen}: left by a \
                         commit cut before its superblock; ignored, and a read-write open \
                         rewrites it",
                        h.generation
                    ),
                )),
                Ok(_) => {}
                Err(e @ BitmapSlotError::Checksum { .. }) => {
                    // Writes to a non-live slot are a commit's shadow (generation above the
                    // superblock's) or a copy of the live block (its generation); the slot's
                    // old contents are older than the live copy. A torn write therefore
                    // leaves a header generation above the superblock's or not above the
                    // live copy's. One in between may have been the live copy itself.
                    let raw = bitmap::BitmapHeader::unpack(pair.bytes[other as usize]).generation;
                    if raw > sb_gen || raw <= live_gen {
                        notes.push((
                            block,
                            loc,
                            format!(
                                "{e}: probably a write cut by a crash; the live copy is slot {} \
                                 (generation {live_gen}), and a read-write open rewrites this one",
                                bitmap::slot_name(l)
                            ),
                        ));
                    } else {
                        problems.push((
                            block,
                            loc,
                            format!(
                                "{e}; its header says generation {raw}, newer than the copy in \
                                 use (slot {}, generation {live_gen}): this was probably the \
                                 live copy, and hydration state committed since generation \
                                 {live_gen} may be lost",
                                bitmap::slot_name(l)
                            ),
                        ));
                    }
                }
                Err(e) => problems.push((block, loc, e.to_string())),
            }
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
    for (block, loc, msg) in notes {
        r.note(Some(block), loc, msg);
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
