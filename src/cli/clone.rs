//! `create` (and the daemon it starts), `list`, `status`, `set`, `stop`.

use super::control::{self, DaemonRecord, Request, Response};
use super::metadata::DEFAULT_REGION_SIZE;
use super::size::parse_size;
use crate::engine::{Engine, EngineConfig, Status};
use crate::io::file::{Access, FileDev};
use crate::io::{BlockDev, BlockSizes};
use crate::logwrites::Recording;
use crate::metadata::overwrite::{self, Overwrite};
use crate::metadata::{Expect, FormatParams, Metadata, MetadataMode};
use crate::ublk::{self, DeviceOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CreateArgs {
    /// Read-only source device or file.
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
    /// Maximum regions hydrating at once (default: 2 batches).
    #[arg(long)]
    pub hydration_threshold: Option<u64>,
    /// Contiguous regions per background copy (default: 4 MiB worth).
    #[arg(long)]
    pub batch_size: Option<u64>,
    /// Background hydration rate limit in bytes/s (0 = unlimited).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub rate: u64,
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
    #[serde(default)]
    pub force_reformat_this_clone: bool,
    /// Resume this clone on a destination other than the one it last ran on, because the
    /// destination's contents were copied there (the hydrated regions must be on it).
    #[arg(long)]
    #[serde(default)]
    pub dest_moved: bool,
    /// Run the daemon in the foreground instead of in the background.
    #[arg(long)]
    pub foreground: bool,
    /// Use the page cache for the source and destination (no O_DIRECT), like rublk's
    /// `--buffered-io`: for backing files on tmpfs, or to let the host cache the source.
    #[arg(long)]
    #[serde(default)]
    pub buffered_io: bool,
    /// Record every write, discard and flush of the destination and the metadata into one
    /// dm-log-writes log at FILE (crash-consistency testing; `ublk-clone mark` adds marks,
    /// `ublk-clone-replay` replays it; see docs/log-writes.md). Not kept for `start`.
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub log_writes: Option<PathBuf>,
    /// Size of the --log-writes file (created sparse; ignored for a block device).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    #[serde(default = "default_log_size")]
    pub log_writes_size: u64,
}

fn default_log_size() -> u64 {
    1 << 30
}

/// Mark logged after the snapshot of the metadata that starts a daemon's log.
pub const LOG_START_MARK: &str = "ublk-clone-start";

impl CreateArgs {
    /// The command-line arguments that reproduce these options for the daemon.
    fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = Vec::new();
        // `--key=value`: a value such as `-1` must not be taken for a flag.
        let mut kv = |k: &str, val: std::ffi::OsString| {
            let mut arg = std::ffi::OsString::from(format!("{k}="));
            arg.push(val);
            v.push(arg);
        };
        // Absolute, so the daemon's record and saved configuration name the devices whatever
        // directory it runs in (symbolic links kept: see `config`).
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        kv("--source", abs(&self.source).into());
        kv("--dest", abs(&self.dest).into());
        kv("--metadata", abs(&self.metadata).into());
        if let Some(r) = self.region_size {
            kv("--region-size", r.to_string().into());
        }
        if let Some(t) = self.hydration_threshold {
            kv("--hydration-threshold", t.to_string().into());
        }
        if let Some(b) = self.batch_size {
            kv("--batch-size", b.to_string().into());
        }
        kv("--rate", self.rate.to_string().into());
        if let Some(q) = self.queues {
            kv("--queues", q.to_string().into());
        }
        kv("--depth", self.depth.to_string().into());
        kv("--number", self.number.to_string().into());
        if let Some(log) = &self.log_writes {
            kv("--log-writes", abs(log).into());
            kv("--log-writes-size", self.log_writes_size.to_string().into());
        }
        for (flag, on) in [
            ("--no-hydration", self.no_hydration),
            ("--no-discard-passdown", self.no_discard_passdown),
            ("--buffered-io", self.buffered_io),
            // Not --force: the caller already formatted; the daemon resumes that metadata.
            ("--ignore-source-mismatch", self.ignore_source_mismatch),
            ("--dest-moved", self.dest_moved),
        ] {
            if on {
                v.push(flag.into());
            }
        }
        v
    }

    fn validate(&self) -> Result<()> {
        if let Some(rs) = self.region_size {
            if !rs.is_power_of_two() || !(4096..=1 << 30).contains(&rs) {
                bail!("--region-size {rs}: must be a power of two between 4K and 1G");
            }
        }
        if self.depth == 0 || self.depth > 4096 {
            bail!("--depth {}: must be between 1 and 4096", self.depth);
        }
        if self.queues == Some(0) {
            bail!("--queues 0: need at least one queue");
        }
        if let Some(log) = &self.log_writes {
            self.validate_log(log)?;
        }
        super::devices::check_distinct(&[
            ("--source", &self.source),
            ("--dest", &self.dest),
            ("--metadata", &self.metadata),
        ])?;
        super::devices::check_usable(&[
            ("--source", &self.source, false),
            ("--dest", &self.dest, true),
            ("--metadata", &self.metadata, true),
        ])
    }

    /// A log is never overwritten: a regular file must be new or empty.
    fn validate_log(&self, log: &Path) -> Result<()> {
        if self.log_writes_size < 1 << 20 || self.log_writes_size % 4096 != 0 {
            bail!(
                "--log-writes-size {}: must be at least 1M and a multiple of 4K",
                self.log_writes_size
            );
        }
        let Ok(meta) = std::fs::metadata(log) else {
            let dir = log.parent().filter(|d| !d.as_os_str().is_empty());
            if dir.is_some_and(|d| !d.is_dir()) {
                bail!(
                    "--log-writes {}: the directory does not exist",
                    log.display()
                );
            }
            return Ok(());
        };
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_file() && meta.len() > 0 {
            bail!(
                "--log-writes {}: the file exists and is not empty; remove it or choose another \
                 file (a log is never overwritten)",
                log.display()
            );
        }
        if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
            bail!(
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
                bail!("--log-writes {}: is also the {what} device", log.display());
            }
        }
        Ok(())
    }
}

struct Opened {
    source: Arc<FileDev>,
    dest: Arc<FileDev>,
    /// The clone's block sizes (the larger of the source's and the destination's).
    block_sizes: BlockSizes,
    /// The destination as the engine sees it (through the recorder when recording).
    dest_dyn: Arc<dyn BlockDev>,
    md: Arc<crate::metadata::Metadata>,
    recording: Option<Arc<Recording>>,
}

/// Opens the three devices and formats or opens the metadata. Nothing is written before all
/// checks passed. With `record` (the daemon) and `--log-writes`, the log is started and the
/// destination and metadata are opened through the recorder.
fn open_devices(a: &CreateArgs, record: bool) -> Result<Opened> {
    a.validate()?;
    for (what, p) in [
        ("--source", &a.source),
        ("--dest", &a.dest),
        ("--metadata", &a.metadata),
    ] {
        if !p.exists() {
            bail!("{what} {}: no such file or device", p.display());
        }
    }
    let direct = !a.buffered_io;
    let source = Arc::new(FileDev::open(&a.source, Access::ReadOnly, direct)?);
    let dest = Arc::new(FileDev::open(&a.dest, Access::ReadWrite, direct)?);
    let meta = Arc::new(FileDev::open(&a.metadata, Access::ReadWrite, true)?);
    source.lock(false)?;
    dest.lock(true)?;
    meta.lock(true)?;
    // The destination and metadata are claimed by their exclusive opens; the source is only
    // read (and may be shared by several clones), but one that someone else claims (mounted,
    // or another program's device) can change under the clone.
    if !crate::io::file::block_device_unclaimed(&a.source)
        .with_context(|| format!("--source {}", a.source.display()))?
    {
        bail!(
            "--source {}: busy: the block device is mounted or held exclusively by another \
             program, so it can change under the clone; unmount or release it first",
            a.source.display()
        );
    }
    let writers = crate::io::holders::openers(&a.source, true);
    if !writers.is_empty() {
        bail!(
            "--source {}: open for writing by {}, so it can change under the clone; close it \
             first",
            a.source.display(),
            writers.join(", ")
        );
    }
    if a.number >= 0 && Path::new(&format!("/dev/ublkc{}", a.number)).exists() {
        bail!(
            "--number {}: /dev/ublkb{} already exists (busy); pick another number or omit --number",
            a.number,
            a.number
        );
    }
    if source.size() == 0 || source.size() % 512 != 0 {
        bail!(
            "--source {}: size {} is not a positive multiple of 512 bytes",
            a.source.display(),
            source.size()
        );
    }
    if dest.size() < source.size() {
        bail!(
            "--dest {}: destination ({} bytes) is smaller than the source ({} bytes); use a destination at least as large",
            a.dest.display(),
            dest.size(),
            source.size()
        );
    }
    // 4Kn devices (issue 9, finding 6). The region size of resumed metadata is checked again
    // once it is known.
    let block_sizes = super::devices::clone_block_sizes(
        (&source, &a.source),
        (&dest, &a.dest),
        a.region_size.unwrap_or(DEFAULT_REGION_SIZE),
        if a.region_size.is_some() {
            "--region-size"
        } else {
            "the default region size"
        },
    )?;
    super::devices::check_metadata_block_size(&meta, &a.metadata)?;
    let (dest_dyn, meta_dyn, recording): (Arc<dyn BlockDev>, Arc<dyn BlockDev>, _) =
        match (&a.log_writes, record) {
            (Some(log), true) => {
                let sectorsize = log_sectorsize(block_sizes);
                let (d, m, rec) = start_recording(a, log, dest.clone(), meta.clone(), sectorsize)?;
                (d, m, Some(rec))
            }
            _ => (dest.clone(), meta.clone(), None),
        };
    let md = open_or_format(a, meta_dyn, source.as_ref(), dest.as_ref())?;
    super::devices::clone_block_sizes(
        (&source, &a.source),
        (&dest, &a.dest),
        md.region_size(),
        &format!(
            "the region size recorded in --metadata {}",
            a.metadata.display()
        ),
    )?;
    Ok(Opened {
        source,
        dest,
        block_sizes,
        dest_dyn,
        md: Arc::new(md),
        recording,
    })
}

/// Sector size of the daemon's dm-log-writes log: the clone's logical block size, as the kernel
/// target uses its device's (every I/O of the destination is aligned to it, and every
/// metadata I/O to 4096), at most the format's largest.
fn log_sectorsize(block_sizes: BlockSizes) -> u32 {
    block_sizes
        .logical
        .min(crate::logwrites::format::MAX_SECTORSIZE)
}

/// The destination and metadata as seen through the recorder, and the recording.
type RecordedDevices = (Arc<dyn BlockDev>, Arc<dyn BlockDev>, Arc<Recording>);

/// Starts the daemon's dm-log-writes log: the destination at byte 0 and the metadata at
/// `metadata_base` of one logged space (docs/log-writes.md). The log begins with a copy of
/// the whole metadata device, a FLUSH and the mark [`LOG_START_MARK`], so that replaying it
/// onto zeroed devices gives this clone's metadata; destination regions hydrated before the
/// recording started are not in the log (for a new clone there are none).
fn start_recording(
    a: &CreateArgs,
    log: &Path,
    dest: Arc<FileDev>,
    meta: Arc<FileDev>,
    sectorsize: u32,
) -> Result<RecordedDevices> {
    use crate::logwrites::{LogWriter, LogWritesDev};
    use std::os::unix::fs::FileTypeExt;
    let is_blockdev = std::fs::metadata(log).is_ok_and(|m| m.file_type().is_block_device());
    let writer = if is_blockdev {
        let dev = FileDev::open(log, Access::ReadWrite, false)
            .with_context(|| format!("--log-writes {}", log.display()))?;
        dev.lock(true)?;
        LogWriter::create(Box::new(dev), sectorsize)
    } else {
        LogWriter::create_file(log, a.log_writes_size, sectorsize)
    }
    .with_context(|| format!("--log-writes {}: cannot start the log", log.display()))?;
    let meta_dyn: Arc<dyn BlockDev> = meta.clone();
    let (d, m, space) = LogWritesDev::pair(dest, meta_dyn.clone(), writer)
        .with_context(|| format!("--log-writes {}", log.display()))?;
    let mut buf = crate::io::AlignedBuf::zeroed(1 << 20);
    let mut off = 0;
    while off < m.size() {
        let n = (m.size() - off).min(buf.len() as u64) as usize;
        meta.read_at(&mut buf[..n], off)?;
        m.write_at(&buf[..n], off)?;
        off += n as u64;
    }
    m.flush()
        .with_context(|| format!("--metadata {}: flush", a.metadata.display()))?;
    space
        .mark(LOG_START_MARK)
        .with_context(|| format!("--log-writes {}", log.display()))?;
    log::info!(
        "recording the destination and metadata into {} ({} entries so far)",
        log.display(),
        space.entries()
    );
    let rec = Arc::new(Recording {
        space,
        metadata: meta_dyn,
    });
    Ok((Arc::new(d), Arc::new(m), rec))
}

/// Blank metadata is formatted; metadata of this clone (this source) is resumed; anything else
/// is refused unless `--force` (see [`overwrite`] for the whole rule). Nothing is written before
/// the decision.
fn open_or_format(
    a: &CreateArgs,
    meta: Arc<dyn BlockDev>,
    source: &FileDev,
    dest: &FileDev,
) -> Result<Metadata> {
    let what = format!("--metadata {}", a.metadata.display());
    let mut expect = Expect::from_devices(source, dest)
        .with_context(|| format!("cannot fingerprint the source {}", a.source.display()))?;
    expect.region_size = a.region_size;
    expect.ignore_source_mismatch = a.ignore_source_mismatch;
    let rs = a.region_size.unwrap_or(DEFAULT_REGION_SIZE);
    let format_bytes = crate::metadata::required_size(rs, source.size()).unwrap_or(0);
    let overwrite = Overwrite::from_flags(a.force, a.force_reformat_this_clone);
    let contents = overwrite::probe(&*meta, &expect, format_bytes)?;
    // This clone's metadata is resumed; only the explicit flag reformats it (with --force,
    // `may_format` says why not).
    let resume = contents.is_this_clone() && overwrite != Overwrite::ThisClone;
    if !resume || overwrite == Overwrite::Force {
        contents.may_format(&what, &a.metadata.display().to_string(), overwrite)?;
    }
    if !resume {
        let params = FormatParams::from_devices(source, dest, rs)
            .with_context(|| format!("cannot fingerprint the source {}", a.source.display()))?;
        // Forced: the decision above is the one that counts (an old clone's superblocks are
        // erased first).
        Metadata::format(meta.clone(), &params, true)?;
    }
    if resume && !a.dest_moved {
        // Before the read-write open, which may repair (write) the metadata.
        let (ro, _) = Metadata::read_only_open(meta.clone())?;
        check_same_destination(a, &ro.uuid(), dest)?;
    }
    let (md, report) = Metadata::open(meta, &expect)?;
    for w in &report.warnings {
        log::warn!("{}: {w}", a.metadata.display());
    }
    if report.mode != MetadataMode::ReadWrite {
        // Started in its persisted mode (dm-clone's ro): reads work, so the data can be
        // copied off; writes that need a region bit and every FLUSH fail.
        let msg = format!(
            "--metadata {}: the clone is in {} mode after an earlier failure ({}); it starts \
             {}: reads work, FLUSH and writes that need hydration fail. Copy the data off, or \
             check the devices and run `ublk-clone reset-mode {}` (with the clone stopped) to \
             accept the possible loss of writes after the last commit",
            a.metadata.display(),
            report.mode,
            report.mode_reason,
            if report.mode == MetadataMode::Fail {
                "failing every I/O"
            } else {
                "read-only"
            },
            a.metadata.display()
        );
        log::warn!("{msg}");
    }
    Ok(md)
}

/// A resumed clone's hydrated regions are on the destination it last ran on: resuming it on
/// another device (disks renamed after a reboot, a typo) would read garbage for them and
/// hydrate over that device. Checked against the identity saved when it last started.
fn check_same_destination(a: &CreateArgs, uuid: &uuid::Uuid, dest: &FileDev) -> Result<()> {
    let Ok((saved, path)) = super::config::load(uuid) else {
        return Ok(());
    };
    let Some(expected) = saved.dest_identity else {
        return Ok(());
    };
    let found = crate::io::identity::DeviceIdentity::of_file(dest.file())
        .with_context(|| format!("--dest {}: cannot stat", a.dest.display()))?;
    if expected != found {
        bail!(
            "--dest {}: clone {} last ran on another destination (expected {expected}, found \
             {found}; recorded in {}). Its hydrated regions are there: give that destination, \
             or pass --dest-moved if its contents were copied to this device",
            a.dest.display(),
            uuid,
            path.display()
        );
    }
    Ok(())
}

fn engine_config(a: &CreateArgs, size: u64, region_size: u64) -> EngineConfig {
    let mut cfg = EngineConfig::new(size, region_size);
    cfg.discard_passdown = !a.no_discard_passdown;
    cfg.knobs.hydration_enabled = !a.no_hydration;
    if let Some(b) = a.batch_size {
        cfg.knobs.batch_size = b.max(1);
    }
    cfg.knobs.threshold = a.hydration_threshold.unwrap_or(cfg.knobs.batch_size * 2);
    cfg.knobs.rate_bytes_per_sec = a.rate;
    cfg
}

/// `ublk-clone create`: validates, then starts the daemon and prints the device path.
pub fn run_create(a: &CreateArgs) -> Result<()> {
    if a.foreground {
        return run_daemon(a, None);
    }
    // Validate and format here, so errors reach the user with a non-zero exit.
    drop(open_devices(a, false)?);
    let run_dir = control::run_dir();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let log_path = run_dir.join("daemon.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open the daemon log {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the ublk-clone executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("create")
        .args(a.to_args())
        .arg("--foreground")
        .env("UBLK_CLONE_NOTIFY", "1");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    // SAFETY: setsid is async-signal-safe; the child gets its own session (a daemon).
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the daemon")?;
    let out = child.stdout.take().context("daemon stdout")?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        if let Some(dev) = line.strip_prefix("READY ") {
            println!("{dev}");
            return Ok(());
        }
        if let Some(err) = line.strip_prefix("ERROR ") {
            bail!("{err}");
        }
    }
    let status = child.wait()?;
    bail!(
        "the daemon exited ({status}) before the device was ready; see {}",
        log_path.display()
    )
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

/// Runs the device in this process until it is stopped. Reports readiness on stdout
/// (`READY /dev/ublkbN`) when started by `create`.
pub fn run_daemon(a: &CreateArgs, _unused: Option<()>) -> Result<()> {
    let notify = std::env::var_os("UBLK_CLONE_NOTIFY").is_some();
    let res = daemon_inner(a, notify);
    if let Err(e) = &res {
        if notify {
            println!("ERROR {e:#}");
        }
    }
    res
}

fn daemon_inner(a: &CreateArgs, notify: bool) -> Result<()> {
    // Our own mount namespace: the daemon's exit must never flush a file system that lives on
    // its own device (libublk-rs#50).
    // SAFETY: plain syscalls with valid arguments.
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
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let o = open_devices(a, true)?;
    super::config::save(a, &o.md, &o.source, &o.dest)?;
    let size = o.source.size();
    let region_size = o.md.region_size();
    let mut cfg = engine_config(a, size, region_size);
    cfg.block_size = o.block_sizes.logical as u64;
    let engine = Engine::start(o.md.clone(), o.source.clone(), o.dest_dyn.clone(), cfg)
        .map_err(anyhow::Error::msg)?;
    let recording = o.recording.clone();
    let ctl_recording = o.recording.clone().map(|r| {
        (
            r,
            a.log_writes
                .clone()
                .unwrap_or_default()
                .display()
                .to_string(),
        )
    });
    let queues = a.queues.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u16)
            .unwrap_or(1)
    });
    let opts = DeviceOptions {
        id: a.number,
        queues,
        depth: a.depth,
        io_buf_bytes: 512 << 10,
        physical_block_size: o.block_sizes.physical,
    };
    let run_dir = control::run_dir();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let ctl_engine = engine.clone();
    let args = a.clone();
    let served = ublk::serve(
        engine.clone(),
        o.source.file().as_raw_fd(),
        o.dest.file().as_raw_fd(),
        recording.map(|r| r as Arc<dyn crate::io::observe::IoObserver>),
        &opts,
        move |ctrl, info| {
            // Absolute paths: `stop` and `list` run from any directory.
            let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
            let rec = DaemonRecord {
                pid: std::process::id(),
                id: info.id,
                device: info.path.clone(),
                source: abs(&args.source),
                dest: abs(&args.dest),
                metadata: abs(&args.metadata),
                queues: info.queues,
                depth: info.depth,
                region_size,
            };
            let listener = match bind_control(&rec) {
                Ok(l) => l,
                Err(e) => {
                    log::error!("{e:#}");
                    let _ = ctrl.kill_dev();
                    return;
                }
            };
            log::info!(
                "{} live: {} queues, depth {}, flags {:#x}",
                info.path,
                info.queues,
                info.depth,
                info.flags
            );
            if notify {
                println!("READY {}", info.path);
                let _ = std::io::stdout().flush();
                // Detach stdout from the parent's pipe.
                if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                    // SAFETY: dup2 onto stdout with a valid descriptor.
                    unsafe { libc::dup2(null.as_raw_fd(), 1) };
                }
            } else {
                println!("{}", info.path);
            }
            control_loop(&listener, &ctl_engine, ctl_recording.as_ref());
            let _ = ctrl.kill_dev();
            let _ = std::fs::remove_file(control::socket_path(rec.id));
            let _ = std::fs::remove_file(control::record_path(rec.id));
        },
    );
    let shut = engine.shutdown();
    // Ends the log after the final commit: the unflushed writes, then the end mark.
    let closed = o.recording.as_ref().map(|r| r.space.close());
    served?;
    shut.map_err(anyhow::Error::msg)?;
    if let (Some(closed), Some(log)) = (closed, &a.log_writes) {
        let n = closed.with_context(|| format!("--log-writes {}", log.display()))?;
        log::info!("log {} closed with {n} entries", log.display());
    }
    Ok(())
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

/// `ublk-clone start`: restarts a stopped clone from its metadata and saved configuration.
/// The recorded devices are checked against what their paths name now before any of them is
/// opened (see [`super::config`]).
pub fn run_start(a: &StartArgs) -> Result<()> {
    let dev: Arc<dyn BlockDev> =
        Arc::new(FileDev::open(&a.metadata, Access::ReadOnly, false).context("--metadata")?);
    let (md, _) = Metadata::read_only_open(dev).with_context(|| {
        format!(
            "--metadata {}: not the metadata of a ublk-clone clone; `start` resumes a clone \
             made by `ublk-clone create`",
            a.metadata.display()
        )
    })?;
    let uuid = md.uuid();
    drop(md);
    let (mut cfg, path) = super::config::load(&uuid)?;
    // The metadata the user named is the one whose uuid chose this configuration.
    cfg.args.metadata = std::path::absolute(&a.metadata)
        .with_context(|| format!("--metadata {}", a.metadata.display()))?;
    cfg.verify(&path, &uuid)?;
    let mut args = cfg.args;
    args.foreground = a.foreground;
    run_create(&args)
}

fn bind_control(rec: &DaemonRecord) -> Result<UnixListener> {
    let sock = control::socket_path(rec.id);
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock).with_context(|| format!("cannot bind {}", sock.display()))?;
    l.set_nonblocking(true)?;
    std::fs::write(
        control::record_path(rec.id),
        serde_json::to_vec_pretty(rec)?,
    )
    .with_context(|| format!("cannot write {}", control::record_path(rec.id).display()))?;
    Ok(l)
}

/// The daemon's recording, as the control loop sees it: the recorder and the log's name.
type CtlRecording = (Arc<Recording>, String);

fn recording_status(rec: Option<&CtlRecording>) -> Option<control::RecordingStatus> {
    rec.map(|(r, log)| control::RecordingStatus {
        log: log.clone(),
        entries: r.space.entries(),
        error: r.space.status().err().map(|e| e.to_string()),
    })
}

fn control_loop(l: &UnixListener, engine: &Engine, rec: Option<&CtlRecording>) {
    loop {
        if STOP.load(Ordering::Acquire) {
            return;
        }
        if ublk::queues_alive() == 0 {
            log::warn!("the device was stopped from outside (all queues ended); shutting down");
            return;
        }
        match l.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let mut reader = BufReader::new(&s);
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let (resp, stop) = match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Status) => (ok_status(engine, rec), false),
                    Ok(Request::Set {
                        hydration,
                        threshold,
                        batch_size,
                        rate,
                        hydrate_on_read,
                    }) => {
                        let mut k = engine.knobs();
                        if let Some(h) = hydration {
                            k.hydration_enabled = h;
                        }
                        if let Some(t) = threshold {
                            k.threshold = t;
                        }
                        if let Some(b) = batch_size {
                            k.batch_size = b.max(1);
                        }
                        if let Some(r) = rate {
                            k.rate_bytes_per_sec = r;
                        }
                        if let Some(h) = hydrate_on_read {
                            k.hydrate_on_read = h;
                        }
                        engine.set_knobs(k);
                        (ok_status(engine, rec), false)
                    }
                    Ok(Request::Mark { name }) => (mark(rec, &name), false),
                    Ok(Request::Stop) => (Response::ok(), true),
                    Err(e) => (Response::err(format!("bad request: {e}")), false),
                };
                let mut w = &s;
                let _ = w.write_all(
                    format!("{}\n", serde_json::to_string(&resp).unwrap_or_default()).as_bytes(),
                );
                if stop {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                log::error!("control socket: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn mark(rec: Option<&CtlRecording>, name: &str) -> Response {
    let Some((r, log)) = rec else {
        return Response::err(
            "not recording: marks need a daemon started with `create --log-writes FILE`".into(),
        );
    };
    let max = r.space.sectorsize() as usize - 33;
    if name.is_empty() || name.len() > max {
        return Response::err(format!("mark '{name}': must be 1 to {max} bytes"));
    }
    match r.space.mark(name) {
        Ok(()) => Response {
            recording: recording_status(rec),
            ..Response::ok()
        },
        Err(e) => Response::err(format!("cannot log mark '{name}' in {log}: {e}")),
    }
}

fn ok_status(engine: &Engine, rec: Option<&CtlRecording>) -> Response {
    Response {
        status: serde_json::to_value(engine.status()).ok(),
        recording: recording_status(rec),
        ..Response::ok()
    }
}

//------------------------------------------------------------------------------------------

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The clone device (default: all).
    pub dev: Option<String>,
    #[arg(long)]
    pub json: bool,
    /// Refresh every second until interrupted or fully hydrated.
    #[arg(long)]
    pub watch: bool,
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
}

pub fn run_list() -> Result<()> {
    let recs = control::list_records();
    if recs.is_empty() {
        println!("no ublk-clone devices");
        return Ok(());
    }
    println!(
        "{:<14} {:>8} {:<24} {:<24} {:<24}",
        "DEVICE", "PID", "SOURCE", "DEST", "METADATA"
    );
    for r in recs {
        println!(
            "{:<14} {:>8} {:<24} {:<24} {:<24}",
            r.device,
            r.pid,
            r.source.display(),
            r.dest.display(),
            r.metadata.display()
        );
    }
    Ok(())
}

fn human(bytes: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

/// dm-clone's status fields plus a progress line.
pub fn format_status(dev: &str, s: &Status) -> String {
    let pct = if s.regions == 0 {
        100.0
    } else {
        s.hydrated as f64 * 100.0 / s.regions as f64
    };
    let remaining = (s.regions - s.hydrated.min(s.regions)) * s.region_size;
    let eta = if s.hydrated == s.regions {
        "done".to_string()
    } else if let Some(secs) = remaining.checked_div(s.hydration_rate_bytes_per_sec) {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        "unknown".to_string()
    };
    let mut out = format!(
        "{dev}: {} {}/{} {} {} hydration_threshold {} hydration_batch_size {} {}\n",
        s.region_size >> 9,
        s.hydrated,
        s.regions,
        s.hydrating,
        if s.knobs.hydration_enabled {
            "hydration"
        } else {
            "no_hydration"
        },
        s.knobs.threshold,
        s.knobs.batch_size,
        s.mode.name(),
    );
    out += &format!(
        "  hydrated {:.1}% ({} of {}), {}/s, ETA {eta}, commits {}, failed regions {}",
        pct,
        human((s.hydrated * s.region_size).min(s.size) as f64),
        human(s.size as f64),
        human(s.hydration_rate_bytes_per_sec as f64),
        s.commits,
        s.failed_regions.len()
    );
    if !s.mode_reason.is_empty() {
        out += &format!("\n  mode {}: {}", s.mode.name(), s.mode_reason);
    }
    out
}

fn fetch_status(id: u32) -> Result<(Status, Option<control::RecordingStatus>)> {
    let r = control::request(id, &Request::Status)?;
    let v = r.status.context("the daemon sent no status")?;
    let s = serde_json::from_value(v).context("malformed status from the daemon")?;
    Ok((s, r.recording))
}

fn format_recording(r: &control::RecordingStatus) -> String {
    match &r.error {
        None => format!("  recording to {}: {} entries", r.log, r.entries),
        Some(e) => format!(
            "  recording to {} STOPPED after {} entries: {e}",
            r.log, r.entries
        ),
    }
}

pub fn run_status(a: &StatusArgs) -> Result<()> {
    let ids: Vec<u32> = match &a.dev {
        Some(d) => vec![control::parse_dev(d)?],
        None => control::list_records().iter().map(|r| r.id).collect(),
    };
    loop {
        let mut all_done = true;
        for id in &ids {
            let (s, rec) = fetch_status(*id)?;
            all_done &= s.hydrated == s.regions;
            if a.json {
                let mut v = serde_json::to_value(&s)?;
                if let (Some(rec), Some(obj)) = (&rec, v.as_object_mut()) {
                    obj.insert("recording".into(), serde_json::to_value(rec)?);
                }
                println!("{v}");
            } else {
                println!("{}", format_status(&format!("/dev/ublkb{id}"), &s));
                if let Some(rec) = &rec {
                    println!("{}", format_recording(rec));
                }
            }
        }
        if !a.watch || all_done {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

pub fn run_set(a: &SetArgs) -> Result<()> {
    let id = control::parse_dev(&a.dev)?;
    let req = Request::Set {
        hydration: a.hydration,
        threshold: a.hydration_threshold,
        batch_size: a.batch_size,
        rate: a.rate,
        hydrate_on_read: a.hydrate_on_read,
    };
    control::request(id, &req)?;
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
