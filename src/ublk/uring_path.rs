//! [`UringPath`]: the engine's [`DataPath`] on the calling queue thread's io_uring, on the
//! fixed files [`SOURCE_SLOT`] and [`DEST_SLOT`] that every queue ring registers.
//!
//! Invariants: every read and write transfers the whole buffer or fails (a short transfer is
//! continued, a zero-length one is an error); an [`IoObserver`] is told of a destination write
//! or discard only after it completed successfully, and a flush is announced to it before it
//! is submitted and reported after it completed, so that it knows exactly which writes the
//! flush covers.

use super::remote::RemoteSource;
use crate::engine::wake::Kick;
use crate::engine::{DataPath, Side};
use crate::io::observe::IoObserver;
use io_uring::{opcode, types};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{UblkError, UblkUringData};
use std::io;
use std::sync::Arc;

/// Fixed-file slots registered with every queue ring (slot 0 is /dev/ublkcN). With a remote
/// source, the source slot is left empty (-1): nothing may read it.
pub(super) const SOURCE_SLOT: u32 = 1;
pub(super) const DEST_SLOT: u32 = 2;

/// The fixed-file slot of `side`.
pub(super) fn slot(side: Side) -> u32 {
    match side {
        Side::Source => SOURCE_SLOT,
        Side::Dest => DEST_SLOT,
    }
}

/// A data path on the calling queue thread's io_uring.
pub struct UringPath {
    /// Told of the destination's completed writes, discards and flushes (a recorder).
    observer: Option<Arc<dyn IoObserver>>,
    /// A remote source, read off the queue thread, and this queue's kick (see `remote`).
    remote: Option<(Arc<RemoteSource>, Kick)>,
}

fn uring_result(res: Result<i32, UblkError>) -> io::Result<usize> {
    match res {
        Ok(n) if n >= 0 => Ok(n as usize),
        Ok(n) => Err(io::Error::from_raw_os_error(-n)),
        Err(e) => Err(io::Error::other(format!("io_uring: {e}"))),
    }
}

impl DataPath for UringPath {
    async fn read(&self, side: Side, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let (Side::Source, Some((remote, kick))) = (side, &self.remote) {
            return remote.read(buf, offset, kick).await;
        }
        let slot = slot(side);
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let sqe = opcode::Read::new(types::Fixed(slot), rest.as_mut_ptr(), rest.len() as u32)
                .offset(offset + done as u64)
                .build();
            let n = uring_result(ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "short read at offset {} of the {side:?} device",
                        offset + done as u64
                    ),
                ));
            }
            done += n;
        }
        Ok(())
    }

    async fn write_dest(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            let sqe = opcode::Write::new(types::Fixed(DEST_SLOT), rest.as_ptr(), rest.len() as u32)
                .offset(offset + done as u64)
                .build();
            let n = uring_result(ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "destination write returned 0",
                ));
            }
            done += n;
        }
        if let Some(obs) = &self.observer {
            obs.write_completed(offset, buf);
        }
        Ok(())
    }

    async fn discard_dest(&self, offset: u64, len: u64) -> io::Result<()> {
        // PUNCH_HOLE on files; on block devices fallocate(PUNCH_HOLE) is a discard too.
        // Discard is a hint: a destination without support keeps its data.
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if self.fallocate_dest(offset, len, mode).await? {
            if let Some(obs) = &self.observer {
                obs.discard_completed(offset, len);
            }
        }
        Ok(())
    }

    async fn zero_dest(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        // A hole reads back as zeroes (files and block devices alike); ZERO_RANGE keeps the
        // space allocated. Where the destination supports neither mode, zeroes are written.
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let (first, second) = if unmap {
            (libc::FALLOC_FL_PUNCH_HOLE, libc::FALLOC_FL_ZERO_RANGE)
        } else {
            (libc::FALLOC_FL_ZERO_RANGE, libc::FALLOC_FL_PUNCH_HOLE)
        };
        let zeroed = self.fallocate_dest(offset, len, first | keep).await?
            || self.fallocate_dest(offset, len, second | keep).await?;
        let zeroes = crate::io::ZEROES.as_slice();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            if !zeroed {
                // write_dest tells the observer of the write itself.
                self.write_dest(&zeroes[..n], offset + done).await?;
            } else if let Some(obs) = &self.observer {
                // The observer sees zeroed ranges as writes of zeroes.
                obs.write_completed(offset + done, &zeroes[..n]);
            }
            done += n as u64;
        }
        Ok(())
    }

    async fn flush_dest(&self) -> io::Result<()> {
        let Some(obs) = &self.observer else {
            return self.fdatasync_dest().await;
        };
        let issued = obs.flush_issued();
        let outcome = self.fdatasync_dest().await;
        issued.completed(outcome)
    }
}

impl UringPath {
    pub(super) fn new(
        observer: Option<Arc<dyn IoObserver>>,
        remote: Option<(Arc<RemoteSource>, Kick)>,
    ) -> UringPath {
        UringPath { observer, remote }
    }

    /// fallocate(`mode`) on the destination. `Ok(false)` when the destination does not
    /// support the mode (EOPNOTSUPP, or EINVAL from a block device that cannot do it, e.g.
    /// some dm targets).
    async fn fallocate_dest(&self, offset: u64, len: u64, mode: i32) -> io::Result<bool> {
        let sqe = opcode::Fallocate::new(types::Fixed(DEST_SLOT), len)
            .offset(offset)
            .mode(mode)
            .build();
        match uring_result(ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await) {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn fdatasync_dest(&self) -> io::Result<()> {
        let sqe = opcode::Fsync::new(types::Fixed(DEST_SLOT))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        uring_result(ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await).map(|_| ())
    }
}
