//! Checks on the devices a command is given: that they are distinct, their locks (naming the
//! running clone that holds a busy one), and their block sizes.
//!
//! Invariant: a command that writes a metadata device (`format`, `reset-mode`, like `create`)
//! holds its exclusive lock before it reads what it will overwrite, so it cannot race a live
//! daemon, which holds that lock for as long as it runs.

use super::control::{self, DaemonRecord};
use super::error::{refuse, Named, Result};
use crate::io::file::FileDev;
use crate::io::identity::DeviceIdentity;
use crate::io::{BlockDev, BlockSizes};
use std::path::Path;

/// Takes `dev`'s advisory lock (exclusive for a device the command writes, shared for a
/// source). `flag` and `path` name it as the user did ("--metadata", "meta.img").
pub fn lock(dev: &FileDev, exclusive: bool, flag: &str, path: &Path) -> Result<()> {
    let Err(e) = dev.lock(exclusive) else {
        return Ok(());
    };
    if e.kind() == std::io::ErrorKind::ResourceBusy {
        if let Some((rec, role)) = holder(path) {
            refuse!(
                "{flag} {}: busy: it is the {role} of the running clone {} (daemon pid {}); \
                 stop that clone first with `ublk-clone stop {}`",
                path.display(),
                rec.device,
                rec.pid,
                rec.device
            );
        }
    }
    // The error names the device already ("PATH: busy: locked by another process ...").
    Err(e).named(|| format!("{flag} cannot be locked"))
}

/// The running clone whose daemon record lists `path` (compared by identity, whatever path
/// spelled it) as its metadata, destination or source.
fn holder(path: &Path) -> Option<(DaemonRecord, &'static str)> {
    let id = DeviceIdentity::of_path(path).ok()?;
    control::list_records().into_iter().find_map(|r| {
        let role = [
            ("metadata", &r.metadata),
            ("destination", &r.dest),
            ("source", &r.source),
        ]
        .into_iter()
        .find(|(_, p)| DeviceIdentity::of_path(p).ok().as_ref() == Some(&id))?
        .0;
        Some((r, role))
    })
}

/// Refuses two roles given the same file or device (compared by identity, so a symbolic link
/// or another spelling of the path is caught too). Paths that do not exist are left to the
/// caller's existence check.
pub fn check_distinct(devs: &[(&str, &Path)]) -> Result<()> {
    let ids: Vec<Option<DeviceIdentity>> = devs
        .iter()
        .map(|(_, p)| DeviceIdentity::of_path(p).ok())
        .collect();
    for (i, (flag_a, path_a)) in devs.iter().enumerate() {
        for (j, (flag_b, path_b)) in devs.iter().enumerate().skip(i + 1) {
            if ids[i].is_some() && ids[i] == ids[j] {
                refuse!(
                    "{flag_b} {} is the same file or device as {flag_a} {}: the source, the \
                     destination and the metadata must be three different devices",
                    path_b.display(),
                    path_a.display()
                );
            }
        }
    }
    Ok(())
}

/// Refuses what cannot serve as a device: neither a regular file nor a block device (a
/// directory, a FIFO), or, for a device the command writes (`true`), one it may not write:
/// missing write permission, an immutable file (`chattr +i`), a read-only file system. Paths
/// that do not exist are left to the caller's existence check.
pub fn check_usable(devs: &[(&str, &Path, bool)]) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    for (flag, p, written) in devs {
        let Ok(meta) = std::fs::metadata(p) else {
            continue;
        };
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            let kind = if ft.is_dir() {
                "a directory"
            } else {
                "a special file"
            };
            refuse!(
                "{flag} {}: {kind}, not a regular file or a block device; give the path of an \
                 image file or a block device",
                p.display()
            );
        }
        if !written {
            continue;
        }
        let c = std::ffi::CString::new(p.as_os_str().as_bytes())
            .named(|| format!("{flag} {}: the path contains a NUL byte", p.display()))?;
        // SAFETY: access() reads a valid NUL-terminated string and writes nothing.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
            let e = std::io::Error::last_os_error();
            refuse!(
                "{flag} {}: not writable ({e}), but it is written; check its permissions and \
                 attributes (`lsattr`, `chattr -i`) and that its file system is mounted \
                 read-write",
                p.display()
            );
        }
    }
    Ok(())
}

/// The block sizes of a clone of `source` onto `dest`: the larger logical and physical block
/// size of the two, so that no request the kernel sends the clone is too small or misaligned
/// for either (with O_DIRECT a 4Kn device refuses anything not aligned to 4096). Refuses what
/// ublk cannot advertise (logical blocks larger than a page), a `region_size` that does not
/// hold whole logical blocks (`region_what` says where it comes from), and a source that is
/// not a whole number of them.
pub fn clone_block_sizes(
    source: (&dyn BlockDev, &Path),
    dest: (&FileDev, &Path),
    region_size: u64,
    region_what: &str,
) -> Result<BlockSizes> {
    let sizes = source.0.block_sizes().stack(dest.0.block_sizes());
    let logical = sizes.logical;
    // The device whose blocks set the clone's (the destination on a tie).
    let (flag, path) = if source.0.block_sizes().logical > dest.0.block_sizes().logical {
        ("--source", source.1)
    } else {
        ("--dest", dest.1)
    };
    let page = page_size();
    if logical as u64 > page {
        refuse!(
            "{flag} {}: its logical block size is {logical} bytes, larger than the {page}-byte \
             page size, the largest a ublk device can advertise; use a device with smaller \
             logical blocks",
            path.display()
        );
    }
    if region_size < logical as u64 {
        refuse!(
            "{region_what} {region_size} is smaller than the {logical}-byte logical block size of \
             {flag} {}: a region must hold whole blocks; use a region size of at least {logical}",
            path.display()
        );
    }
    let source_size = source.0.size();
    if source_size % logical as u64 != 0 {
        refuse!(
            "--source {}: its size {source_size} is not a multiple of the clone's {logical}-byte \
             logical block size (that of {flag} {}), so its last block could not be read or \
             written; use a source whose size is a multiple of {logical} bytes",
            source.1.display(),
            path.display()
        );
    }
    Ok(sizes)
}

/// Refuses a metadata device whose logical blocks are larger than the 4096-byte metadata
/// block: every metadata write must be a whole number of its blocks.
pub fn check_metadata_block_size(meta: &FileDev, path: &Path) -> Result<()> {
    let block = crate::metadata::checksum::BLOCK_SIZE as u32;
    let logical = meta.block_sizes().logical;
    if logical > block {
        refuse!(
            "--metadata {}: its logical block size is {logical} bytes, larger than the \
             {block}-byte metadata block; use a device with logical blocks of at most {block} bytes",
            path.display()
        );
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::file::Access;

    /// A regular file of `size` bytes behaving as a device with `logical`-byte blocks.
    fn dev(dir: &Path, name: &str, size: u64, logical: u32) -> (FileDev, std::path::PathBuf) {
        let path = dir.join(name);
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(size).expect("set_len");
        let d = FileDev::open(&path, Access::ReadOnly, false)
            .expect("open")
            .with_logical_block_size(logical);
        (d, path)
    }

    fn err(r: Result<BlockSizes>) -> String {
        match r {
            Ok(s) => panic!("accepted: {s:?}"),
            Err(e) => super::super::error::chain(&e),
        }
    }

    /// A clone on a 4Kn destination (or source) takes the larger logical block size of its
    /// devices.
    #[test]
    fn a_clone_takes_the_larger_logical_block_size() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (s512, sp) = dev(dir.path(), "s512", 1 << 20, 512);
        let (d4k, dp) = dev(dir.path(), "d4k", 1 << 20, 4096);
        let (s4k, sp4) = dev(dir.path(), "s4k", 1 << 20, 4096);
        let (d512, dp5) = dev(dir.path(), "d512", 1 << 20, 512);
        let both = |s: (&FileDev, &Path), d: (&FileDev, &Path)| {
            clone_block_sizes((s.0 as &dyn BlockDev, s.1), d, 65536, "--region-size")
                .map(|b| b.logical)
        };
        assert_eq!(both((&s512, &sp), (&d512, &dp5)).ok(), Some(512));
        assert_eq!(both((&s512, &sp), (&d4k, &dp)).ok(), Some(4096));
        assert_eq!(both((&s4k, &sp4), (&d512, &dp5)).ok(), Some(4096));
        assert_eq!(both((&s4k, &sp4), (&d4k, &dp)).ok(), Some(4096));
        Ok(())
    }

    #[test]
    fn block_sizes_that_do_not_fit_are_refused_with_the_device_named() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let (src, sp) = dev(dir.path(), "src", (1 << 20) + 512, 512);
        let (d4k, dp) = dev(dir.path(), "d4k", 2 << 20, 4096);
        let (src_ok, sp_ok) = dev(dir.path(), "src-ok", 1 << 20, 512);
        // A source that is not a whole number of the destination's blocks.
        let e = err(clone_block_sizes(
            (&src, &sp),
            (&d4k, &dp),
            65536,
            "--region-size",
        ));
        assert!(
            e.contains("src") && e.contains("not a multiple of the clone's 4096"),
            "{e}"
        );
        assert!(e.contains("--dest") && e.contains("d4k"), "{e}");
        // A region smaller than a logical block.
        let e = err(clone_block_sizes(
            (&src_ok, &sp_ok),
            (&d4k, &dp),
            2048,
            "--region-size",
        ));
        assert!(
            e.contains("--region-size 2048 is smaller than the 4096-byte"),
            "{e}"
        );
        assert!(e.contains("d4k"), "{e}");
        // Logical blocks larger than a page cannot be advertised by ublk.
        let huge = (page_size() * 2) as u32;
        let (dbig, dbp) = dev(dir.path(), "dbig", 2 << 20, huge);
        let e = err(clone_block_sizes(
            (&src_ok, &sp_ok),
            (&dbig, &dbp),
            1 << 20,
            "--region-size",
        ));
        assert!(e.contains("dbig") && e.contains("page size"), "{e}");
        // A metadata device with blocks larger than a metadata block.
        let (m8k, mp) = dev(dir.path(), "m8k", 8 << 20, 8192);
        let e = check_metadata_block_size(&m8k, &mp)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("m8k") && e.contains("4096-byte metadata block")));
        let (m4k, mp4) = dev(dir.path(), "m4k", 8 << 20, 4096);
        assert!(check_metadata_block_size(&m4k, &mp4).is_ok());
        Ok(())
    }
}
