//! `create`, `start`, `set` and `mark`: shims that turn their arguments into a
//! [`DaemonConfig`] or a control request and make one call into [`crate::daemon`].

use super::size::parse_size;
use crate::daemon::control::{self, Request};
use crate::daemon::{self, DaemonConfig};
use crate::engine::HydrateWhen;
use anyhow::{Context, Result};
use clap::Args;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Args, Clone, Debug)]
pub struct CreateArgs {
    /// Read-only source: a device or file, or an NBD export (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH).
    #[arg(long)]
    pub source: PathBuf,
    /// Destination device or file, at least as large as the source.
    #[arg(long)]
    pub dest: PathBuf,
    /// Metadata device or file (formatted if blank; resumed if it holds this clone).
    #[arg(long)]
    pub metadata: PathBuf,
    /// Region size (power of two, 4K..1G; default 64K for new metadata, the recorded size when
    /// resuming).
    #[arg(long, value_parser = parse_size)]
    pub region_size: Option<u64>,
    /// Resume even though the source's fingerprint changed (you know the source is the same
    /// data, e.g. copied to another device).
    #[arg(long)]
    pub ignore_source_mismatch: bool,
    /// Start with background hydration disabled.
    #[arg(long)]
    pub no_hydration: bool,
    /// Never pass discards down to the destination.
    #[arg(long)]
    pub no_discard_passdown: bool,
    /// Maximum regions hydrating at once (default: 2 batches; 4 for an NBD source).
    #[arg(long)]
    pub hydration_threshold: Option<u64>,
    /// Contiguous regions per background copy (default: 4 MiB worth; over a local source at
    /// most 256 KiB, or one region, while users have requests in service).
    #[arg(long)]
    pub batch_size: Option<u64>,
    /// Background hydration rate limit in bytes/s (0 = unlimited).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub rate: u64,
    /// When background hydration copies: `always` (bounded by the threshold and --rate), or
    /// `idle`: a batch starts only while no user request is in service (dm-clone's policy;
    /// under a load that never pauses, hydration waits).
    #[arg(long, default_value = "always")]
    pub hydrate_when: HydrateWhen,
    /// Number of ublk queues (default: one per CPU).
    #[arg(long)]
    pub queues: Option<u16>,
    /// Queue depth.
    #[arg(long, default_value_t = 128)]
    pub depth: u16,
    /// Requested device number (default: the kernel picks).
    #[arg(long, default_value_t = -1)]
    pub number: i32,
    /// Overwrite metadata that is not blank: another clone's, damaged metadata, a file system
    /// or other data. Never this clone's own metadata (see --force-reformat-this-clone).
    #[arg(long)]
    pub force: bool,
    /// Reformat even this clone's own metadata (recorded for this source), starting the clone
    /// over from the source: every write made to the clone is lost.
    #[arg(long)]
    pub force_reformat_this_clone: bool,
    /// Resume this clone on a destination other than the one it last ran on, because the
    /// destination's contents were copied there (the hydrated regions must be on it).
    #[arg(long)]
    pub dest_moved: bool,
    /// Run the daemon in the foreground instead of in the background.
    #[arg(long)]
    pub foreground: bool,
    /// Use the page cache for the source and destination (no O_DIRECT), like rublk's
    /// `--buffered-io`: for backing files on tmpfs, or to let the host cache the source.
    #[arg(long)]
    pub buffered_io: bool,
    /// Record every write, discard and flush of the destination and the metadata into one
    /// dm-log-writes log at FILE (crash-consistency testing; `ublk-clone mark` adds marks,
    /// `ublk-clone-replay` replays it; see docs/log-writes.md). Not kept for `start`.
    #[arg(long, value_name = "FILE")]
    pub log_writes: Option<PathBuf>,
    /// Size of the --log-writes file (created sparse; ignored for a block device).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub log_writes_size: u64,
    /// Create the device without user recovery: if the daemon dies, the device and whatever
    /// is mounted on it go away (by default the device waits for `ublk-clone recover`).
    #[arg(long)]
    pub no_recovery: bool,
    /// Do not use zero copy even where the kernel offers it (ublk's UBLK_F_AUTO_BUF_REG,
    /// kernel 6.16 and later): serve requests through the daemon's buffers, as on 6.12.
    #[arg(long)]
    pub no_zero_copy: bool,
    /// Internal (`ublk-clone recover`): attach to the quiesced device --number.
    #[arg(long, hide = true)]
    pub recover: bool,
    /// An NBD source (--source nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH):
    /// how many seconds a read waits for the server, connected or not, before it fails with
    /// EIO (that request only; background hydration just pauses).
    #[arg(long, default_value_t = daemon::config::DEFAULT_SOURCE_TIMEOUT)]
    pub source_timeout: u64,
    /// The clone's name: the daemon keeps /dev/ublk-clone/NAME pointing at its device, and
    /// every command takes NAME (default: clone- and the start of the metadata's UUID).
    #[arg(long)]
    pub name: Option<String>,
    /// Serve Prometheus metrics at HOST:PORT (GET /metrics); `ublk-clone metrics` prints
    /// the same text (for node_exporter's textfile collector).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Record the order in which regions are first read (`ublk-clone trace` writes it out;
    /// a later clone's `--prefetch` uses it).
    #[arg(long)]
    pub trace_reads: bool,
    /// Hydrate the regions of this read trace first, in order, ahead of the sweep.
    #[arg(long, value_name = "FILE")]
    pub prefetch: Option<PathBuf>,
}

impl From<&CreateArgs> for DaemonConfig {
    fn from(a: &CreateArgs) -> DaemonConfig {
        DaemonConfig {
            source: a.source.clone(),
            dest: a.dest.clone(),
            metadata: a.metadata.clone(),
            region_size: a.region_size,
            ignore_source_mismatch: a.ignore_source_mismatch,
            no_hydration: a.no_hydration,
            no_discard_passdown: a.no_discard_passdown,
            hydration_threshold: a.hydration_threshold,
            batch_size: a.batch_size,
            rate: a.rate,
            hydrate_when: a.hydrate_when,
            queues: a.queues,
            depth: a.depth,
            number: a.number,
            force: a.force,
            force_reformat_this_clone: a.force_reformat_this_clone,
            dest_moved: a.dest_moved,
            foreground: a.foreground,
            buffered_io: a.buffered_io,
            log_writes: a.log_writes.clone(),
            log_writes_size: a.log_writes_size,
            no_recovery: a.no_recovery,
            no_zero_copy: a.no_zero_copy,
            recover: a.recover,
            source_timeout: a.source_timeout,
            name: a.name.clone(),
            metrics: a.metrics.clone(),
            trace_reads: a.trace_reads,
            prefetch: a.prefetch.clone(),
        }
    }
}

/// The command line that runs `cfg` in a daemon: `create` with [`CreateArgs`]' flags and
/// `--foreground`. Not `--force`: the caller already formatted; the daemon resumes that
/// metadata.
pub(super) fn daemon_command_line(cfg: &DaemonConfig) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["create".into()];
    // `--key=value`: a value such as `-1` must not be taken for a flag.
    let mut kv = |k: &str, val: OsString| {
        let mut arg = OsString::from(format!("{k}="));
        arg.push(val);
        v.push(arg);
    };
    // Absolute, so the daemon's record and saved configuration name the devices whatever
    // directory it runs in (symbolic links kept: see `daemon::saved`).
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match cfg.source_path() {
        Some(p) => kv("--source", abs(p).into()),
        None => kv("--source", cfg.source.clone().into()),
    }
    kv("--source-timeout", cfg.source_timeout.to_string().into());
    kv("--dest", abs(&cfg.dest).into());
    kv("--metadata", abs(&cfg.metadata).into());
    if let Some(n) = &cfg.name {
        kv("--name", n.into());
    }
    if let Some(m) = &cfg.metrics {
        kv("--metrics", m.into());
    }
    if let Some(p) = &cfg.prefetch {
        kv("--prefetch", abs(p).into());
    }
    if let Some(r) = cfg.region_size {
        kv("--region-size", r.to_string().into());
    }
    if let Some(t) = cfg.hydration_threshold {
        kv("--hydration-threshold", t.to_string().into());
    }
    if let Some(b) = cfg.batch_size {
        kv("--batch-size", b.to_string().into());
    }
    kv("--rate", cfg.rate.to_string().into());
    if cfg.hydrate_when != HydrateWhen::default() {
        kv("--hydrate-when", cfg.hydrate_when.name().into());
    }
    if let Some(q) = cfg.queues {
        kv("--queues", q.to_string().into());
    }
    kv("--depth", cfg.depth.to_string().into());
    kv("--number", cfg.number.to_string().into());
    if let Some(log) = &cfg.log_writes {
        kv("--log-writes", abs(log).into());
        kv("--log-writes-size", cfg.log_writes_size.to_string().into());
    }
    for (flag, on) in [
        ("--no-hydration", cfg.no_hydration),
        ("--no-discard-passdown", cfg.no_discard_passdown),
        ("--buffered-io", cfg.buffered_io),
        ("--ignore-source-mismatch", cfg.ignore_source_mismatch),
        ("--dest-moved", cfg.dest_moved),
        ("--no-recovery", cfg.no_recovery),
        ("--no-zero-copy", cfg.no_zero_copy),
        ("--recover", cfg.recover),
        ("--trace-reads", cfg.trace_reads),
    ] {
        if on {
            v.push(flag.into());
        }
    }
    v.push("--foreground".into());
    v
}

/// Runs `cfg` in this process (`foreground`), or starts a background daemon and prints its
/// device once it is live.
pub(super) fn create(cfg: &DaemonConfig) -> Result<()> {
    if cfg.foreground {
        return Ok(daemon::run(cfg)?);
    }
    let dev = daemon::spawn(cfg, &daemon_command_line(cfg))?;
    println!("{dev}");
    Ok(())
}

/// `ublk-clone create`: validates, then starts the daemon and prints the device path.
pub fn run_create(a: &CreateArgs) -> Result<()> {
    create(&DaemonConfig::from(a))
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// Metadata device or file of an existing clone: its saved configuration is used.
    #[arg(long)]
    pub metadata: PathBuf,
    /// Run the daemon in the foreground.
    #[arg(long)]
    pub foreground: bool,
}

/// `ublk-clone start`: restarts a stopped clone from its metadata and saved configuration, or
/// recovers its device if the device is still there without a daemon (the daemon died).
/// The recorded devices are checked against what their paths name now before any of them is
/// opened (see [`daemon::saved`]).
pub fn run_start(a: &StartArgs) -> Result<()> {
    // Its device still there, waiting (the daemon died): recover it, file system and all.
    if let Some(id) = daemon::recover::recoverable_device_of(&a.metadata) {
        let mut cfg = daemon::recover::config_for_recover(&id.to_string())?;
        cfg.foreground = a.foreground;
        return create(&cfg);
    }
    let mut cfg = daemon::saved::config_for_start(&a.metadata)?;
    cfg.foreground = a.foreground;
    create(&cfg)
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    /// The device whose daemon died: /dev/ublkbN or N.
    pub dev: String,
    /// Run the daemon in the foreground.
    #[arg(long)]
    pub foreground: bool,
}

/// `ublk-clone recover DEV`: a new daemon for a device whose daemon died, from the clone's
/// saved configuration; the requests that waited in the kernel then complete.
pub fn run_recover(a: &RecoverArgs) -> Result<()> {
    let mut cfg = daemon::recover::config_for_recover(&a.dev)?;
    cfg.foreground = a.foreground;
    create(&cfg)
}

#[derive(Args, Debug)]
pub struct RestartArgs {
    /// The running device: /dev/ublkbN or N.
    pub dev: String,
    /// Run the new daemon in the foreground.
    #[arg(long)]
    pub foreground: bool,
}

/// `ublk-clone restart DEV`: a live handover to a new daemon (the binary now on disk); the
/// device and the file system on it stay, their I/O pauses meanwhile.
pub fn run_restart(a: &RestartArgs) -> Result<()> {
    let mut cfg = daemon::restart::handover(&a.dev)?;
    cfg.foreground = a.foreground;
    let waits = || {
        format!(
            "{}: restart: the old daemon has handed over and exited; the new one failed, and \
             the device waits for `ublk-clone recover {}`",
            a.dev, a.dev
        )
    };
    create(&cfg).with_context(waits)
}

#[derive(Args, Debug)]
pub struct SetArgs {
    pub dev: String,
    /// Enable or disable background hydration.
    #[arg(long)]
    pub hydration: Option<bool>,
    #[arg(long)]
    pub hydration_threshold: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<u64>,
    /// Hydration rate limit in bytes/s (0 = unlimited).
    #[arg(long, value_parser = parse_size)]
    pub rate: Option<u64>,
    #[arg(long)]
    pub hydrate_on_read: Option<bool>,
    /// When background hydration copies: always, or idle (only while no user request is in
    /// service).
    #[arg(long)]
    pub hydrate_when: Option<HydrateWhen>,
}

/// `ublk-clone set DEV ...`: changes the daemon's run-time settings.
pub fn run_set(a: &SetArgs) -> Result<()> {
    let id = control::parse_dev(&a.dev)?;
    let req = Request::Set {
        hydration: a.hydration,
        threshold: a.hydration_threshold,
        batch_size: a.batch_size,
        rate: a.rate,
        hydrate_on_read: a.hydrate_on_read,
        hydrate_when: a.hydrate_when,
    };
    control::request(id, &req)?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// The clone (started with --trace-reads).
    pub dev: String,
    /// Where to write the trace (one byte offset and length per line, in the order of first reads).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `ublk-clone trace DEV --out FILE`: the order in which the clone's regions were first read.
pub fn run_trace(a: &TraceArgs) -> Result<()> {
    let id = control::parse_dev(&a.dev)?;
    let t = control::request(id, &Request::Trace)?
        .trace
        .context("the daemon sent no trace")?;
    let text = crate::engine::trace::format_trace(&t.regions, t.region_size);
    std::fs::write(&a.out, text).with_context(|| format!("cannot write {}", a.out.display()))?;
    println!("{} regions written to {}", t.regions.len(), a.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct MarkArgs {
    /// The clone device: /dev/ublkbN or N (its daemon must record, `create --log-writes`).
    pub dev: String,
    /// The mark's text (like `dmsetup message LW 0 mark NAME`).
    pub name: String,
}

/// `ublk-clone mark DEV NAME`: logs a mark in the daemon's dm-log-writes recording.
pub fn run_mark(a: &MarkArgs) -> Result<()> {
    let id = control::parse_dev(&a.dev)?;
    let r = control::request(
        id,
        &Request::Mark {
            name: a.name.clone(),
        },
    )?;
    match r.recording {
        Some(rec) => println!(
            "mark '{}' is entry {} of {}",
            a.name,
            rec.entries.saturating_sub(1),
            rec.log
        ),
        None => println!("mark '{}' logged", a.name),
    }
    Ok(())
}
