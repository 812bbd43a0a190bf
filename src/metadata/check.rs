//! `check`: verifies every block of the metadata without writing, collecting every finding.
//!
//! Findings are of two kinds (like thin_check and e2fsck): **problems** are damage (exit 1);
//! **notes** are what a write cut by a crash leaves by design and a read-write open repairs
//! (`metadata-format/SPEC.md` §4.4): a non-live bitmap slot newer than the superblock or
//! torn, a torn superblock copy next to a valid one. They do not make the metadata
//! unhealthy (exit 0).
//!
//! Invariant: `check` never stops at the first finding (only an unreadable device stops it)
//! and every finding names the block it was found in, when there is one.

use super::bitmap::{self, BitmapSlotError, WORDS_PER_BITMAP_BLOCK};
use super::format::{check_geometry, valid_mask};
use super::scan::{self, Pair};
use super::superblock::{SlotError, Superblock};
use crate::io::BlockDev;
use serde::Serialize;
use std::fmt;
use std::io;

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
    let Some((live, sb)) = check_superblocks(dev, &mut r) else {
        return r;
    };
    r.live_superblock = Some(live as u64);
    r.generation = Some(sb.generation);
    r.nr_regions = Some(sb.nr_regions);
    if check_geometry(&sb, dev.size()).is_err() {
        // Geometry unusable: the bitmap area cannot be located reliably.
        return r;
    }
    check_bitmap(dev, &sb, live, &mut r);
    r
}

/// Checks both superblock slots; returns the live one (slot and contents), if any.
fn check_superblocks(dev: &dyn BlockDev, r: &mut CheckReport) -> Option<(usize, Superblock)> {
    let slots = match scan::read_superblocks(dev) {
        Ok(s) => s,
        Err(e) => {
            r.unreadable = true;
            r.problem(None, "superblocks".into(), format!("cannot read: {e}"));
            return None;
        }
    };
    r.blocks_checked = 2;
    let live = scan::pick_superblock(&slots);
    for (i, s) in slots.iter().enumerate() {
        let loc = format!("superblock slot {i}");
        match (s, live) {
            // A torn write of the next superblock (`metadata-format/SPEC.md` §4.4): open uses
            // the other copy and a read-write open overwrites this one with its next
            // generation. A bit flip in the newest copy looks the same; only the absence of a
            // crash tells them apart.
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
                    r.problem(Some(i as u64), loc, e.to_string());
                }
            }
        }
    }
    let live = live?;
    let Ok(sb) = &slots[live] else { return None };
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
    Some((live, sb.clone()))
}

/// The bitmap area could not be read (the device is then reported unreadable).
#[derive(Debug, thiserror::Error)]
#[error("cannot read bitmap blocks from {first}: {error}")]
struct BitmapUnreadable {
    first: u64,
    #[source]
    error: io::Error,
}

/// Checks every bitmap block of the clone described by `sb` (live in superblock slot
/// `live`), and that the superblock's hydrated count matches the live bitmap.
fn check_bitmap(dev: &dyn BlockDev, sb: &Superblock, live: usize, r: &mut CheckReport) {
    let mut hydrated = 0u64;
    let scanned = scan::scan_bitmap(
        dev,
        sb.nr_bitmap_blocks,
        &sb.uuid,
        |error, first| BitmapUnreadable { first, error },
        |pair| {
            hydrated += check_pair(&pair, sb, r);
            Ok(())
        },
    );
    r.blocks_checked += 2 * sb.nr_bitmap_blocks;
    match scanned {
        Err(e) => {
            r.unreadable = true;
            r.problem(None, "bitmap".into(), e.to_string());
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
}

/// Block number and location name of slot `slot` of bitmap block `index`.
fn slot_at(index: u64, slot: u8) -> (u64, String) {
    (
        bitmap::slot_blocknr(index, slot),
        format!("bitmap block {index} slot {}", bitmap::slot_name(slot)),
    )
}

/// Checks both slots of one bitmap block; returns the hydrated regions of its live copy
/// (0 when it has none).
fn check_pair(pair: &Pair<'_>, sb: &Superblock, r: &mut CheckReport) -> u64 {
    let sb_gen = sb.generation;
    // Copies this superblock can use: valid, and not newer than it.
    let gens = [0, 1].map(|slot| match &pair.slots[slot] {
        Ok(h) if h.generation <= sb_gen => Some(h.generation),
        _ => None,
    });
    let Some(l) = bitmap::choose_live(gens, sb_gen) else {
        for slot in 0..2u8 {
            let (block, loc) = slot_at(pair.index, slot);
            let why = match &pair.slots[slot as usize] {
                Err(e) => e.to_string(),
                Ok(h) => format!(
                    "generation {} is newer than the superblock's {sb_gen}",
                    h.generation
                ),
            };
            r.problem(Some(block), loc, why);
        }
        r.problem(
            Some(bitmap::slot_blocknr(pair.index, 0)),
            format!("bitmap block {}", pair.index),
            "no valid copy in either slot: the hydration state of its regions is lost".into(),
        );
        return 0;
    };
    check_other_slot(pair, l, gens[l as usize].unwrap_or(0), sb_gen, r);
    if gens[0] == gens[1] && pair.bytes[0][48..] != pair.bytes[1][48..] {
        r.problem(
            Some(bitmap::slot_blocknr(pair.index, 1)),
            format!("bitmap block {} slot B", pair.index),
            "same generation as slot A but different contents".into(),
        );
    }
    count_live_bits(pair, l, sb.nr_regions, r)
}

/// Checks the slot that is not live (`l` is): a copy newer than the superblock or torn by
/// a crash is a note; other damage is a problem.
fn check_other_slot(pair: &Pair<'_>, l: u8, live_gen: u64, sb_gen: u64, r: &mut CheckReport) {
    let other = 1 - l;
    let (block, loc) = slot_at(pair.index, other);
    match &pair.slots[other as usize] {
        Ok(h) if h.generation > sb_gen => r.note(
            Some(block),
            loc,
            format!(
                "generation {} is newer than the superblock's {sb_gen}: left by a \
                 commit cut before its superblock; ignored, and a read-write open \
                 rewrites it",
                h.generation
            ),
        ),
        Ok(_) => {}
        Err(e @ BitmapSlotError::Checksum { .. }) => {
            // Writes to a non-live slot are a commit's shadow (generation above the
            // superblock's) or a copy of the live block (its generation); the slot's
            // old contents are older than the live copy. A torn write therefore
            // leaves a header generation above the superblock's or not above the
            // live copy's. One in between may have been the live copy itself.
            let raw = bitmap::BitmapHeader::unpack(pair.bytes[other as usize]).generation;
            if raw > sb_gen || raw <= live_gen {
                r.note(
                    Some(block),
                    loc,
                    format!(
                        "{e}: probably a write cut by a crash; the live copy is slot {} \
                         (generation {live_gen}), and a read-write open rewrites this one",
                        bitmap::slot_name(l)
                    ),
                );
            } else {
                r.problem(
                    Some(block),
                    loc,
                    format!(
                        "{e}; its header says generation {raw}, newer than the copy in \
                         use (slot {}, generation {live_gen}): this was probably the \
                         live copy, and hydration state committed since generation \
                         {live_gen} may be lost",
                        bitmap::slot_name(l)
                    ),
                );
            }
        }
        Err(e) => r.problem(Some(block), loc, e.to_string()),
    }
}

/// Counts the hydrated regions in live slot `l`; bits set beyond the last region are a
/// problem.
fn count_live_bits(pair: &Pair<'_>, l: u8, nr_regions: u64, r: &mut CheckReport) -> u64 {
    let block = pair.bytes[l as usize];
    let first_word = pair.index * WORDS_PER_BITMAP_BLOCK as u64;
    let mut hydrated = 0u64;
    let mut stray = 0u32;
    for i in 0..WORDS_PER_BITMAP_BLOCK {
        let w = bitmap::payload_word(block, i);
        let m = valid_mask(nr_regions, first_word + i as u64);
        hydrated += (w & m).count_ones() as u64;
        stray += (w & !m).count_ones();
    }
    if stray != 0 {
        let (block, loc) = slot_at(pair.index, l);
        r.problem(
            Some(block),
            loc,
            format!(
                "{stray} bit(s) set beyond the last region {}",
                nr_regions - 1
            ),
        );
    }
    hydrated
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
