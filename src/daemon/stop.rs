//! Stopping a clone: refuses a device that is in use, asks its daemon to stop, and returns
//! only once the daemon has released every device it opened.
//!
//! Invariant: when `stop` returns 0, the daemon's process (every thread of it) is gone and
//! its destination and metadata block devices are no longer claimed, so that `stop X &&
//! dmsetup remove D` or `losetup -d L` never finds them busy.

use super::control::{self, DaemonRecord, Request};
use super::error::{refuse, DaemonError, Named, Result};
use super::process;
use crate::io::file::block_device_unclaimed;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the daemon may take for its final commit and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the kernel may take to release a device after the daemon exited.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// Stops the clone `dev` (`/dev/ublkbN` or `N`): its daemon makes the final commit and
/// removes the device. Unless `force`, a device that is mounted or open is refused.
pub fn stop(dev: &str, force: bool) -> Result<()> {
    let id = control::parse_dev(dev)?;
    let rec: Option<DaemonRecord> = control::list_records().into_iter().find(|r| r.id == id);
    let dev = PathBuf::from(format!("/dev/ublkb{id}"));
    if !force {
        // udev's own brief probe (after a writer closed the device) is not a user.
        settle_udev();
        if let Some(user) = in_use(&dev)? {
            refuse!(
                "{}: in use ({user}); unmount or close it first, or pass --force to stop it \
                 anyway (whatever uses it then gets I/O errors)",
                dev.display()
            );
        }
    }
    if rec.is_none() && remove_quiesced(id)? {
        return Ok(());
    }
    control::request(id, &Request::Stop)?;
    let Some(rec) = rec else {
        return Ok(());
    };
    wait_exited(rec.pid).named(|| format!("{}", dev.display()))?;
    wait_released(&rec).named(|| format!("{}", dev.display()))?;
    settle_udev();
    Ok(())
}

/// A recoverable device whose daemon died (quiesced, no daemon): removes it, giving up its
/// recovery. Its requests fail; the clone's metadata and survival copy stay, so `start`
/// resumes the clone with every region its daemon hydrated. False if `id` is not such a
/// device.
fn remove_quiesced(id: u32) -> Result<bool> {
    if !matches!(
        crate::ublk::device_state(id),
        Some((crate::ublk::DeviceState::Quiesced, _))
    ) {
        return Ok(false);
    }
    crate::ublk::delete_device(id)?;
    // Its dead daemon's record, socket and name link go with it: the number may be reused.
    let rec = super::control::all_records()
        .into_iter()
        .find(|r| r.id == id);
    if let Some((name, dev)) = rec.and_then(|r| Some((r.name?, r.device))) {
        super::names::unlink(&name, &dev);
    }
    let _ = std::fs::remove_file(super::control::record_path(id));
    let _ = std::fs::remove_file(super::control::socket_path(id));
    settle_udev();
    Ok(true)
}

/// Waits for udev to finish with the devices the daemon closed. udev watches block devices
/// (inotify) and probes each one a writer closes: it opens it again for a moment, which is
/// enough to make `dmsetup remove` or `losetup -d` right after `stop` fail "busy". udevd
/// answers `udevadm settle`'s ping only after it has handled pending inotify events, so the
/// synthetic change events of our closes are queued before settle looks at the queue.
fn settle_udev() {
    if !Path::new("/run/udev/control").exists() {
        return;
    }
    match std::process::Command::new("udevadm")
        // Short: settling is for udev's own probe of a device we just closed (milliseconds);
        // an unrelated event that keeps the queue busy must not hold `stop` (measured in the
        // guest: an occasional 30 s timeout, once per clone in the crash-check loops).
        .args(["settle", "--timeout=5"])
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => log::warn!("udevadm settle: {s}"),
        Err(e) => log::warn!("cannot run udevadm settle: {e}"),
    }
}

/// Who uses the block device `dev`, if anyone: a claim (a mount, device-mapper, md), a
/// holder in sysfs, or a process with it open.
fn in_use(dev: &Path) -> Result<Option<String>> {
    let Ok(meta) = std::fs::metadata(dev) else {
        return Ok(None);
    };
    if !meta.file_type().is_block_device() {
        return Ok(None);
    }
    let rdev = meta.rdev();
    if let Some(mnt) = mount_point(rdev) {
        return Ok(Some(format!("mounted on {mnt}")));
    }
    if let Some(name) = dev.file_name().and_then(|n| n.to_str()) {
        let holders = PathBuf::from(format!("/sys/block/{name}/holders"));
        if let Ok(rd) = std::fs::read_dir(&holders) {
            let names: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !names.is_empty() {
                return Ok(Some(format!("held by {}", names.join(", "))));
            }
        }
    }
    if !block_device_unclaimed(dev).named(|| format!("{}", dev.display()))? {
        return Ok(Some(
            "claimed exclusively: mounted in another mount namespace or held by another program"
                .into(),
        ));
    }
    let openers = crate::io::holders::openers(dev, false);
    if !openers.is_empty() {
        return Ok(Some(format!("open by {}", openers.join(", "))));
    }
    Ok(None)
}

/// The mount point of the block device `rdev` in our mount namespace.
fn mount_point(rdev: u64) -> Option<String> {
    let want = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&want.as_str())).then(|| f.get(4).unwrap_or(&"?").to_string())
    })
}

/// Waits until the daemon's process is gone: no such pid, or only its zombie group leader is
/// left. A zombie leader alone is not enough: the other threads of the process may still be
/// exiting, and the files they share are closed only when the last of them has.
fn wait_exited(pid: u32) -> Result<()> {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        if process::exited(pid) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(DaemonError::Daemon(format!(
                "the daemon (pid {pid}) did not exit within {} s",
                EXIT_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until the daemon's destination and metadata block devices are no longer claimed
/// (the daemon opens them exclusively). The kernel can drop the last reference to a file a
/// little after the process that used it exited (io_uring tears its rings down
/// asynchronously); the daemon unregisters its rings' files before it exits, and this is the
/// check that it worked.
fn wait_released(rec: &DaemonRecord) -> Result<()> {
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    for (what, p) in [("destination", &rec.dest), ("metadata", &rec.metadata)] {
        loop {
            match block_device_unclaimed(p) {
                Ok(true) => break,
                // Gone or renamed meanwhile: nothing of ours holds it.
                Err(_) => break,
                Ok(false) if Instant::now() < deadline => std::thread::sleep(POLL),
                Ok(false) => {
                    return Err(DaemonError::Daemon(format!(
                        "the daemon exited, but its {what} {} is still claimed {} s later",
                        p.display(),
                        RELEASE_TIMEOUT.as_secs()
                    )))
                }
            }
        }
    }
    Ok(())
}
