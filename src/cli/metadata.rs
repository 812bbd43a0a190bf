//! `format`, `check` and `dump`: the metadata subcommands.
//!
//! Each parses its arguments into a clap struct and makes one library call. Exit codes of
//! `check` ([`metadata::CheckReport::exit_code`]): 0 healthy (with notes for what opening
//! repairs by design), 1 damage found, 2 the metadata could not be read.

use super::size::parse_size;
use crate::io::file::{Access, FileDev};
use crate::io::BlockDev;
use crate::metadata::{self, FormatParams, Metadata};
use anyhow::{Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Default region size.
pub const DEFAULT_REGION_SIZE: u64 = 64 * 1024;

#[derive(Args, Debug)]
pub struct FormatArgs {
    /// Metadata device or file to format.
    #[arg(long)]
    pub metadata: PathBuf,
    /// Source device (read-only; sized and fingerprinted).
    #[arg(long)]
    pub source: PathBuf,
    /// Destination device (must be at least as large as the source).
    #[arg(long)]
    pub dest: PathBuf,
    /// Region size: a power of two from 4K to 1G.
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    pub region_size: u64,
    /// Overwrite existing clone metadata.
    #[arg(long)]
    pub force: bool,
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

fn open_ro(path: &Path) -> Result<FileDev> {
    FileDev::open(path, Access::ReadOnly, false)
        .with_context(|| format!("cannot open {}", path.display()))
}

pub fn run_format(args: &FormatArgs) -> Result<ExitCode> {
    let source = open_ro(&args.source)?;
    let dest = open_ro(&args.dest)?;
    let params = FormatParams::from_devices(&source, &dest, args.region_size)
        .with_context(|| format!("cannot fingerprint the source {}", args.source.display()))?;
    let meta: Arc<dyn BlockDev> = Arc::new(
        FileDev::open(&args.metadata, Access::ReadWrite, false)
            .with_context(|| format!("cannot open {}", args.metadata.display()))?,
    );
    let sb = Metadata::format(meta, &params, args.force)?;
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
            eprintln!(
                "ublk-clone check: cannot open {}: {e}",
                args.metadata.display()
            );
            return Ok(ExitCode::from(2));
        }
    };
    let report = metadata::check(&dev);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(ExitCode::from(report.exit_code()))
}

pub fn run_dump(args: &DumpArgs) -> Result<ExitCode> {
    let dev: Arc<dyn BlockDev> = Arc::new(open_ro(&args.metadata)?);
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
    let dev: Arc<dyn BlockDev> = Arc::new(
        FileDev::open(&args.metadata, Access::ReadWrite, false)
            .with_context(|| format!("cannot open {}", args.metadata.display()))?,
    );
    let (md, report) = Metadata::open(dev, &metadata::Expect::default())?;
    if report.mode == metadata::MetadataMode::ReadWrite {
        println!(
            "{}: already in read-write mode; nothing to do",
            args.metadata.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
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
