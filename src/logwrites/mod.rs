//! dm-log-writes compatible recording and replay of block I/O.
//!
//! - [`format`]: the kernel's on-disk log format (super block, entries, flags, marks);
//! - [`writer`]: [`LogWriter`] appends entries to a log;
//! - [`space`]: [`LoggedSpace`], the address space several devices share in one log, and the
//!   kernel target's ordering of what is logged;
//! - [`dev`]: [`LogWritesDev`] wraps a device and logs its writes, discards, flushes and FUA
//!   writes into a space;
//! - [`recording`]: [`Recording`] logs the destination I/O a data path does by itself (the
//!   ublk queues' io_uring path), as an [`crate::io::observe::IoObserver`] of that path;
//! - [`reader`]: [`LogReader`] parses a log, ours or one written by the kernel;
//! - [`replay`]: replays a log (or a prefix of it) onto a device, with replay-log's options.
//!
//! Invariant kept by the recorder, as by the kernel target: a write or discard is in the log
//! before a FLUSH entry only if it completed before that flush was issued, so replaying the
//! log up to a FLUSH entry gives a state the device may really have been in after a crash.
//!
//! **Logged address space.** Several devices can share one log (one [`LoggedSpace`]), each
//! mapped at a byte offset of one address space, as if they were dm-linear slices of one
//! logged device. For a clone, [`LogWritesDev::pair`] maps the destination at sector 0 and
//! the metadata device at [`metadata_base`]`(dest_size)`: the destination size rounded up to
//! [`PAIR_ALIGN`] (1 MiB). A flush of either device flushes both and is logged as one flush
//! of the shared device. [`pair_span`] is the matching replay target.

pub mod dev;
pub mod format;
pub mod reader;
pub mod recording;
pub mod replay;
pub mod space;
pub mod writer;

#[cfg(test)]
mod tests;

pub use dev::LogWritesDev;
pub use format::{EntryHeader, LogSuper, END_MARK};
pub use reader::{LogEntry, LogReader};
pub use recording::Recording;
pub use replay::{replay, BadCheck, Check, ReplayOptions, ReplaySummary, Start};
pub use space::{FlushTicket, LoggedSpace};
pub use writer::LogWriter;

use crate::io::span::SpanDev;
use crate::io::BlockDev;
use std::io;
use std::sync::Arc;

/// Alignment of the metadata range after the destination in a [`LogWritesDev::pair`] space.
pub const PAIR_ALIGN: u64 = 1 << 20;

/// Byte offset of the metadata device in the logged address space of a clone whose
/// destination is `dest_size` bytes long.
pub fn metadata_base(dest_size: u64) -> u64 {
    dest_size.div_ceil(PAIR_ALIGN) * PAIR_ALIGN
}

/// The replay target of a log recorded with [`LogWritesDev::pair`]: `dest` at byte 0 and
/// `metadata` at [`metadata_base`] of the destination's size, as one device.
pub fn pair_span(dest: Arc<dyn BlockDev>, metadata: Arc<dyn BlockDev>) -> SpanDev {
    let base = metadata_base(dest.size());
    SpanDev::new(vec![(0, dest), (base, metadata)])
}

/// Errors of the log writer, reader and replayer. Each names the log or device concerned.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{dev}: {source}")]
    Io { dev: String, source: io::Error },
    #[error("{log}: super block: {source}")]
    Super {
        log: String,
        source: format::FormatError,
    },
    #[error("{log}: entry {entry} at byte {offset}: {source}")]
    Entry {
        log: String,
        entry: u64,
        offset: u64,
        source: format::FormatError,
    },
    #[error("{log}: entry {entry} at byte {offset} needs {need} bytes but the log ends at byte {size}: the log is truncated; nr_entries counts entries that are not there")]
    Truncated {
        log: String,
        entry: u64,
        offset: u64,
        need: u64,
        size: u64,
    },
    #[error("{log}: log device is full ({size} bytes, {needed} more needed at byte {offset}); use a larger log")]
    Full {
        log: String,
        size: u64,
        offset: u64,
        needed: u64,
    },
    #[error("{dev}: I/O at byte {offset}, length {len}, is not aligned to the log's sectorsize {sectorsize}; log with a sectorsize the device's I/O is aligned to (its logical block size or less)")]
    Unaligned {
        dev: String,
        offset: u64,
        len: u64,
        sectorsize: u32,
    },
    #[error("{log}: logging was disabled after an earlier error: {reason}")]
    Disabled { log: String, reason: String },
    #[error("{log}: the log is closed")]
    Closed { log: String },
    #[error("{target}: entry {entry} touches bytes {offset}..{end}, beyond the replay target's size {size}; replay onto a device at least as large as the logged one")]
    TargetTooSmall {
        target: String,
        entry: u64,
        offset: u64,
        end: u64,
        size: u64,
    },
    #[error("{log}: {what} not found in the log's {entries} entries")]
    NotFound {
        log: String,
        what: String,
        entries: u64,
    },
    #[error("{what}")]
    Usage { what: String },
    #[error("check command `{cmd}` could not be run: {source}")]
    CheckSpawn { cmd: String, source: io::Error },
}

impl LogError {
    pub(crate) fn io(dev: &str, source: io::Error) -> LogError {
        LogError::Io {
            dev: dev.to_string(),
            source,
        }
    }
}
