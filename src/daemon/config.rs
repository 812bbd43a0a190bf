//! [`DaemonConfig`]: the options a clone daemon runs with, and the body of the configuration
//! saved for `start` (see [`super::saved`]).
//!
//! Invariant: the field names and serde attributes are the saved JSON format. Configurations
//! written by earlier versions keep loading: fields added since have serde defaults.
//! [`DaemonConfig::validate`] checks every option that can be checked without opening a
//! device, before anything is opened or written.

use super::devices;
use super::error::{refuse, Named, Result};
use crate::engine::{EngineConfig, HydrateWhen};
use crate::metadata::overwrite::Overwrite;
use crate::metadata::DEFAULT_REGION_SIZE;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Size of a `log_writes` file when none is given.
pub const DEFAULT_LOG_WRITES_SIZE: u64 = 1 << 30;

fn default_log_size() -> u64 {
    DEFAULT_LOG_WRITES_SIZE
}

/// A clone daemon's options. The one-shot options (`force`, `force_reformat_this_clone`,
/// `dest_moved`, `recover`, `foreground`, `log_writes`, `number`) are cleared in a saved
/// configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonConfig {
    /// Read-only source device or file.
    pub source: PathBuf,
    /// Destination device or file, at least as large as the source.
    pub dest: PathBuf,
    /// Metadata device or file (formatted if blank; resumed if it holds this clone).
    pub metadata: PathBuf,
    /// Region size of new metadata ([`DEFAULT_REGION_SIZE`] if `None`); when resuming, the
    /// size the metadata must record.
    pub region_size: Option<u64>,
    /// Resume even though the source's fingerprint changed.
    pub ignore_source_mismatch: bool,
    /// Start with background hydration disabled.
    pub no_hydration: bool,
    /// Never pass discards down to the destination.
    pub no_discard_passdown: bool,
    /// Maximum regions hydrating at once (default: two batches; four for a remote source).
    pub hydration_threshold: Option<u64>,
    /// Contiguous regions per background copy (default: the engine's).
    pub batch_size: Option<u64>,
    /// Background hydration rate limit in bytes/s (0 = unlimited).
    pub rate: u64,
    /// When background batches start (`--hydrate-when`); saved only when not the default.
    #[serde(default, skip_serializing_if = "HydrateWhen::is_always")]
    pub hydrate_when: HydrateWhen,
    /// Number of ublk queues (default: one per CPU).
    pub queues: Option<u16>,
    /// Queue depth.
    pub depth: u16,
    /// Requested device number; -1 lets the kernel pick.
    pub number: i32,
    /// Overwrite metadata that is not blank (never this clone's own).
    pub force: bool,
    /// Reformat even this clone's own metadata, starting the clone over.
    #[serde(default)]
    pub force_reformat_this_clone: bool,
    /// Resume on a destination other than the one the clone last ran on.
    #[serde(default)]
    pub dest_moved: bool,
    /// Run in the calling process instead of a background daemon.
    pub foreground: bool,
    /// Use the page cache for the source and destination (no O_DIRECT).
    #[serde(default)]
    pub buffered_io: bool,
    /// Record the destination and metadata into this dm-log-writes log.
    #[serde(default)]
    pub log_writes: Option<PathBuf>,
    /// Size of a `log_writes` file (created sparse; ignored for a block device).
    #[serde(default = "default_log_size")]
    pub log_writes_size: u64,
    /// Create the device without user recovery: a daemon death then removes it.
    #[serde(default)]
    pub no_recovery: bool,
    /// Never use zero copy, even where the kernel offers it (saved only when set).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_zero_copy: bool,
    /// Attach to the quiesced device `number`, whose daemon died, instead of adding one.
    #[serde(default)]
    pub recover: bool,
    /// How long a read of a remote (NBD) source waits for it, connected or not, before it
    /// fails with EIO (that request only).
    #[serde(default = "default_source_timeout")]
    pub source_timeout: u64,
    /// The clone's name (`/dev/ublk-clone/NAME`; every command takes it); `None`: derived
    /// from the metadata's UUID ([`super::names::default_name`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Serve Prometheus metrics at this address (`HOST:PORT`, `GET /metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// Record the order in which regions are first read (`ublk-clone trace` writes it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trace_reads: bool,
    /// A read trace whose regions are hydrated first, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<PathBuf>,
}

/// Most connections to one NBD server.
pub const MAX_NBD_CONNECTIONS: usize = 16;

/// Seconds a read of a remote source waits when no `--source-timeout` is given.
pub const DEFAULT_SOURCE_TIMEOUT: u64 = 30;

fn default_source_timeout() -> u64 {
    DEFAULT_SOURCE_TIMEOUT
}

impl DaemonConfig {
    /// Whether the source is remote (an NBD URI) rather than a file or device path.
    pub fn source_is_remote(&self) -> bool {
        self.source.to_str().is_some_and(crate::io::nbd::is_nbd_uri)
    }

    /// The source's path, if it is a file or device (not an NBD URI).
    pub fn source_path(&self) -> Option<&Path> {
        (!self.source_is_remote()).then_some(self.source.as_path())
    }

    /// The options of a remote source.
    /// One connection per queue plus one per background hydration worker (when the server
    /// allows several, `CAN_MULTI_CONN`), at most [`MAX_NBD_CONNECTIONS`].
    pub fn nbd_options(&self) -> crate::io::nbd::NbdOptions {
        let wanted = self.queue_count() as usize + crate::engine::REMOTE_HYDRATION_WORKERS;
        crate::io::nbd::NbdOptions {
            timeout: std::time::Duration::from_secs(self.source_timeout.max(1)),
            connections: wanted.min(MAX_NBD_CONNECTIONS),
        }
    }

    /// The number of ublk queues: `--queues`, else one per CPU.
    pub fn queue_count(&self) -> u16 {
        self.queues.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get().min(u16::MAX as usize) as u16)
                .unwrap_or(1)
        })
    }

    /// The region size new metadata gets.
    pub fn region_size_or_default(&self) -> u64 {
        self.region_size.unwrap_or(DEFAULT_REGION_SIZE)
    }

    /// How far formatting the metadata may go.
    pub fn overwrite(&self) -> Overwrite {
        Overwrite::from_flags(self.force, self.force_reformat_this_clone)
    }

    /// The engine's configuration for a clone of `size` bytes in regions of `region_size`.
    pub fn engine_config(&self, size: u64, region_size: u64) -> EngineConfig {
        let mut cfg = EngineConfig::new(size, region_size);
        let batches = if self.source_is_remote() {
            cfg = cfg.for_remote_source();
            crate::engine::REMOTE_HYDRATION_WORKERS as u64
        } else {
            2
        };
        cfg.discard_passdown = !self.no_discard_passdown;
        cfg.knobs.hydration_enabled = !self.no_hydration;
        if let Some(b) = self.batch_size {
            cfg.knobs.batch_size = b.max(1);
        }
        cfg.knobs.threshold = self
            .hydration_threshold
            .unwrap_or(cfg.knobs.batch_size * batches);
        cfg.knobs.rate_bytes_per_sec = self.rate;
        cfg.knobs.hydrate_when = self.hydrate_when;
        cfg
    }

    /// The extents of the `--prefetch` trace file, if one is given. A recovering daemon
    /// goes on without them when the file cannot be read (it is an optimisation; the device
    /// and the file system on it wait for the recovery).
    pub fn prefetch_extents(&self) -> Result<Vec<crate::engine::trace::Extent>> {
        match (&self.prefetch, self.recover) {
            (None, _) => Ok(Vec::new()),
            (Some(p), false) => self.prefetch_extents_of(p),
            (Some(p), true) => Ok(self.prefetch_extents_of(p).unwrap_or_else(|e| {
                log::warn!("{e}; recovering without the prefetch list");
                Vec::new()
            })),
        }
    }

    fn prefetch_extents_of(&self, p: &Path) -> Result<Vec<crate::engine::trace::Extent>> {
        let text = std::fs::read_to_string(p)
            .named(|| format!("--prefetch {}: cannot read the trace", p.display()))?;
        match crate::engine::trace::parse_trace(&text) {
            Ok(v) => Ok(v),
            Err(e) => refuse!("--prefetch {}: {e}", p.display()),
        }
    }

    /// The checks of [`validate`](Self::validate) that read no device: option values, the
    /// name, and an NBD source's URI.
    pub fn validate_options(&self) -> Result<()> {
        if let Some(name) = &self.name {
            super::names::validate(name)?;
        }
        if let Some(a) = &self.metrics {
            if a.parse::<std::net::SocketAddr>().is_err() {
                refuse!("--metrics {a}: expected an address and port, e.g. 127.0.0.1:9560");
            }
        }
        if let Some(rs) = self.region_size {
            if !rs.is_power_of_two() || !(4096..=1 << 30).contains(&rs) {
                refuse!("--region-size {rs}: must be a power of two between 4K and 1G");
            }
        }
        if self.depth == 0 || self.depth > 4096 {
            refuse!("--depth {}: must be between 1 and 4096", self.depth);
        }
        if self.queues == Some(0) {
            refuse!("--queues 0: need at least one queue");
        }
        if let Some(log) = &self.log_writes {
            self.validate_log(log)?;
        }
        if self.source_is_remote() {
            match crate::io::nbd::uri::parse(&self.source.to_string_lossy()) {
                Err(e) => refuse!("--source {e}"),
                Ok(u) => {
                    if let crate::io::nbd::uri::Endpoint::Unix(p) = &u.endpoint {
                        if p.is_relative() {
                            refuse!(
                                "--source {}: the socket path {} is relative; give it from / \
                                 (the clone is restarted from other directories)",
                                self.source.display(),
                                p.display()
                            );
                        }
                    }
                }
            }
            if self.source_timeout == 0 {
                refuse!("--source-timeout 0: must be at least 1 second");
            }
        }
        Ok(())
    }

    /// Checks the options, and that the paths that exist can serve in their roles. Paths that
    /// do not exist are left to the open.
    pub fn validate(&self) -> Result<()> {
        self.validate_options()?;
        if let Some(p) = &self.prefetch {
            // A recovery goes on without its prefetch list (a mounted file system waits).
            if !self.recover {
                self.prefetch_extents_of(p)?;
            }
        }
        let source = self.source_path().map(|p| ("--source", p));
        let mut distinct = vec![
            ("--dest", self.dest.as_path()),
            ("--metadata", &self.metadata),
        ];
        distinct.extend(source);
        devices::check_distinct(&distinct)?;
        let mut usable = vec![
            ("--dest", self.dest.as_path(), true),
            ("--metadata", &self.metadata, true),
        ];
        usable.extend(source.map(|(f, p)| (f, p, false)));
        devices::check_usable(&usable)
    }

    /// A log is never overwritten: a regular file must be new or empty.
    fn validate_log(&self, log: &Path) -> Result<()> {
        if self.log_writes_size < 1 << 20 || self.log_writes_size % 4096 != 0 {
            refuse!(
                "--log-writes-size {}: must be at least 1M and a multiple of 4K",
                self.log_writes_size
            );
        }
        let Ok(meta) = std::fs::metadata(log) else {
            let dir = log.parent().filter(|d| !d.as_os_str().is_empty());
            if dir.is_some_and(|d| !d.is_dir()) {
                refuse!(
                    "--log-writes {}: the directory does not exist",
                    log.display()
                );
            }
            return Ok(());
        };
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_file() && meta.len() > 0 {
            refuse!(
                "--log-writes {}: the file exists and is not empty; remove it or choose another \
                 file (a log is never overwritten)",
                log.display()
            );
        }
        if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
            refuse!(
                "--log-writes {}: not a regular file or a block device",
                log.display()
            );
        }
        let canon = std::fs::canonicalize(log).ok();
        for (what, p) in [
            ("--source", &self.source),
            ("--dest", &self.dest),
            ("--metadata", &self.metadata),
        ] {
            if canon.is_some() && std::fs::canonicalize(p).ok() == canon {
                refuse!("--log-writes {}: is also the {what} device", log.display());
            }
        }
        Ok(())
    }

    /// What is saved for `start` once the clone runs with `region_size`: absolute device
    /// paths (symbolic links kept, see [`super::saved`]), the recorded region size, and the
    /// one-shot options cleared.
    pub fn to_saved(&self, region_size: u64) -> Result<DaemonConfig> {
        let mut c = self.clone();
        let remote = self.source_is_remote();
        let mut paths = vec![&mut c.dest, &mut c.metadata];
        if !remote {
            paths.push(&mut c.source);
        }
        for p in paths {
            let abs = std::path::absolute(&*p).named(|| format!("{}", p.display()))?;
            *p = abs;
        }
        c.force = false;
        c.force_reformat_this_clone = false;
        c.dest_moved = false;
        c.recover = false;
        c.foreground = false;
        c.log_writes = None;
        c.number = -1;
        c.region_size = Some(region_size);
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(source: &str, threshold: Option<u64>) -> serde_json::Result<DaemonConfig> {
        serde_json::from_value(serde_json::json!({
            "source": source, "dest": "/dev/sdc", "metadata": "/dev/sdd",
            "region_size": null, "ignore_source_mismatch": false, "no_hydration": false,
            "no_discard_passdown": false, "hydration_threshold": threshold,
            "batch_size": null, "rate": 0, "queues": null, "depth": 128, "number": -1,
            "force": false, "foreground": false
        }))
    }

    #[test]
    fn a_remote_source_gets_more_copies_in_flight() -> serde_json::Result<()> {
        let region = 64 << 10;
        let local = config("/dev/sdb", None)?.engine_config(1 << 30, region);
        let remote = config("nbd://server/img", None)?.engine_config(1 << 30, region);
        let batch = local.knobs.batch_size;
        assert_eq!(
            (local.hydration_workers, local.knobs.threshold),
            (2, 2 * batch)
        );
        assert_eq!(
            (remote.hydration_workers, remote.knobs.threshold),
            (REMOTE_WORKERS, REMOTE_WORKERS as u64 * batch)
        );
        let nbd = config("nbd://server/img", None)?;
        assert_eq!(
            nbd.nbd_options().connections,
            (nbd.queue_count() as usize + REMOTE_WORKERS).min(MAX_NBD_CONNECTIONS)
        );
        // A threshold the user gave is kept.
        let given = config("nbd://server/img", Some(3))?.engine_config(1 << 30, region);
        assert_eq!(given.knobs.threshold, 3);
        Ok(())
    }

    const REMOTE_WORKERS: usize = crate::engine::REMOTE_HYDRATION_WORKERS;

    /// A missing trace file refuses a new start, but never a recovery (a mounted file system
    /// waits for it); the clone table's parsing does not read the file at all.
    #[test]
    fn a_missing_prefetch_file_refuses_a_start_but_not_a_recovery() -> serde_json::Result<()> {
        let mut cfg = config("/dev/sdb", None)?;
        cfg.prefetch = Some(PathBuf::from("/nonexistent/trace"));
        assert!(cfg.validate_options().is_ok());
        match cfg.prefetch_extents() {
            Err(e) => assert!(e.to_string().contains("/nonexistent/trace"), "{e}"),
            Ok(v) => panic!("accepted: {v:?}"),
        }
        cfg.recover = true;
        assert!(matches!(cfg.prefetch_extents(), Ok(v) if v.is_empty()));
        Ok(())
    }
}
