//! Recovering a device whose daemon died: the device (`/dev/ublkbN`, created recoverable)
//! and the file system on it are still there, its requests wait in the kernel, and a new
//! daemon attaches to it with the clone's saved configuration.
//!
//! Invariant (the old daemon's I/O has ended before the new one writes): the new daemon
//! opens no device before the kernel has accepted `START_USER_RECOVERY`, which it does only
//! once the dead daemon's `/dev/ublkcN` is closed. That happens when its process has exited
//! (every thread, so every synchronous backing I/O of the hydration and commit threads, has
//! returned) and its io_uring rings were torn down (every backing I/O in flight on a queue
//! ring has completed, and the backing files registered on them are released). The requests
//! the dead daemon held are re-issued to the new one; a write re-applied over its first attempt
//! is safe then, since nothing else can land in between.
//!
//! One recovery at a time: the recovering daemon holds `<run dir>/<N>.recover` locked for its
//! whole life, and a second `recover` of the same device is refused at once.

use super::config::DaemonConfig;
use super::control::{self, run_dir, DaemonRecord};
use super::error::{refuse, Named, Result};
use super::saved;
use crate::ublk::{self, DeviceState};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// How long the kernel gets to quiesce a device after its daemon has exited.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon that is still there gets to finish dying before its device counts as live.
const DYING_GRACE: Duration = Duration::from_secs(3);

/// The configuration that recovers device `dev` (`/dev/ublkbN` or `N`): the clone its dead
/// daemon served, from the daemon's record and the clone's saved configuration.
pub fn config_for_recover(dev: &str) -> Result<DaemonConfig> {
    let id = control::parse_dev(dev)?;
    let path = control::record_path(id);
    let text = std::fs::read_to_string(&path).named(|| {
        format!(
            "/dev/ublkb{id}: no record of a ublk-clone daemon for it ({}); was it made by \
             `ublk-clone create`?",
            path.display()
        )
    })?;
    let rec: DaemonRecord =
        serde_json::from_str(&text).named(|| format!("{}: damaged record", path.display()))?;
    if !record_is_the_devices(&rec) {
        refuse!(
            "/dev/ublkb{id}: {} is stale: the device's daemon was pid {}, not pid {}; was the \
             device made by another program?",
            path.display(),
            ublk::device_daemon_pid(id).unwrap_or(0),
            rec.pid
        );
    }
    // The process to wait for: the one the kernel names (a daemon that died while
    // recovering may not have replaced the record's).
    let daemon = kernels_daemon(&rec);
    match wait_quiesced(id, daemon) {
        None => refuse!("/dev/ublkb{id}: no such ublk device"),
        Some((DeviceState::Live, _)) if super::process::dying(daemon) => refuse!(
            "/dev/ublkb{id}: its daemon (pid {daemon}) was killed but the kernel has not \
             quiesced the device within {} s (the I/O the daemon started has not ended: a slow \
             or stuck backing device?); try again later",
            QUIESCE_TIMEOUT.as_secs()
        ),
        Some((DeviceState::Live, _)) => {
            refuse!("/dev/ublkb{id} is live: its daemon is running; nothing to recover")
        }
        Some((DeviceState::Quiesced, true)) => {}
        Some((_, false)) => refuse!(
            "/dev/ublkb{id} was created with --no-recovery and cannot be recovered; stop it and \
             start the clone again"
        ),
        Some((state, true)) => {
            refuse!("/dev/ublkb{id} is not waiting for recovery (state {state:?})")
        }
    }
    let mut cfg = saved::config_for_start(&rec.metadata)?;
    cfg.number = id as i32;
    cfg.recover = true;
    cfg.queues = Some(rec.queues);
    cfg.depth = rec.depth;
    Ok(cfg)
}

/// The state of device `id`. While it is still live but its daemon `pid` is gone or dying
/// (killed: its threads end only once the backing I/O they wait for has), the kernel is
/// tearing the dead daemon down: waits (up to 30 s) for the device to settle. A daemon that
/// shows no sign of dying gets a few seconds (a signal other than SIGKILL may still end it)
/// before the device counts as live.
fn wait_quiesced(id: u32, pid: u32) -> Option<(DeviceState, bool)> {
    let start = Instant::now();
    loop {
        let state = ublk::device_state(id);
        let waited = start.elapsed();
        let limit = if super::process::dying(pid) {
            QUIESCE_TIMEOUT
        } else {
            DYING_GRACE
        };
        match state {
            Some((DeviceState::Live, true)) if waited < limit => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The device that served the clone whose metadata is at `metadata` and whose daemon died or
/// is dying, if it is still there and recoverable: `start` recovers it rather than adding a
/// new device (a supervisor restarting the daemon right after a crash finds the device
/// still live, the kernel tearing the dead daemon down; `recover` waits for that).
pub fn recoverable_device_of(metadata: &std::path::Path) -> Option<u32> {
    let want = std::fs::canonicalize(metadata).ok()?;
    control::all_records().into_iter().find_map(|rec| {
        let same = std::fs::canonicalize(&rec.metadata).is_ok_and(|m| m == want)
            && record_is_the_devices(&rec);
        let waiting = match ublk::device_state(rec.id) {
            Some((DeviceState::Quiesced, true)) => true,
            Some((DeviceState::Live, true)) => super::process::dying(kernels_daemon(&rec)),
            _ => false,
        };
        (same && waiting).then_some(rec.id)
    })
}

/// Whether `rec` describes the daemon the kernel knows for its device: the pid the kernel
/// keeps for the device's last daemon is the record's, or the one a recovering daemon
/// replaces. A record left behind for a device number now used by another device does not
/// match. -1 (no pid: what newer kernels report once the daemon is gone) is accepted: the
/// pid cannot tell then, and refusing would make every recovery impossible there (issue 13
/// is to stamp devices with an id of their own).
fn record_is_the_devices(rec: &DaemonRecord) -> bool {
    ublk::device_daemon_pid(rec.id).is_some_and(|p| {
        p == -1 || p == rec.pid as i32 || rec.replaces_pid.is_some_and(|r| p == r as i32)
    })
}

/// The process the kernel names as `rec`'s device's daemon (the record's own when the
/// kernel names none): the one to wait for, and the one a recovering daemon replaces (a
/// recovery before it may have died before the kernel knew it).
fn kernels_daemon(rec: &DaemonRecord) -> u32 {
    ublk::device_daemon_pid(rec.id)
        .filter(|&p| p > 0)
        .map_or(rec.pid, |p| p as u32)
}

/// Before a recovering daemon starts the kernel's recovery: its record names it, and the
/// daemon it replaces, so that whenever it dies the record still matches the device (see
/// [`record_is_the_devices`]).
fn claim_record(id: u32, metadata: &std::path::Path) -> Result<()> {
    let path = control::record_path(id);
    let text =
        std::fs::read_to_string(&path).named(|| format!("cannot read {}", path.display()))?;
    let mut rec: DaemonRecord =
        serde_json::from_str(&text).named(|| format!("{}: damaged record", path.display()))?;
    // Checked again here, in the daemon: the record may have changed since the command read it.
    let same_clone =
        std::fs::canonicalize(&rec.metadata).ok() == std::fs::canonicalize(metadata).ok();
    if !record_is_the_devices(&rec) || !same_clone {
        refuse!(
            "/dev/ublkb{id}: {} no longer describes this clone's device; run `ublk-clone list`",
            path.display()
        );
    }
    let me = std::process::id();
    if rec.pid != me {
        // The daemon the kernel names (a recovery before this one may have died before the
        // kernel knew it).
        rec.replaces_pid = Some(kernels_daemon(&rec));
        rec.pid = me;
    }
    super::sticky::write_atomically(&path, &serde_json::to_vec_pretty(&rec)?)
}

/// Starts the recovery of `cfg`'s device in the daemon that will attach to it, before any
/// device is opened: takes the recovery lock (kept for the process's life) and waits for the
/// kernel's barrier (see the module doc).
pub(super) fn begin(cfg: &DaemonConfig) -> Result<()> {
    let id = cfg.number.max(0) as u32;
    let dir = run_dir();
    std::fs::create_dir_all(&dir).named(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{id}.recover"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .named(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a valid, open descriptor.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        refuse!("/dev/ublkb{id}: another `ublk-clone recover` of it is running");
    }
    claim_record(id, &cfg.metadata)?;
    ublk::begin_recovery(id)?;
    // Held until this process exits: the lock ends with the last descriptor.
    std::mem::forget(lock);
    Ok(())
}
