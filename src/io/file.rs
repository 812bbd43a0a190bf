//! [`FileDev`]: a regular file or a block device behind the [`BlockDev`] trait.
//!
//! Opened with O_DIRECT when asked; an unaligned buffer then goes through an aligned bounce
//! buffer, so callers never see EINVAL for alignment. `flush` is fdatasync, which on a block
//! device sends a cache flush and on a file flushes the file's data and the file system's
//! journal as needed.
//!
//! Invariant: with O_DIRECT, every read and write that reaches the kernel is aligned to the
//! device's O_DIRECT alignment in offset and length (its logical block size: 4096 on a 4Kn
//! device) and to a page in memory; anything else goes through the bounce buffer.

use super::kernel::file_dio_alignment;
use super::{check_range, AlignedBuf, BlockDev, BlockSizes};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub use super::kernel::{block_device_block_sizes, block_device_size, block_device_unclaimed};

/// How a device is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

pub struct FileDev {
    file: File,
    name: String,
    path: PathBuf,
    size: u64,
    direct: bool,
    is_block: bool,
    /// Its logical size is also the alignment of the offset and length of every O_DIRECT I/O.
    block_sizes: BlockSizes,
}

impl FileDev {
    /// Opens `path`. `direct` asks for O_DIRECT; if the file system refuses it (tmpfs), the
    /// device silently falls back to buffered I/O, which `flush` still makes durable.
    ///
    /// A block device opened for writing is opened exclusively (O_EXCL: the kernel's claim,
    /// as mount, dm and mkfs take it): a mounted device, one under device-mapper or md, or
    /// one another program holds exclusively is refused with "busy", and while we hold it
    /// nobody can mount it or build a dm table on it. A partition and its whole disk exclude
    /// each other the same way.
    pub fn open(path: &Path, access: Access, direct: bool) -> io::Result<FileDev> {
        let ctx = |e: io::Error, what: &str| {
            io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
        };
        let exclusive = access == Access::ReadWrite
            && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let mut opts = OpenOptions::new();
        opts.read(true).write(access == Access::ReadWrite);
        let excl = if exclusive { libc::O_EXCL } else { 0 };
        let open = |extra: i32| {
            let mut o = opts.clone();
            o.custom_flags(excl | extra);
            o.open(path).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    busy(path)
                } else {
                    ctx(e, "cannot open")
                }
            })
        };
        let (file, direct) = if direct {
            match open(libc::O_DIRECT) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0)?, false),
                Err(e) => return Err(e),
            }
        } else {
            (open(0)?, false)
        };
        let meta = file.metadata().map_err(|e| ctx(e, "cannot stat"))?;
        let is_block = meta.file_type().is_block_device();
        let (size, block_sizes) = if is_block {
            let size = block_device_size(&file)
                .map_err(|e| ctx(e, "cannot read the block device size"))?;
            let bs = block_device_block_sizes(&file)
                .map_err(|e| ctx(e, "cannot read the block device's block sizes"))?;
            (size, bs)
        } else if meta.file_type().is_file() {
            // A file is addressed in bytes; with O_DIRECT its file system's alignment applies.
            let logical = if direct {
                file_dio_alignment(&file).unwrap_or(512)
            } else {
                512
            };
            (
                meta.len(),
                BlockSizes {
                    logical,
                    physical: logical,
                },
            )
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a regular file or a block device", path.display()),
            ));
        };
        if !block_sizes.logical.is_power_of_two() || block_sizes.logical < 512 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: unusable logical block size {}",
                    path.display(),
                    block_sizes.logical
                ),
            ));
        }
        Ok(FileDev {
            file,
            name: path.display().to_string(),
            path: path.to_path_buf(),
            size,
            direct,
            is_block,
            block_sizes,
        })
    }

    /// The device's block sizes: a block device's own (BLKSSZGET, BLKPBSZGET); for a regular
    /// file 512, or its file system's O_DIRECT alignment when opened with O_DIRECT.
    pub fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    /// Test only: behave as a device with `logical`-byte logical blocks (a 4Kn device) on a
    /// file whose file system would accept smaller O_DIRECT I/O.
    #[cfg(test)]
    pub(crate) fn with_logical_block_size(mut self, logical: u32) -> FileDev {
        self.block_sizes = BlockSizes {
            logical,
            physical: logical,
        };
        self
    }

    /// Takes an advisory lock (exclusive for devices we write, shared for the source) so that
    /// two clones never use the same destination or metadata, and a destination is never
    /// another clone's source. Fails at once if another process holds a conflicting lock.
    /// Waits up to 3 s for a conflicting lock to go away, because udev briefly holds a shared
    /// lock on block devices it is probing (a fresh loop device, say).
    pub fn lock(&self, exclusive: bool) -> io::Result<()> {
        let how = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(self.file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: cannot lock: {e}", self.name),
                ));
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!(
                        "{}: busy: locked by another process (another ublk-clone device using it, \
                         or a tool holding it open)",
                        self.name
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block
    }

    /// The offset and length alignment of O_DIRECT I/O (a power of two >= 512).
    fn align(&self) -> u64 {
        self.block_sizes.logical as u64
    }

    /// Whether an I/O can go to the kernel as it is (without the bounce buffer).
    fn aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        !self.direct
            || ((ptr as usize) % AlignedBuf::ALIGN == 0
                && len as u64 % self.align() == 0
                && offset % self.align() == 0)
    }

    /// pread of the whole buffer; the one place reads reach the kernel.
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.assert_kernel_io(buf.as_ptr(), buf.len(), offset);
        self.file.read_exact_at(buf, offset)
    }

    /// pwrite of the whole buffer; the one place writes reach the kernel.
    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.assert_kernel_io(buf.as_ptr(), buf.len(), offset);
        self.file.write_all_at(buf, offset)
    }

    /// The module's invariant, checked in debug builds on every I/O that reaches the kernel
    /// (stated on its own, not through `aligned`, so that a wrong decision there is caught).
    fn assert_kernel_io(&self, ptr: *const u8, len: usize, offset: u64) {
        debug_assert!(
            !self.direct
                || (offset % self.align() == 0
                    && len as u64 % self.align() == 0
                    && (ptr as usize) % AlignedBuf::ALIGN == 0),
            "{}: O_DIRECT I/O of {len} bytes at {offset} is not aligned to {} bytes",
            self.name,
            self.align()
        );
    }

    fn err(&self, e: io::Error, what: &str, offset: u64, len: usize) -> io::Error {
        io::Error::new(
            e.kind(),
            format!(
                "{}: {what} of {len} bytes at offset {offset} failed: {e}",
                self.name
            ),
        )
    }
}

/// The error for a block device that someone else holds exclusively.
fn busy(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!(
            "{}: busy: the block device is mounted or held exclusively by another program \
             (a file system, device-mapper, md, another ublk-clone); unmount or release it first",
            path.display()
        ),
    )
}

impl BlockDev for FileDev {
    fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(&self.name, self.size, offset, buf.len() as u64)?;
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self
                .pread(buf, offset)
                .map_err(|e| self.err(e, "read", offset, buf.len()));
        }
        let (start, bounce_len) = bounce_span(offset, buf.len(), self.align(), self.size);
        let mut bounce = AlignedBuf::try_zeroed(bounce_len)
            .map_err(|e| self.err(e, "read", offset, buf.len()))?;
        self.pread(&mut bounce, start)
            .or_else(|e| {
                // The last partial block of a file whose size is not a multiple of it.
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| self.err(e, "read", offset, buf.len()))?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(&self.name, self.size, offset, buf.len() as u64)?;
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            return self
                .pwrite(buf, offset)
                .map_err(|e| self.err(e, "write", offset, buf.len()));
        }
        // Read-modify-write through an aligned bounce buffer; only the copy when the write
        // covers whole blocks (its memory alone is misaligned).
        let (start, bounce_len) = bounce_span(offset, buf.len(), self.align(), self.size);
        let mut bounce = AlignedBuf::try_zeroed(bounce_len)
            .map_err(|e| self.err(e, "write", offset, buf.len()))?;
        if (start, bounce_len) != (offset, buf.len()) {
            let end = (start + bounce_len as u64).min(self.size);
            self.read_at(&mut bounce[..(end - start) as usize], start)?;
        }
        let skip = (offset - start) as usize;
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.pwrite(&bounce, start)
            .map_err(|e| self.err(e, "write", offset, buf.len()))
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: flush (fdatasync) failed: {e}", self.name),
            )
        })
    }

    fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
        check_range(&self.name, self.size, offset, len)?;
        if self.is_block || len == 0 {
            return Ok(Vec::new());
        }
        super::sparse::holes(self.file.as_raw_fd(), offset, len)
            .map_err(|e| self.err(e, "finding holes", offset, len as usize))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(&self.name, self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let zeroed = super::sparse::zero_range(self.file.as_raw_fd(), offset, len)
            .map_err(|e| self.err(e, "zeroing", offset, len as usize))?;
        if zeroed {
            return Ok(());
        }
        super::write_zero_buffers(self, offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(&self.name, self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let rc = if self.is_block {
            const BLKDISCARD: libc::c_ulong = 0x1277;
            let range = [offset, len];
            // SAFETY: BLKDISCARD reads two u64 through the pointer.
            unsafe { libc::ioctl(self.file.as_raw_fd(), BLKDISCARD as _, range.as_ptr()) }
        } else {
            // SAFETY: plain syscall on an owned fd.
            unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            }
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            // A device without discard support: discard is only a hint.
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                return Ok(());
            }
            return Err(self.err(e, "discard", offset, len as usize));
        }
        Ok(())
    }
}

/// The `align`-aligned span covering `[offset, offset+len)` (a range inside a device of
/// `size` bytes): its end stops at the device's last block, never past it.
fn bounce_span(offset: u64, len: usize, align: u64, size: u64) -> (u64, usize) {
    let start = offset / align * align;
    let end = (offset + len as u64).div_ceil(align) * align;
    let end = end.min(size.div_ceil(align) * align);
    (start, (end - start) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_io_roundtrips_through_bounce_buffer() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![7u8; 3 * 4096])?;
        let dev = FileDev::open(&path, Access::ReadWrite, true)?;
        dev.write_at(&[1, 2, 3], 4095)?;
        let mut back = [0u8; 5];
        dev.read_at(&mut back, 4094)?;
        assert_eq!(back, [7, 1, 2, 3, 7]);
        assert!(
            dev.read_at(&mut back, 3 * 4096 - 2).is_err(),
            "read past the end must fail"
        );
        Ok(())
    }

    /// Whole blocks from misaligned memory go through the bounce buffer without a read
    /// first: the write replaces exactly its blocks.
    #[test]
    fn whole_blocks_from_misaligned_memory_replace_exactly_their_blocks() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![7u8; 4 * 4096])?;
        let dev = FileDev::open(&path, Access::ReadWrite, true)?.with_logical_block_size(4096);
        assert!(
            dev.is_direct(),
            "the test needs O_DIRECT on {}",
            path.display()
        );
        let mut v = vec![9u8; 2 * 4096 + 1];
        let data = &v[1..];
        assert!((data.as_ptr() as usize) % AlignedBuf::ALIGN != 0);
        dev.write_at(data, 4096)?;
        let mut back = vec![0u8; 4 * 4096];
        dev.read_at(&mut back, 0)?;
        let mut want = vec![7u8; 4 * 4096];
        want[4096..3 * 4096].fill(9);
        assert!(
            back == want,
            "the write did not replace exactly blocks 1 and 2"
        );
        v[1] = 1;
        dev.write_at(&v[1..513], 3 * 4096)?;
        dev.read_at(&mut back[..4096], 3 * 4096)?;
        assert_eq!((back[0], back[1], back[511], back[512]), (1, 9, 9, 7));
        Ok(())
    }

    #[test]
    fn bounce_span_is_aligned_to_the_logical_block_and_stops_at_the_device_end() {
        assert_eq!(bounce_span(4095, 3, 512, 1 << 20), (3584, 1024));
        assert_eq!(bounce_span(4095, 3, 4096, 1 << 20), (0, 8192));
        assert_eq!(bounce_span(512, 512, 4096, 1 << 20), (0, 4096));
        // Never past the device's last block (a 512-byte-sector device of 2.5 KiB).
        assert_eq!(bounce_span(2048, 100, 512, 2560), (2048, 512));
        assert_eq!(bounce_span(2000, 100, 4096, 2560), (0, 4096));
    }

    #[test]
    fn a_regular_file_has_512_byte_sectors_without_o_direct() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![0u8; 8192])?;
        let dev = FileDev::open(&path, Access::ReadOnly, false)?;
        assert_eq!(dev.block_sizes(), BlockSizes::SECTOR);
        Ok(())
    }

    /// A 4Kn device: every I/O that reaches the kernel is 4096-aligned (`pread`/`pwrite`
    /// assert it), whatever the caller asks for, and the data round-trips.
    #[test]
    fn io_to_a_4kn_device_reaches_the_kernel_4096_aligned() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("dev");
        let image: Vec<u8> = (0..4 * 4096u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &image)?;
        let dev = FileDev::open(&path, Access::ReadWrite, true)?.with_logical_block_size(4096);
        assert!(
            dev.is_direct(),
            "the test needs O_DIRECT on {}",
            path.display()
        );
        assert_eq!(dev.block_sizes().logical, 4096);
        let mut expect = image.clone();
        // 512-byte-sector I/O, an unaligned write across a block boundary, an aligned
        // block, and the last bytes of the device; from page-aligned buffers (which would
        // go to the kernel as they are if the offset and length allowed it) and from
        // unaligned ones.
        for (off, len) in [
            (512u64, 512usize),
            (4095, 3),
            (8192, 4096),
            (4 * 4096 - 7, 7),
        ] {
            for page_aligned in [true, false] {
                let mut data = AlignedBuf::zeroed(len + 1);
                let data = if page_aligned {
                    &mut data[..len]
                } else {
                    &mut data[1..]
                };
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (i as u8) ^ (0x5a + page_aligned as u8);
                }
                dev.write_at(data, off)?;
                expect[off as usize..off as usize + len].copy_from_slice(data);
                let mut back = AlignedBuf::zeroed(len);
                dev.read_at(&mut back, off)?;
                assert_eq!(&back[..], &data[..], "read back at {off}");
            }
        }
        let mut all = AlignedBuf::zeroed(4 * 4096);
        dev.read_at(&mut all, 0)?;
        assert_eq!(&all[..], &expect[..]);
        // A 4 KiB read into an unaligned buffer (as the source fingerprint's samples are)
        // reads the same data as through the page cache.
        let buffered = FileDev::open(&path, Access::ReadOnly, false)?;
        let (mut direct_back, mut cached_back) = (vec![0u8; 4097], vec![0u8; 4097]);
        dev.read_at(&mut direct_back[1..], 4096)?;
        buffered.read_at(&mut cached_back[1..], 4096)?;
        assert_eq!(direct_back, cached_back);
        assert_eq!(&direct_back[1..], &expect[4096..8192]);
        Ok(())
    }
}
