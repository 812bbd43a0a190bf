//! Checks on the devices a command is given: that they are distinct, and their locks, naming
//! the running clone that holds a busy one.
//!
//! Invariant: a command that writes a metadata device (`format`, `reset-mode`, like `create`)
//! holds its exclusive lock before it reads what it will overwrite, so it cannot race a live
//! daemon, which holds that lock for as long as it runs.

use super::control::{self, DaemonRecord};
use crate::io::file::FileDev;
use crate::io::identity::DeviceIdentity;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Takes `dev`'s advisory lock (exclusive for a device the command writes, shared for a
/// source). `flag` and `path` name it as the user did ("--metadata", "meta.img").
pub fn lock(dev: &FileDev, exclusive: bool, flag: &str, path: &Path) -> Result<()> {
    let Err(e) = dev.lock(exclusive) else {
        return Ok(());
    };
    if e.kind() == std::io::ErrorKind::ResourceBusy {
        if let Some((rec, role)) = holder(path) {
            bail!(
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
    Err(anyhow::Error::new(e).context(format!("{flag} cannot be locked")))
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
                bail!(
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
            bail!(
                "{flag} {}: {kind}, not a regular file or a block device; give the path of an \
                 image file or a block device",
                p.display()
            );
        }
        if !written {
            continue;
        }
        let c = std::ffi::CString::new(p.as_os_str().as_bytes())
            .with_context(|| format!("{flag} {}: the path contains a NUL byte", p.display()))?;
        // SAFETY: access() reads a valid NUL-terminated string and writes nothing.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
            let e = std::io::Error::last_os_error();
            bail!(
                "{flag} {}: not writable ({e}), but it is written; check its permissions and \
                 attributes (`lsattr`, `chattr -i`) and that its file system is mounted \
                 read-write",
                p.display()
            );
        }
    }
    Ok(())
}
