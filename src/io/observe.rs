//! [`IoObserver`]: a listener told of the destination writes, discards and flushes that a data
//! path completed by itself, outside any [`super::BlockDev`] (the ublk queues submit them on
//! their own io_uring). The dm-log-writes recorder implements it to log that I/O.
//!
//! Invariant the data path keeps towards an observer: a write or discard is reported only after
//! it completed, and only if it succeeded; a flush is announced ([`IoObserver::flush_issued`])
//! before it is submitted and its outcome reported ([`IssuedFlush::completed`]) after it
//! completed, so the observer knows exactly which reported writes the flush covers: those
//! reported before it was announced.

use std::io;

/// A listener told of completed destination I/O, in completion order. Offsets are the
/// destination's byte offsets.
pub trait IoObserver: Send + Sync {
    /// `data` was written at `offset`, and the write completed successfully.
    fn write_completed(&self, offset: u64, data: &[u8]);
    /// `len` bytes at `offset` were discarded by a device that supports discards, and the
    /// discard completed successfully. A discard the device ignored is not reported.
    fn discard_completed(&self, offset: u64, len: u64);
    /// A flush is about to be submitted: it covers the writes and discards reported so far.
    /// Its outcome must be reported to the returned [`IssuedFlush`] once it completed.
    fn flush_issued(&self) -> Box<dyn IssuedFlush>;
}

/// A flush announced to an [`IoObserver`], waiting for its outcome.
pub trait IssuedFlush: Send {
    /// The destination's flush ended with `outcome`. The observer may have more to make
    /// durable before the flush counts as complete (a recorder whose log also covers other
    /// devices flushes them too, after a successful destination flush); the result is the
    /// flush's: `outcome`'s error, else the error of that extra work, else `Ok`.
    fn completed(self: Box<Self>, outcome: io::Result<()>) -> io::Result<()>;
}
