//! Block-device I/O layer: one synchronous, positional [`BlockDev`] trait and its
//! implementations.
//!
//! - [`file::FileDev`]: a regular file or block device (pread/pwrite/fdatasync, O_DIRECT
//!   when the caller asks and the buffers allow it);
//! - [`mem::MemDev`]: an in-memory device with a volatile write cache model and fault
//!   injection, for host tests;
//! - [`record::RecordingDev`]: wraps any device and records every write, discard and flush in
//!   one shared, ordered log, from which crash states are built;
//! - [`signature`]: what a device holds before it is overwritten (file-system, partition-table,
//!   RAID, LVM, LUKS and swap magic numbers) and whether it is blank;
//! - [`identity::DeviceIdentity`]: recognises a device again under any path.
//!
//! The metadata commit protocol, the background hydrator and the tests all use this trait. The
//! ublk queues' hot path uses io_uring on the same file descriptors instead (see `ublk`).
//!
//! Invariant kept by every implementation: `flush()` returning `Ok` means every write and
//! discard that completed before `flush()` was called is durable.

pub mod file;
pub mod holders;
pub mod identity;
pub mod mem;
pub mod record;
pub mod signature;

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
    /// Writes zeroes over `len` bytes at `offset` (like a write: not durable until a flush).
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.name(), self.size(), offset, len)?;
        let zeroes = ZEROES.as_slice();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
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
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).write_zeroes(offset, len)
    }
}

/// A page-aligned heap buffer, usable for O_DIRECT I/O.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    /// A zero-filled buffer of `len` bytes (rounded up to at least one byte internally).
    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (see `layout`).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        // A 4096-byte alignment with a non-zero size is always a valid layout unless the size
        // overflows isize, which no buffer of ours comes near.
        std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN)
            .unwrap_or_else(|_| std::alloc::Layout::new::<[u8; 4096]>())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with the same layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
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
