//! A live handover (`ublk-clone restart DEV`), e.g. to upgrade the binary under a mounted
//! file system: the running daemon commits and exits without removing its device, the kernel
//! holds the device's requests (quiesced), and a new daemon, the binary now on disk,
//! recovers it. On kernels without `UBLK_F_QUIESCE` (6.12) this is the recovery path:
//! requests the old daemon had taken and not completed are re-issued to the new one.
//!
//! Invariant: the same barrier as recovery ([`super::recover`]): the new daemon opens no
//! device before the old process is gone and the kernel has accepted `START_USER_RECOVERY`.

use super::control::{self, Request};
use super::error::{refuse, DaemonError, Named, Result};
use super::{process, recover, DaemonConfig};
use crate::ublk::{self, DeviceState};
use std::time::{Duration, Instant};

/// How long the old daemon may take to commit and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(600);

/// Asks the daemon of `dev` to hand its device over, waits until its process is gone, and
/// returns the configuration that recovers the device (the new daemon takes the old one's
/// run-time settings from its sticky state, see `sticky`). An error after the request was
/// sent says that the device waits for `recover`.
pub fn handover(dev: &str) -> Result<DaemonConfig> {
    let id = control::parse_dev(dev)?;
    let Some(rec) = control::list_records().into_iter().find(|r| r.id == id) else {
        refuse!(
            "/dev/ublkb{id}: no running ublk-clone daemon (see `ublk-clone list`; a device \
             whose daemon died is brought back with `ublk-clone recover`)"
        );
    };
    match ublk::device_state(id) {
        Some((DeviceState::Live, true)) => {}
        Some((DeviceState::Live, false)) => refuse!(
            "/dev/ublkb{id} was created with --no-recovery: a restart would remove it; stop it \
             and start the clone again"
        ),
        Some((state, _)) => refuse!("/dev/ublkb{id} is not live (state {state:?})"),
        None => refuse!("/dev/ublkb{id}: no such ublk device"),
    }
    if let Some(unit) = systemd_unit(rec.pid) {
        refuse!(
            "/dev/ublkb{id}: its daemon runs under systemd ({unit}); a restart would move it \
             out of the unit. Use `systemctl kill --signal=SIGKILL {unit}`: the unit brings \
             the daemon back through recovery (nothing acknowledged is lost)"
        );
    }
    let waits = || {
        format!(
            "/dev/ublkb{id}: restart: the old daemon was asked to hand over; once it has \
             exited, the device waits for `ublk-clone recover /dev/ublkb{id}`"
        )
    };
    // The commit before the handover may take long (a large dirty page cache with
    // --buffered-io); the daemon exits after it in any case.
    control::request_within(id, &Request::Handover, EXIT_TIMEOUT).named(waits)?;
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while !process::exited(rec.pid) {
        if Instant::now() >= deadline {
            return Err(DaemonError::Daemon(format!(
                "the daemon (pid {}) did not exit within {} s",
                rec.pid,
                EXIT_TIMEOUT.as_secs()
            )))
            .named(waits);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    recover::config_for_recover(&id.to_string()).named(waits)
}

/// The systemd service that process `pid` runs in, if any (from its cgroup path).
fn systemd_unit(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .find(|c| c.ends_with(".service"))
        .map(str::to_string)
}
