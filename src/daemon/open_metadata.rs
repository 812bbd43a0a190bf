//! Opening a clone's metadata: blank metadata is formatted, metadata of this clone (this
//! source) is resumed, anything else is refused unless the options allow overwriting it (see
//! [`crate::metadata::overwrite`] for the whole rule).
//!
//! Invariant: nothing is written to the metadata before the decision, and a resumed clone is
//! checked to run on the destination it last ran on before the read-write open (which may
//! repair, that is write, the metadata).

use super::config::DaemonConfig;
use super::error::{refuse, Named, Result};
use super::saved;
use crate::io::file::FileDev;
use crate::io::identity::DeviceIdentity;
use crate::io::BlockDev;
use crate::metadata::overwrite::{self, Overwrite};
use crate::metadata::{Expect, FormatParams, Metadata, MetadataMode};
use std::sync::Arc;

/// Formats or resumes the metadata on `meta` for a clone of `source` onto `dest`.
pub(super) fn open_or_format(
    cfg: &DaemonConfig,
    meta: Arc<dyn BlockDev>,
    source: &dyn BlockDev,
    dest: &FileDev,
) -> Result<Metadata> {
    let what = format!("--metadata {}", cfg.metadata.display());
    let mut expect = Expect::from_devices(source, dest)
        .named(|| format!("cannot fingerprint the source {}", cfg.source.display()))?;
    expect.region_size = cfg.region_size;
    expect.ignore_source_mismatch = cfg.ignore_source_mismatch;
    let rs = cfg.region_size_or_default();
    let format_bytes = crate::metadata::required_size(rs, source.size()).unwrap_or(0);
    let overwrite = cfg.overwrite();
    let contents = overwrite::probe(&*meta, &expect, format_bytes)?;
    // This clone's metadata is resumed; only the explicit flag reformats it (with --force,
    // `may_format` says why not).
    let resume = contents.is_this_clone() && overwrite != Overwrite::ThisClone;
    if !resume || overwrite == Overwrite::Force {
        contents.may_format(&what, &cfg.metadata.display().to_string(), overwrite)?;
    }
    if !resume {
        let params = FormatParams::from_devices(source, dest, rs)
            .named(|| format!("cannot fingerprint the source {}", cfg.source.display()))?;
        // Forced: the decision above is the one that counts (an old clone's superblocks are
        // erased first).
        Metadata::format(meta.clone(), &params, true)?;
    }
    if resume && !cfg.dest_moved {
        // Before the read-write open, which may repair (write) the metadata.
        let (ro, _) = Metadata::read_only_open(meta.clone())?;
        check_same_destination(cfg, &ro.uuid(), dest)?;
    }
    let (md, report) = Metadata::open(meta, &expect)?;
    for w in &report.warnings {
        log::warn!("{}: {w}", cfg.metadata.display());
    }
    if report.mode != MetadataMode::ReadWrite {
        warn_degraded(cfg, report.mode, &report.mode_reason);
    }
    Ok(md)
}

/// A clone in a degraded mode starts in it (dm-clone's read-only mode): reads work, so the
/// data can be copied off; writes that need a region bit and every FLUSH fail.
fn warn_degraded(cfg: &DaemonConfig, mode: MetadataMode, reason: &str) {
    let msg = format!(
        "--metadata {}: the clone is in {} mode after an earlier failure ({}); it starts \
         {}: reads work, FLUSH and writes that need hydration fail. Copy the data off, or \
         check the devices and run `ublk-clone reset-mode {}` (with the clone stopped) to \
         accept the possible loss of writes after the last commit",
        cfg.metadata.display(),
        mode,
        reason,
        if mode == MetadataMode::Fail {
            "failing every I/O"
        } else {
            "read-only"
        },
        cfg.metadata.display()
    );
    log::warn!("{msg}");
}

/// A resumed clone's hydrated regions are on the destination it last ran on: resuming it on
/// another device (disks renamed after a reboot, a typo) would read garbage for them and
/// hydrate over that device. Checked against the identity saved when it last started.
fn check_same_destination(cfg: &DaemonConfig, uuid: &uuid::Uuid, dest: &FileDev) -> Result<()> {
    let Ok((saved, path)) = saved::load(uuid) else {
        return Ok(());
    };
    let Some(expected) = saved.dest_identity else {
        return Ok(());
    };
    let found = DeviceIdentity::of_file(dest.file())
        .named(|| format!("--dest {}: cannot stat", cfg.dest.display()))?;
    if expected != found {
        refuse!(
            "--dest {}: clone {} last ran on another destination (expected {expected}, found \
             {found}; recorded in {}). Its hydrated regions are there: give that destination, \
             or pass --dest-moved if its contents were copied to this device",
            cfg.dest.display(),
            uuid,
            path.display()
        );
    }
    Ok(())
}
