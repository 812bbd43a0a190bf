//! The ublk frontend: libublk glue only.
//!
//! - [`device`]: the device's options and parameters, and what the kernel granted;
//! - [`queue`]: one thread per queue, with its command loop;
//! - [`request`]: a request descriptor decoded once, and its engine call;
//! - [`uring_path`]: [`UringPath`], the engine's data path on the queue's own io_uring, on the
//!   fixed files 1 (source) and 2 (destination).
//!
//! One thread per queue (libublk's model: a `UblkQueue` and its io_uring never leave their
//! thread). A plain read or write of hydrated regions is one backend I/O submitted straight
//! from the queue's completion handler; every other request becomes one task on the queue's
//! executor, spawned when the request arrives and ended once it is committed (a tag has one
//! request in flight, so at most one task per tag). Each task turns its request into an
//! engine call and commits the result.
//!
//! Each queue also owns an eventfd that a helper task keeps a read pending on; the engine's
//! cross-thread wake-ups (a commit finished, a region lock was released on another queue)
//! write to it, which pulls the queue thread out of its io_uring wait (see `engine::wake`).
//!
//! A FLUSH on any queue is handled by the engine's group commit, whose destination flush covers
//! writes completed on every queue. `UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA` are advertised
//! so the kernel sends FLUSH and FUA at all.
//!
//! An [`IoObserver`] (the dm-log-writes recorder) can watch the destination: the queue paths
//! then tell it of every destination write, discard and flush they completed, and every
//! request takes the full path.

mod device;
mod pages;
mod queue;
mod remote;
mod request;
mod uring_path;

pub use device::{
    begin_recovery, delete_device, device_daemon_pid, device_state, driver_features, feature_names,
    quiesce, quiesce_for_handover, zero_copy, DeviceInfo, DeviceOptions, DeviceState,
    RecoveryStart, ZERO_COPY_FLAGS,
};
pub use queue::queues_alive;
pub use uring_path::UringPath;

use crate::engine::Engine;
use crate::io::observe::IoObserver;
use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;
use libublk::UblkError;
use std::os::fd::RawFd;
use std::sync::Arc;

/// Why a ublk device could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot add the ublk device (is ublk_drv loaded? try `modprobe ublk_drv`): {cause}")]
    Add { cause: UblkError },
    #[error("ublk device failed: {cause}")]
    Run { cause: UblkError },
    #[error("/dev/ublkb{id} cannot be recovered: {why}")]
    NotRecoverable { id: u32, why: String },
    #[error("recovering /dev/ublkb{id}: {cause}")]
    Recover { id: u32, cause: UblkError },
    #[error("deleting /dev/ublkb{id}: {cause}")]
    Delete { id: u32, cause: UblkError },
}

/// Adds the device, serves it until it is stopped, and returns after the queues exited.
/// `observer` is told of the destination I/O the queues complete (a recorder); `on_started`
/// runs once the device is live (print its path, start the control socket, ...).
/// How the queues read the source.
pub enum SourceIo {
    /// A local file or device, read on each queue's ring (a fixed file).
    File(RawFd),
    /// A remote source (NBD): blocking reads, done by reader threads (see `remote`), each
    /// failing after the timeout.
    Remote(Arc<dyn crate::io::BlockDev>, std::time::Duration),
}

pub fn serve(
    engine: Arc<Engine>,
    source: SourceIo,
    dest: RawFd,
    observer: Option<Arc<dyn IoObserver>>,
    opts: &DeviceOptions,
    on_started: impl FnOnce(&UblkCtrl, DeviceInfo) + Send + Sync + 'static,
) -> Result<(), ServeError> {
    let (source_fd, remote) = match source {
        SourceIo::File(fd) => (fd, None),
        SourceIo::Remote(dev, timeout) => (
            -1,
            Some(
                remote::RemoteSource::start(dev, timeout).map_err(|e| ServeError::Run {
                    cause: UblkError::IOError(e),
                })?,
            ),
        ),
    };
    let ctrl = device::add(opts)?;
    let geo = engine.geometry();
    let (logical_shift, physical_shift) =
        device::block_shifts(engine.block_size(), opts.physical_block_size);
    let target = device::Target {
        size: geo.size,
        region_size: geo.region_size,
        region_shift: geo.region_shift,
        logical_shift,
        physical_shift,
        depth: opts.depth,
        source: source_fd,
        dest,
    };
    queue::set_queues_alive(opts.queues as usize);
    let q_fn = move |qid: u16, dev: &UblkDev| {
        queue::queue_thread(engine.clone(), observer.clone(), remote.clone(), qid, dev)
    };
    let recoverable = opts.recovery || opts.recover;
    let dev_fn = move |ctrl: &UblkCtrl| {
        if recoverable {
            // Live now: from here only a clean stop deletes the device (below). A daemon
            // that dies leaves it quiesced, with its file system, for `recover`.
            ctrl.disown();
        }
        on_started(ctrl, DeviceInfo::granted(ctrl))
    };
    ctrl.run_target(|dev: &mut UblkDev| target.init(dev), q_fn, dev_fn)
        .map_err(|cause| ServeError::Run { cause })?;
    if recoverable {
        // The queues exited: the device was stopped (by `stop`, or from outside). Delete
        // it; it may be gone already.
        let _ = ctrl.del_dev();
    }
    Ok(())
}
