//! [`Request`]: a ublk request descriptor (the kernel's `ublksrv_io_desc`), decoded once when
//! the request arrives, and [`handle`], which serves it through the engine's full path.
//!
//! Invariant: the descriptor is read only by [`Request::decode`]; everything after works on
//! the decoded copy, so the direct path and the full path of one request see the same
//! operation, range and flags.

use super::uring_path::UringPath;
use crate::engine::{Engine, IoError, ReadData, WriteData};
use libublk::sys;

/// The operation of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Read,
    Write,
    Flush,
    /// `unmap`: the range may be deallocated rather than written (no NOUNMAP flag).
    WriteZeroes {
        unmap: bool,
    },
    Discard,
    /// An operation the device does not serve (its ublk opcode).
    Unsupported(u32),
}

impl Op {
    /// The operation as the metrics count it (`None`: unsupported).
    pub fn kind(self) -> Option<crate::engine::metrics::OpKind> {
        use crate::engine::metrics::OpKind;
        Some(match self {
            Op::Read => OpKind::Read,
            Op::Write => OpKind::Write,
            Op::Flush => OpKind::Flush,
            Op::WriteZeroes { .. } => OpKind::WriteZeroes,
            Op::Discard => OpKind::Discard,
            Op::Unsupported(_) => return None,
        })
    }
}

/// A decoded request descriptor. Offsets and lengths are in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Request {
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    /// Forced Unit Access: the data must be durable when the request completes.
    pub fua: bool,
    /// On a zero-copy device, the kernel did not register the request's pages in the ring's
    /// buffer table (`UBLK_IO_F_NEED_REG_BUF`, the fallback of `UBLK_F_AUTO_BUF_REG`): the
    /// request can only take the path through the tag's buffer.
    pub unregistered: bool,
}

impl Request {
    pub fn decode(iod: &sys::ublksrv_io_desc) -> Request {
        let op = match iod.op_flags & 0xff {
            sys::UBLK_IO_OP_READ => Op::Read,
            sys::UBLK_IO_OP_WRITE => Op::Write,
            sys::UBLK_IO_OP_FLUSH => Op::Flush,
            sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes {
                unmap: iod.op_flags & sys::UBLK_IO_F_NOUNMAP == 0,
            },
            sys::UBLK_IO_OP_DISCARD => Op::Discard,
            other => Op::Unsupported(other),
        };
        Request {
            op,
            offset: iod.start_sector << 9,
            len: (iod.nr_sectors as u64) << 9,
            fua: iod.op_flags & sys::UBLK_IO_F_FUA != 0,
            unregistered: iod.op_flags & sys::UBLK_IO_F_NEED_REG_BUF != 0,
        }
    }

    /// A read or a write: the only requests whose data is in the tag's buffer.
    pub fn carries_data(&self) -> bool {
        matches!(self.op, Op::Read | Op::Write)
    }

    /// The request's length in bytes if it fits a `buf_len`-byte buffer. Only reads and
    /// writes carry data; a discard may be far larger than the buffer.
    pub fn fits(&self, buf_len: usize) -> Option<usize> {
        usize::try_from(self.len).ok().filter(|&n| n <= buf_len)
    }
}

/// The ublk result of an engine call: `ok` on success (bytes for reads and writes, 0 for
/// the others), `-errno` on failure.
fn op_result(res: Result<(), IoError>, ok: i32, what: &str, off: u64, len: u64) -> i32 {
    match res {
        Ok(()) => ok,
        Err(e) => {
            log::error!("{what} at offset {off} length {len}: {e}");
            -e.errno
        }
    }
}

/// Serves `req` through the engine, with `buf` the tag's I/O buffer; returns the ublk result.
pub(super) async fn handle(engine: &Engine, path: &UringPath, req: Request, buf: &mut [u8]) -> i32 {
    let Request {
        op,
        offset: off,
        len,
        fua,
        ..
    } = req;
    match op {
        Op::Read | Op::Write => {
            let Some(n) = req.fits(buf.len()) else {
                log::error!(
                    "request of {len} bytes exceeds the {}-byte I/O buffer",
                    buf.len()
                );
                return -libc::EINVAL;
            };
            read_write(engine, path, req, &mut buf[..n]).await
        }
        Op::Flush => op_result(engine.flush(path).await, 0, "flush", off, 0),
        Op::WriteZeroes { unmap } => {
            let res = engine.write_zeroes(path, off, len, unmap, fua).await;
            op_result(res, 0, "write zeroes", off, len)
        }
        Op::Discard => op_result(engine.discard(path, off, len).await, 0, "discard", off, len),
        Op::Unsupported(_) => -libc::EOPNOTSUPP,
    }
}

/// Serves `req`, a read or a write, with `data` its data (in memory, or in the request's own
/// pages); returns the ublk result.
pub(super) async fn read_write<D: ReadData + WriteData + ?Sized>(
    engine: &Engine,
    path: &UringPath,
    req: Request,
    data: &mut D,
) -> i32 {
    let n = ReadData::len(data) as i32;
    let (off, len) = (req.offset, req.len);
    if req.op == Op::Read {
        let res = engine.read_into(path, off, data).await;
        op_result(res, n, "read", off, len)
    } else {
        let res = engine.write_from(path, off, data, req.fua).await;
        op_result(res, n, "write", off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iod(op_flags: u32, start_sector: u64, nr_sectors: u32) -> sys::ublksrv_io_desc {
        sys::ublksrv_io_desc {
            op_flags,
            nr_sectors,
            start_sector,
            addr: 0,
        }
    }

    #[test]
    fn descriptors_decode_to_byte_ranges_and_flags() {
        let w = Request::decode(&iod(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 8, 16));
        assert_eq!(
            w,
            Request {
                op: Op::Write,
                offset: 4096,
                len: 8192,
                fua: true,
                unregistered: false,
            }
        );
        let r = Request::decode(&iod(
            sys::UBLK_IO_OP_READ | sys::UBLK_IO_F_NEED_REG_BUF,
            0,
            8,
        ));
        assert!(r.unregistered && r.carries_data());
        assert!(w.carries_data());
        assert_eq!(w.fits(8192), Some(8192));
        assert_eq!(w.fits(4096), None);
        let z = Request::decode(&iod(sys::UBLK_IO_OP_WRITE_ZEROES, 0, 8));
        assert_eq!(z.op, Op::WriteZeroes { unmap: true });
        let z = Request::decode(&iod(
            sys::UBLK_IO_OP_WRITE_ZEROES | sys::UBLK_IO_F_NOUNMAP,
            0,
            8,
        ));
        assert_eq!(z.op, Op::WriteZeroes { unmap: false });
        // A discard's length does not wrap (u32::MAX sectors is almost 2 TiB).
        let d = Request::decode(&iod(sys::UBLK_IO_OP_DISCARD, 0, u32::MAX));
        assert_eq!((d.op, d.len), (Op::Discard, (u32::MAX as u64) << 9));
        assert!(!d.carries_data());
        assert_eq!(Request::decode(&iod(0xfe, 0, 0)).op, Op::Unsupported(0xfe));
    }
}
