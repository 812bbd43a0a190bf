//! Opening a clone's three devices: validated, opened, locked and checked, then the metadata
//! formatted or resumed ([`super::open_metadata`]).
//!
//! Invariant: nothing is written to any device before every check has passed; the
//! destination and metadata are held exclusively (their locks) from here until the daemon
//! exits, and the source by a shared lock.

use super::config::DaemonConfig;
use super::devices;
use super::error::{refuse, Named, Result};
use super::open_metadata::open_or_format;
use super::record::{log_sectorsize, start_recording};
use crate::io::file::{Access, FileDev};
use crate::io::nbd::NbdDev;
use crate::io::{BlockDev, BlockSizes};
use crate::logwrites::Recording;
use crate::metadata::Metadata;
use std::path::Path;
use std::sync::Arc;

/// A clone's opened devices.
pub(super) struct Opened {
    /// The source as the engine reads it (a file or device, or an NBD export).
    pub source: Arc<dyn BlockDev>,
    /// The source when it is a local file or device (the queues read it on their rings).
    pub source_file: Option<Arc<FileDev>>,
    pub dest: Arc<FileDev>,
    /// The clone's block sizes (the larger of the source's and the destination's).
    pub block_sizes: BlockSizes,
    /// The destination as the engine sees it (through the recorder when recording).
    pub dest_dyn: Arc<dyn BlockDev>,
    pub md: Arc<Metadata>,
    pub recording: Option<Arc<Recording>>,
}

/// Opens the three devices and formats or opens the metadata. With `record` (the daemon)
/// and `log_writes`, the log is started and the destination and metadata are opened through
/// the recorder.
pub(super) fn open_devices(cfg: &DaemonConfig, record: bool) -> Result<Opened> {
    cfg.validate()?;
    check_exist(cfg)?;
    if cfg.recover {
        if !record {
            // Only the daemon starts a recovery (`spawn` runs no check process for one).
            refuse!("a recovery is checked and started by the daemon itself");
        }
        // Before any device is opened: the dead daemon's I/O must have ended.
        super::recover::begin(cfg)?;
    }
    let direct = !cfg.buffered_io;
    let (source, source_file): (Arc<dyn BlockDev>, _) = match cfg.source_path() {
        Some(path) => {
            let f = Arc::new(FileDev::open(path, Access::ReadOnly, direct)?);
            (f.clone(), Some(f))
        }
        None => {
            let uri = cfg.source.to_string_lossy();
            let nbd = open_nbd(&uri, cfg).named(|| format!("--source {uri}"))?;
            (Arc::new(nbd), None)
        }
    };
    let dest = Arc::new(open_claimed(cfg, &cfg.dest, direct)?);
    let meta = Arc::new(open_claimed(cfg, &cfg.metadata, true)?);
    if let (Some(f), Some(path)) = (&source_file, cfg.source_path()) {
        f.lock(false)?;
        check_source_unshared(path)?;
    }
    if !cfg.recover {
        check_number_free(cfg.number)?;
    }
    check_sizes(cfg, source.as_ref(), &dest)?;
    // The region size of resumed metadata is checked again once it is known.
    let block_sizes = devices::clone_block_sizes(
        (source.as_ref(), &cfg.source),
        (&dest, &cfg.dest),
        cfg.region_size_or_default(),
        if cfg.region_size.is_some() {
            "--region-size"
        } else {
            "the default region size"
        },
    )?;
    devices::check_metadata_block_size(&meta, &cfg.metadata)?;
    let (dest_dyn, meta_dyn, recording): (Arc<dyn BlockDev>, Arc<dyn BlockDev>, _) =
        match (&cfg.log_writes, record) {
            (Some(log), true) => {
                let sectorsize = log_sectorsize(block_sizes);
                let (d, m, rec) =
                    start_recording(cfg, log, dest.clone(), meta.clone(), sectorsize)?;
                (d, m, Some(rec))
            }
            _ => (dest.clone(), meta.clone(), None),
        };
    let md = open_or_format(cfg, meta_dyn, source.as_ref(), dest.as_ref())?;
    devices::clone_block_sizes(
        (source.as_ref(), &cfg.source),
        (&dest, &cfg.dest),
        md.region_size(),
        &format!(
            "the region size recorded in --metadata {}",
            cfg.metadata.display()
        ),
    )?;
    Ok(Opened {
        source,
        source_file,
        dest,
        block_sizes,
        dest_dyn,
        md: Arc::new(md),
        recording,
    })
}

/// Opens an NBD source. While recovering a device (a file system above it waits; a
/// supervisor's restart is one), a server that cannot be reached is tried again (backing off)
/// until the source timeout, to ride out a short outage. Otherwise, and for any other error
/// (no such export, a bad reply), it fails at once.
fn open_nbd(uri: &str, cfg: &DaemonConfig) -> std::io::Result<NbdDev> {
    use std::io::ErrorKind::{ConnectionRefused, NotFound, TimedOut};
    let deadline = std::time::Instant::now() + cfg.nbd_options().timeout;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match NbdDev::open(uri, cfg.nbd_options()) {
            Err(e)
                if cfg.recover
                    && matches!(e.kind(), ConnectionRefused | NotFound | TimedOut)
                    && std::time::Instant::now() + backoff < deadline =>
            {
                log::warn!("{uri}: {e}; trying again in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

fn check_exist(cfg: &DaemonConfig) -> Result<()> {
    let mut paths = vec![("--dest", &cfg.dest), ("--metadata", &cfg.metadata)];
    if cfg.source_path().is_some() {
        paths.insert(0, ("--source", &cfg.source));
    }
    for (what, p) in paths {
        if !p.exists() {
            refuse!("{what} {}: no such file or device", p.display());
        }
    }
    Ok(())
}

/// The destination and metadata are claimed by their exclusive opens; the source is only
/// read (and may be shared by several clones), but one that someone else claims (mounted, or
/// another program's device) or writes can change under the clone.
fn check_source_unshared(source: &Path) -> Result<()> {
    if !crate::io::file::block_device_unclaimed(source)
        .named(|| format!("--source {}", source.display()))?
    {
        refuse!(
            "--source {}: busy: the block device is mounted or held exclusively by another \
             program, so it can change under the clone; unmount or release it first",
            source.display()
        );
    }
    let writers = crate::io::holders::openers(source, true);
    if !writers.is_empty() {
        refuse!(
            "--source {}: open for writing by {}, so it can change under the clone; close it \
             first",
            source.display(),
            writers.join(", ")
        );
    }
    Ok(())
}

/// Opens and locks the destination or metadata. While recovering, the dead daemon may still
/// hold them for a moment after the kernel let the recovery start (the queue rings' files are
/// released by a kernel worker, after `/dev/ublkcN`): busy is retried for a while then.
fn open_claimed(cfg: &DaemonConfig, path: &Path, direct: bool) -> Result<FileDev> {
    let deadline = std::time::Instant::now() + RECOVER_BUSY_WAIT;
    loop {
        let dev =
            FileDev::open(path, Access::ReadWrite, direct).and_then(|d| d.lock(true).map(|()| d));
        match dev {
            Err(e)
                if cfg.recover
                    && e.kind() == std::io::ErrorKind::ResourceBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// How long a recovering daemon waits for the dead one's hold on a device to go.
const RECOVER_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A requested device number must be free.
fn check_number_free(number: i32) -> Result<()> {
    if number >= 0 && Path::new(&format!("/dev/ublkc{number}")).exists() {
        refuse!(
            "--number {number}: /dev/ublkb{number} already exists (busy); pick another number or omit --number"
        );
    }
    Ok(())
}

/// The source must be whole sectors, and the destination at least as large.
fn check_sizes(cfg: &DaemonConfig, source: &dyn BlockDev, dest: &FileDev) -> Result<()> {
    if source.size() == 0 || source.size() % 512 != 0 {
        refuse!(
            "--source {}: size {} is not a positive multiple of 512 bytes",
            cfg.source.display(),
            source.size()
        );
    }
    if dest.size() < source.size() {
        refuse!(
            "--dest {}: destination ({} bytes) is smaller than the source ({} bytes); use a destination at least as large",
            cfg.dest.display(),
            dest.size(),
            source.size()
        );
    }
    Ok(())
}
