//! The clone engine: decides where every I/O goes and when the bitmap may be committed.
//!
//! Transport-agnostic (no ublk types): queue threads call [`Engine::read`], [`Engine::write`],
//! [`Engine::write_zeroes`], [`Engine::discard`] and [`Engine::flush`] with a [`DataPath`].
//! The engine is made of parts, each in its own file:
//! - `view`: the region map (which regions user I/O treats as hydrated);
//! - `regions`: the region locks, and the one function that locks regions for writing;
//! - `committer`: the mode, flush sequencing and the commit thread (group commit);
//! - `hydrator`: the background sweep's state and its worker threads;
//! - `readwrite` and `zero_discard`: the user requests.
//!
//! Invariants:
//! - a region's bit is set only after the destination write that made its data complete has
//!   finished, and it is committed only after a destination flush issued after the bit was set
//!   (the metadata API enforces the flush by type);
//! - a region that is not hydrated is written only under its region lock (`regions`), so a
//!   hydration copy never lands over newer user data;
//! - FLUSH and FUA complete only after a destination flush that started after they arrived;
//!   once a commit has failed, every FLUSH and FUA fails (sticky degraded mode).

pub mod budget;
mod committer;
mod config;
mod copy;
mod error;
pub mod flush;
mod hydrator;
pub mod metrics;
pub mod path;
pub mod pause;
mod readwrite;
pub mod regions;
pub mod trace;
pub mod user_io;
pub mod userdata;
mod view;
pub mod wake;
mod zero_discard;

#[cfg(test)]
pub(crate) use config::Bugs;
pub use config::{EngineConfig, Geometry, HydrateWhen, Knobs, Mode, REMOTE_HYDRATION_WORKERS};
pub use error::{CommitError, EngineError, IoError};
pub use path::{DataPath, Side, SyncPath};
pub use userdata::{ReadData, WriteData};

use crate::io::BlockDev;
use crate::metadata::Metadata;
use committer::Committer;
use hydrator::Hydrator;
use parking_lot::Mutex;
use regions::RegionLocks;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use view::RegionMap;
use wake::{Kick, Kickers};

/// What `status` reports.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Status {
    pub size: u64,
    pub region_size: u64,
    pub regions: u64,
    pub hydrated: u64,
    pub hydrating: u64,
    pub failed_regions: Vec<u64>,
    pub mode: Mode,
    pub mode_reason: String,
    pub commits: u64,
    pub flushes: u64,
    pub bytes_hydrated: u64,
    /// Of which hydrated by zeroing, where the source reported zeroes (no copy).
    pub bytes_zeroed: u64,
    pub hydration_rate_bytes_per_sec: u64,
    /// Memory held by the in-core bitmap (released once hydration is complete and committed).
    pub bitmap_bytes: u64,
    /// Requests served by the direct path (one backend I/O from the queue), and of those the
    /// ones redone by the full path because the direct I/O did not transfer everything.
    #[serde(default)]
    pub direct_ios: u64,
    #[serde(default)]
    pub direct_redone: u64,
    /// Requests of the full path (cold regions, copy-on-write) whose data stayed in the
    /// request's pages (zero copy).
    #[serde(default)]
    pub in_place_ios: u64,
    /// Milliseconds background hydration waited because users had requests in service
    /// (`--hydrate-when idle`), summed over its workers.
    #[serde(default)]
    pub hydration_idle_wait_ms: u64,
    /// User requests in service now, on all queues.
    #[serde(default)]
    pub user_requests_in_service: u64,
    pub knobs: Knobs,
    /// A remote source out of reach: since when (seconds since the epoch) and why. Reads that
    /// need it wait for it (up to its timeout) and background hydration pauses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_disconnected: Option<SourceDown>,
}

/// A remote source out of reach, as `status` reports it.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SourceDown {
    /// Seconds since the Unix epoch.
    pub since: u64,
    pub reason: String,
}

pub struct Engine {
    config: EngineConfig,
    geo: Geometry,
    source: Arc<dyn BlockDev>,
    dest: Arc<dyn BlockDev>,
    kickers: Arc<Kickers>,
    map: Arc<RegionMap>,
    locks: RegionLocks,
    committer: Arc<Committer>,
    hydrator: Hydrator,
    knobs: Mutex<Knobs>,
    /// Every copy buffer comes from it.
    copy_budget: budget::CopyBudget,
    /// User requests in service (the queues count them).
    user_io: user_io::UserIo,
    regions_hydrated_write: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    metrics: Arc<metrics::Metrics>,
    /// `--trace-reads`: the first-read order of the regions.
    trace: Option<trace::ReadTrace>,
    /// `--prefetch`: regions hydrated ahead of the sweep.
    prefetch: trace::Prefetch,
}

impl Engine {
    /// Builds the engine and starts its commit and hydration threads.
    pub fn start(
        md: Arc<Metadata>,
        source: Arc<dyn BlockDev>,
        dest: Arc<dyn BlockDev>,
        config: EngineConfig,
    ) -> Result<Arc<Engine>, EngineError> {
        let geo = Self::check_geometry(&md, source.as_ref(), dest.as_ref(), &config)?;
        let kickers = Arc::new(Kickers::default());
        // A clone whose metadata records a degraded mode starts in it (dm-clone's ro): its
        // data can be read and copied off; `reset-mode` is the explicit way back to rw.
        let (md_mode, md_reason) = md.mode();
        let mut mode = (Mode::from_metadata(md_mode), md_reason);
        // A dead daemon's degraded mode that its metadata does not record yet (the write that
        // would have recorded it may have failed): start in it, and record it.
        let start_mode = config.start_mode.clone().filter(|(m, _)| *m > mode.0);
        if let Some(m) = &start_mode {
            log::error!("starting in {} mode: {}", m.0.name(), m.1);
            mode = m.clone();
        }
        if mode.0 != Mode::ReadWrite {
            // The bitmap just loaded is the committed one; nothing may change it.
            md.seal();
        }
        let map = Arc::new(RegionMap::new(md.clone(), mode.0 != Mode::ReadWrite));
        let metrics = Arc::new(metrics::Metrics::default());
        let committer = Arc::new(Committer::new(
            md,
            dest.clone(),
            map.clone(),
            &config,
            mode,
            &kickers,
            metrics.clone(),
        ));
        if start_mode.is_some() {
            committer.persist_start_mode();
        }
        let engine = Arc::new(Engine {
            knobs: Mutex::new(config.knobs.clone()),
            geo,
            locks: RegionLocks::new(&kickers),
            hydrator: Hydrator::new(&kickers),
            copy_budget: budget::CopyBudget::new(config.copy_budget, &kickers),
            user_io: user_io::UserIo::default(),
            kickers,
            map,
            committer,
            source,
            dest,
            regions_hydrated_write: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
            metrics,
            trace: config
                .trace_reads
                .then(|| trace::ReadTrace::new(geo.nr_regions)),
            prefetch: trace::Prefetch::new(config.prefetch.iter().copied()),
            config,
        });
        engine.spawn_threads()?;
        Ok(engine)
    }

    /// Checks that the metadata, the devices and the configuration agree, and returns the
    /// region arithmetic.
    fn check_geometry(
        md: &Metadata,
        source: &dyn BlockDev,
        dest: &dyn BlockDev,
        config: &EngineConfig,
    ) -> Result<Geometry, EngineError> {
        let region_size = md.region_size();
        if !region_size.is_power_of_two() {
            return Err(EngineError::RegionSizeNotPowerOfTwo(region_size));
        }
        let block_size = config.block_size;
        if !block_size.is_power_of_two() || block_size < crate::io::SECTOR_SIZE {
            return Err(EngineError::BadBlockSize(block_size));
        }
        // A region is copied and locked whole: it must hold whole logical blocks.
        if region_size < block_size {
            return Err(EngineError::RegionSmallerThanBlock {
                region_size,
                block_size,
            });
        }
        if config.size % block_size != 0 {
            return Err(EngineError::SizeNotBlockAligned {
                size: config.size,
                block_size,
            });
        }
        let need = config.size.div_ceil(region_size);
        if md.nr_regions() != need {
            return Err(EngineError::RegionCount {
                have: md.nr_regions(),
                size: config.size,
                region_size,
                need,
            });
        }
        if source.size() < config.size || dest.size() < config.size {
            return Err(EngineError::DevicesTooSmall {
                source_size: source.size(),
                dest_size: dest.size(),
                size: config.size,
            });
        }
        Ok(Geometry {
            size: config.size,
            region_size,
            region_shift: region_size.trailing_zeros(),
            nr_regions: need,
        })
    }

    fn spawn_threads(self: &Arc<Self>) -> Result<(), EngineError> {
        let mut threads = Vec::new();
        let committer = self.committer.clone();
        threads.push(
            std::thread::Builder::new()
                .name("clone-commit".into())
                .spawn(move || committer.run())
                .map_err(|error| EngineError::Thread {
                    what: "commit",
                    error,
                })?,
        );
        for i in 0..self.config.hydration_workers.max(1) {
            let e = self.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("clone-hydrate-{i}"))
                    .spawn(move || e.hydration_worker())
                    .map_err(|error| EngineError::Thread {
                        what: "hydration",
                        error,
                    })?,
            );
        }
        *self.threads.lock() = threads;
        Ok(())
    }

    /// Stops background hydration (no new copies start; a batch in progress finishes) while
    /// user I/O goes on: a stopping device's last requests and the kernel's final flush do
    /// not queue behind a sweep that [`shutdown`](Self::shutdown) would end anyway.
    pub fn stop_background_hydration(&self) {
        self.hydrator.stop();
    }

    /// Stops hydration, runs a final commit, marks the metadata clean and joins the threads.
    pub fn shutdown(&self) -> Result<(), EngineError> {
        self.hydrator.stop();
        let final_commit = if self.mode() == Mode::ReadWrite {
            self.flush_blocking().map_err(EngineError::FinalCommit)
        } else {
            Ok(())
        };
        self.committer.stop();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        final_commit?;
        if self.mode() == Mode::ReadWrite {
            self.map
                .md()
                .close_clean()
                .map_err(EngineError::MarkClean)?;
        }
        Ok(())
    }

    pub fn add_kicker(&self, k: Kick) {
        self.kickers.add(k);
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The clone's logical block size: every I/O must be aligned to it.
    pub fn block_size(&self) -> u64 {
        self.config.block_size
    }

    pub fn mode(&self) -> Mode {
        self.committer.mode()
    }

    pub fn knobs(&self) -> Knobs {
        self.knobs.lock().clone()
    }

    pub fn set_knobs(&self, k: Knobs) {
        *self.knobs.lock() = k;
        self.hydrator.poke();
    }

    /// Regions whose source could not be read, as a dead daemon of this clone left them:
    /// reads of them fail again, and the sweep skips them.
    pub fn restore_failed_regions(&self, regions: &[u64]) {
        for &r in regions.iter().filter(|r| **r < self.geo.nr_regions) {
            self.hydrator.mark_failed(r);
        }
        self.hydrator.poke();
    }

    /// Regions whose source could not be read.
    pub fn failed_regions(&self) -> Vec<u64> {
        self.hydrator.failed_regions()
    }

    pub fn is_fully_hydrated(&self) -> bool {
        self.map.is_fully_hydrated()
    }

    /// FLUSH (see `committer`): completes once a destination flush that started after it
    /// arrived has completed and every bit set before it arrived is durable.
    pub async fn flush<P: DataPath>(&self, p: &P) -> Result<(), IoError> {
        pause::point(pause::Point::Flush);
        let t = std::time::Instant::now();
        let r = self.committer.flush(p).await;
        self.metrics.flush.observe(t.elapsed());
        r
    }

    /// Records a user read of `[offset, offset+len)` for the read trace (`--trace-reads`).
    pub fn trace_read(&self, offset: u64, len: u64) {
        if let Some(t) = &self.trace {
            if len > 0 && offset < self.geo.size {
                let last = (offset + len - 1).min(self.geo.size - 1);
                t.record(self.geo.region_of(offset), self.geo.region_of(last));
            }
        }
    }

    /// The regions first read so far, in order (`None`: not tracing).
    pub fn read_trace(&self) -> Option<Vec<u64>> {
        self.trace.as_ref().map(|t| t.order())
    }

    /// User requests in service: the frontend counts each request it takes
    /// ([`UserIo::started`](user_io::UserIo::started)) and completes.
    pub fn user_io(&self) -> &user_io::UserIo {
        &self.user_io
    }

    /// The monitoring counters (user I/O by operation, FLUSH and commit latency).
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// FLUSH through a group commit (always a commit-thread destination flush).
    pub async fn commit_flush(&self) -> Result<(), IoError> {
        self.committer.commit_flush().await
    }

    /// Blocking FLUSH for engine threads and tools (never called on a queue thread).
    pub fn flush_blocking(&self) -> Result<(), IoError> {
        futures_lite::future::block_on(self.commit_flush())
    }

    /// Refuses I/O beyond the device or not aligned to its logical block size. (The kernel
    /// never sends such a request to a device that advertises that size; this keeps a
    /// misaligned one from reaching a 4Kn source or destination.)
    fn validate(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let bs = self.config.block_size;
        if offset % bs != 0 || len % bs != 0 {
            return Err(IoError::einval(format!(
                "unaligned I/O at offset {offset} length {len}: the clone's logical block size \
                 is {bs} bytes, and offset and length must be multiples of it"
            )));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(IoError::einval(format!(
                "I/O at offset {offset} length {len} is beyond the device size {}",
                self.geo.size
            ))),
        }
    }

    pub fn status(&self) -> Status {
        let (mode, reason) = self.committer.mode_and_reason();
        let (commits, flushes) = self.committer.counts();
        let md = self.map.md();
        Status {
            size: self.geo.size,
            region_size: self.geo.region_size,
            regions: self.geo.nr_regions,
            hydrated: md.nr_hydrated(),
            hydrating: self.hydrator.in_flight(),
            failed_regions: self.hydrator.failed_regions(),
            mode,
            mode_reason: reason,
            commits,
            flushes,
            bytes_hydrated: self.hydrator.bytes_hydrated.load(Ordering::Relaxed),
            bytes_zeroed: self.hydrator.bytes_zeroed.load(Ordering::Relaxed),
            hydration_rate_bytes_per_sec: self.hydrator.measured_rate(),
            bitmap_bytes: md.in_core_bytes(),
            direct_ios: self.metrics().direct_ios.load(Ordering::Relaxed),
            direct_redone: self.metrics().direct_redone.load(Ordering::Relaxed),
            in_place_ios: self.metrics().in_place_ios.load(Ordering::Relaxed),
            hydration_idle_wait_ms: self.hydrator.idle_wait_us.load(Ordering::Relaxed) / 1000,
            user_requests_in_service: self.user_io.in_service(),
            knobs: self.knobs(),
            source_disconnected: self.source.link_down().map(|d| SourceDown {
                since: d
                    .since
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |t| t.as_secs()),
                reason: d.reason,
            }),
        }
    }
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod nbd_tests;
#[cfg(test)]
mod tests;
