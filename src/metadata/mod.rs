//! Clone metadata: the on-disk format (specified in `metadata-format/SPEC.md`), opening and
//! formatting it, the in-core hydrated-region bitmap and the two-phase commit protocol.
//!
//! Owns the metadata device. Invariants:
//! - a region's bit is only ever set, never cleared, and is set in core only after its data
//!   write to the destination completed (the engine's side of the contract);
//! - the on-disk bitmap a durable superblock refers to only contains bits whose data was
//!   covered by a completed destination flush (the commit protocol in [`commit`]);
//! - the live copy of every bitmap block and the superblock it belongs to are never
//!   overwritten before the superblock that supersedes them is durable.

pub mod bitmap;
pub mod check;
pub mod checksum;
pub mod commit;
pub mod dump;
pub mod error;
pub mod overwrite;
mod scan;
pub mod superblock;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vectors;

pub use check::{check, CheckReport, Problem};
pub use commit::{flush_destination, CommitInfo, DestinationFlushed, FrozenCommit, ShadowsDurable};
pub use dump::{dump, DumpOutput};
pub use error::{MetadataError, Result};
pub use superblock::{MetadataMode, Superblock};

use crate::io::BlockDev;
use bitmap::{BitmapSlotError, REGIONS_PER_BITMAP_BLOCK, WORDS_PER_BITMAP_BLOCK};
use checksum::BLOCK_SIZE;
use error::io_err;
use parking_lot::Mutex;
use serde::Serialize;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use superblock::{SlotError, FLAG_CLEAN_SHUTDOWN, FORMAT_VERSION, SUPERBLOCK_MAGIC};
use uuid::Uuid;

/// Smallest region size (one metadata block's worth of data, one page).
pub const MIN_REGION_SIZE: u64 = 4096;
/// Largest region size.
pub const MAX_REGION_SIZE: u64 = 1 << 30;
/// Most regions one clone may have: 2^36 (256 TiB at 4 KiB regions; an 8 GiB in-core bitmap).
pub const MAX_REGIONS: u64 = 1 << 36;
/// Blocks sampled by [`source_fingerprint`].
pub const FINGERPRINT_SAMPLES: u64 = 64;
/// Size of each fingerprint sample.
pub const FINGERPRINT_SAMPLE_SIZE: u64 = 4096;

/// Checks that `size` is a power of two in `[MIN_REGION_SIZE, MAX_REGION_SIZE]`.
pub fn validate_region_size(size: u64) -> Result<()> {
    if size.is_power_of_two() && (MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(MetadataError::BadRegionSize { size })
    }
}

/// Number of regions of a clone of `source_size` bytes, after validating both values.
pub fn nr_regions_for(source_size: u64, region_size: u64) -> Result<u64> {
    validate_region_size(region_size)?;
    if source_size == 0 {
        return Err(MetadataError::EmptySource);
    }
    let nr_regions = source_size.div_ceil(region_size);
    if nr_regions > MAX_REGIONS {
        return Err(MetadataError::TooManyRegions {
            source_size,
            region_size,
            nr_regions,
            max: MAX_REGIONS,
        });
    }
    Ok(nr_regions)
}

/// Metadata blocks needed for `nr_regions` regions: two superblock slots plus two slots per
/// bitmap block.
pub fn required_blocks(nr_regions: u64) -> u64 {
    superblock::SUPERBLOCK_SLOTS + bitmap::BITMAP_SLOTS * bitmap::bitmap_blocks(nr_regions)
}

/// Bytes of metadata device needed for a clone of `dev_size` bytes in `region_size` regions.
pub fn required_size(region_size: u64, dev_size: u64) -> Result<u64> {
    Ok(required_blocks(nr_regions_for(dev_size, region_size)?) * BLOCK_SIZE as u64)
}

/// A cheap, stable identity of a source device: 8 little-endian crc32c lanes over the
/// device size and 64 samples of 4 KiB spread evenly over the device (sample `k` feeds
/// lane `k % 8`, each sample prefixed by its offset). It detects a different or rewritten
/// source attached by mistake; it is not a cryptographic hash.
pub fn source_fingerprint(dev: &dyn BlockDev) -> io::Result<[u8; 32]> {
    let size = dev.size();
    let mut lanes = [0u32; 8];
    for lane in lanes.iter_mut() {
        *lane = crc32c::crc32c(&size.to_le_bytes());
    }
    let sample = FINGERPRINT_SAMPLE_SIZE.min(size);
    let mut buf = vec![0u8; sample as usize];
    let span = size - sample;
    for k in 0..FINGERPRINT_SAMPLES {
        let offset = if FINGERPRINT_SAMPLES > 1 {
            ((span as u128 * k as u128 / (FINGERPRINT_SAMPLES - 1) as u128) as u64)
                / FINGERPRINT_SAMPLE_SIZE
                * FINGERPRINT_SAMPLE_SIZE
        } else {
            0
        };
        dev.read_at(&mut buf, offset)?;
        let lane = &mut lanes[(k % 8) as usize];
        *lane = crc32c::crc32c_append(*lane, &offset.to_le_bytes());
        *lane = crc32c::crc32c_append(*lane, &buf);
    }
    let mut out = [0u8; 32];
    for (i, l) in lanes.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&l.to_le_bytes());
    }
    Ok(out)
}

/// Lower-case hex of a fingerprint, for messages and JSON.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`Metadata::format`] records.
#[derive(Clone, Debug)]
pub struct FormatParams {
    pub region_size: u64,
    pub source_size: u64,
    pub dest_size: u64,
    pub source_fingerprint: [u8; 32],
    /// Name of the destination device, for messages.
    pub dest_name: String,
    /// `None`: a random (v4) UUID.
    pub uuid: Option<Uuid>,
}

impl FormatParams {
    /// Parameters for cloning `source` onto `dest` (computes the source fingerprint).
    pub fn from_devices(
        source: &dyn BlockDev,
        dest: &dyn BlockDev,
        region_size: u64,
    ) -> io::Result<FormatParams> {
        Ok(FormatParams {
            region_size,
            source_size: source.size(),
            dest_size: dest.size(),
            source_fingerprint: source_fingerprint(source)?,
            dest_name: dest.name().to_string(),
            uuid: None,
        })
    }
}

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

/// Where the live copy of a bitmap block is, and how many bits it has set.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LiveSlot {
    pub slot: u8,
    pub generation: u64,
    pub count: u32,
}

/// Mutable state changed only by commits (serialised by `Core::committing`).
pub(crate) struct State {
    /// The last durable superblock.
    pub sb: Superblock,
    pub live: Vec<LiveSlot>,
    /// Bitmap blocks whose non-live slot was written by a commit that failed: that slot
    /// must be rewritten before any later superblock makes its generation current.
    pub tainted: Vec<u64>,
}

pub(crate) struct Core {
    pub dev: Arc<dyn BlockDev>,
    pub writable: bool,
    pub nr_regions: u64,
    pub nr_bitmap_blocks: u64,
    /// In-core bitmap: `nr_bitmap_blocks * WORDS_PER_BITMAP_BLOCK` words. Emptied (and
    /// `released` set) once every region is hydrated and committed: from then on every
    /// region reads as hydrated without a lookup (dm-clone known issue #2). Readers go
    /// through [`Core::with_bitmap`], which decides "released" under the read lock.
    pub words: parking_lot::RwLock<Vec<AtomicU64>>,
    pub released: AtomicBool,
    /// No bit may be set any more: the clone is read-only after a failure and the in-core
    /// bitmap is the committed one (`revert_to_committed`, `seal`).
    pub sealed: AtomicBool,
    /// One bit per bitmap block changed since the last freeze.
    pub dirty: Vec<AtomicU64>,
    /// Bits set in `words`.
    pub hydrated: AtomicU64,
    /// A commit (or another superblock write) is in progress.
    pub committing: AtomicBool,
    pub state: Mutex<State>,
    /// Test-only: run by the bitmap readers right before they look a word up (after deciding
    /// that the bitmap is not released), so a test can release it from another thread there.
    #[cfg(test)]
    pub before_lookup: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Core {
    /// Runs `lookup` on the in-core bitmap words, or returns `None` once the bitmap is
    /// released (every region hydrated and committed). The one place that decides between
    /// the two: `release_bitmap_if_complete` empties the words under the write lock, so the
    /// decision is taken again while holding the read lock, and the words cannot be emptied
    /// until `lookup` returns. (Deciding before taking the lock let a reader preempted
    /// across the release index an empty vector and panic on a queue thread.)
    pub fn with_bitmap<T>(&self, lookup: impl FnOnce(&[AtomicU64]) -> T) -> Option<T> {
        // Fast path: `released` never goes back to false.
        if self.released.load(Ordering::Acquire) {
            return None;
        }
        let words = self.words.read();
        if self.released.load(Ordering::Acquire) {
            return None;
        }
        #[cfg(test)]
        self.before_lookup();
        Some(lookup(&words))
    }

    #[cfg(test)]
    fn before_lookup(&self) {
        let hook = self.before_lookup.lock().clone();
        if let Some(hook) = hook {
            hook();
        }
    }

    pub fn name(&self) -> &str {
        self.dev.name()
    }

    pub fn mark_dirty(&self, index: u64) {
        let w = &self.dirty[(index / 64) as usize];
        let bit = 1u64 << (index % 64);
        if w.load(Ordering::SeqCst) & bit == 0 {
            w.fetch_or(bit, Ordering::SeqCst);
        }
    }

    /// Writes `sb` to slot `generation % 2` and flushes the metadata device.
    pub fn write_superblock(&self, sb: &Superblock) -> Result<()> {
        let slot = sb.generation % superblock::SUPERBLOCK_SLOTS;
        self.dev
            .write_at(&sb.pack(), slot * BLOCK_SIZE as u64)
            .map_err(io_err(
                self.name(),
                format!(
                    "writing superblock generation {} to slot {slot}",
                    sb.generation
                ),
            ))?;
        self.dev.flush().map_err(io_err(
            self.name(),
            format!("flushing superblock generation {}", sb.generation),
        ))
    }
}

/// Open clone metadata: the in-core bitmap and the commit protocol (see [`commit`]).
pub struct Metadata {
    pub(crate) core: Arc<Core>,
}

/// Static superblock consistency: geometry and sizes agree with each other and the device.
pub(crate) fn check_geometry(sb: &Superblock, dev_size: u64) -> std::result::Result<(), String> {
    validate_region_size(sb.region_size).map_err(|e| e.to_string())?;
    let nr = nr_regions_for(sb.source_size, sb.region_size).map_err(|e| e.to_string())?;
    if nr != sb.nr_regions {
        return Err(format!(
            "nr_regions is {} but the source size {} in {}-byte regions needs {nr}",
            sb.nr_regions, sb.source_size, sb.region_size
        ));
    }
    if sb.dest_size < sb.source_size {
        return Err(format!(
            "destination size {} is smaller than the source size {}",
            sb.dest_size, sb.source_size
        ));
    }
    let nbb = bitmap::bitmap_blocks(nr);
    if sb.nr_bitmap_blocks != nbb
        || sb.bitmap_start != bitmap::BITMAP_START
        || sb.regions_per_bitmap_block as u64 != REGIONS_PER_BITMAP_BLOCK
        || sb.metadata_blocks != required_blocks(nr)
    {
        return Err(format!(
            "bitmap geometry (start {}, {} blocks of {} regions, {} metadata blocks) does not \
             match {nr} regions",
            sb.bitmap_start, sb.nr_bitmap_blocks, sb.regions_per_bitmap_block, sb.metadata_blocks
        ));
    }
    if sb.metadata_blocks * BLOCK_SIZE as u64 > dev_size {
        return Err(format!(
            "the device has {dev_size} bytes but the metadata needs {}",
            sb.metadata_blocks * BLOCK_SIZE as u64
        ));
    }
    if sb.hydrated > sb.nr_regions {
        return Err(format!(
            "hydrated count {} exceeds the {} regions",
            sb.hydrated, sb.nr_regions
        ));
    }
    Ok(())
}

/// Mask of the valid bits of in-core word `w` (bits beyond `nr_regions` are zero).
pub(crate) fn valid_mask(nr_regions: u64, w: u64) -> u64 {
    let first = w * 64;
    if first + 64 <= nr_regions {
        !0
    } else if first >= nr_regions {
        0
    } else {
        (1u64 << (nr_regions - first)) - 1
    }
}

/// Turns two unusable superblock slots into the most helpful error.
fn no_superblock_error(
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

impl Metadata {
    /// Formats `dev` for a clone described by `params`. Refuses, writing nothing, when a
    /// parameter is invalid, the device is too small, or (without `force`) it already holds
    /// a clone superblock. Writes every bitmap slot (both slots, generation 0, all zero),
    /// then superblock slot 0 (generation 0) and slot 1 (generation 1, live), both flagged
    /// clean. Returns the live superblock.
    pub fn format(
        dev: Arc<dyn BlockDev>,
        params: &FormatParams,
        force: bool,
    ) -> Result<Superblock> {
        let name = dev.name().to_string();
        let nr_regions = nr_regions_for(params.source_size, params.region_size)?;
        if params.dest_size < params.source_size {
            return Err(MetadataError::DestinationTooSmall {
                dev: params.dest_name.clone(),
                dest_size: params.dest_size,
                source_size: params.source_size,
            });
        }
        let blocks = required_blocks(nr_regions);
        let required = blocks * BLOCK_SIZE as u64;
        if dev.size() < required {
            return Err(MetadataError::DeviceTooSmall {
                dev: name,
                actual: dev.size(),
                required,
                required_kib: required / 1024,
                nr_regions,
            });
        }
        let slots = scan::read_superblocks(&*dev)
            .map_err(io_err(&name, "reading the superblocks before formatting"))?;
        if let Some(i) = scan::pick_superblock(&slots) {
            if let Ok(sb) = &slots[i] {
                if !force {
                    return Err(MetadataError::AlreadyFormatted {
                        dev: name,
                        uuid: sb.uuid,
                        generation: sb.generation,
                    });
                }
            }
            // Invalidate the old clone first, so a crash while formatting cannot leave its
            // superblocks pointing at half-written new bitmap blocks.
            dev.write_at(&vec![0u8; 2 * BLOCK_SIZE], 0)
                .and_then(|_| dev.flush())
                .map_err(io_err(&name, "erasing the old superblocks"))?;
        }
        let uuid = params.uuid.unwrap_or_else(Uuid::new_v4);
        let nbb = bitmap::bitmap_blocks(nr_regions);
        // Write the bitmap area in 8 MiB sequential chunks.
        const PAIRS: u64 = 1024;
        let pair_bytes = 2 * BLOCK_SIZE;
        let mut buf = vec![0u8; pair_bytes * PAIRS.min(nbb).max(1) as usize];
        let mut first = 0;
        while first < nbb {
            let n = PAIRS.min(nbb - first);
            let chunk = &mut buf[..n as usize * pair_bytes];
            for i in 0..n {
                for slot in 0..2u8 {
                    let off = (i as usize * 2 + slot as usize) * BLOCK_SIZE;
                    let b = &mut chunk[off..off + BLOCK_SIZE];
                    b.fill(0);
                    bitmap::BitmapHeader {
                        blocknr: bitmap::slot_blocknr(first + i, slot),
                        index: first + i,
                        generation: 0,
                        uuid,
                    }
                    .pack_into(b);
                }
            }
            dev.write_at(chunk, bitmap::slot_blocknr(first, 0) * BLOCK_SIZE as u64)
                .map_err(io_err(&name, format!("writing bitmap blocks from {first}")))?;
            first += n;
        }
        dev.flush()
            .map_err(io_err(&name, "flushing the bitmap blocks"))?;
        let mut sb = Superblock {
            flags: FLAG_CLEAN_SHUTDOWN,
            blocknr: 0,
            magic: SUPERBLOCK_MAGIC,
            version: FORMAT_VERSION,
            mode: MetadataMode::ReadWrite,
            uuid,
            generation: 0,
            region_size: params.region_size,
            nr_regions,
            source_size: params.source_size,
            dest_size: params.dest_size,
            source_fingerprint: params.source_fingerprint,
            metadata_blocks: blocks,
            bitmap_start: bitmap::BITMAP_START,
            nr_bitmap_blocks: nbb,
            regions_per_bitmap_block: REGIONS_PER_BITMAP_BLOCK as u32,
            hydrated: 0,
            mode_reason: String::new(),
        };
        let mut both = sb.pack();
        sb.generation = 1;
        sb.blocknr = 1;
        both.extend_from_slice(&sb.pack());
        dev.write_at(&both, 0)
            .and_then(|_| dev.flush())
            .map_err(io_err(&name, "writing the superblocks"))?;
        Ok(sb)
    }

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
        if dev.size() < 2 * BLOCK_SIZE as u64 {
            return Err(MetadataError::BadMagic {
                dev: name,
                details: format!("the device has only {} bytes", dev.size()),
            });
        }
        let slots =
            scan::read_superblocks(&*dev).map_err(io_err(&name, "reading the superblocks"))?;
        let Some(live) = scan::pick_superblock(&slots) else {
            return Err(no_superblock_error(&name, &slots));
        };
        let mut sb = match &slots[live] {
            Ok(sb) => sb.clone(),
            Err(_) => return Err(no_superblock_error(&name, &slots)),
        };
        let mut warnings = Vec::new();
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
            dev: name.clone(),
            what: format!("superblock generation {}: {what}", sb.generation),
        })?;
        if let Some(x) = expect {
            Self::check_expect(&name, &mut sb, x, &mut warnings)?;
        }

        // Load the bitmap.
        let nbb = sb.nr_bitmap_blocks;
        let nr_regions = sb.nr_regions;
        let total_words = nbb as usize * WORDS_PER_BITMAP_BLOCK;
        let mut words: Vec<u64> = Vec::with_capacity(total_words);
        let mut live_slots: Vec<LiveSlot> = Vec::with_capacity(nbb as usize);
        let mut repairs: Vec<(u64, u8, Vec<u8>)> = Vec::new();
        let mut repaired_names = Vec::new();
        let sb_gen = sb.generation;
        let map_io = |e: io::Error, first: u64| {
            io_err(&name, format!("reading bitmap blocks from {first}"))(e)
        };
        scan::scan_bitmap(&*dev, nbb, &sb.uuid, map_io, |pair| -> Result<()> {
            let gens = [
                pair.slots[0].as_ref().ok().map(|h| h.generation),
                pair.slots[1].as_ref().ok().map(|h| h.generation),
            ];
            let Some(l) = bitmap::choose_live(gens, sb_gen) else {
                let why = |s: &std::result::Result<bitmap::BitmapHeader, BitmapSlotError>| match s {
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
                return Err(
                    if pair
                        .slots
                        .iter()
                        .any(|s| matches!(s, Err(BitmapSlotError::Checksum { .. })))
                    {
                        MetadataError::ChecksumMismatch {
                            dev: name.clone(),
                            what,
                        }
                    } else {
                        MetadataError::Corrupt {
                            dev: name.clone(),
                            what: format!("no valid copy of {what}"),
                        }
                    },
                );
            };
            let block = pair.bytes[l as usize];
            let first_word = pair.index * WORDS_PER_BITMAP_BLOCK as u64;
            let mut count = 0u32;
            let mut masked = false;
            for i in 0..WORDS_PER_BITMAP_BLOCK {
                let raw = bitmap::payload_word(block, i);
                let w = raw & valid_mask(nr_regions, first_word + i as u64);
                masked |= w != raw;
                count += w.count_ones();
                words.push(w);
            }
            if masked {
                warnings.push(format!(
                    "bitmap block {} has bits set beyond the last region; ignored them",
                    pair.index
                ));
            }
            live_slots.push(LiveSlot {
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
                let mut copy = block.to_vec();
                let mut h = bitmap::BitmapHeader::unpack(block);
                h.blocknr = bitmap::slot_blocknr(pair.index, other);
                h.pack_into(&mut copy);
                repairs.push((pair.index, other, copy));
                repaired_names.push(format!(
                    "bitmap block {} slot {} (block {})",
                    pair.index,
                    bitmap::slot_name(other),
                    bitmap::slot_blocknr(pair.index, other)
                ));
            }
            Ok(())
        })?;
        let hydrated: u64 = live_slots.iter().map(|l| l.count as u64).sum();
        if hydrated != sb.hydrated {
            warnings.push(format!(
                "superblock records {} hydrated regions but the bitmap has {hydrated}; using the bitmap",
                sb.hydrated
            ));
            sb.hydrated = hydrated;
        }
        let loaded_generation = sb.generation;
        let was_clean = sb.is_clean();

        let core = Core {
            dev,
            writable,
            nr_regions,
            nr_bitmap_blocks: nbb,
            words: parking_lot::RwLock::new(words.into_iter().map(AtomicU64::new).collect()),
            released: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            dirty: (0..nbb.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            hydrated: AtomicU64::new(hydrated),
            committing: AtomicBool::new(false),
            state: Mutex::new(State {
                sb: sb.clone(),
                live: live_slots,
                tainted: Vec::new(),
            }),
            #[cfg(test)]
            before_lookup: Mutex::new(None),
        };
        if writable {
            // Repairs must be durable before a newer superblock could make a slot left by an
            // interrupted commit (generation > sb_gen) current.
            if !repairs.is_empty() {
                for (index, slot, bytes) in &repairs {
                    core.dev
                        .write_at(
                            bytes,
                            bitmap::slot_blocknr(*index, *slot) * BLOCK_SIZE as u64,
                        )
                        .map_err(io_err(&name, format!("repairing bitmap block {index}")))?;
                }
                core.dev
                    .flush()
                    .map_err(io_err(&name, "flushing repaired bitmap blocks"))?;
            }
            let mut next = sb.clone();
            next.generation += 1;
            next.blocknr = next.generation % superblock::SUPERBLOCK_SLOTS;
            next.flags &= !FLAG_CLEAN_SHUTDOWN;
            core.write_superblock(&next)?;
            core.state.lock().sb = next;
        }
        let generation = core.state.lock().sb.generation;
        let report = OpenReport {
            superblock_slot: live as u64,
            loaded_generation,
            generation,
            fell_back,
            was_clean,
            mode: sb.mode,
            mode_reason: sb.mode_reason.clone(),
            hydrated,
            repaired_slots: if writable { repaired_names } else { Vec::new() },
            warnings,
        };
        Ok((
            Metadata {
                core: Arc::new(core),
            },
            report,
        ))
    }

    fn check_expect(
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
        if let Some(s) = x.source_size {
            if s != sb.source_size {
                return Err(MetadataError::SizeMismatch {
                    dev: name.to_string(),
                    which: "source",
                    expected: sb.source_size,
                    actual: s,
                });
            }
        }
        if let Some(d) = x.dest_size {
            if d != sb.dest_size {
                return Err(MetadataError::SizeMismatch {
                    dev: name.to_string(),
                    which: "destination",
                    expected: sb.dest_size,
                    actual: d,
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

    /// Name of the metadata device.
    pub fn name(&self) -> &str {
        self.core.name()
    }

    pub fn nr_regions(&self) -> u64 {
        self.core.nr_regions
    }

    pub fn nr_bitmap_blocks(&self) -> u64 {
        self.core.nr_bitmap_blocks
    }

    pub fn region_size(&self) -> u64 {
        self.core.state.lock().sb.region_size
    }

    pub fn uuid(&self) -> Uuid {
        self.core.state.lock().sb.uuid
    }

    /// Generation of the last durable superblock.
    pub fn generation(&self) -> u64 {
        self.core.state.lock().sb.generation
    }

    /// The last durable superblock.
    pub fn superblock(&self) -> Superblock {
        self.core.state.lock().sb.clone()
    }

    pub fn mode(&self) -> (MetadataMode, String) {
        let s = self.core.state.lock();
        (s.sb.mode, s.sb.mode_reason.clone())
    }

    pub fn is_writable(&self) -> bool {
        self.core.writable
    }

    /// Regions hydrated in core (committed or not).
    pub fn nr_hydrated(&self) -> u64 {
        self.core.hydrated.load(Ordering::SeqCst)
    }

    /// Regions hydrated according to the last durable commit.
    pub fn nr_committed_hydrated(&self) -> u64 {
        self.core.state.lock().sb.hydrated
    }

    pub fn all_hydrated(&self) -> bool {
        self.nr_hydrated() == self.core.nr_regions
    }

    /// Whether `region` is hydrated in core. Regions beyond the end read as not hydrated.
    pub fn is_hydrated(&self, region: u64) -> bool {
        region < self.core.nr_regions
            && self
                .core
                .with_bitmap(|words| {
                    words[(region / 64) as usize].load(Ordering::SeqCst) & (1 << (region % 64)) != 0
                })
                .unwrap_or(true)
    }

    /// The first region at or after `from` that is not hydrated.
    pub fn next_unhydrated(&self, from: u64) -> Option<u64> {
        let nr_regions = self.core.nr_regions;
        // Released: every region is hydrated.
        self.core
            .with_bitmap(|words| {
                let mut r = from;
                while r < nr_regions {
                    let w =
                        words[(r / 64) as usize].load(Ordering::SeqCst) | ((1u64 << (r % 64)) - 1);
                    if w != !0 {
                        let candidate = (r / 64) * 64 + (!w).trailing_zeros() as u64;
                        return (candidate < nr_regions).then_some(candidate);
                    }
                    r = (r / 64 + 1) * 64;
                }
                None
            })
            .flatten()
    }

    /// Records that `region` is hydrated. Call only after the region's data write to the
    /// destination completed: the bit may be committed by any commit frozen after this.
    pub fn set_hydrated(&self, region: u64) -> Result<()> {
        self.set_range_hydrated(region, 1)
    }

    /// [`set_hydrated`](Self::set_hydrated) for `count` regions from `first`. Takes only the
    /// bitmap's read lock (shared by all setters).
    pub fn set_range_hydrated(&self, first: u64, count: u64) -> Result<()> {
        let core = &self.core;
        let end = first
            .checked_add(count)
            .filter(|e| *e <= core.nr_regions)
            .ok_or_else(|| MetadataError::RegionOutOfRange {
                dev: core.name().to_string(),
                region: first.saturating_add(count.saturating_sub(1)),
                nr_regions: core.nr_regions,
            })?;
        // Released (`None`): everything is hydrated and committed already.
        core.with_bitmap(|words| {
            // Checked under the read lock: `revert_to_committed` seals under the write lock.
            if core.sealed.load(Ordering::Acquire) {
                return Err(MetadataError::ReadOnly {
                    dev: core.name().to_string(),
                    what: "marked hydrated (the clone is read-only after a failure)",
                });
            }
            let mut r = first;
            while r < end {
                let bit = r % 64;
                let n = (64 - bit).min(end - r);
                let mask = if n == 64 {
                    !0
                } else {
                    ((1u64 << n) - 1) << bit
                };
                let w = (r / 64) as usize;
                // Order matters: the bit first, then the dirty mark. A commit that sees the
                // dirty mark (swap in begin_commit) therefore also sees the bit when it copies
                // the words.
                let old = words[w].fetch_or(mask, Ordering::SeqCst);
                let new = mask & !old;
                if new != 0 {
                    core.hydrated
                        .fetch_add(new.count_ones() as u64, Ordering::SeqCst);
                }
                core.mark_dirty(w as u64 / WORDS_PER_BITMAP_BLOCK as u64);
                r += n;
            }
            Ok(())
        })
        .unwrap_or(Ok(()))
    }

    /// Drops the in-core bitmap once every region is hydrated and that state is committed
    /// (nothing dirty). Returns whether the bitmap is released now.
    pub fn release_bitmap_if_complete(&self) -> bool {
        if self.core.released.load(Ordering::Acquire) {
            return true;
        }
        // Under the write lock no setter is between its bit and its dirty mark, and checking
        // `committing` excludes a commit between its freeze and its image copy.
        let mut words = self.core.words.write();
        if self.core.committing.load(Ordering::SeqCst)
            || self.nr_committed_hydrated() != self.core.nr_regions
            || self.is_dirty()
        {
            return false;
        }
        self.core.released.store(true, Ordering::Release);
        *words = Vec::new();
        true
    }

    /// Bytes of memory used by the in-core bitmap and dirty set.
    pub fn in_core_bytes(&self) -> u64 {
        // One lock at a time: the commit thread takes `state` then `words`.
        let words = self.core.words.read().len();
        let live = self.core.state.lock().live.len();
        (words + self.core.dirty.len()) as u64 * 8
            + live as u64 * std::mem::size_of::<LiveSlot>() as u64
    }
}
