//! The daemon's life in this process: open the devices, save the configuration, start the
//! engine, serve the ublk device and the control socket until stopped, then shut down.
//!
//! Before the engine starts, the survival copy a dead daemon left is merged and a new one
//! started (`survival`); it is removed after a clean shutdown only.
//!
//! Invariant: on every way out after the engine started (a stop request, a signal, the
//! device removed from outside, a failure to serve), the engine is shut down (its final
//! commit) before the recording's log is closed, so the log ends after the final commit.

use super::config::DaemonConfig;
use super::control::{self, DaemonRecord};
use super::error::{DaemonError, Named, Result};
use super::open::{open_devices, Opened};
use super::server::{self, CtlRecording};
use super::sticky::Sticky;
use super::{names, process, saved, spawn, survival};
use crate::engine::{Engine, Mode};
use crate::io::BlockDev;
use crate::ublk::{self, DeviceInfo, DeviceOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Runs the clone in this process until it is stopped. Started by [`spawn::spawn`], it
/// reports readiness (`READY /dev/ublkbN` or `ERROR ...`) on stdout; in the foreground it
/// prints the device path once live.
pub fn run(cfg: &DaemonConfig) -> Result<()> {
    let notify = spawn::notify_requested();
    let res = serve_clone(cfg, notify);
    if let Err(e) = &res {
        if notify {
            spawn::notify_error(e);
        }
    }
    res
}

fn serve_clone(cfg: &DaemonConfig, notify: bool) -> Result<()> {
    let private_ns = process::private_mount_namespace();
    process::install_signal_handlers();
    process::abort_on_panic();
    let metrics = match cfg.metrics.as_deref().map(super::metrics::listen) {
        Some(Err(e)) if cfg.recover => {
            // The device and its file system wait for this recovery: go on without metrics.
            log::error!("{}; recovering without metrics", super::error::chain(&e));
            None
        }
        other => other.transpose()?,
    };
    let recovering = cfg.recover.then_some(cfg.number as u32);
    // The name is held (locked) for the daemon's life, from before the check on.
    let mut _name_lock = None;
    if let (Some(name), false) = (&cfg.name, cfg.recover) {
        // Before anything is opened or formatted: a refused name writes nothing.
        names::check_free(name, None)?;
        _name_lock = Some(names::lock(name, false)?);
        names::check_free(name, None)?;
    }
    // A recovery takes its name after `open_devices`, whose recovery lock makes a second
    // recovery of the device fail at once, and whose barrier waits for the dead daemon.
    let o = open_devices(cfg, true)?;
    let name = match &cfg.name {
        Some(n) => n.clone(),
        // A name derived from the metadata (taken only by a copy of this metadata).
        None => names::default_name(&o.md.uuid()),
    };
    if _name_lock.is_none() {
        _name_lock = Some(names::lock(&name, cfg.recover)?);
        names::check_free(&name, recovering)?;
    }
    saved::save(cfg, &o.md, o.source_file.as_deref(), &o.dest)?;
    let (survival_path, degraded) = survival::resume(cfg, &o.md)?;
    process::detach_ublk_mounts(private_ns, &control::run_dir());
    let region_size = o.md.region_size();
    let mut ecfg = cfg.engine_config(o.source.size(), region_size);
    ecfg.trace_reads = cfg.trace_reads;
    ecfg.prefetch = crate::engine::trace::regions_of(
        &cfg.prefetch_extents()?,
        region_size,
        o.source.size().div_ceil(region_size),
    );
    ecfg.block_size = o.block_sizes.logical as u64;
    ecfg.start_mode = degraded.map(|(m, reason)| (Mode::from_metadata(m), reason));
    // A recovering daemon continues the dead one: its settings and failed regions.
    let sticky = Arc::new(Sticky::new(&o.md.uuid(), survival::boot_id()?));
    let taken = cfg.recover.then(|| sticky.take_over()).flatten();
    if let Some(t) = &taken {
        ecfg.knobs = t.knobs.clone();
    }
    let engine = Engine::start(o.md.clone(), o.source.clone(), o.dest_dyn.clone(), ecfg)?;
    if let Some(t) = &taken {
        engine.restore_failed_regions(&t.failed_regions);
    }
    if let Err(e) = sticky.record(&engine) {
        log::warn!("{}", super::error::chain(&e));
    }
    let served = serve_device(cfg, &o, &engine, &sticky, name, metrics, notify);
    let shut = engine.shutdown();
    // Ends the log after the final commit: the unflushed writes, then the end mark.
    let closed = o.recording.as_ref().map(|r| r.space.close());
    served?;
    shut?;
    if engine.mode() == Mode::ReadWrite {
        // Shut down clean: the committed bitmap holds every bit of the survival copy.
        survival::remove(&survival_path);
    }
    sticky.remove();
    if let (Some(closed), Some(log)) = (closed, &cfg.log_writes) {
        let n = closed.named(|| format!("--log-writes {}", log.display()))?;
        log::info!("log {} closed with {n} entries", log.display());
    }
    Ok(())
}

/// Serves the ublk device until it is stopped; [`Live::run`] runs once it is live.
fn serve_device(
    cfg: &DaemonConfig,
    o: &Opened,
    engine: &Arc<Engine>,
    sticky: &Arc<Sticky>,
    name: String,
    metrics: Option<tiny_http::Server>,
    notify: bool,
) -> Result<()> {
    let queues = cfg.queue_count();
    let opts = DeviceOptions {
        id: cfg.number,
        queues,
        depth: cfg.depth,
        io_buf_bytes: 512 << 10,
        physical_block_size: o.block_sizes.physical,
        recovery: !cfg.no_recovery,
        recover: cfg.recover,
        zero_copy: !cfg.no_zero_copy,
    };
    let run_dir = control::run_dir();
    std::fs::create_dir_all(&run_dir).named(|| format!("cannot create {}", run_dir.display()))?;
    let live = Live {
        source: match cfg.source_path() {
            Some(p) => absolute(p),
            None => cfg.source.clone(),
        },
        dest: absolute(&cfg.dest),
        metadata: absolute(&cfg.metadata),
        region_size: o.md.region_size(),
        name,
        metrics,
        engine: engine.clone(),
        sticky: sticky.clone(),
        recording: o.recording.clone().map(|r| {
            let log = cfg.log_writes.clone().unwrap_or_default();
            (r, log.display().to_string())
        }),
        notify,
        recovering: cfg.recover,
    };
    ublk::serve(
        engine.clone(),
        match &o.source_file {
            Some(f) => ublk::SourceIo::File(f.file().as_raw_fd()),
            None => ublk::SourceIo::Remote(
                o.source.clone(),
                std::time::Duration::from_secs(cfg.source_timeout.max(1)),
            ),
        },
        o.dest.file().as_raw_fd(),
        o.recording
            .clone()
            .map(|r| r as Arc<dyn crate::io::observe::IoObserver>),
        &opts,
        move |ctrl, info| {
            live.run(info, || {
                let _ = ctrl.kill_dev();
            })
        },
    )
    .map_err(DaemonError::Ublk)
}

/// Absolute, so that `stop` and `list` find the devices from any directory.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// What the daemon needs once its device is live.
struct Live {
    source: PathBuf,
    dest: PathBuf,
    metadata: PathBuf,
    region_size: u64,
    name: String,
    /// `--metrics`: listening, served once the device is live.
    metrics: Option<tiny_http::Server>,
    engine: Arc<Engine>,
    sticky: Arc<Sticky>,
    recording: Option<CtlRecording>,
    notify: bool,
    /// Attached to an existing device (`recover`): an error never removes it.
    recovering: bool,
}

impl Live {
    /// Publishes the device (record, control socket, readiness), answers the control socket
    /// until stopped, then removes the device (`kill_dev`) and its runtime files.
    fn run(mut self, info: DeviceInfo, kill_dev: impl Fn()) {
        let rec = DaemonRecord {
            pid: std::process::id(),
            replaces_pid: None,
            id: info.id,
            device: info.path.clone(),
            source: self.source,
            dest: self.dest,
            metadata: self.metadata,
            queues: info.queues,
            depth: info.depth,
            region_size: self.region_size,
            name: Some(self.name.clone()),
            features: Some(
                ublk::feature_names(info.flags)
                    .into_iter()
                    .map(String::from)
                    .collect(),
            ),
        };
        let listener = match server::bind_control(&rec) {
            Ok(l) => l,
            Err(e) if self.recovering => {
                // The device may hold a mounted file system: leave it quiesced for the next
                // `recover` rather than remove it. The kernel quiesces it once this process
                // (every thread and ring) is gone.
                log::error!(
                    "{}; exiting, the device stays for `recover`",
                    super::error::chain(&e)
                );
                if self.notify {
                    spawn::notify_error(&e);
                }
                // SAFETY: _exit ends the process at once, as on a handover (below).
                unsafe { libc::_exit(1) };
            }
            Err(e) => {
                log::error!("{}", super::error::chain(&e));
                kill_dev();
                return;
            }
        };
        if let Err(e) = names::link(&self.name, &info.path) {
            // The name still works for ublk-clone's commands (they read the record).
            log::error!("{}", super::error::chain(&e));
        }
        if let Some(server) = self.metrics.take() {
            let r = super::metrics::serve(
                server,
                info.path.clone(),
                self.name.clone(),
                self.engine.clone(),
            );
            if let Err(e) = r {
                log::error!("--metrics: cannot start serving: {e}");
            }
        }
        // udev's by-id link asks `ublk-clone name`, which reads the record written just now.
        names::udev_change(&info.path);
        // Under systemd (Type=notify): the device is live.
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            log::warn!("cannot tell systemd the device is ready: {e}");
        }
        log::info!(
            "{} ({}) live: {} queues, depth {}, flags {:#x}",
            info.path,
            self.name,
            info.queues,
            info.depth,
            info.flags
        );
        if self.notify {
            spawn::notify_ready(&info.path);
        } else {
            println!("{}", info.path);
        }
        if server::control_loop(
            &listener,
            &self.engine,
            &self.sticky,
            self.recording.as_ref(),
        ) == server::LoopEnd::Handover
        {
            // The device stays and the next daemon recovers it; the record stays for it too.
            // Where the kernel can, this daemon quiesces it first: new requests wait in the
            // kernel from then on instead of reaching a daemon about to exit. Otherwise (6.12)
            // the kernel quiesces it once this process (every thread and ring) is gone. Either
            // way the requests in service at the end are re-issued to the next daemon (every
            // request is idempotent for that), which starts no I/O before this process and
            // its I/O are gone (the recovery barrier).
            if ublk::quiesce(info.flags) {
                match ublk::quiesce_for_handover(info.id) {
                    Ok(()) => log::info!(
                        "{}: handed over, quiesced (each queue logs the requests still in \
                         service, which are re-issued to the next daemon); exiting without \
                         removing the device",
                        info.path
                    ),
                    Err(e) => log::warn!(
                        "{}: handed over; quiescing failed ({e}): requests in flight are \
                         re-issued to the next daemon; exiting without removing the device",
                        info.path
                    ),
                }
            } else {
                log::info!(
                    "{}: handed over (no quiesce on this kernel: requests in flight are \
                     re-issued to the next daemon); exiting without removing the device",
                    info.path
                );
            }
            // SAFETY: _exit ends the process at once (no atexit handlers, which would run
            // while the queue threads still serve); the kernel tears the rings down.
            unsafe { libc::_exit(0) };
        }
        // No new background copies from here: the device's last requests and the final
        // flush of its removal do not share the destination with the sweep.
        self.engine.stop_background_hydration();
        kill_dev();
        names::unlink(&self.name, &info.path);
        let _ = std::fs::remove_file(control::socket_path(rec.id));
        let _ = std::fs::remove_file(control::record_path(rec.id));
    }
}
