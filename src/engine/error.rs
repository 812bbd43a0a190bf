//! The engine's errors: [`IoError`] for one request (an errno for the frontend plus a message
//! for the log), [`EngineError`] for starting and stopping the engine, and [`CommitError`] for
//! one commit of the bitmap.

use crate::metadata;

/// An I/O error returned to the frontend: an errno plus a message for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (errno {errno})")]
pub struct IoError {
    pub errno: i32,
    pub msg: String,
}

impl IoError {
    pub fn eio(msg: impl Into<String>) -> IoError {
        IoError {
            errno: libc::EIO,
            msg: msg.into(),
        }
    }
    pub fn einval(msg: impl Into<String>) -> IoError {
        IoError {
            errno: libc::EINVAL,
            msg: msg.into(),
        }
    }
}

/// Why the engine cannot start, or why its shutdown did not leave the metadata clean.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("region size {0} is not a power of two")]
    RegionSizeNotPowerOfTwo(u64),
    #[error("logical block size {0} is not a power of two of at least 512")]
    BadBlockSize(u64),
    #[error(
        "region size {region_size} is smaller than the {block_size}-byte logical block size of \
         the source or destination"
    )]
    RegionSmallerThanBlock { region_size: u64, block_size: u64 },
    #[error("device size {size} is not a multiple of the {block_size}-byte logical block size")]
    SizeNotBlockAligned { size: u64, block_size: u64 },
    #[error(
        "metadata has {have} regions but a {size}-byte device at {region_size}-byte regions \
         needs {need}"
    )]
    RegionCount {
        have: u64,
        size: u64,
        region_size: u64,
        need: u64,
    },
    #[error(
        "source ({source_size} bytes) and destination ({dest_size} bytes) must hold the \
         {size}-byte device"
    )]
    DevicesTooSmall {
        source_size: u64,
        dest_size: u64,
        size: u64,
    },
    #[error("cannot start a {what} thread: {error}")]
    Thread {
        what: &'static str,
        error: std::io::Error,
    },
    #[error("{0}")]
    FinalCommit(IoError),
    #[error("marking the metadata clean: {0}")]
    MarkClean(metadata::MetadataError),
}

/// Why one commit failed (the engine then leaves read-write mode).
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("device is not in read-write mode")]
    NotReadWrite,
    #[error("metadata phase 1: {0}")]
    Freeze(metadata::MetadataError),
    #[error("destination flush: {0}")]
    DestinationFlush(String),
    #[error("a concurrent destination flush failed: {0}")]
    ConcurrentFlush(super::flush::FlushFailed),
    #[error("the metadata shadows were not written")]
    ShadowsNotWritten,
    #[error("metadata shadow write: {0}")]
    Shadows(metadata::MetadataError),
    #[error("metadata superblock write: {0}")]
    Superblock(metadata::MetadataError),
}
