//! Clone names: a stable name for each clone (`create --name`, a clonetab's first column),
//! a link `/dev/ublk-clone/NAME` → `/dev/ublkbN` that the daemon keeps while its device is
//! live, and the lookup that lets every command take a name where it takes a device.
//!
//! Invariants:
//! - A name is used by at most one clone device at a time (running or waiting for recovery):
//!   a daemon refuses to start under a name another device holds.
//! - A link never points at a device that serves another name: the daemon publishing a
//!   device first removes every other link in [`dev_dir`] that points at it (left by a daemon
//!   that died without recovery, its device number since reused).
//! - A name is never a plain number or `ublkbN`, so `N` and `/dev/ublkbN` always mean the
//!   device number.
//! - Two daemons never start under one name at once: each holds [`NameLock`] (an exclusive
//!   flock on `<run_dir>/names/NAME.lock`) from before its [`check_free`] until its device is
//!   gone, so the check and the daemon record it leads to are one step for other daemons.
//!   `create` takes it before its own checks and formatting and the daemon inherits it.
//!   Lock files stay in `<run_dir>/names` (a tmpfs); removing one safely would need the
//!   holder to re-check its inode, and an empty file costs nothing.

use super::error::{refuse, Named, Result};
use std::path::{Path, PathBuf};

/// Where the name links live.
pub const DEV_DIR: &str = "/dev/ublk-clone";

/// [`DEV_DIR`], unless `UBLK_CLONE_DEV_DIR` names another directory (tests).
pub fn dev_dir() -> PathBuf {
    std::env::var_os("UBLK_CLONE_DEV_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEV_DIR))
}

/// Longest name (a path component under [`DEV_DIR`] and in `/dev/disk/by-id`).
pub const MAX_NAME: usize = 64;

/// Checks that `name` can name a clone: 1 to 64 characters from `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit, and not a device number (`N`, `ublkbN`).
pub fn validate(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_NAME {
        refuse!("name '{name}': must be 1 to {MAX_NAME} characters");
    }
    if !name.chars().all(ok_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        refuse!(
            "name '{name}': use letters, digits and . _ - only (a systemd unit instance must be able to carry it), starting with a letter or digit"
        );
    }
    if device_number(name).is_some() {
        refuse!("name '{name}': a number or ublkbN names a device number, not a clone");
    }
    Ok(())
}

/// The device number `dev` names (`N`, `ublkbN`, `/dev/ublkbN`), if it names one.
pub fn device_number(dev: &str) -> Option<u32> {
    let t = dev.strip_prefix("/dev/").unwrap_or(dev);
    let t = t.strip_prefix("ublkb").unwrap_or(t);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// The name a clone gets without `--name`: `clone-` and the first 8 hex digits of its
/// metadata's UUID (stable for the clone's life).
pub fn default_name(uuid: &uuid::Uuid) -> String {
    let hex = uuid.simple().to_string();
    format!("clone-{}", &hex[..8])
}

/// Refuses `name` if a clone device other than `recovering` (the device a recovering or
/// restarted daemon takes over) holds it.
pub fn check_free(name: &str, recovering: Option<u32>) -> Result<()> {
    for l in super::control::list_devices() {
        let r = &l.record;
        if r.name.as_deref() == Some(name) && Some(r.id) != recovering {
            refuse!(
                "name '{name}' is taken by {} (metadata {}); choose another --name",
                r.device,
                r.metadata.display()
            );
        }
    }
    Ok(())
}

/// A daemon's hold on its name (see the module's invariants); released when dropped or when
/// the process dies.
#[derive(Debug)]
pub struct NameLock {
    _file: std::fs::File,
}

/// Set in a daemon started by `spawn`: the descriptor of the name lock that `spawn` took
/// (before its checks and any formatting) and the daemon inherits.
pub const LOCK_FD_ENV: &str = "UBLK_CLONE_NAME_LOCK_FD";

impl NameLock {
    /// The lock's descriptor (for a child to inherit).
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self._file.as_raw_fd()
    }
}

/// Takes `name`'s lock, or adopts the one this process inherited from `spawn`. A recovering
/// daemon (`wait`) waits up to 30 s for a dying daemon (which keeps its descriptors until
/// the kernel has ended its I/O) to let go; any other is refused at once while another
/// process holds the name.
pub fn lock(name: &str, wait: bool) -> Result<NameLock> {
    let dir = super::control::run_dir().join("names");
    if let Some(l) = inherited(&dir, name) {
        return Ok(l);
    }
    let timeout = std::time::Duration::from_secs(if wait { 30 } else { 0 });
    lock_in(&dir, name, timeout)
}

/// The lock of `name` passed down by `spawn` ([`LOCK_FD_ENV`]), if it is that: a descriptor
/// of `<dir>/NAME.lock` (same file), which holds the flock already (it is `spawn`'s open
/// file, shared).
fn inherited(dir: &Path, name: &str) -> Option<NameLock> {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::MetadataExt;
    let fd: i32 = std::env::var(LOCK_FD_ENV).ok()?.parse().ok()?;
    std::env::remove_var(LOCK_FD_ENV);
    let want = std::fs::metadata(dir.join(format!("{name}.lock"))).ok()?;
    // SAFETY: fstat into a zeroed stat buffer; the descriptor is only read.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if fd < 0 || unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    if st.st_dev != want.dev() || st.st_ino != want.ino() {
        return None;
    }
    // SAFETY: the descriptor is open, refers to the lock file, and nothing else owns it in
    // this process (it came from the parent through exec).
    Some(NameLock {
        _file: unsafe { std::fs::File::from_raw_fd(fd) },
    })
}

fn lock_in(dir: &Path, name: &str, timeout: std::time::Duration) -> Result<NameLock> {
    use std::os::fd::AsRawFd;
    validate(name)?;
    std::fs::create_dir_all(dir).named(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .named(|| format!("cannot open {}", path.display()))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(NameLock { _file: file });
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(e).named(|| format!("cannot lock {}", path.display()));
        }
        if std::time::Instant::now() >= deadline {
            refuse!(
                "name '{name}' is taken by another ublk-clone daemon that is starting or \
                 serving it ({} is locked); choose another --name",
                path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The name `dev` gives, if it is one: `NAME` or `<dev_dir>/NAME`.
pub fn name_of(dev: &str) -> Option<&str> {
    let dir = dev_dir();
    let name = match dev.strip_prefix(dir.to_str()?) {
        Some(rest) => rest.strip_prefix('/')?,
        None => dev,
    };
    validate(name).is_ok().then_some(name)
}

/// Publishes `<dev_dir>/name` → `device` (replacing a stale link of that name), after
/// removing any other link that points at `device`.
pub fn link(name: &str, device: &str) -> Result<()> {
    link_in(&dev_dir(), name, device)
}

fn link_in(dir: &Path, name: &str, device: &str) -> Result<()> {
    std::fs::create_dir_all(dir).named(|| format!("cannot create {}", dir.display()))?;
    remove_links_to(dir, device, Some(name));
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(device, &tmp)
        .named(|| format!("cannot create the link {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).named(|| format!("cannot create the link {}", path.display()))
}

/// Asks udev (where it runs) to look at `device` again: its rule for
/// `/dev/disk/by-id/ublk-clone-NAME` reads the daemon record, which did not exist yet when
/// the kernel announced the device.
pub fn udev_change(device: &str) {
    if !Path::new("/run/udev/control").exists() {
        return;
    }
    let r = std::process::Command::new("udevadm")
        .args(["trigger", "--action=change", device])
        .status();
    if let Err(e) = r {
        log::warn!("udevadm trigger {device}: {e}");
    }
}

/// Removes `<dev_dir>/name` if it points at `device`.
pub fn unlink(name: &str, device: &str) {
    let path = dev_dir().join(name);
    if points_at(&path, device) {
        let _ = std::fs::remove_file(&path);
    }
}

/// Whether `link` points at `device`, written absolute (ours) or relative (udev's
/// `../ublkbN`), compared lexically (the device may be gone already).
fn points_at(link: &Path, device: &str) -> bool {
    let Ok(t) = std::fs::read_link(link) else {
        return false;
    };
    let full = match link.parent() {
        Some(dir) if t.is_relative() => dir.join(t),
        _ => t,
    };
    let mut norm = PathBuf::new();
    for c in full.components() {
        match c {
            std::path::Component::ParentDir => {
                norm.pop();
            }
            std::path::Component::CurDir => {}
            other => norm.push(other),
        }
    }
    norm == Path::new(device)
}

/// Removes the links in `dir` that point at `device`, except the one named `keep`.
fn remove_links_to(dir: &Path, device: &str, keep: Option<&str>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let stale = e.file_name().to_str() != keep;
        if stale && points_at(&e.path(), device) {
            log::info!("removing the stale link {}", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["db", "web-1", "a.b_c-d", "9lives", &"x".repeat(64)] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a/b",
            "a b",
            "a+b",
            "é",
            "12",
            "ublkb3",
            &"x".repeat(65),
        ] {
            assert!(validate(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn device_numbers_are_not_names() {
        assert_eq!(device_number("3"), Some(3));
        assert_eq!(device_number("ublkb3"), Some(3));
        assert_eq!(device_number("/dev/ublkb12"), Some(12));
        assert_eq!(device_number("/dev/ublkb"), None);
        assert_eq!(device_number("db"), None);
        assert_eq!(device_number("ublkb3x"), None);
        assert_eq!(name_of("db"), Some("db"));
        assert_eq!(name_of("/dev/ublk-clone/db"), Some("db"));
        assert_eq!(name_of("/dev/sda"), None);
        assert_eq!(name_of("12"), None);
    }

    /// The race a check alone leaves open: two daemons starting under one name both find it
    /// free. The lock lets only one through, and frees the name when its holder goes.
    #[test]
    fn a_name_is_locked_by_one_daemon_at_a_time() -> Result<()> {
        let d = tempfile::tempdir()?;
        let now = std::time::Duration::ZERO;
        let held = lock_in(d.path(), "db", now)?;
        let e = lock_in(d.path(), "db", now).expect_err("a second holder of 'db'");
        assert!(e.to_string().contains("name 'db' is taken"), "{e}");
        let _other = lock_in(d.path(), "web", now)?;
        // A recovering daemon waits for the dying holder.
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(held);
        });
        lock_in(d.path(), "db", std::time::Duration::from_secs(10))?;
        t.join().expect("thread");
        assert!(lock_in(d.path(), "../x", now).is_err());
        Ok(())
    }

    #[test]
    fn the_default_name_comes_from_the_uuid() {
        let u = uuid::Uuid::parse_str("0123abcd-0000-4000-8000-000000000000").expect("uuid");
        assert_eq!(default_name(&u), "clone-0123abcd");
        assert!(validate(&default_name(&u)).is_ok());
    }

    #[test]
    fn a_link_replaces_stale_ones() -> Result<()> {
        let d = tempfile::tempdir()?;
        let dir = d.path().join("ublk-clone");
        link_in(&dir, "old", "/dev/ublkb0")?;
        link_in(&dir, "other", "/dev/ublkb1")?;
        // Device 0 now serves another clone: its old name must not lead to it.
        link_in(&dir, "new", "/dev/ublkb0")?;
        assert!(!dir.join("old").exists() && std::fs::read_link(dir.join("old")).is_err());
        assert_eq!(
            std::fs::read_link(dir.join("new"))?,
            Path::new("/dev/ublkb0")
        );
        assert_eq!(
            std::fs::read_link(dir.join("other"))?,
            Path::new("/dev/ublkb1")
        );
        // udev's relative link to the same device counts as pointing at it.
        std::os::unix::fs::symlink("../ublkb5", dir.join("by-udev"))?;
        assert!(points_at(
            &dir.join("by-udev"),
            &format!("{}/ublkb5", d.path().display())
        ));
        assert!(!points_at(&dir.join("by-udev"), "/dev/ublkb5"));
        std::fs::remove_file(dir.join("by-udev"))?;
        // A name moves to another device number (a restart under another number).
        link_in(&dir, "new", "/dev/ublkb2")?;
        assert_eq!(
            std::fs::read_link(dir.join("new"))?,
            Path::new("/dev/ublkb2")
        );
        let left: Vec<_> = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        Ok(())
    }
}
