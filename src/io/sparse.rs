//! What a file says about its own zeroes: the holes of a sparse file (`SEEK_DATA`/`SEEK_HOLE`),
//! and zeroing a range without writing it (`fallocate`).
//!
//! Used by [`super::file::FileDev`]: hole-aware hydration asks the source which ranges read as
//! zeroes, and zeroes them on the destination instead of copying them, so hydrating a mostly
//! empty image costs the time of its data, not of its size.
//!
//! Invariant: a range is reported as zeroes only if the file system says it is a hole; when the
//! file system cannot tell (no `SEEK_HOLE` support, a block device), nothing is reported and
//! every byte is read.

use std::io;
use std::os::fd::RawFd;

/// The holes of the regular file `fd` inside `[offset, offset+len)`, in order, as
/// `(offset, len)` ranges. Past the end of the file counts as a hole (it reads as zeroes).
pub fn holes(fd: RawFd, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match seek(fd, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data at or after `pos`: a hole to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            // The file system cannot tell: nothing is known.
            Err(e) if unsupported(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        if data > pos {
            out.push((pos, data.min(end) - pos));
        }
        if data >= end {
            break;
        }
        pos = match seek(fd, data, libc::SEEK_HOLE) {
            Ok(h) => h,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
            Err(e) => return Err(e),
        };
    }
    Ok(out)
}

fn seek(fd: RawFd, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a file descriptor the caller owns; the file position it moves is not
    // used by anyone (every transfer is positional).
    let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
    )
}

/// Makes `[offset, offset+len)` of `fd` (a file or a block device) read as zeroes without
/// writing them: a punched hole (which keeps a file or a thin device thin), else a zeroed range.
/// Returns false where neither is supported (the caller writes zeroes). Like a write, not
/// durable until a flush.
pub fn zero_range(fd: RawFd, offset: u64, len: u64) -> io::Result<bool> {
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    for mode in [libc::FALLOC_FL_PUNCH_HOLE, libc::FALLOC_FL_ZERO_RANGE] {
        // SAFETY: plain syscall on a file descriptor the caller owns.
        let r =
            unsafe { libc::fallocate(fd, mode | keep, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if !unsupported(&e) {
            return Err(e);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    #[test]
    fn holes_of_a_sparse_file_are_found_and_zeroed_ranges_become_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("create");
        const M: u64 = 1 << 20;
        f.set_len(8 * M).expect("size");
        f.write_all_at(&[1; 4096], 2 * M).expect("data at 2M");
        f.write_all_at(&[2; 4096], 5 * M + 4096)
            .expect("data at 5M+4K");
        let fd = f.as_raw_fd();
        let h = holes(fd, 0, 8 * M).expect("holes");
        // Every reported hole reads as zeroes, and the data is outside them.
        for &(o, l) in &h {
            let mut buf = vec![0xffu8; l as usize];
            f.read_exact_at(&mut buf, o).expect("read");
            assert!(buf.iter().all(|b| *b == 0), "hole {o}+{l} holds data");
            for d in [2 * M, 5 * M + 4096] {
                assert!(!(o..o + l).contains(&d), "data at {d} reported as a hole");
            }
        }
        let total: u64 = h.iter().map(|(_, l)| l).sum();
        assert!(
            total >= 8 * M - 2 * M,
            "only {total} bytes of holes found: {h:?}"
        );
        // A window inside one hole, and one inside the data.
        assert_eq!(holes(fd, 3 * M, M).expect("holes"), vec![(3 * M, M)]);
        assert_eq!(holes(fd, 2 * M, 4096).expect("holes"), vec![]);
        // Zeroing turns data into a hole that reads as zeroes.
        assert!(zero_range(fd, 2 * M, 4096).expect("zero"));
        let mut buf = vec![0xffu8; 4096];
        f.read_exact_at(&mut buf, 2 * M).expect("read");
        assert_eq!(buf, vec![0; 4096]);
        assert_eq!(holes(fd, 2 * M, 4096).expect("holes"), vec![(2 * M, 4096)]);
    }
}
