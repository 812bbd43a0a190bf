//! What the kernel says about a block device or a file, through ioctls and statx: its size,
//! its logical and physical block sizes, the O_DIRECT alignment of a file, and whether
//! somebody holds a block device exclusively.
//!
//! Invariant: every function here only asks; none changes the device or keeps a claim on it
//! (the O_EXCL probe closes the device again before returning).

use super::BlockSizes;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

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

/// The logical (BLKSSZGET) and physical (BLKPBSZGET) block sizes of a block device.
pub fn block_device_block_sizes(file: &File) -> io::Result<BlockSizes> {
    const BLKSSZGET: libc::c_ulong = 0x1268;
    const BLKPBSZGET: libc::c_ulong = 0x127b;
    let mut logical: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid and aligned.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKSSZGET as _,
            &mut logical as *mut libc::c_int,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut physical: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer, valid and aligned.
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKPBSZGET as _,
            &mut physical as *mut libc::c_uint,
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let logical = u32::try_from(logical).unwrap_or(0);
    Ok(BlockSizes {
        logical,
        physical: physical.max(logical),
    })
}

/// The offset and length alignment O_DIRECT I/O to a regular file needs, as its file system
/// reports it (statx STATX_DIOALIGN, Linux 6.1); `None` where it is not reported.
pub(super) fn file_dio_alignment(file: &File) -> Option<u32> {
    // SAFETY: statx is plain old data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on a descriptor we own (AT_EMPTY_PATH with an empty path) writes one
    // statx struct through the valid pointer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let reported = rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0;
    let align = stx.stx_dio_offset_align;
    (reported && align.is_power_of_two()).then_some(align.max(512))
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
