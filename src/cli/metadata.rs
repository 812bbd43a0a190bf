//! `format`, `check`, `dump` and `reset-mode`: the metadata subcommands.
//!
//! Each parses its arguments into a clap struct and makes one library call. Exit codes of
//! `check` ([`metadata::CheckReport::exit_code`]): 0 healthy (with notes for what opening
//! repairs by design), 1 damage found, 2 the metadata could not be read.

use super::size::parse_size;
use crate::daemon::devices;
use crate::io::file::{Access, FileDev};
use crate::io::nbd::{is_nbd_uri, NbdDev, NbdOptions};
use crate::io::BlockDev;
use crate::metadata::overwrite::{self, Contents, Overwrite};
use crate::metadata::{self, Expect, FormatParams, Metadata};
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct FormatArgs {
    /// Metadata device or file to format.
    #[arg(long)]
    pub metadata: PathBuf,
    /// Source device or file, or an NBD export (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH); read-only, sized and fingerprinted.
    #[arg(long)]
    pub source: PathBuf,
    /// Destination device (must be at least as large as the source).
    #[arg(long)]
    pub dest: PathBuf,
    /// Region size: a power of two from 4K to 1G.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub region_size: u64,
    /// Overwrite a device that is not blank: another clone's metadata, damaged metadata, a
    /// file system or other data. Never this clone's own metadata (same source): see
    /// --force-reformat-this-clone.
    #[arg(long)]
    pub force: bool,
    /// Reformat even this clone's own metadata, starting the clone over from the source: every
    /// write made to the clone is lost.
    #[arg(long)]
    pub force_reformat_this_clone: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Metadata device or file.
    pub metadata: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// Metadata device or file.
    pub metadata: PathBuf,
}

fn open_ro(flag: &str, path: &Path) -> Result<FileDev> {
    // The error names the path.
    FileDev::open(path, Access::ReadOnly, false).with_context(|| flag.to_string())
}

/// `ublk-clone format`: takes the locks `create` takes, then formats only what
/// [`overwrite`] allows (blank, or not this clone's with `--force`).
pub fn run_format(args: &FormatArgs) -> Result<ExitCode> {
    let remote = args.source.to_str().is_some_and(is_nbd_uri);
    let local_source = (!remote).then_some(("--source", args.source.as_path()));
    let mut distinct = vec![
        ("--dest", args.dest.as_path()),
        ("--metadata", &args.metadata),
    ];
    distinct.extend(local_source);
    devices::check_distinct(&distinct)?;
    let mut usable = vec![
        ("--dest", args.dest.as_path(), false),
        ("--metadata", &args.metadata, true),
    ];
    usable.extend(local_source.map(|(f, p)| (f, p, false)));
    devices::check_usable(&usable)?;
    let source: Arc<dyn BlockDev> = if remote {
        let uri = args.source.to_string_lossy();
        Arc::new(
            NbdDev::open(&uri, NbdOptions::default()).with_context(|| format!("--source {uri}"))?,
        )
    } else {
        let f = open_ro("--source", &args.source)?;
        devices::lock(&f, false, "--source", &args.source)?;
        Arc::new(f)
    };
    let dest = open_ro("--dest", &args.dest)?;
    let meta = FileDev::open(&args.metadata, Access::ReadWrite, false).context("--metadata")?;
    devices::lock(&dest, true, "--dest", &args.dest)?;
    devices::lock(&meta, true, "--metadata", &args.metadata)?;
    devices::clone_block_sizes(
        (source.as_ref(), &args.source),
        (&dest, &args.dest),
        args.region_size,
        "--region-size",
    )?;
    devices::check_metadata_block_size(&meta, &args.metadata)?;
    let params = FormatParams::from_devices(source.as_ref(), &dest, args.region_size)
        .with_context(|| format!("cannot fingerprint the source {}", args.source.display()))?;
    let this = Expect {
        source_size: Some(params.source_size),
        source_fingerprint: Some(params.source_fingerprint),
        ..Expect::default()
    };
    let format_bytes = metadata::required_size(args.region_size, params.source_size).unwrap_or(0);
    let what = format!("--metadata {}", args.metadata.display());
    overwrite::probe(&meta, &this, format_bytes)?.may_format(
        &what,
        &args.metadata.display().to_string(),
        Overwrite::from_flags(args.force, args.force_reformat_this_clone),
    )?;
    let meta: Arc<dyn BlockDev> = Arc::new(meta);
    // Forced: the decision above is the one that counts (an old clone's superblocks are
    // erased first).
    let sb = Metadata::format(meta, &params, true)?;
    println!(
        "formatted {}: clone {}, {} regions of {} bytes, {} metadata bytes",
        args.metadata.display(),
        sb.uuid,
        sb.nr_regions,
        sb.region_size,
        sb.metadata_blocks * 4096
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run_check(args: &CheckArgs) -> Result<ExitCode> {
    let dev = match FileDev::open(&args.metadata, Access::ReadOnly, false) {
        Ok(d) => d,
        Err(e) => {
            // The error names the path.
            eprintln!("ublk-clone check: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let report = metadata::check(&dev);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    if report.live_superblock.is_none() && !report.unreadable {
        // No clone superblock at all: say what the device holds instead, if we know.
        match overwrite::probe(&dev, &Expect::default(), 0) {
            Ok(Contents::Foreign(sig)) => eprintln!(
                "{} holds {sig}, not ublk-clone metadata; check that this is the metadata device",
                args.metadata.display()
            ),
            Ok(Contents::Blank | Contents::Data { .. }) => eprintln!(
                "{} holds no ublk-clone metadata; check that this is the metadata device \
                 (`ublk-clone format` makes one)",
                args.metadata.display()
            ),
            _ => {}
        }
    }
    Ok(ExitCode::from(report.exit_code()))
}

pub fn run_dump(args: &DumpArgs) -> Result<ExitCode> {
    let dev: Arc<dyn BlockDev> = Arc::new(open_ro("metadata", &args.metadata)?);
    let out = metadata::dump(dev)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(Args, Debug)]
pub struct ResetModeArgs {
    /// Metadata device or file of a clone left read-only or failed by an earlier error.
    pub metadata: PathBuf,
}

/// The explicit operator action that leaves a degraded (read-only / fail) mode. Data written
/// after the last successful commit may have been lost when the failure happened; the user
/// takes responsibility for that by running this.
pub fn run_reset_mode(args: &ResetModeArgs) -> Result<ExitCode> {
    devices::check_usable(&[("metadata", &args.metadata, true)])?;
    let dev = FileDev::open(&args.metadata, Access::ReadWrite, false).context("metadata")?;
    // A live daemon holds this lock: its in-core mode would overwrite ours at its next commit.
    devices::lock(&dev, true, "metadata", &args.metadata)?;
    let dev: Arc<dyn BlockDev> = Arc::new(dev);
    // Looked at without writing first: a healthy clone is left exactly as it is.
    let (_, report) = Metadata::read_only_open(dev.clone())?;
    if report.mode == metadata::MetadataMode::ReadWrite {
        println!(
            "{}: already in read-write mode; nothing to do",
            args.metadata.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (md, report) = Metadata::open(dev, &metadata::Expect::default())?;
    md.persist_mode(
        metadata::MetadataMode::ReadWrite,
        &format!("reset by the operator after: {}", report.mode_reason),
    )?;
    println!(
        "{}: mode {} ({}) reset to read-write; writes acknowledged after the last commit before \
         that failure may be lost",
        args.metadata.display(),
        report.mode,
        report.mode_reason
    );
    Ok(ExitCode::SUCCESS)
}
