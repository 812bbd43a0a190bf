//! [`MetadataError`]: every way the metadata layer can refuse or fail.
//!
//! Invariant: each message names the device (or the value) at fault and says what to do.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error(
        "region size {size} bytes is invalid: it must be a power of two between 4 KiB and \
         1 GiB (e.g. 4K, 64K, 1M)"
    )]
    BadRegionSize { size: u64 },

    #[error(
        "too many regions: {source_size} bytes in regions of {region_size} bytes is \
         {nr_regions} regions, more than the supported {max}; choose a larger region size"
    )]
    TooManyRegions {
        source_size: u64,
        region_size: u64,
        nr_regions: u64,
        max: u64,
    },

    #[error("the source is empty: a clone needs a source of at least one byte")]
    EmptySource,

    #[error(
        "destination {dev} is {dest_size} bytes, smaller than the source ({source_size} \
         bytes); use a destination at least as large as the source"
    )]
    DestinationTooSmall {
        dev: String,
        dest_size: u64,
        source_size: u64,
    },

    #[error(
        "metadata device {dev} is too small: it has {actual} bytes but {required} bytes \
         ({required_kib} KiB) are needed for {nr_regions} regions; use a metadata device of \
         at least {required} bytes or a larger region size"
    )]
    DeviceTooSmall {
        dev: String,
        actual: u64,
        required: u64,
        required_kib: u64,
        nr_regions: u64,
    },

    #[error(
        "{dev} does not hold ublk-clone metadata (bad magic in both superblock copies: \
         {details}); format it with `ublk-clone format`, or check that this is the right device"
    )]
    BadMagic { dev: String, details: String },

    #[error(
        "{dev}: metadata format version {found} is not supported (this build reads version \
         {supported}); use the ublk-clone release that wrote it"
    )]
    UnsupportedVersion {
        dev: String,
        found: u32,
        supported: u32,
    },

    #[error(
        "{dev}: checksum mismatch in {what}; the metadata is corrupt: run `ublk-clone check \
         {dev}` for a full report"
    )]
    ChecksumMismatch { dev: String, what: String },

    #[error("{dev}: the metadata is inconsistent: {what}; run `ublk-clone check {dev}`")]
    Corrupt { dev: String, what: String },

    #[error(
        "{dev}: {which} size mismatch: the clone was created for {expected} bytes but the \
         {which} device now has {actual} bytes; reattach the original {which} device"
    )]
    SizeMismatch {
        dev: String,
        which: &'static str,
        expected: u64,
        actual: u64,
    },

    #[error(
        "{dev}: region size mismatch: the metadata uses {on_disk}-byte regions but {asked} \
         was asked for; omit the region size or pass {on_disk}"
    )]
    RegionSizeMismatch {
        dev: String,
        on_disk: u64,
        asked: u64,
    },

    #[error(
        "{dev}: the source device does not match the one this clone was created from (its \
         fingerprint differs: recorded {recorded}, found {found}); if you are sure it holds \
         the same data, pass --ignore-source-mismatch"
    )]
    SourceMismatch {
        dev: String,
        recorded: String,
        found: String,
    },

    #[error(
        "{dev} already holds ublk-clone metadata (clone {uuid}, generation {generation}); \
         formatting would destroy it: pass --force to overwrite it"
    )]
    AlreadyFormatted {
        dev: String,
        uuid: uuid::Uuid,
        generation: u64,
    },

    /// The survival copy of the bitmap could not be written: a bit set now would not outlive
    /// the daemon, so the clone must stop acknowledging writes that depend on new bits.
    #[error("{dev}: writing the survival copy of the bitmap: {error}")]
    Survival {
        dev: String,
        #[source]
        error: io::Error,
    },

    #[error("{dev}: {context}: {error}")]
    Io {
        dev: String,
        context: String,
        #[source]
        error: io::Error,
    },

    #[error("{dev}: the metadata was opened read-only; it cannot be {what}")]
    ReadOnly { dev: String, what: &'static str },

    #[error("{dev}: a metadata commit is already in progress; finish or drop it first")]
    CommitInProgress { dev: String },

    #[error(
        "{dev}: commit phase 2 was given proofs from another commit (frozen {frozen}, \
         shadows {shadows}, destination flush {flushed}); this is a bug in the caller"
    )]
    CommitMismatch {
        dev: String,
        frozen: u64,
        shadows: u64,
        flushed: u64,
    },

    #[error("{dev}: region {region} is beyond the last region ({nr_regions} regions)")]
    RegionOutOfRange {
        dev: String,
        region: u64,
        nr_regions: u64,
    },
}

pub type Result<T, E = MetadataError> = std::result::Result<T, E>;

/// Wraps an I/O error with the device name and what was being done.
pub(crate) fn io_err(
    dev: &str,
    context: impl Into<String>,
) -> impl FnOnce(io::Error) -> MetadataError {
    let dev = dev.to_string();
    let context = context.into();
    move |error| MetadataError::Io {
        dev,
        context,
        error,
    }
}
