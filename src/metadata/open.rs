//! Opening existing metadata: picking the superblock, checking it against what the caller
//! expects, loading the bitmap into core and, for a read-write open, repairing bitmap slots.
//!
//! Invariants:
//! - the superblock used is the valid slot with the highest generation; the live copy of
//!   each bitmap block is the valid slot with the highest generation not above it;
//! - a read-only open never writes;
//! - a read-write open makes its slot repairs durable before it writes the superblock one
//!   generation newer (flagged not clean), so that superblock can never make current a slot
//!   left by an interrupted commit.

use super::bitmap::{self, BitmapHeader, BitmapSlotError, WORDS_PER_BITMAP_BLOCK};
use super::checksum::BLOCK_SIZE;
use super::error::{io_err, MetadataError, Result};
use super::fingerprint::{hex, source_fingerprint};
use super::format::{check_geometry, valid_mask};
use super::incore::{Core, LiveSlot};
use super::scan::{self, Pair};
use super::superblock::{
    self, MetadataMode, SlotError, Superblock, FLAG_CLEAN_SHUTDOWN, FORMAT_VERSION,
};
use super::Metadata;
use crate::io::BlockDev;
use serde::Serialize;
use std::io;
use std::sync::Arc;

/// What [`Metadata::open`] checks the metadata against. `None` fields are not checked.
#[derive(Clone, Debug, Default)]
pub struct Expect {
    /// `None`: take the region size from disk.
    pub region_size: Option<u64>,
    pub source_size: Option<u64>,
    pub dest_size: Option<u64>,
    pub source_fingerprint: Option<[u8; 32]>,
    /// Open even if the source fingerprint differs (the new one is then recorded).
    pub ignore_source_mismatch: bool,
}

impl Expect {
    /// Expect the given source and destination devices (computes the source fingerprint).
    pub fn from_devices(source: &dyn BlockDev, dest: &dyn BlockDev) -> io::Result<Expect> {
        Ok(Expect {
            region_size: None,
            source_size: Some(source.size()),
            dest_size: Some(dest.size()),
            source_fingerprint: Some(source_fingerprint(source)?),
            ignore_source_mismatch: false,
        })
    }
}

/// What open found and did. Warnings are things a user should hear about (a corrupt
/// superblock copy, repaired bitmap slots, an overridden source mismatch).
#[derive(Clone, Debug, Serialize)]
pub struct OpenReport {
    /// Superblock slot the metadata was loaded from.
    pub superblock_slot: u64,
    /// Generation loaded from disk.
    pub loaded_generation: u64,
    /// Generation after open (one more when opened read-write).
    pub generation: u64,
    /// True when the other superblock copy was unusable.
    pub fell_back: bool,
    /// The previous shutdown was clean.
    pub was_clean: bool,
    pub mode: MetadataMode,
    pub mode_reason: String,
    pub hydrated: u64,
    /// Bitmap slots rewritten by a read-write open (torn or left by an interrupted commit).
    pub repaired_slots: Vec<String>,
    pub warnings: Vec<String>,
}

impl Metadata {
    /// Opens the metadata read-write, checking it against `expect`. Before returning it
    /// rewrites bitmap slots that are torn or were left by an interrupted commit, and then
    /// makes durable a superblock one generation newer with the clean-shutdown flag cleared.
    pub fn open(dev: Arc<dyn BlockDev>, expect: &Expect) -> Result<(Metadata, OpenReport)> {
        Self::load(dev, Some(expect), true)
    }

    /// Opens the metadata without ever writing (for check, dump, inspection). Commits and
    /// mode changes are refused.
    pub fn read_only_open(dev: Arc<dyn BlockDev>) -> Result<(Metadata, OpenReport)> {
        Self::load(dev, None, false)
    }

    fn load(
        dev: Arc<dyn BlockDev>,
        expect: Option<&Expect>,
        writable: bool,
    ) -> Result<(Metadata, OpenReport)> {
        let name = dev.name().to_string();
        let mut warnings = Vec::new();
        let picked = pick_superblock(&*dev, &mut warnings)?;
        let mut sb = picked.sb;
        if let Some(x) = expect {
            check_expect(&name, &mut sb, x, &mut warnings)?;
        }
        let loaded = load_bitmap(&*dev, &sb, writable, &mut warnings)?;
        let hydrated: u64 = loaded.live.iter().map(|l| l.count as u64).sum();
        if hydrated != sb.hydrated {
            warnings.push(format!(
                "superblock records {} hydrated regions but the bitmap has {hydrated}; using \
                 the bitmap",
                sb.hydrated
            ));
            sb.hydrated = hydrated;
        }
        let loaded_generation = sb.generation;
        let was_clean = sb.is_clean();
        let repaired_slots = loaded.repairs.iter().map(Repair::describe).collect();
        let core = Core::new(dev, writable, sb.clone(), loaded.words, loaded.live);
        if writable {
            repair_slots(&core, &loaded.repairs)?;
            start_generation(&core, &sb)?;
        }
        let generation = core.state.lock().sb.generation;
        let report = OpenReport {
            superblock_slot: picked.slot as u64,
            loaded_generation,
            generation,
            fell_back: picked.fell_back,
            was_clean,
            mode: sb.mode,
            mode_reason: sb.mode_reason.clone(),
            hydrated,
            repaired_slots: if writable { repaired_slots } else { Vec::new() },
            warnings,
        };
        let core = Arc::new(core);
        Ok((Metadata { core }, report))
    }
}

/// The superblock open uses.
struct Picked {
    sb: Superblock,
    /// The slot it was read from.
    slot: usize,
    /// The other copy was unusable.
    fell_back: bool,
}

/// Reads both superblock slots and picks the one to use: the valid one with the highest
/// generation, whose geometry must agree with itself and the device. Warns about the other
/// copy when it is unusable or describes another clone.
fn pick_superblock(dev: &dyn BlockDev, warnings: &mut Vec<String>) -> Result<Picked> {
    let name = dev.name();
    if dev.size() < 2 * BLOCK_SIZE as u64 {
        return Err(MetadataError::BadMagic {
            dev: name.to_string(),
            details: format!("the device has only {} bytes", dev.size()),
        });
    }
    let slots = scan::read_superblocks(dev).map_err(io_err(name, "reading the superblocks"))?;
    let Some(live) = scan::pick_superblock(&slots) else {
        return Err(no_superblock_error(name, &slots));
    };
    let sb = match &slots[live] {
        Ok(sb) => sb.clone(),
        Err(_) => return Err(no_superblock_error(name, &slots)),
    };
    let mut fell_back = false;
    match &slots[1 - live] {
        Err(e) => {
            fell_back = true;
            warnings.push(format!(
                "superblock copy in block {} is unusable ({e}); using the copy in block \
                 {live} (generation {})",
                1 - live,
                sb.generation
            ));
        }
        Ok(other) if other.uuid != sb.uuid || other.nr_regions != sb.nr_regions => {
            warnings.push(format!(
                "superblock copy in block {} belongs to another clone or geometry; using \
                 block {live}",
                1 - live
            ));
        }
        Ok(_) => {}
    }
    check_geometry(&sb, dev.size()).map_err(|what| MetadataError::Corrupt {
        dev: name.to_string(),
        what: format!("superblock generation {}: {what}", sb.generation),
    })?;
    Ok(Picked {
        sb,
        slot: live,
        fell_back,
    })
}

/// Turns two unusable superblock slots into the most helpful error.
pub(crate) fn no_superblock_error(
    dev: &str,
    slots: &[std::result::Result<Superblock, SlotError>; 2],
) -> MetadataError {
    let errs: Vec<&SlotError> = slots.iter().filter_map(|s| s.as_ref().err()).collect();
    if let Some(SlotError::BadVersion(v)) =
        errs.iter().find(|e| matches!(e, SlotError::BadVersion(_)))
    {
        return MetadataError::UnsupportedVersion {
            dev: dev.to_string(),
            found: *v,
            supported: FORMAT_VERSION,
        };
    }
    let details = format!("block 0: {}; block 1: {}", errs[0], errs[errs.len() - 1]);
    if errs.iter().all(|e| matches!(e, SlotError::BadMagic(_))) {
        MetadataError::BadMagic {
            dev: dev.to_string(),
            details,
        }
    } else if errs.iter().any(|e| matches!(e, SlotError::Checksum { .. })) {
        MetadataError::ChecksumMismatch {
            dev: dev.to_string(),
            what: format!("both superblock copies ({details})"),
        }
    } else {
        MetadataError::Corrupt {
            dev: dev.to_string(),
            what: format!("no usable superblock ({details})"),
        }
    }
}

/// Checks `sb` against what the caller expects. A differing source fingerprint is only a
/// warning with `ignore_source_mismatch`, and the new fingerprint is then recorded in `sb`.
pub(crate) fn check_expect(
    name: &str,
    sb: &mut Superblock,
    x: &Expect,
    warnings: &mut Vec<String>,
) -> Result<()> {
    if let Some(rs) = x.region_size {
        if rs != sb.region_size {
            return Err(MetadataError::RegionSizeMismatch {
                dev: name.to_string(),
                on_disk: sb.region_size,
                asked: rs,
            });
        }
    }
    let sizes = [
        ("source", sb.source_size, x.source_size),
        ("destination", sb.dest_size, x.dest_size),
    ];
    for (which, expected, actual) in sizes {
        if let Some(actual) = actual.filter(|a| *a != expected) {
            return Err(MetadataError::SizeMismatch {
                dev: name.to_string(),
                which,
                expected,
                actual,
            });
        }
    }
    if let Some(fp) = x.source_fingerprint {
        if fp != sb.source_fingerprint {
            if !x.ignore_source_mismatch {
                return Err(MetadataError::SourceMismatch {
                    dev: name.to_string(),
                    recorded: hex(&sb.source_fingerprint),
                    found: hex(&fp),
                });
            }
            warnings.push(format!(
                "the source fingerprint differs (recorded {}, found {}); continuing because \
                 of --ignore-source-mismatch and recording the new one",
                hex(&sb.source_fingerprint),
                hex(&fp)
            ));
            sb.source_fingerprint = fp;
        }
    }
    Ok(())
}

/// A bitmap slot a read-write open rewrites with the live copy of its block: it is torn,
/// or holds a generation newer than the superblock (left by an interrupted commit).
struct Repair {
    index: u64,
    slot: u8,
    /// The live copy, re-stamped for `slot`.
    image: Vec<u8>,
}

impl Repair {
    /// The slot, for [`OpenReport::repaired_slots`].
    fn describe(&self) -> String {
        format!(
            "bitmap block {} slot {} (block {})",
            self.index,
            bitmap::slot_name(self.slot),
            bitmap::slot_blocknr(self.index, self.slot)
        )
    }
}

/// The bitmap as read from disk.
struct LoadedBitmap {
    /// The live copies' words, bits beyond the last region cleared.
    words: Vec<u64>,
    live: Vec<LiveSlot>,
    /// Only collected for a read-write open.
    repairs: Vec<Repair>,
}

/// Reads every bitmap block's pair of slots and keeps the live copy of each. Fails when a
/// block has no usable copy.
fn load_bitmap(
    dev: &dyn BlockDev,
    sb: &Superblock,
    writable: bool,
    warnings: &mut Vec<String>,
) -> Result<LoadedBitmap> {
    let name = dev.name();
    let nbb = sb.nr_bitmap_blocks;
    let mut loaded = LoadedBitmap {
        words: Vec::with_capacity(nbb as usize * WORDS_PER_BITMAP_BLOCK),
        live: Vec::with_capacity(nbb as usize),
        repairs: Vec::new(),
    };
    let map_io =
        |e: io::Error, first: u64| io_err(name, format!("reading bitmap blocks from {first}"))(e);
    scan::scan_bitmap(dev, nbb, &sb.uuid, map_io, |pair| {
        loaded.add_pair(&pair, name, sb, writable, warnings)
    })?;
    Ok(loaded)
}

impl LoadedBitmap {
    /// Takes the live copy of one bitmap block, and notes its other slot for repair when it
    /// is unusable or newer than the superblock.
    fn add_pair(
        &mut self,
        pair: &Pair<'_>,
        name: &str,
        sb: &Superblock,
        writable: bool,
        warnings: &mut Vec<String>,
    ) -> Result<()> {
        let sb_gen = sb.generation;
        let gens = [0, 1].map(|slot| pair.slots[slot].as_ref().ok().map(|h| h.generation));
        let Some(l) = bitmap::choose_live(gens, sb_gen) else {
            return Err(no_live_copy_error(name, pair, sb_gen));
        };
        let block = pair.bytes[l as usize];
        let first_word = pair.index * WORDS_PER_BITMAP_BLOCK as u64;
        let mut count = 0u32;
        let mut masked = false;
        for i in 0..WORDS_PER_BITMAP_BLOCK {
            let raw = bitmap::payload_word(block, i);
            let w = raw & valid_mask(sb.nr_regions, first_word + i as u64);
            masked |= w != raw;
            count += w.count_ones();
            self.words.push(w);
        }
        if masked {
            warnings.push(format!(
                "bitmap block {} has bits set beyond the last region; ignored them",
                pair.index
            ));
        }
        self.live.push(LiveSlot {
            slot: l,
            generation: gens[l as usize].unwrap_or(0),
            count,
        });
        let other = 1 - l;
        let needs_repair = match &pair.slots[other as usize] {
            Err(_) => true,
            Ok(h) => h.generation > sb_gen,
        };
        if needs_repair && writable {
            let mut image = block.to_vec();
            let mut h = BitmapHeader::unpack(block);
            h.blocknr = bitmap::slot_blocknr(pair.index, other);
            h.pack_into(&mut image);
            self.repairs.push(Repair {
                index: pair.index,
                slot: other,
                image,
            });
        }
        Ok(())
    }
}

/// The error for a bitmap block with no usable copy: a checksum mismatch when a slot failed
/// its checksum, otherwise corruption.
fn no_live_copy_error(name: &str, pair: &Pair<'_>, sb_gen: u64) -> MetadataError {
    let why = |s: &std::result::Result<BitmapHeader, BitmapSlotError>| match s {
        Ok(h) => format!(
            "generation {} is newer than the superblock's {sb_gen}",
            h.generation
        ),
        Err(e) => e.to_string(),
    };
    let what = format!(
        "bitmap block {} (slot A in block {}: {}; slot B in block {}: {})",
        pair.index,
        bitmap::slot_blocknr(pair.index, 0),
        why(&pair.slots[0]),
        bitmap::slot_blocknr(pair.index, 1),
        why(&pair.slots[1])
    );
    if pair
        .slots
        .iter()
        .any(|s| matches!(s, Err(BitmapSlotError::Checksum { .. })))
    {
        MetadataError::ChecksumMismatch {
            dev: name.to_string(),
            what,
        }
    } else {
        MetadataError::Corrupt {
            dev: name.to_string(),
            what: format!("no valid copy of {what}"),
        }
    }
}

/// Writes every repair and flushes. Repairs must be durable before a newer superblock could
/// make a slot left by an interrupted commit (generation above the superblock's) current.
fn repair_slots(core: &Core, repairs: &[Repair]) -> Result<()> {
    if repairs.is_empty() {
        return Ok(());
    }
    let name = core.name();
    for r in repairs {
        core.dev
            .write_at(
                &r.image,
                bitmap::slot_blocknr(r.index, r.slot) * BLOCK_SIZE as u64,
            )
            .map_err(io_err(name, format!("repairing bitmap block {}", r.index)))?;
    }
    core.dev
        .flush()
        .map_err(io_err(name, "flushing repaired bitmap blocks"))
}

/// Makes durable the superblock one generation after `sb`, flagged not clean (the clone is
/// in use), and adopts it in core.
fn start_generation(core: &Core, sb: &Superblock) -> Result<()> {
    let mut next = sb.clone();
    next.generation += 1;
    next.blocknr = next.generation % superblock::SUPERBLOCK_SLOTS;
    next.flags &= !FLAG_CLEAN_SHUTDOWN;
    core.write_superblock(&next)?;
    core.state.lock().sb = next;
    Ok(())
}
