//! Recording a daemon's destination and metadata into one dm-log-writes log (`log_writes`).
//!
//! Invariant: the log starts with a copy of the whole metadata device, a FLUSH and the mark
//! [`LOG_START_MARK`], before the engine issues any I/O; so replaying it onto zeroed devices
//! gives this clone's metadata, and every later write of the clone follows in the log.
//! Destination regions hydrated before the recording started are not in the log (for a new
//! clone there are none). A log is never overwritten (see [`DaemonConfig::validate`]).

use super::config::DaemonConfig;
use super::error::{Named, Result};
use crate::io::file::{Access, FileDev};
use crate::io::{BlockDev, BlockSizes};
use crate::logwrites::Recording;
use crate::logwrites::{LogWriter, LogWritesDev};
use std::path::Path;
use std::sync::Arc;

/// Mark logged after the snapshot of the metadata that starts a daemon's log.
pub const LOG_START_MARK: &str = "ublk-clone-start";

/// Sector size of the daemon's dm-log-writes log: the clone's logical block size, as the kernel
/// target uses its device's (every I/O of the destination is aligned to it, and every
/// metadata I/O to 4096), at most the format's largest.
pub(super) fn log_sectorsize(block_sizes: BlockSizes) -> u32 {
    block_sizes
        .logical
        .min(crate::logwrites::format::MAX_SECTORSIZE)
}

/// The destination and metadata as seen through the recorder, and the recording.
pub(super) type RecordedDevices = (Arc<dyn BlockDev>, Arc<dyn BlockDev>, Arc<Recording>);

/// Starts the log at `log`: the destination at byte 0 and the metadata at the logged space's
/// metadata base, the metadata copied in first (see the module invariant).
pub(super) fn start_recording(
    cfg: &DaemonConfig,
    log: &Path,
    dest: Arc<FileDev>,
    meta: Arc<FileDev>,
    sectorsize: u32,
) -> Result<RecordedDevices> {
    let writer = log_writer(cfg, log, sectorsize)?;
    let meta_dyn: Arc<dyn BlockDev> = meta.clone();
    let (d, m, space) = LogWritesDev::pair(dest, meta_dyn.clone(), writer)
        .named(|| format!("--log-writes {}", log.display()))?;
    let mut buf = crate::io::AlignedBuf::zeroed(1 << 20);
    let mut off = 0;
    while off < m.size() {
        let n = (m.size() - off).min(buf.len() as u64) as usize;
        meta.read_at(&mut buf[..n], off)?;
        m.write_at(&buf[..n], off)?;
        off += n as u64;
    }
    m.flush()
        .named(|| format!("--metadata {}: flush", cfg.metadata.display()))?;
    space
        .mark(LOG_START_MARK)
        .named(|| format!("--log-writes {}", log.display()))?;
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

/// The log's writer: on a block device (locked exclusively), or a new sparse file of
/// `log_writes_size` bytes.
fn log_writer(cfg: &DaemonConfig, log: &Path, sectorsize: u32) -> Result<LogWriter> {
    use std::os::unix::fs::FileTypeExt;
    let is_blockdev = std::fs::metadata(log).is_ok_and(|m| m.file_type().is_block_device());
    let writer = if is_blockdev {
        let dev = FileDev::open(log, Access::ReadWrite, false)
            .named(|| format!("--log-writes {}", log.display()))?;
        dev.lock(true)?;
        LogWriter::create(Box::new(dev), sectorsize)
    } else {
        LogWriter::create_file(log, cfg.log_writes_size, sectorsize)
    };
    writer.named(|| format!("--log-writes {}: cannot start the log", log.display()))
}
