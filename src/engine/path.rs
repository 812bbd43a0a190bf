//! The data path seen by the engine: asynchronous reads of the source and the destination,
//! writes and discards of the destination only (the source is never written: there is no
//! method for it).
//!
//! The ublk frontend implements it on each queue's io_uring; [`SyncPath`] implements it over
//! two [`BlockDev`]s for host tests and tools.

use crate::io::BlockDev;
use std::io;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Dest,
}

#[allow(async_fn_in_trait)]
pub trait DataPath {
    async fn read(&self, side: Side, buf: &mut [u8], offset: u64) -> io::Result<()>;
    async fn write_dest(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    async fn discard_dest(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes `len` bytes of the destination at `offset`: afterwards they read back as
    /// zeroes. `unmap` allows deallocating them (a hole) rather than writing zeroes.
    async fn zero_dest(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Makes every destination write completed before this call durable.
    async fn flush_dest(&self) -> io::Result<()>;
}

/// A data path over two block devices, completing synchronously.
pub struct SyncPath {
    pub source: Arc<dyn BlockDev>,
    pub dest: Arc<dyn BlockDev>,
}

impl DataPath for SyncPath {
    async fn read(&self, side: Side, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match side {
            Side::Source => self.source.read_at(buf, offset),
            Side::Dest => self.dest.read_at(buf, offset),
        }
    }

    async fn write_dest(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.dest.write_at(buf, offset)
    }

    async fn discard_dest(&self, offset: u64, len: u64) -> io::Result<()> {
        self.dest.discard(offset, len)
    }

    async fn zero_dest(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.dest.write_zeroes(offset, len)
    }

    async fn flush_dest(&self) -> io::Result<()> {
        self.dest.flush()
    }
}
