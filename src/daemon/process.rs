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
pub(super) fn private_mount_namespace() {
    // SAFETY: plain syscalls with valid arguments (a NUL-terminated path, null optional
    // arguments).
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) == 0 {
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            );
        }
    }
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
