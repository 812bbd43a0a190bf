//! [`FileDev`]: a regular file or a block device behind the [`BlockDev`] trait.
//!
//! Opened with O_DIRECT when asked; an unaligned buffer then goes through an aligned bounce
//! buffer, so callers never see EINVAL for alignment. `flush` is fdatasync, which on a block
//! device sends a cache flush and on a file flushes the file's data and the file system's
//! journal as needed.

use super::{check_range, AlignedBuf, BlockDev};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

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
        let size = if is_block {
            block_device_size(&file).map_err(|e| ctx(e, "cannot read the block device size"))?
        } else if meta.file_type().is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a regular file or a block device", path.display()),
            ));
        };
        Ok(FileDev {
            file,
            name: path.display().to_string(),
            path: path.to_path_buf(),
            size,
            direct,
            is_block,
        })
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

    fn aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        !self.direct
            || ((ptr as usize) % AlignedBuf::ALIGN == 0 && len % 512 == 0 && offset % 512 == 0)
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

/// Whether nobody holds the block device at `path` exclusively (mounted, under dm or md,
/// another clone's destination or metadata): opens it with O_EXCL and closes it again.
/// `Ok(true)` for anything that is not a block device.
pub fn block_device_unclaimed(path: &Path) -> io::Result<bool> {
    if !std::fs::metadata(path)?.file_type().is_block_device() {
        return Ok(true);
    }
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
    {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Size of a block device in bytes (BLKGETSIZE64).
pub fn block_device_size(file: &File) -> io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid and aligned.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

impl BlockDev for FileDev {
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
                .file
                .read_exact_at(buf, offset)
                .map_err(|e| self.err(e, "read", offset, buf.len()));
        }
        let (start, bounce_len) = bounce_span(offset, buf.len());
        let mut bounce = AlignedBuf::zeroed(bounce_len);
        let avail = (self.size - start).min(bounce_len as u64) as usize;
        let rounded = avail.div_ceil(512) * 512;
        self.file
            .read_exact_at(&mut bounce[..rounded.min(bounce_len)], start)
            .or_else(|e| {
                // The last partial sector of a file that is not a multiple of 512.
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
                .file
                .write_all_at(buf, offset)
                .map_err(|e| self.err(e, "write", offset, buf.len()));
        }
        // Read-modify-write through an aligned bounce buffer.
        let (start, bounce_len) = bounce_span(offset, buf.len());
        let mut bounce = AlignedBuf::zeroed(bounce_len);
        let end = (start + bounce_len as u64).min(self.size);
        let mut old = vec![0u8; (end - start) as usize];
        self.read_at(&mut old, start)?;
        bounce[..old.len()].copy_from_slice(&old);
        let skip = (offset - start) as usize;
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.file
            .write_all_at(&bounce, start)
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

/// The 4 KiB-aligned span covering `[offset, offset+len)`.
fn bounce_span(offset: u64, len: usize) -> (u64, usize) {
    let a = AlignedBuf::ALIGN as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).div_ceil(a) * a;
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
}
