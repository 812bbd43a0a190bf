//! The daemon process's own setup: a private mount namespace, and the SIGTERM/SIGINT
//! handlers that ask the serve loop to stop.
//!
//! Invariant: a signal only sets a flag; the serve loop sees it, and the device is removed
//! and the final commit made on the normal shutdown path, never in the handler.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

/// Whether SIGTERM or SIGINT asked the daemon to stop.
pub(super) fn stop_requested() -> bool {
    STOP.load(Ordering::Acquire)
}

/// Moves the process into its own mount namespace, so that the daemon's exit never flushes
/// a file system that lives on its own device (which would deadlock: the flush waits for the
/// daemon). Best effort: without the privilege the daemon runs in the shared namespace.
/// Returns whether the process has a private namespace now (unshared, and every mount's
/// propagation made private, so that nothing done to it reaches the real one).
pub(super) fn private_mount_namespace() -> bool {
    // SAFETY: plain syscalls with valid arguments (a NUL-terminated path, null optional
    // arguments).
    unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    }
}

/// Detaches, in the daemon's private mount namespace, every mount of a ublk block device
/// (call it once the devices are open: an open file keeps its own mount). Created as a copy
/// of the caller's namespace, the private one holds every mount that existed then; a daemon
/// that recovers a device under a mounted file system, or starts while another clone is
/// mounted, would otherwise pin those file systems: after `umount` in the real namespace the
/// device would stay claimed, `stop` would refuse, and e2fsck would see it in use.
///
/// Only in a private namespace (`private`, from [`private_mount_namespace`]): in the real one
/// this would unmount the users' file systems. Never a mount that holds what the daemon still
/// needs by path (`/`, and those above the run directory, `/dev`, `/proc`, `/sys`).
pub(super) fn detach_ublk_mounts(private: bool, run_dir: &std::path::Path) {
    if !private {
        return;
    }
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let needed = [run_dir, "/dev".as_ref(), "/proc".as_ref(), "/sys".as_ref()];
    let targets: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let target = unescape_mount_path(f.get(4)?);
            let holds_needed = needed.iter().any(|n| n.starts_with(&target));
            (is_ublk_disk(f.get(2)?) && !holds_needed).then_some(target)
        })
        .collect();
    // Children are listed after their parents: detach the deepest first.
    for t in targets.iter().rev() {
        let Ok(c) = std::ffi::CString::new(t.as_str()) else {
            continue;
        };
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            log::warn!(
                "cannot detach {t} from the daemon's mount namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Whether block device `major:minor` is a ublk disk (`/dev/ublkbN`; they have no major of
/// their own, so the name tells).
fn is_ublk_disk(major_minor: &str) -> bool {
    std::fs::read_link(format!("/sys/dev/block/{major_minor}")).is_ok_and(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ublkb"))
    })
}

/// A mountinfo path field with its octal escapes (`\040` for a space) decoded.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Installs the handlers of SIGTERM and SIGINT.
pub(super) fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
}

/// Makes a panic on any thread end the process at once, without unwinding: an unwinding
/// daemon would stop its device on the way out (libublk's epilogue), and with it the file
/// system mounted on it. Aborted, the daemon leaves a recoverable device quiesced for
/// `ublk-clone recover`, like any other death.
pub(super) fn abort_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        log::error!("{info}; aborting (a recoverable device waits for `ublk-clone recover`)");
        eprintln!("ublk-clone daemon: {info}; aborting");
        std::process::abort();
    }));
}

/// Whether process `pid` is gone: no such pid, or only its zombie group leader is left. A
/// zombie leader alone is not enough: the other threads of the process may still be exiting,
/// and the files they share are closed only when the last of them has. A zombie waits for
/// its parent to reap it (in a minimal guest, PID 1 may never do so), so "/proc/PID exists"
/// is not "the daemon is running".
pub(crate) fn exited(pid: u32) -> bool {
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return true;
    };
    // The state follows the parenthesised command name, which may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if !matches!(state, Some("Z") | Some("X")) {
        return false;
    }
    std::fs::read_dir(proc_dir.join("task")).map_or(true, |rd| rd.count() <= 1)
}

/// Whether process `pid` is gone or on its way out: [`exited`], or its main thread is exiting,
/// or a SIGKILL waits for it (`kill -9` returns before the target has even begun to exit, and
/// a thread blocked on I/O in the kernel exits only once that I/O has ended, which may take
/// long on a slow or stuck device).
pub(crate) fn dying(pid: u32) -> bool {
    if exited(pid) {
        return true;
    }
    const PF_EXITING: u64 = 0x4;
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
    if let Ok(status) = std::fs::read_to_string(proc_dir.join("status")) {
        let kill_pending = status.lines().any(|l| {
            l.strip_prefix("ShdPnd:")
                .or_else(|| l.strip_prefix("SigPnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .is_some_and(|mask| mask & SIGKILL_BIT != 0)
        });
        if kill_pending {
            return true;
        }
    }
    // The main thread's flags only: the daemon's other threads come and go (a commit runs
    // one), and one that ends shows PF_EXITING while the process lives on.
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return true;
    };
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6))
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/x\\134y"), "/x\\y");
        assert_eq!(unescape_mount_path("/trail\\04"), "/trail\\04");
    }

    #[test]
    fn a_killed_process_counts_as_dying_before_it_is_reaped() {
        // Running, it is not dying; killed, it is dying from the moment `kill` returns
        // (SIGKILL stays in the shared pending set until the last thread is released),
        // before anyone reaps it.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        assert!(!dying(pid), "a sleeping process counts as dying");
        // SAFETY: kill on our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        assert!(dying(pid), "a SIGKILLed process does not count as dying");
        let _ = child.wait();
        assert!(dying(pid) && exited(pid));
    }
}
