//! Clone metadata: the on-disk format (specified in `metadata-format/SPEC.md`), opening and
//! formatting it, the in-core hydrated-region bitmap and the two-phase commit protocol.
//!
//! Owns the metadata device. Invariants:
//! - a region's bit is only ever set, never cleared, and is set in core only after its data
//!   write to the destination completed (the engine's side of the contract); only a revert
//!   to the committed bitmap after a failure clears bits, and it seals the bitmap;
//! - the on-disk bitmap a durable superblock refers to only contains bits whose data was
//!   covered by a completed destination flush (the commit protocol in [`commit`]);
//! - the live copy of every bitmap block and the superblock it belongs to are never
//!   overwritten before the superblock that supersedes them is durable.
//!
//! Where things are: [`format`](mod@format) (geometry rules and formatting a device), [`open`]
//! (picking the superblock, loading the bitmap, repairing slots), [`incore`] (the in-core
//! bitmap and its operations), [`commit`] (making it durable), [`superblock`] and
//! [`bitmap`] (byte layouts), [`check`](mod@check) and [`dump`](mod@dump) (read-only
//! inspection).

pub mod bitmap;
pub mod check;
pub mod checksum;
pub mod commit;
pub mod dump;
pub mod error;
pub mod fingerprint;
pub mod format;
pub mod incore;
pub mod open;
pub mod overwrite;
mod scan;
pub mod superblock;
pub mod survival;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod vectors;

pub use check::{check, CheckReport, Problem};
pub(crate) use commit::flush_destination_with;
pub use commit::{flush_destination, CommitInfo, DestinationFlushed, FrozenCommit, ShadowsDurable};
pub use dump::{dump, DumpOutput};
pub use error::{MetadataError, Result};
pub use fingerprint::{hex, source_fingerprint, FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_SIZE};
pub use format::{
    nr_regions_for, required_blocks, required_size, validate_region_size, FormatParams,
    GeometryError, DEFAULT_REGION_SIZE, MAX_REGIONS, MAX_REGION_SIZE, MIN_REGION_SIZE,
};
pub use open::{Expect, OpenReport};
pub use superblock::{MetadataMode, Superblock};
pub use survival::{survival_size, SurvivalError, SurvivalFile, Survived};

pub(crate) use incore::Core;

use std::sync::Arc;
use uuid::Uuid;

/// Open clone metadata: the in-core bitmap ([`incore`]) and the commit protocol
/// ([`commit`]). Made by [`Metadata::open`], [`Metadata::read_only_open`].
pub struct Metadata {
    pub(crate) core: Arc<Core>,
}

impl Metadata {
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
}
