//! A zero-copy request's data, left in the request's own pages while the engine serves it.
//!
//! On a zero-copy device the kernel registers each request's pages in the queue ring's buffer
//! table (at the index of its tag) before it hands the request over. [`RequestPages`] lets the
//! engine's full path move data between those pages and the backing files with
//! `ReadFixed`/`WriteFixed`, as the direct path does: a write over whole cold regions, or a
//! read of regions that are not hydrated, costs no copy through the daemon. Where the bytes
//! themselves are needed (a copy-on-write merging a partial write with source data; a read of
//! a remote source) they are copied through `/dev/ublkcN` at the request's user-copy offset.
//!
//! Used only without an I/O observer: the observer (a recorder) learns of destination writes
//! from `UringPath`, which these fixed writes bypass.
//!
//! Invariant: a fixed I/O that fails or moves less than asked has completed; it is then redone
//! through the tag's buffer, counted in `direct_redone` (the kernel may refuse a fixed I/O the
//! buffer path accepts, e.g. for alignment).

use super::uring_path;
use crate::engine::{DataPath, ReadData, Side, WriteData};
use io_uring::{opcode, types};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::UblkUringData;
use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// The data of one read or write request in its registered pages.
pub(super) struct RequestPages<'b> {
    /// Its buffer-table index.
    index: u16,
    /// Its offset in `/dev/ublkcN` (user copy).
    pos: u64,
    len: usize,
    /// The tag's buffer (`len` bytes), for what the pages cannot do in place; taken while
    /// in use.
    buf: Cell<Option<&'b mut [u8]>>,
    /// The source is remote: its reads arrive in memory, never in the pages.
    remote_source: bool,
    /// Fixed I/Os redone through `buf`.
    redone: &'b AtomicU64,
}

impl<'b> RequestPages<'b> {
    pub(super) fn new(
        index: u16,
        pos: u64,
        buf: &'b mut [u8],
        remote_source: bool,
        redone: &'b AtomicU64,
    ) -> RequestPages<'b> {
        RequestPages {
            index,
            pos,
            len: buf.len(),
            buf: Cell::new(Some(buf)),
            remote_source,
            redone,
        }
    }

    /// A fixed read (`read`) or write of `len` bytes of the pages from byte `at`, at `offset`
    /// of the file in `slot`. `Err` (what went wrong): it failed or came short, and must be
    /// redone.
    async fn fixed(
        &self,
        slot: u32,
        read: bool,
        at: usize,
        len: usize,
        offset: u64,
    ) -> Result<(), String> {
        let mut done = 0usize;
        while done < len {
            // A registered kernel buffer is addressed by the offset within it.
            let (addr, n) = (at + done, (len - done) as u32);
            let sqe = if read {
                opcode::ReadFixed::new(types::Fixed(slot), addr as *mut u8, n, self.index)
                    .offset(offset + done as u64)
                    .build()
            } else {
                opcode::WriteFixed::new(types::Fixed(slot), addr as *const u8, n, self.index)
                    .offset(offset + done as u64)
                    .build()
            };
            match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
                Ok(n) if n > 0 => done += n as usize,
                Ok(0) => return Err(format!("no bytes moved after {done}")),
                Ok(n) => return Err(io::Error::from_raw_os_error(-n).to_string()),
                Err(e) => return Err(format!("io_uring: {e}")),
            }
        }
        Ok(())
    }

    fn count_redone(&self, what: &str, offset: u64, len: usize, why: &str) {
        let n = self.redone.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            log::warn!(
                "zero-copy {what} at offset {offset} length {len} did not complete ({why}); \
                 redone through the daemon's buffer ({n} so far)"
            );
        }
    }
}

impl WriteData for RequestPages<'_> {
    fn len(&self) -> usize {
        self.len
    }

    async fn write_dest<P: DataPath>(&self, p: &P, offset: u64) -> io::Result<()> {
        match self
            .fixed(uring_path::DEST_SLOT, false, 0, self.len, offset)
            .await
        {
            Ok(()) => return Ok(()),
            Err(why) => self.count_redone("write", offset, self.len, &why),
        }
        // The engine moves a request's data one step at a time: nobody else holds the buffer.
        let Some(buf) = self.buf.take() else {
            return Err(io::Error::other("the request's buffer is in use"));
        };
        let res = match user_copy(buf, self.pos, true).await {
            Ok(()) => p.write_dest(buf, offset).await,
            Err(e) => Err(e),
        };
        self.buf.set(Some(buf));
        res
    }

    async fn copy_into(&self, buf: &mut [u8]) -> io::Result<()> {
        user_copy(buf, self.pos, true).await
    }
}

impl ReadData for RequestPages<'_> {
    fn len(&self) -> usize {
        self.len
    }

    async fn read_from<P: DataPath>(
        &mut self,
        p: &P,
        side: Side,
        offset: u64,
        at: usize,
        len: usize,
    ) -> io::Result<()> {
        let in_memory = side == Side::Source && self.remote_source;
        if !in_memory {
            match self
                .fixed(uring_path::slot(side), true, at, len, offset)
                .await
            {
                Ok(()) => return Ok(()),
                Err(why) => self.count_redone("read", offset, len, &why),
            }
        }
        let Some(buf) = self.buf.get_mut() else {
            return Err(io::Error::other("the request's buffer is in use"));
        };
        let part = &mut buf[at..at + len];
        p.read(side, part, offset).await?;
        user_copy(part, self.pos + at as u64, false).await
    }
}

/// Copies a request's data between `buf` and the request's pages, through `/dev/ublkcN`
/// (fixed file 0) at the request's user-copy offset `pos`: `fetch` reads the data of a write
/// into `buf`, otherwise `buf` is written into a read's pages.
pub(super) async fn user_copy(buf: &mut [u8], pos: u64, fetch: bool) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let (ptr, len, at) = (rest.as_mut_ptr(), rest.len() as u32, pos + done as u64);
        let sqe = if fetch {
            opcode::Read::new(types::Fixed(0), ptr, len)
                .offset(at)
                .build()
        } else {
            opcode::Write::new(types::Fixed(0), ptr, len)
                .offset(at)
                .build()
        };
        match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
            Ok(n) if n > 0 => done += n as usize,
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "no bytes moved",
                ))
            }
            Ok(n) => return Err(io::Error::from_raw_os_error(-n)),
            Err(e) => return Err(io::Error::other(format!("io_uring: {e}"))),
        }
    }
    Ok(())
}
