//! Starting a daemon in the background, and the readiness protocol between it and the
//! command that started it.
//!
//! The command validates the options and formats or checks the metadata itself (so errors
//! reach the user with a non-zero exit), then starts the daemon in its own session
//! (`setsid`) with `$UBLK_CLONE_NOTIFY` set, stdin on /dev/null, stdout on a pipe and stderr
//! appended to `<run dir>/daemon.log`. The daemon prints one line on stdout: `READY
//! /dev/ublkbN` once the device is live, or `ERROR <message>` if it failed before.
//! Invariant: [`spawn`] returns the device only after `READY`, so the device exists and
//! answers its control socket when `create` prints it.

use super::config::DaemonConfig;
use super::control;
use super::error::{chain, DaemonError, Named, Result};
use super::open::open_devices;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// Set in a daemon started by [`spawn`]: it reports readiness on stdout.
const NOTIFY_ENV: &str = "UBLK_CLONE_NOTIFY";

/// Checks `cfg` and opens (formatting blank metadata) its devices here, then starts this
/// program with `daemon_args` (the command line that runs `cfg` in the foreground) as a
/// background daemon, and returns its device path once it is ready.
pub fn spawn(cfg: &DaemonConfig, daemon_args: &[OsString]) -> Result<String> {
    let mut name_lock = None;
    if !cfg.recover {
        // The checks run here first, so that errors reach the caller before a daemon
        // exists. A recovery skips them: only the daemon may start it (the kernel accepts
        // START_USER_RECOVERY once), and the devices may be held by the dead daemon until
        // then; the daemon reports its errors through the notify pipe.
        // The name is locked before it is checked and anything is formatted; the daemon
        // inherits the lock (a create that loses a race for a name writes nothing).
        // (Checked before the lock too: a name that a live clone holds is refused naming it.)
        if let Some(name) = &cfg.name {
            super::names::check_free(name, None)?;
            name_lock = Some(super::names::lock(name, false)?);
            super::names::check_free(name, None)?;
        }
        drop(open_devices(cfg, false)?);
    }
    let run_dir = control::run_dir();
    std::fs::create_dir_all(&run_dir).named(|| format!("cannot create {}", run_dir.display()))?;
    let log_path = run_dir.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .named(|| format!("cannot open the daemon log {}", log_path.display()))?;
    let exe = std::env::current_exe().named(|| "cannot find the ublk-clone executable".into())?;
    let mut cmd = Command::new(exe);
    cmd.args(daemon_args).env(NOTIFY_ENV, "1");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    let lock_fd = name_lock.as_ref().map(|l| {
        cmd.env(super::names::LOCK_FD_ENV, l.fd().to_string());
        l.fd()
    });
    // SAFETY: setsid and fcntl are async-signal-safe; the child gets its own session (a
    // daemon) and keeps the name lock's descriptor across exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if let Some(fd) = lock_fd {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().named(|| "cannot start the daemon".into())?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| DaemonError::Daemon("daemon stdout".into()))?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        if let Some(dev) = line.strip_prefix("READY ") {
            return Ok(dev.to_string());
        }
        if let Some(err) = line.strip_prefix("ERROR ") {
            return Err(DaemonError::Daemon(err.to_string()));
        }
    }
    let status = child.wait()?;
    Err(DaemonError::Daemon(format!(
        "the daemon exited ({status}) before the device was ready; see {}",
        log_path.display()
    )))
}

/// Whether this process is a daemon started by [`spawn`].
pub(super) fn notify_requested() -> bool {
    std::env::var_os(NOTIFY_ENV).is_some()
}

/// Tells the starting command that the device `path` is live, then detaches stdout from its
/// pipe (the command exits; later output must not fail).
pub(super) fn notify_ready(path: &str) {
    println!("READY {path}");
    let _ = std::io::stdout().flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto stdout with a valid descriptor.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

/// Tells the starting command why the daemon failed.
pub(super) fn notify_error(e: &DaemonError) {
    println!("ERROR {}", chain(e));
}
