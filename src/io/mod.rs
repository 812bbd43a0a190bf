//! Block-device I/O layer: one synchronous, positional [`BlockDev`] trait and its
//! implementations.
//!
//! - [`file::FileDev`]: a regular file or block device (pread/pwrite/fdatasync, O_DIRECT
//!   when the caller asks and the buffers allow it);
//! - [`kernel`]: what the kernel says about a block device (size, block sizes, O_DIRECT
//!   alignment, whether someone holds it exclusively);
//! - [`mem::MemDev`]: an in-memory device with a volatile write cache model and fault
//!   injection, for host tests;
//! - [`record::RecordingDev`]: wraps any device and records every write, discard and flush in
//!   one shared, ordered log, from which crash states are built;
//! - [`span::SpanDev`]: several devices at byte offsets of one address space, seen as one;
//! - [`observe::IoObserver`]: a listener told of the destination writes, discards and flushes
//!   a data path completed by itself (the recorder of the ublk queues' io_uring I/O);
//! - [`AlignedBuf`]: page-aligned buffers for O_DIRECT;
//! - [`signature`]: what a device holds before it is overwritten (file-system, partition-table,
//!   RAID, LVM, LUKS and swap magic numbers) and whether it is blank;
//! - [`identity::DeviceIdentity`]: recognises a device again under any path;
//! - [`sparse`]: a sparse file's holes, and zeroing a range without writing it.
//!
//! The metadata commit protocol, the background hydrator and the tests all use this trait. The
//! ublk queues' hot path uses io_uring on the same file descriptors instead (see `ublk`).
//!
//! Invariant kept by every implementation: `flush()` returning `Ok` means every write and
//! discard that completed before `flush()` was called is durable.

mod aligned;
pub mod file;
pub mod holders;
pub mod identity;
pub mod kernel;
pub mod mem;
pub mod nbd;
pub mod observe;
pub mod record;
pub mod signature;
pub mod span;
pub mod sparse;

pub use aligned::AlignedBuf;

use std::io;

/// The unit of the kernel's and the ublk protocol's sector numbers. Not the alignment I/O
/// needs: that is a device's logical block size ([`BlockSizes`]), 4096 on a 4Kn device.
pub const SECTOR_SIZE: u64 = 512;

/// A device's block sizes in bytes, as the kernel reports them (BLKSSZGET, BLKPBSZGET).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// The smallest unit the device can be addressed in; with O_DIRECT every I/O must be
    /// aligned to it in offset and length (4096 on a 4Kn device).
    pub logical: u32,
    /// The unit the device writes internally: smaller writes are read-modify-write.
    pub physical: u32,
}

impl BlockSizes {
    /// A classic 512-byte-sector device (and what a regular file is taken for).
    pub const SECTOR: BlockSizes = BlockSizes {
        logical: 512,
        physical: 512,
    };

    /// What a device stacked on both `self` and `other` must advertise so that no request it
    /// accepts is too small or misaligned for either (device-mapper's stacking rule): the
    /// larger logical and the larger physical size, the physical never below the logical.
    pub fn stack(self, other: BlockSizes) -> BlockSizes {
        let logical = self.logical.max(other.logical);
        BlockSizes {
            logical,
            physical: self.physical.max(other.physical).max(logical),
        }
    }
}

/// A remote device out of reach: since when, and the last reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkDown {
    pub since: std::time::SystemTime,
    pub reason: String,
}

/// A device addressed by byte offset. All methods transfer the whole buffer or fail.
pub trait BlockDev: Send + Sync {
    /// A human-readable name (path) used in error messages.
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes exactly `buf.len()` bytes at `offset`. Not durable until a later [`flush`].
    ///
    /// [`flush`]: BlockDev::flush
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write and discard completed before this call durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards `len` bytes at `offset`; afterwards the range reads back as zeroes or as its
    /// old contents (undefined, like a real device).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Writes with Forced Unit Access: durable when it returns, without making other writes
    /// durable in a recorder's model. The default, a write followed by a flush, is at least
    /// as strong; a device that can do better (the dm-log-writes recorder logs it as one FUA
    /// write) overrides it.
    fn write_fua(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.flush()
    }
    /// Ranges inside `[offset, offset+len)` known to read as zeroes without reading them (the
    /// holes of a sparse file; an NBD export's zero extents), in order, as `(offset, len)`.
    /// The default knows nothing: a range not reported must be read.
    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        check_range(self.name(), self.size(), offset, len)?;
        Ok(Vec::new())
    }
    /// Writes zeroes over `len` bytes at `offset` (like a write: not durable until a flush).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.name(), self.size(), offset, len)?;
        write_zero_buffers(self, offset, len)
    }
    /// [`BlockDev::read_at`], giving up (`TimedOut`) at `deadline` where the device can wait
    /// (a remote source); a local device ignores it.
    fn read_until(
        &self,
        buf: &mut [u8],
        offset: u64,
        deadline: std::time::Instant,
    ) -> io::Result<()> {
        let _ = deadline;
        self.read_at(buf, offset)
    }

    /// Whether the device is out of reach now (a remote source whose connections are all
    /// down), since when and why; `None` for a device that is there.
    fn link_down(&self) -> Option<LinkDown> {
        None
    }

    /// The device's logical and physical block sizes.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::SECTOR
    }
}

/// Writes zeroes over `len` bytes at `offset` of `dev` with ordinary writes, a MiB at a time
/// (what [`BlockDev::write_zeroes`] does where nothing faster is known).
pub fn write_zero_buffers<D: BlockDev + ?Sized>(dev: &D, offset: u64, len: u64) -> io::Result<()> {
    let zeroes = ZEROES.as_slice();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        dev.write_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// One MiB of zeroes, page aligned, shared by everything that writes zeroes.
pub static ZEROES: std::sync::LazyLock<AlignedBuf> =
    std::sync::LazyLock::new(|| AlignedBuf::zeroed(1 << 20));

/// Checks that `[offset, offset+len)` lies inside a device of `size` bytes.
pub fn check_range(name: &str, size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name}: I/O at offset {offset} length {len} is beyond the device size {size}"),
        )),
    }
}

impl<T: BlockDev + ?Sized> BlockDev for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn write_fua(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_fua(buf, offset)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        (**self).zero_ranges(offset, len)
    }
    fn link_down(&self) -> Option<LinkDown> {
        (**self).link_down()
    }
    fn read_until(
        &self,
        buf: &mut [u8],
        offset: u64,
        deadline: std::time::Instant,
    ) -> io::Result<()> {
        (**self).read_until(buf, offset, deadline)
    }
    fn block_sizes(&self) -> BlockSizes {
        (**self).block_sizes()
    }
}

#[cfg(test)]
mod tests {
    use super::BlockSizes;

    #[test]
    fn stacked_block_sizes_are_the_larger_of_both() {
        let n512 = BlockSizes::SECTOR;
        let e512 = BlockSizes {
            logical: 512,
            physical: 4096,
        };
        let n4k = BlockSizes {
            logical: 4096,
            physical: 4096,
        };
        assert_eq!(n512.stack(n512), n512);
        assert_eq!(n512.stack(e512), e512);
        assert_eq!(e512.stack(n4k), n4k);
        assert_eq!(n4k.stack(n512), n4k);
        // The physical size never falls below the logical one.
        let odd = BlockSizes {
            logical: 4096,
            physical: 512,
        };
        assert_eq!(odd.stack(n512), n4k);
    }
}
