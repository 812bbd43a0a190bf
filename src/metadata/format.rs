//! The geometry of the on-disk format and formatting a device with it.
//!
//! Owns the rules that tie a clone's sizes together: valid region sizes, how many regions
//! and metadata blocks a clone needs, and whether a superblock's recorded geometry agrees
//! with itself and its device (`check_geometry`). [`Metadata::format`] writes a fresh
//! clone. Invariant: formatting writes every bitmap slot before any superblock that refers
//! to them, and erases an old clone's superblocks before writing its new bitmap, so a crash
//! while formatting never leaves a valid superblock pointing at half-written bitmap blocks.

use super::bitmap::{self, REGIONS_PER_BITMAP_BLOCK};
use super::checksum::BLOCK_SIZE;
use super::error::{io_err, MetadataError, Result};
use super::fingerprint::source_fingerprint;
use super::scan;
use super::superblock::{
    self, MetadataMode, Superblock, FLAG_CLEAN_SHUTDOWN, FORMAT_VERSION, SUPERBLOCK_MAGIC,
};
use super::Metadata;
use crate::io::BlockDev;
use std::io;
use std::sync::Arc;
use uuid::Uuid;

/// Region size of a new clone when none is given (64 KiB).
pub const DEFAULT_REGION_SIZE: u64 = 64 * 1024;
/// Smallest region size (one metadata block's worth of data, one page).
pub const MIN_REGION_SIZE: u64 = 4096;
/// Largest region size.
pub const MAX_REGION_SIZE: u64 = 1 << 30;
/// Most regions one clone may have: 2^36 (256 TiB at 4 KiB regions; an 8 GiB in-core bitmap).
pub const MAX_REGIONS: u64 = 1 << 36;

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

/// Why a superblock's recorded geometry is unusable (see `check_geometry`).
#[derive(Debug, thiserror::Error)]
pub enum GeometryError {
    /// The region size or the source size is invalid on its own.
    #[error(transparent)]
    Sizes(#[from] MetadataError),

    #[error(
        "nr_regions is {recorded} but the source size {source_size} in {region_size}-byte \
         regions needs {needed}"
    )]
    NrRegions {
        recorded: u64,
        source_size: u64,
        region_size: u64,
        needed: u64,
    },

    #[error("destination size {dest_size} is smaller than the source size {source_size}")]
    DestinationTooSmall { dest_size: u64, source_size: u64 },

    #[error(
        "bitmap geometry (start {bitmap_start}, {nr_bitmap_blocks} blocks of \
         {regions_per_bitmap_block} regions, {metadata_blocks} metadata blocks) does not \
         match {nr_regions} regions"
    )]
    Bitmap {
        bitmap_start: u64,
        nr_bitmap_blocks: u64,
        regions_per_bitmap_block: u32,
        metadata_blocks: u64,
        nr_regions: u64,
    },

    #[error("the device has {dev_size} bytes but the metadata needs {needed}")]
    DeviceTooSmall { dev_size: u64, needed: u64 },

    #[error("hydrated count {hydrated} exceeds the {nr_regions} regions")]
    HydratedCount { hydrated: u64, nr_regions: u64 },
}

/// Static superblock consistency: geometry and sizes agree with each other and the device.
pub(crate) fn check_geometry(sb: &Superblock, dev_size: u64) -> Result<(), GeometryError> {
    validate_region_size(sb.region_size)?;
    let nr = nr_regions_for(sb.source_size, sb.region_size)?;
    if nr != sb.nr_regions {
        return Err(GeometryError::NrRegions {
            recorded: sb.nr_regions,
            source_size: sb.source_size,
            region_size: sb.region_size,
            needed: nr,
        });
    }
    if sb.dest_size < sb.source_size {
        return Err(GeometryError::DestinationTooSmall {
            dest_size: sb.dest_size,
            source_size: sb.source_size,
        });
    }
    if sb.nr_bitmap_blocks != bitmap::bitmap_blocks(nr)
        || sb.bitmap_start != bitmap::BITMAP_START
        || sb.regions_per_bitmap_block as u64 != REGIONS_PER_BITMAP_BLOCK
        || sb.metadata_blocks != required_blocks(nr)
    {
        return Err(GeometryError::Bitmap {
            bitmap_start: sb.bitmap_start,
            nr_bitmap_blocks: sb.nr_bitmap_blocks,
            regions_per_bitmap_block: sb.regions_per_bitmap_block,
            metadata_blocks: sb.metadata_blocks,
            nr_regions: nr,
        });
    }
    let needed = sb.metadata_blocks * BLOCK_SIZE as u64;
    if needed > dev_size {
        return Err(GeometryError::DeviceTooSmall { dev_size, needed });
    }
    if sb.hydrated > sb.nr_regions {
        return Err(GeometryError::HydratedCount {
            hydrated: sb.hydrated,
            nr_regions: sb.nr_regions,
        });
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

/// Bitmap block pairs written per I/O when formatting (1024 pairs = 8 MiB).
const FORMAT_PAIRS_PER_WRITE: u64 = 1024;

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
        let nr_regions = validate_format(&*dev, params)?;
        erase_old_clone(&*dev, force)?;
        let uuid = params.uuid.unwrap_or_else(Uuid::new_v4);
        let nbb = bitmap::bitmap_blocks(nr_regions);
        write_empty_bitmap(&*dev, nbb, uuid)?;
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
            metadata_blocks: required_blocks(nr_regions),
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
}

/// Checks `params` and the size of `dev` before anything is written; returns the number of
/// regions.
fn validate_format(dev: &dyn BlockDev, params: &FormatParams) -> Result<u64> {
    let nr_regions = nr_regions_for(params.source_size, params.region_size)?;
    if params.dest_size < params.source_size {
        return Err(MetadataError::DestinationTooSmall {
            dev: params.dest_name.clone(),
            dest_size: params.dest_size,
            source_size: params.source_size,
        });
    }
    let required = required_blocks(nr_regions) * BLOCK_SIZE as u64;
    if dev.size() < required {
        return Err(MetadataError::DeviceTooSmall {
            dev: dev.name().to_string(),
            actual: dev.size(),
            required,
            required_kib: required / 1024,
            nr_regions,
        });
    }
    Ok(nr_regions)
}

/// Refuses (without `force`) a device that holds a valid clone superblock; otherwise zeroes
/// both superblock slots of whatever clone is there, durably, before the new bitmap is
/// written, so a crash while formatting cannot leave the old superblocks pointing at
/// half-written new bitmap blocks.
fn erase_old_clone(dev: &dyn BlockDev, force: bool) -> Result<()> {
    let name = dev.name();
    let slots = scan::read_superblocks(dev)
        .map_err(io_err(name, "reading the superblocks before formatting"))?;
    let Some(i) = scan::pick_superblock(&slots) else {
        return Ok(());
    };
    if let Ok(sb) = &slots[i] {
        if !force {
            return Err(MetadataError::AlreadyFormatted {
                dev: name.to_string(),
                uuid: sb.uuid,
                generation: sb.generation,
            });
        }
    }
    dev.write_at(&vec![0u8; 2 * BLOCK_SIZE], 0)
        .and_then(|_| dev.flush())
        .map_err(io_err(name, "erasing the old superblocks"))
}

/// Writes both slots of every bitmap block (all zero, generation 0) in large sequential
/// chunks, then flushes.
fn write_empty_bitmap(dev: &dyn BlockDev, nbb: u64, uuid: Uuid) -> Result<()> {
    let name = dev.name();
    let pair_bytes = 2 * BLOCK_SIZE;
    let mut buf = vec![0u8; pair_bytes * FORMAT_PAIRS_PER_WRITE.min(nbb).max(1) as usize];
    let mut first = 0;
    while first < nbb {
        let n = FORMAT_PAIRS_PER_WRITE.min(nbb - first);
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
            .map_err(io_err(name, format!("writing bitmap blocks from {first}")))?;
        first += n;
    }
    dev.flush()
        .map_err(io_err(name, "flushing the bitmap blocks"))
}
