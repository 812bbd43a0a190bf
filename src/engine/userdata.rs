//! Where a user request's data lives while the engine serves it.
//!
//! Usually in memory: a write's bytes, a read's buffer (`[u8]` implements both traits). On a
//! zero-copy ublk device they stay in the request's own pages, which the frontend can hand to
//! a backend read or write without copying them through the daemon; only a copy-on-write that
//! merges a partial write with source data needs the bytes themselves ([`WriteData::copy_into`]).
//! The engine decides where data goes; these traits only move it.
//!
//! Invariant: every method moves all the bytes it is asked to or fails; an implementation
//! never reports success for a partial transfer.

use super::path::{DataPath, Side};
use std::io;

/// The data of a user write.
#[allow(async_fn_in_trait, clippy::len_without_is_empty)]
pub trait WriteData {
    fn len(&self) -> usize;
    /// Writes all of it to the destination at `offset`.
    async fn write_dest<P: DataPath>(&self, p: &P, offset: u64) -> io::Result<()>;
    /// Copies all of it into `buf`, which has the same length.
    async fn copy_into(&self, buf: &mut [u8]) -> io::Result<()>;
    /// The bytes, when they are in memory already (no copy to wait for).
    fn bytes(&self) -> Option<&[u8]> {
        None
    }
}

/// Where a user read's data goes.
#[allow(async_fn_in_trait, clippy::len_without_is_empty)]
pub trait ReadData {
    fn len(&self) -> usize;
    /// Fills bytes `[at, at + len)` with `len` bytes of `side` read at `offset`.
    async fn read_from<P: DataPath>(
        &mut self,
        p: &P,
        side: Side,
        offset: u64,
        at: usize,
        len: usize,
    ) -> io::Result<()>;
}

impl WriteData for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    async fn write_dest<P: DataPath>(&self, p: &P, offset: u64) -> io::Result<()> {
        p.write_dest(self, offset).await
    }

    async fn copy_into(&self, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(self);
        Ok(())
    }

    fn bytes(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl ReadData for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    async fn read_from<P: DataPath>(
        &mut self,
        p: &P,
        side: Side,
        offset: u64,
        at: usize,
        len: usize,
    ) -> io::Result<()> {
        p.read(side, &mut self[at..at + len], offset).await
    }
}
