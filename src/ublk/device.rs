//! Device setup: the options a device is created with, its parameters (size, block sizes,
//! discard limits, the backend's fixed files), and [`DeviceInfo`], what the kernel granted,
//! read back once the device was added.
//!
//! A recoverable device is disowned once live (see `serve`): only a clean stop deletes it, so
//! no error path of a dying daemon removes a device that holds a mounted file system.
//!
//! Invariant: the device never advertises a logical block size below the engine's (the
//! larger of the source's and the destination's), so the kernel never sends a request that
//! the backend's O_DIRECT I/O to a 4Kn source or destination could not serve; it advertises
//! a volatile cache and FUA, so the kernel sends FLUSH and FUA at all.

use super::uring_path::{DEST_SLOT, SOURCE_SLOT};
use super::ServeError;
use libublk::ctrl::UblkCtrl;
use libublk::io::UblkDev;
use libublk::{UblkError, UblkFlags};
use std::os::fd::RawFd;

/// What to create the device with.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Requested device id; -1 lets the kernel choose.
    pub id: i32,
    pub queues: u16,
    pub depth: u16,
    pub io_buf_bytes: u32,
    /// Physical block size to advertise (at least the engine's logical block size and 4096).
    pub physical_block_size: u32,
    /// Create the device recoverable (`UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`):
    /// when the daemon dies, the device and the file system on it stay, requests wait in the
    /// kernel, and those the daemon held are re-issued to the daemon that recovers it.
    pub recovery: bool,
    /// Attach to the existing quiesced device `id` (after [`begin_recovery`]) instead of
    /// adding one.
    pub recover: bool,
    /// Use zero copy ([`ZERO_COPY_FLAGS`]) where the kernel offers it; `false` keeps the
    /// data path of kernels without it (6.12), e.g. to compare the two.
    pub zero_copy: bool,
}

/// Zero copy: the kernel registers each request's pages in the queue ring's buffer table
/// (`UBLK_F_AUTO_BUF_REG`, 6.16), so hydrated reads and writes go between those pages and
/// the destination in place; the daemon copies the data itself where it needs it in its own
/// buffer (`UBLK_F_USER_COPY`). Used only where the kernel offers both, and allows them
/// together.
pub const ZERO_COPY_FLAGS: u64 =
    (libublk::sys::UBLK_F_AUTO_BUF_REG | libublk::sys::UBLK_F_USER_COPY) as u64;

/// Whether a device with `flags` (as granted) serves requests with zero copy.
pub fn zero_copy(flags: u64) -> bool {
    flags & ZERO_COPY_FLAGS == ZERO_COPY_FLAGS
}

/// The ublk features the loaded driver offers (`UBLK_U_CMD_GET_FEATURES`); `None` when it
/// cannot be asked (no ublk_drv, or no permission to open `/dev/ublk-control`).
pub fn driver_features() -> Option<u64> {
    if !std::path::Path::new("/dev/ublk-control").exists() {
        return None;
    }
    UblkCtrl::get_features()
}

/// Flags that change how request data moves; a device must have none of them or exactly
/// [`ZERO_COPY_FLAGS`] for this daemon to serve it.
const DATA_FLAGS: u64 = (libublk::sys::UBLK_F_AUTO_BUF_REG
    | libublk::sys::UBLK_F_USER_COPY
    | libublk::sys::UBLK_F_SUPPORT_ZERO_COPY
    | libublk::sys::UBLK_F_BATCH_IO
    | libublk::sys::UBLK_F_NEED_GET_DATA) as u64;

/// Whether this daemon can serve a device with `flags` (one it did not create itself may use
/// a data transport it does not speak).
pub fn servable(flags: u64) -> bool {
    let data = flags & DATA_FLAGS;
    data == 0 || data == ZERO_COPY_FLAGS
}

/// The names of the ublk features a device with `flags` serves with, for status and list.
pub fn feature_names(flags: u64) -> Vec<&'static str> {
    use libublk::sys;
    let mut names = Vec::new();
    if zero_copy(flags) {
        names.push("zero-copy");
    }
    if flags & sys::UBLK_F_USER_RECOVERY as u64 != 0 {
        names.push("recovery");
    }
    if quiesce(flags) {
        names.push("quiesce");
    }
    names
}

/// Whether a device with `flags` (as granted) can be quiesced by its daemon for a handover
/// (`UBLK_F_QUIESCE` on a recoverable device, kernel 6.16 and later).
pub fn quiesce(flags: u64) -> bool {
    let need = (libublk::sys::UBLK_F_QUIESCE | libublk::sys::UBLK_F_USER_RECOVERY) as u64;
    flags & need == need
}

/// How long the kernel waits, in [`quiesce_for_handover`], for an idle tag on every queue.
const QUIESCE_TIMEOUT_MS: u64 = 30_000;

/// Quiesces device `id` from its own live daemon, for a handover: the kernel stops handing
/// this daemon requests (new ones wait in the kernel for the next daemon), waits until every
/// queue has an idle tag, and ends the queues' idle commands. Requests still in service here
/// then are not committed any more (libublk stops committing once a queue is aborted): the
/// kernel re-issues them to the next daemon, as after a crash. Called on a thread that serves
/// no queue, while the queues serve on.
pub fn quiesce_for_handover(id: u32) -> Result<(), UblkError> {
    let ctrl = UblkCtrl::new_simple(id as i32)?;
    ctrl.quiesce_dev(QUIESCE_TIMEOUT_MS).map(|_| ())
}

/// What a device's recovery starts from: the existing device's queues and depth.
#[derive(Clone, Copy, Debug)]
pub struct RecoveryStart {
    pub queues: u16,
    pub depth: u16,
}

/// A device's state as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    Live,
    /// Its daemon died; it waits for a new one (`recover`).
    Quiesced,
    Dead,
    Other(u16),
}

/// The state of device `id` and whether it was created recoverable; `None` if there is no
/// such device.
pub fn device_state(id: u32) -> Option<(DeviceState, bool)> {
    // Without ublk_drv there is no device, and libublk would print advice on stderr.
    if !std::path::Path::new("/dev/ublk-control").exists()
        || !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
    {
        return None;
    }
    let ctrl = UblkCtrl::new_simple(id as i32).ok()?;
    let info = ctrl.dev_info();
    let state = match info.state as u32 {
        libublk::sys::UBLK_S_DEV_LIVE => DeviceState::Live,
        libublk::sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
        libublk::sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
        other => DeviceState::Other(other as u16),
    };
    Some((state, info.flags & RECOVERY_FLAGS as u64 != 0))
}

/// The pid the kernel records for device `id`'s daemon: the last daemon that started or
/// recovered it (on 6.12 kept after it died, and until `END_USER_RECOVERY` names the next),
/// or -1 for a device not started (newer kernels may also report -1 once the daemon is
/// gone). `None` if there is no such device.
pub fn device_daemon_pid(id: u32) -> Option<i32> {
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        return None;
    }
    let ctrl = UblkCtrl::new_simple(id as i32).ok()?;
    let pid = ctrl.dev_info().ublksrv_pid;
    Some(pid)
}

/// Deletes device `id` (one whose daemon is gone).
pub fn delete_device(id: u32) -> Result<(), ServeError> {
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|cause| ServeError::Delete { id, cause })?;
    ctrl.del_dev()
        .map(|_| ())
        .map_err(|cause| ServeError::Delete { id, cause })
}

const RECOVERY_FLAGS: u32 =
    libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE;

/// Starts the recovery of device `id`, whose daemon died: waits (up to 30 s) until the dead
/// daemon's process is gone and its rings are torn down (the kernel refuses earlier), which is
/// also when every I/O it had in flight has ended. Only then may a new daemon open the
/// devices and write. The kernel accepts `START_USER_RECOVERY` once per recovery: only the
/// daemon that will attach calls this.
///
/// An earlier recovery that sent `START_USER_RECOVERY` and died before its queues were all
/// ready leaves the device quiesced with no queue counted ready, and the kernel then answers
/// EINVAL (it checks that before whether `/dev/ublkcN` is open, so EINVAL alone proves
/// nothing about the barrier). Recovery goes on because the other holds are enough then: that
/// process is gone (the recovery lock is free), the destination and metadata are claimed
/// exclusively until every file of the dead daemon is released (the new daemon waits for
/// them), and `/dev/ublkcN` admits one opener at a time (attaching fails while it is held).
pub fn begin_recovery(id: u32) -> Result<RecoveryStart, ServeError> {
    let not = |why: String| ServeError::NotRecoverable { id, why };
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| not(format!("no such device ({e})")))?;
    let info = ctrl.dev_info();
    if info.flags & RECOVERY_FLAGS as u64 == 0 {
        return Err(not(
            "it was created with --no-recovery; stop it and start the clone again".into(),
        ));
    }
    if info.state as u32 != libublk::sys::UBLK_S_DEV_QUIESCED {
        let what = if info.state as u32 == libublk::sys::UBLK_S_DEV_LIVE {
            "it is live: its daemon is running"
        } else {
            "it is not waiting for recovery"
        };
        return Err(not(what.into()));
    }
    if !servable(info.flags) {
        return Err(not(format!(
            "its ublk flags {:#x} ask for a data transport this version does not serve (was it \
             created by a newer ublk-clone? recover it with that one)",
            info.flags
        )));
    }
    let start = RecoveryStart {
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
    };
    match ctrl.start_user_recover() {
        Ok(r) if r >= 0 => Ok(start),
        Err(libublk::UblkError::UringIOError(r)) if r == -libc::EINVAL => {
            log::warn!("/dev/ublkb{id}: an earlier recovery started and did not finish; attaching");
            Ok(start)
        }
        Ok(r) => Err(not(format!(
            "the kernel refused to start recovery (errno {}): the dead daemon's process may \
             still be exiting",
            -r
        ))),
        Err(cause) => Err(ServeError::Recover { id, cause }),
    }
}

/// What the kernel granted, read back after the device was added.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub id: u32,
    pub path: String,
    pub queues: u16,
    pub depth: u16,
    pub flags: u64,
    pub max_io_buf_bytes: u32,
}

impl DeviceInfo {
    /// Reads back what the kernel granted to the device of `ctrl`.
    pub(super) fn granted(ctrl: &UblkCtrl) -> DeviceInfo {
        let info = ctrl.dev_info();
        DeviceInfo {
            id: info.dev_id,
            path: format!("/dev/ublkb{}", info.dev_id),
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            flags: info.flags,
            max_io_buf_bytes: info.max_io_buf_bytes,
        }
    }
}

/// Adds the ublk device (not yet started), or with `recover` attaches to the quiesced one.
pub(super) fn add(opts: &DeviceOptions) -> Result<UblkCtrl, ServeError> {
    let builder = || {
        libublk::ctrl::UblkCtrlBuilder::default()
            .name("ublk-clone")
            .id(opts.id)
            .nr_queues(opts.queues)
            .depth(opts.depth)
            .io_buf_bytes(opts.io_buf_bytes)
    };
    if opts.recover {
        return builder()
            .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            .build()
            .map_err(|cause| ServeError::Recover {
                id: opts.id.max(0) as u32,
                cause,
            });
    }
    // Detected at run time, never from the kernel's version.
    let offered = driver_features().unwrap_or(0);
    let base = recovery_flags(offered, opts.recovery);
    let zc = opts.zero_copy && zero_copy(offered);
    let added = builder()
        .ctrl_flags(base | if zc { ZERO_COPY_FLAGS } else { 0 })
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build();
    match added {
        Err(UblkError::UringIOError(r)) if zc && (r == -libc::EINVAL || r == -libc::EOPNOTSUPP) => {
            // A driver that offers both flags but refuses them together.
            log::warn!(
                "the kernel refused a zero-copy device (errno {}); adding one without",
                -r
            );
            builder()
                .ctrl_flags(base)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(|cause| ServeError::Add { cause })
        }
        other => other.map_err(|cause| ServeError::Add { cause }),
    }
}

/// The recovery flags of a new device where the driver offers `offered`: none without
/// `recovery`; otherwise recovery with re-issue, and quiesce for `restart` where offered.
fn recovery_flags(offered: u64, recovery: bool) -> u64 {
    let quiesce = libublk::sys::UBLK_F_QUIESCE as u64;
    match recovery {
        false => 0,
        true => RECOVERY_FLAGS as u64 | (offered & quiesce),
    }
}

/// The device's parameters, from the engine's geometry and block size and the options.
#[derive(Clone, Copy, Debug)]
pub(super) struct Target {
    /// Device size in bytes.
    pub size: u64,
    pub region_size: u64,
    pub region_shift: u32,
    pub logical_shift: u8,
    pub physical_shift: u8,
    pub depth: u16,
    /// The source and destination descriptors, registered as fixed files on every queue ring.
    pub source: RawFd,
    pub dest: RawFd,
}

impl Target {
    /// Sets the device's parameters: libublk's `tgt_init`.
    pub fn init(&self, dev: &mut UblkDev) -> Result<(), UblkError> {
        let region_sectors = (self.region_size >> 9) as u32;
        dev.set_default_params(self.size);
        let p = &mut dev.tgt.params;
        p.basic.attrs = libublk::sys::UBLK_ATTR_VOLATILE_CACHE | libublk::sys::UBLK_ATTR_FUA;
        p.basic.logical_bs_shift = self.logical_shift;
        p.basic.physical_bs_shift = self.physical_shift;
        p.basic.io_min_shift = self.physical_shift;
        p.basic.io_opt_shift = self.region_shift.max(self.physical_shift as u32) as u8;
        p.types |= libublk::sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = libublk::sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: self.region_size as u32,
            max_discard_sectors: (u32::MAX >> 9) / region_sectors * region_sectors,
            // WRITE_ZEROES is served (Engine::write_zeroes); 128 MiB (at least one region) per
            // request bounds what a recording holds in memory for one.
            max_write_zeroes_sectors: ((128u32 << 20) >> 9).max(region_sectors) / region_sectors
                * region_sectors,
            max_discard_segments: 1,
            reserved0: 0,
        };
        let tgt = &mut dev.tgt;
        tgt.fds[SOURCE_SLOT as usize] = self.source;
        tgt.fds[DEST_SLOT as usize] = self.dest;
        tgt.nr_fds = 3;
        // A tag may have a few backend I/Os in flight, plus the kick read.
        tgt.sq_depth = self.depth.saturating_mul(2).max(64);
        tgt.cq_depth = self.depth.saturating_mul(4).max(128);
        Ok(())
    }
}

/// The `logical_bs_shift` and `physical_bs_shift` to advertise for a `logical`-byte logical
/// block size and a `physical`-byte physical one: the physical (which is also the minimum I/O
/// size) never below the logical nor below 4096, libublk's default.
pub(super) fn block_shifts(logical: u64, physical: u32) -> (u8, u8) {
    let logical = logical.max(crate::io::SECTOR_SIZE).next_power_of_two();
    let physical = (physical as u64).next_power_of_two().max(logical).max(4096);
    (
        logical.trailing_zeros() as u8,
        physical.trailing_zeros() as u8,
    )
}

#[cfg(test)]
mod tests {
    use super::{block_shifts, quiesce, recovery_flags, servable, zero_copy, ZERO_COPY_FLAGS};
    use libublk::sys;

    #[test]
    fn a_recoverable_device_is_quiesced_for_restart_where_the_driver_offers_it() {
        let rec = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
        let q = sys::UBLK_F_QUIESCE as u64;
        // 6.12 offers recovery, not quiesce.
        assert_eq!(recovery_flags(rec, true), rec);
        assert!(!quiesce(recovery_flags(rec, true)));
        assert_eq!(recovery_flags(rec | q, true), rec | q);
        assert!(quiesce(recovery_flags(rec | q, true)));
        // --no-recovery: neither (quiesce needs a recoverable device).
        assert_eq!(recovery_flags(rec | q, false), 0);
        assert!(!quiesce(q));
    }

    #[test]
    fn only_the_copy_and_zero_copy_transports_are_served() {
        let rec = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
        assert!(servable(rec) && !zero_copy(rec));
        assert!(servable(rec | ZERO_COPY_FLAGS) && zero_copy(rec | ZERO_COPY_FLAGS));
        // User copy alone, auto registration alone, the older zero copy, batch I/O: refused
        // (a recovery would set up its queues for the wrong transport).
        for f in [
            sys::UBLK_F_USER_COPY,
            sys::UBLK_F_AUTO_BUF_REG,
            sys::UBLK_F_SUPPORT_ZERO_COPY,
            sys::UBLK_F_BATCH_IO,
        ] {
            assert!(!servable(rec | f as u64), "{f:#x}");
        }
        assert!(!servable(
            rec | ZERO_COPY_FLAGS | sys::UBLK_F_BATCH_IO as u64
        ));
    }

    #[test]
    fn advertised_block_sizes_follow_the_devices() {
        // 512-byte sectors: libublk's defaults (512 logical, 4096 physical and minimum I/O).
        assert_eq!(block_shifts(512, 512), (9, 12));
        assert_eq!(block_shifts(512, 4096), (9, 12));
        // A 4Kn source or destination: 4096-byte logical blocks.
        assert_eq!(block_shifts(4096, 4096), (12, 12));
        assert_eq!(block_shifts(4096, 512), (12, 12));
        // A larger physical block is passed on.
        assert_eq!(block_shifts(512, 16384), (9, 14));
    }
}
