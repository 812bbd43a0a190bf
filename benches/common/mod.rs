//! What the hydration benchmarks share: a fresh clone of a source, hydrated to the end.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_clone::engine::{Engine, EngineConfig};
use ublk_clone::io::file::{Access, FileDev};
use ublk_clone::io::BlockDev;
use ublk_clone::metadata::{Expect, FormatParams, Metadata};

/// Hydrates a fresh clone of `source` (a new destination and metadata in `dir`, 64 KiB
/// regions, the engine's configuration adjusted by `tune`) to its final commit; the time
/// from the engine's start. The destination is removed afterwards.
pub fn time_hydration(
    source: Arc<dyn BlockDev>,
    dir: &Path,
    tune: impl FnOnce(EngineConfig) -> EngineConfig,
) -> anyhow::Result<Duration> {
    let dst = dir.join("clone-dest");
    let meta = dir.join("clone-meta");
    let _ = std::fs::remove_file(&dst);
    std::fs::File::create(&dst)?.set_len(source.size())?;
    std::fs::File::create(&meta)?.set_len(1 << 20)?;
    let dest = Arc::new(FileDev::open(&dst, Access::ReadWrite, true)?);
    let md_dev: Arc<dyn BlockDev> = Arc::new(FileDev::open(&meta, Access::ReadWrite, true)?);
    let region = 64 << 10;
    Metadata::format(
        md_dev.clone(),
        &FormatParams::from_devices(source.as_ref(), dest.as_ref(), region)?,
        true,
    )?;
    let (md, _) = Metadata::open(
        md_dev,
        &Expect::from_devices(source.as_ref(), dest.as_ref())?,
    )?;
    let cfg = tune(EngineConfig::new(source.size(), region));
    let t0 = Instant::now();
    let engine = Engine::start(Arc::new(md), source, dest, cfg)?;
    while !engine.is_fully_hydrated() {
        std::thread::sleep(Duration::from_millis(5));
    }
    engine.shutdown()?;
    let t = t0.elapsed();
    std::fs::remove_file(&dst)?;
    Ok(t)
}
