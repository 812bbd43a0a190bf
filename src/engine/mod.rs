//! The clone engine: decides where every I/O goes and when the bitmap may be committed.
//!
//! Transport-agnostic (no ublk types): queue threads call [`Engine::read`], [`Engine::write`],
//! [`Engine::discard`] and [`Engine::flush`] with a [`DataPath`]; the engine's own threads
//! commit metadata (`commit`) and hydrate in the background (`hydrate`).
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
mod commit;
pub mod flush;
mod hydrate;
pub mod path;
pub mod regions;
pub mod wake;

pub use path::{DataPath, Side, SyncPath};

use crate::io::BlockDev;
use crate::metadata::Metadata;
use parking_lot::{Condvar, Mutex};
use regions::RegionLocks;
use serde::Serialize;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use wake::{Kick, Kickers, Signal};

/// Metadata mode, ordered by severity (dm-clone's rw / ro / fail).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, serde::Deserialize)]
pub enum Mode {
    ReadWrite,
    ReadOnly,
    Fail,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::ReadWrite => "rw",
            Mode::ReadOnly => "ro",
            Mode::Fail => "fail",
        }
    }
}

/// An I/O error returned to the frontend: an errno plus a message for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    pub errno: i32,
    pub msg: String,
}

impl IoError {
    pub fn eio(msg: impl Into<String>) -> IoError {
        IoError {
            errno: libc::EIO,
            msg: msg.into(),
        }
    }
    pub fn einval(msg: impl Into<String>) -> IoError {
        IoError {
            errno: libc::EINVAL,
            msg: msg.into(),
        }
    }
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (errno {})", self.msg, self.errno)
    }
}

/// Run-time knobs (dm-clone's messages plus ours).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Knobs {
    pub hydration_enabled: bool,
    /// Maximum regions being hydrated at once, including write-triggered hydrations.
    pub threshold: u64,
    /// Contiguous regions per background copy.
    pub batch_size: u64,
    /// Background hydration byte rate limit; 0 = unlimited.
    pub rate_bytes_per_sec: u64,
    /// Queue regions that users read for early hydration.
    pub hydrate_on_read: bool,
}

impl Knobs {
    /// Defaults sized so that one background copy moves about 4 MiB.
    pub fn defaults_for(region_size: u64) -> Knobs {
        let batch = (4 << 20) / region_size.max(1);
        let batch = batch.max(1);
        Knobs {
            hydration_enabled: true,
            threshold: batch * 2,
            batch_size: batch,
            rate_bytes_per_sec: 0,
            hydrate_on_read: true,
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Size of the clone device in bytes (the source size).
    pub size: u64,
    /// Logical block size of the clone in bytes: the larger of the source's and the
    /// destination's, so that every I/O the engine passes on is aligned for both (with
    /// O_DIRECT a 4Kn device refuses anything smaller). I/O not aligned to it is refused.
    pub block_size: u64,
    pub discard_passdown: bool,
    pub commit_period: Duration,
    pub source_retries: u32,
    pub retry_backoff: Duration,
    pub hydration_workers: usize,
    /// Memory for copy buffers (copy-on-write and background hydration), in bytes.
    pub copy_budget: u64,
    pub knobs: Knobs,
    /// Deliberate protocol violations, for the crash oracle's own tests only.
    #[cfg(test)]
    pub(crate) bugs: Bugs,
}

/// Deliberate protocol violations that the crash oracle (`crash_tests`) must catch. All off
/// by default; they exist only in test builds, so the production path cannot take them.
#[cfg(test)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Bugs {
    /// Commit the metadata (shadows and superblock) *before* flushing the destination.
    pub commit_before_dest_flush: bool,
    /// Set a region's bit and make it durable *before* its copy or write reached the
    /// destination.
    pub bit_before_copy: bool,
    /// A FLUSH joins the commit already in flight (or none at all) instead of waiting for
    /// one that starts after it arrived, so it can complete without a covering flush.
    pub flush_joins_old_commit: bool,
    /// The FLUSH fast path ignores uncommitted region bits (flushes only the destination).
    pub fast_flush_ignores_dirty: bool,
}

impl EngineConfig {
    pub fn new(size: u64, region_size: u64) -> EngineConfig {
        EngineConfig {
            size,
            block_size: crate::io::SECTOR_SIZE,
            discard_passdown: true,
            commit_period: Duration::from_secs(1),
            source_retries: 3,
            retry_backoff: Duration::from_millis(10),
            hydration_workers: 2,
            copy_budget: 64 << 20,
            knobs: Knobs::defaults_for(region_size),
            #[cfg(test)]
            bugs: Bugs::default(),
        }
    }
}

/// Region arithmetic.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub size: u64,
    pub region_size: u64,
    pub region_shift: u32,
    pub nr_regions: u64,
}

impl Geometry {
    pub fn region_of(&self, offset: u64) -> u64 {
        offset >> self.region_shift
    }
    pub fn region_start(&self, r: u64) -> u64 {
        r << self.region_shift
    }
    /// End of region `r`, clamped to the device size (the last region may be partial).
    pub fn region_end(&self, r: u64) -> u64 {
        ((r + 1) << self.region_shift).min(self.size)
    }
    /// Byte span of regions `[head, head+count)`.
    pub fn regions_span(&self, head: u64, count: u64) -> (u64, u64) {
        let start = self.region_start(head);
        (start, self.region_end(head + count - 1) - start)
    }
}

#[derive(Default)]
pub(crate) struct Stats {
    pub commits: AtomicU64,
    pub flushes: AtomicU64,
    pub bytes_hydrated: AtomicU64,
    pub regions_hydrated_bg: AtomicU64,
    pub regions_hydrated_write: AtomicU64,
    pub dest_write_errors: AtomicU64,
    /// Background batches picked (each one a look at the bitmap).
    pub hydration_scans: AtomicU64,
}

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
    pub hydration_rate_bytes_per_sec: u64,
    /// Memory held by the in-core bitmap (released once hydration is complete and committed).
    pub bitmap_bytes: u64,
    pub knobs: Knobs,
}

pub struct Engine {
    config: EngineConfig,
    geo: Geometry,
    md: Arc<Metadata>,
    source: Arc<dyn BlockDev>,
    dest: Arc<dyn BlockDev>,
    kickers: Arc<Kickers>,
    locks: RegionLocks,
    knobs: Mutex<Knobs>,
    mode: Mutex<(Mode, String)>,
    /// The mode changed and the commit thread has not recorded it in the metadata yet.
    mode_unpersisted: AtomicBool,
    /// Every destination flush goes through it (seed 004).
    flushes: flush::FlushSequencer,
    /// Every copy buffer comes from it.
    copy_budget: budget::CopyBudget,
    /// In read-only or fail mode: the in-core bitmap is settled and sealed: the committed one
    /// again after a failed destination flush (reads of regions hydrated after the last commit
    /// go to the source), the in-core one after other failures.
    bitmap_reverted: AtomicBool,
    /// A destination flush failed: the destination may have lost writes made since the last
    /// commit, so the bits set since then cannot be trusted (finding 2).
    dest_flush_failed: AtomicBool,
    commit_state: Mutex<commit::CommitState>,
    commit_cv: Condvar,
    commit_done: Signal,
    hydrate_wake: Signal,
    hydrate_stop: AtomicBool,
    hydrations_in_flight: AtomicU64,
    fully_hydrated: AtomicBool,
    /// Serialises setting `fully_hydrated` with the revert's final store.
    fully_hydrated_lock: Mutex<()>,
    cursor: Mutex<u64>,
    hints: Mutex<VecDeque<u64>>,
    failed: Mutex<BTreeSet<u64>>,
    has_failed: AtomicBool,
    rate: Mutex<hydrate::RateLimiter>,
    /// Background destination writes that failed in a row.
    dest_write_failures: std::sync::atomic::AtomicU32,
    rate_sample: Mutex<(Instant, u64, u64)>,
    stats: Stats,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

const MAX_HINTS: usize = 4096;
/// Most region locks one WRITE_ZEROES holds at a time.
const ZERO_CHUNK_REGIONS: u64 = 1024;

impl Engine {
    /// Builds the engine and starts its commit and hydration threads.
    pub fn start(
        md: Arc<Metadata>,
        source: Arc<dyn BlockDev>,
        dest: Arc<dyn BlockDev>,
        config: EngineConfig,
    ) -> Result<Arc<Engine>, String> {
        let region_size = md.region_size();
        if !region_size.is_power_of_two() {
            return Err(format!("region size {region_size} is not a power of two"));
        }
        let block_size = config.block_size;
        if !block_size.is_power_of_two() || block_size < crate::io::SECTOR_SIZE {
            return Err(format!(
                "logical block size {block_size} is not a power of two of at least 512"
            ));
        }
        // A region is copied and locked whole: it must hold whole logical blocks.
        if region_size < block_size {
            return Err(format!(
                "region size {region_size} is smaller than the {block_size}-byte logical block \
                 size of the source or destination"
            ));
        }
        if config.size % block_size != 0 {
            return Err(format!(
                "device size {} is not a multiple of the {block_size}-byte logical block size",
                config.size
            ));
        }
        let geo = Geometry {
            size: config.size,
            region_size,
            region_shift: region_size.trailing_zeros(),
            nr_regions: md.nr_regions(),
        };
        if geo.nr_regions != config.size.div_ceil(region_size) {
            return Err(format!(
                "metadata has {} regions but a {}-byte device at {region_size}-byte regions needs {}",
                geo.nr_regions,
                config.size,
                config.size.div_ceil(region_size)
            ));
        }
        if source.size() < config.size || dest.size() < config.size {
            return Err(format!(
                "source ({} bytes) and destination ({} bytes) must hold the {}-byte device",
                source.size(),
                dest.size(),
                config.size
            ));
        }
        let kickers = Arc::new(Kickers::default());
        // A clone whose metadata records a degraded mode starts in it (dm-clone's ro): its
        // data can be read and copied off; `reset-mode` is the explicit way back to rw.
        let (md_mode, md_reason) = md.mode();
        let mode = match md_mode {
            crate::metadata::MetadataMode::ReadWrite => Mode::ReadWrite,
            crate::metadata::MetadataMode::ReadOnly => Mode::ReadOnly,
            crate::metadata::MetadataMode::Fail => Mode::Fail,
        };
        if mode != Mode::ReadWrite {
            // The bitmap just loaded is the committed one; nothing may change it.
            md.seal();
        }
        let flushes = flush::FlushSequencer::new(&kickers);
        let copy_budget = budget::CopyBudget::new(config.copy_budget, &kickers);
        let engine = Arc::new(Engine {
            knobs: Mutex::new(config.knobs.clone()),
            geo,
            locks: RegionLocks::new(&kickers),
            commit_done: Signal::new(&kickers),
            hydrate_wake: Signal::new(&kickers),
            kickers,
            md,
            source,
            dest,
            mode: Mutex::new((mode, md_reason)),
            mode_unpersisted: AtomicBool::new(false),
            flushes,
            copy_budget,
            bitmap_reverted: AtomicBool::new(mode != Mode::ReadWrite),
            dest_flush_failed: AtomicBool::new(false),
            // The periodic commit runs a commit period after start, not at once.
            commit_state: Mutex::new(commit::CommitState {
                last_commit: Some(Instant::now()),
                ..commit::CommitState::default()
            }),
            commit_cv: Condvar::new(),
            hydrate_stop: AtomicBool::new(false),
            hydrations_in_flight: AtomicU64::new(0),
            fully_hydrated: AtomicBool::new(false),
            fully_hydrated_lock: Mutex::new(()),
            cursor: Mutex::new(0),
            hints: Mutex::new(VecDeque::new()),
            failed: Mutex::new(BTreeSet::new()),
            has_failed: AtomicBool::new(false),
            rate: Mutex::new(hydrate::RateLimiter {
                tokens: 0.0,
                last: Instant::now(),
            }),
            rate_sample: Mutex::new((Instant::now(), 0, 0)),
            dest_write_failures: std::sync::atomic::AtomicU32::new(0),
            stats: Stats::default(),
            threads: Mutex::new(Vec::new()),
            config,
        });
        engine.check_fully_hydrated();
        let mut threads = Vec::new();
        let e = engine.clone();
        threads.push(
            std::thread::Builder::new()
                .name("clone-commit".into())
                .spawn(move || e.commit_thread())
                .map_err(|e| format!("cannot start the commit thread: {e}"))?,
        );
        for i in 0..engine.config.hydration_workers.max(1) {
            let e = engine.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("clone-hydrate-{i}"))
                    .spawn(move || e.hydration_worker())
                    .map_err(|e| format!("cannot start a hydration thread: {e}"))?,
            );
        }
        *engine.threads.lock() = threads;
        Ok(engine)
    }

    /// Stops hydration, runs a final commit, marks the metadata clean and joins the threads.
    pub fn shutdown(&self) -> Result<(), String> {
        self.hydrate_stop.store(true, Ordering::Release);
        self.hydrate_wake.notify();
        let final_commit = if self.mode() == Mode::ReadWrite {
            self.flush_blocking().map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        self.commit_state.lock().shutdown = true;
        self.commit_cv.notify_all();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        final_commit?;
        if self.mode() == Mode::ReadWrite {
            self.md
                .close_clean()
                .map_err(|e| format!("marking the metadata clean: {e}"))?;
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
        self.mode.lock().0
    }

    pub fn knobs(&self) -> Knobs {
        self.knobs.lock().clone()
    }

    pub fn set_knobs(&self, k: Knobs) {
        *self.knobs.lock() = k;
        self.hydrate_wake.notify();
    }

    pub fn is_fully_hydrated(&self) -> bool {
        self.fully_hydrated.load(Ordering::Acquire)
    }

    fn is_failed(&self, r: u64) -> bool {
        self.has_failed.load(Ordering::Acquire) && self.failed.lock().contains(&r)
    }

    fn check_fully_hydrated(&self) {
        if self.fully_hydrated.load(Ordering::Acquire) {
            return;
        }
        // Under the same lock as the revert's store, which is final: a check that started
        // before a failure cannot set the flag after the revert cleared it.
        let _g = self.fully_hydrated_lock.lock();
        if !self.bitmap_reverted.load(Ordering::Acquire)
            && self.md.nr_hydrated() == self.geo.nr_regions
        {
            self.fully_hydrated.store(true, Ordering::Release);
        }
    }

    fn is_hydrated(&self, r: u64) -> bool {
        self.fully_hydrated.load(Ordering::Acquire) || self.md.is_hydrated(r)
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
        let (mode, reason) = self.mode.lock().clone();
        let bytes = self.stats.bytes_hydrated.load(Ordering::Relaxed);
        let rate = {
            let mut s = self.rate_sample.lock();
            let dt = s.0.elapsed().as_secs_f64();
            if dt >= 1.0 {
                s.2 = ((bytes - s.1) as f64 / dt) as u64;
                *s = (Instant::now(), bytes, s.2);
            }
            s.2
        };
        Status {
            size: self.geo.size,
            region_size: self.geo.region_size,
            regions: self.geo.nr_regions,
            hydrated: self.md.nr_hydrated(),
            hydrating: self.hydrations_in_flight.load(Ordering::Relaxed),
            failed_regions: self.failed.lock().iter().copied().collect(),
            mode,
            mode_reason: reason,
            commits: self.stats.commits.load(Ordering::Relaxed),
            flushes: self.stats.flushes.load(Ordering::Relaxed),
            bytes_hydrated: bytes,
            hydration_rate_bytes_per_sec: rate,
            bitmap_bytes: self.md.in_core_bytes(),
            knobs: self.knobs(),
        }
    }

    /// The one backend I/O that serves a plain read or write completely, when the engine
    /// has nothing else to do for it: the device is read-write, it is not FUA, and every
    /// region it touches is hydrated, so it goes to the destination as it is. `None` sends it
    /// through [`Engine::read`] / [`Engine::write`]. The frontend uses this to serve the
    /// common case without the async machinery; what it does must equal what those would do.
    pub fn direct_route(&self, offset: u64, len: u64, fua: bool) -> Option<Side> {
        if len == 0 || fua || self.validate(offset, len).is_err() {
            return None;
        }
        if self.mode() != Mode::ReadWrite {
            return None;
        }
        if self.is_fully_hydrated() {
            return Some(Side::Dest);
        }
        let (first, last) = (
            self.geo.region_of(offset),
            self.geo.region_of(offset + len - 1),
        );
        (first..=last)
            .all(|r| self.md.is_hydrated(r))
            .then_some(Side::Dest)
    }

    //--------------------------------------------------------------------------------------
    // Reads

    pub async fn read<P: DataPath>(
        &self,
        p: &P,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), IoError> {
        self.validate(offset, buf.len() as u64)?;
        self.await_committed_view().await;
        if self.mode() == Mode::Fail {
            return Err(IoError::eio("device is in fail mode"));
        }
        if self.is_fully_hydrated() {
            return p
                .read(Side::Dest, buf, offset)
                .await
                .map_err(|e| IoError::eio(e.to_string()));
        }
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let r = self.geo.region_of(pos);
            let hydrated = self.is_hydrated(r);
            if !hydrated && self.is_failed(r) {
                return Err(IoError::eio(format!(
                    "region {r} could not be hydrated: source read errors"
                )));
            }
            // Extend the run over regions in the same state.
            let mut run_end = self.geo.region_end(r).min(end);
            while run_end < end {
                let next = self.geo.region_of(run_end);
                if self.is_hydrated(next) != hydrated || (!hydrated && self.is_failed(next)) {
                    break;
                }
                run_end = self.geo.region_end(next).min(end);
            }
            let slice = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            let side = if hydrated { Side::Dest } else { Side::Source };
            p.read(side, slice, pos)
                .await
                .map_err(|e| IoError::eio(e.to_string()))?;
            if !hydrated && self.knobs.lock().hydrate_on_read {
                let mut hints = self.hints.lock();
                if hints.len() < MAX_HINTS {
                    hints.push_back(r);
                }
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Right after a failure the in-core bitmap may still hold bits set since the last
    /// commit, whose data the failed flush may have lost; the commit thread reverts it to the
    /// committed bitmap. Until it has, reads wait (normally a few milliseconds).
    async fn await_committed_view(&self) {
        if self.mode() != Mode::ReadWrite && !self.bitmap_reverted.load(Ordering::Acquire) {
            self.commit_done
                .wait_until(|| {
                    self.bitmap_reverted.load(Ordering::Acquire) || self.mode() == Mode::Fail
                })
                .await;
        }
    }

    //--------------------------------------------------------------------------------------
    // Writes

    /// A write. With `fua` it completes only once it and the metadata that makes it visible
    /// are durable.
    pub async fn write<P: DataPath>(
        &self,
        p: &P,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), IoError> {
        self.validate(offset, data.len() as u64)?;
        self.await_committed_view().await;
        let mode = self.mode();
        match mode {
            Mode::Fail => return Err(IoError::eio("device is in fail mode")),
            Mode::ReadOnly if fua => {
                return Err(IoError::eio(
                    "device is read-only after a failure; FUA refused",
                ))
            }
            _ => {}
        }
        if data.is_empty() {
            return Ok(());
        }
        self.write_inner(p, offset, data).await?;
        if mode == Mode::ReadWrite && self.mode() != Mode::ReadWrite {
            // The clone failed while this write was in flight: its region may have been
            // hydrated after the last commit, and the revert to the committed bitmap makes it
            // invisible. Say so rather than acknowledge it.
            return Err(IoError::eio(
                "the device failed during this write (read-only now); the write may be lost",
            ));
        }
        if fua {
            self.flush(p).await?;
        }
        Ok(())
    }

    async fn write_inner<P: DataPath>(
        &self,
        p: &P,
        offset: u64,
        data: &[u8],
    ) -> Result<(), IoError> {
        let end = offset + data.len() as u64;
        let first = self.geo.region_of(offset);
        let last = self.geo.region_of(end - 1);
        // Fast path: every touched region is hydrated.
        if (first..=last).all(|r| self.is_hydrated(r)) {
            return p
                .write_dest(data, offset)
                .await
                .map_err(|e| IoError::eio(e.to_string()));
        }
        // Lock the unhydrated regions in ascending order.
        let mut guards = Vec::new();
        for r in first..=last {
            if !self.is_hydrated(r) {
                let g = self.locks.lock(r).await;
                if !self.is_hydrated(r) {
                    guards.push(g);
                }
            }
        }
        if guards.is_empty() {
            return p
                .write_dest(data, offset)
                .await
                .map_err(|e| IoError::eio(e.to_string()));
        }
        if self.mode() != Mode::ReadWrite {
            return Err(IoError::eio(
                "device is read-only after a failure; cannot hydrate for this write",
            ));
        }
        let locked = |r: u64| guards.iter().any(|g| g.region() == r);
        // Extend the write to whole regions for a partially covered unhydrated head or tail,
        // filling the uncovered parts from the source (copy-on-write hydration).
        let start = if locked(first) {
            self.geo.region_start(first)
        } else {
            offset
        };
        let stop = if locked(last) {
            self.geo.region_end(last)
        } else {
            end
        };
        // Write-triggered hydrations count against the hydration threshold, like dm-clone.
        self.hydrations_in_flight
            .fetch_add(guards.len() as u64, Ordering::AcqRel);
        #[cfg(test)]
        if self.config.bugs.bit_before_copy {
            // BUG (test only): the bits become durable before the data is written.
            for g in &guards {
                let _ = self.md.set_hydrated(g.region());
            }
            let _ = self.commit_flush().await;
        }
        let result = async {
            if start == offset && stop == end {
                // Whole regions overwritten: no copy needed.
                return p.write_dest(data, offset).await;
            }
            if stop - start > budget::COPY_CHUNK as u64 {
                // Large regions: the uncovered head and tail are copied a chunk at a time,
                // then the data is written; the bits are set only after all of it.
                self.copy_source_range(p, start, offset).await?;
                self.copy_source_range(p, end, stop).await?;
                return p.write_dest(data, offset).await;
            }
            let mut buf = self.copy_budget.take((stop - start) as usize).await;
            if start < offset {
                p.read(Side::Source, &mut buf[..(offset - start) as usize], start)
                    .await?;
            }
            if stop > end {
                let at = (end - start) as usize;
                p.read(Side::Source, &mut buf[at..], end).await?;
            }
            buf[(offset - start) as usize..(end - start) as usize].copy_from_slice(data);
            p.write_dest(&buf, start).await
        }
        .await;
        self.hydrations_in_flight
            .fetch_sub(guards.len() as u64, Ordering::AcqRel);
        self.hydrate_wake.notify();
        result.map_err(|e| IoError::eio(e.to_string()))?;
        // The data of every locked region is now complete on the destination.
        self.set_written(&guards)?;
        drop(guards);
        self.check_fully_hydrated();
        Ok(())
    }

    /// Copies `[a, b)` from the source to the destination, a budgeted chunk at a time (the
    /// caller holds the region locks).
    async fn copy_source_range<P: DataPath>(&self, p: &P, a: u64, b: u64) -> std::io::Result<()> {
        let mut pos = a;
        while pos < b {
            let n = (b - pos).min(budget::COPY_CHUNK as u64) as usize;
            let mut buf = self.copy_budget.take(n).await;
            p.read(Side::Source, &mut buf[..], pos).await?;
            p.write_dest(&buf, pos).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Marks the regions of `guards` hydrated after a user write (or zeroing) made their data
    /// complete on the destination; called before the guards are released.
    fn set_written(&self, guards: &[regions::RegionGuard<'_>]) -> Result<(), IoError> {
        for g in guards {
            self.md.set_hydrated(g.region()).map_err(|e| {
                IoError::eio(format!("recording region {} hydrated: {e}", g.region()))
            })?;
        }
        self.stats
            .regions_hydrated_write
            .fetch_add(guards.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    //--------------------------------------------------------------------------------------
    // Write zeroes

    /// WRITE_ZEROES: afterwards the range reads back as zeroes. Whole regions are zeroed on
    /// the destination without a copy (a hole or an allocated zero range, as the destination
    /// allows; `unmap` permits the hole) and then marked hydrated, like a write that covers
    /// them; partially covered regions at the edges go through the write path.
    pub async fn write_zeroes<P: DataPath>(
        &self,
        p: &P,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), IoError> {
        self.validate(offset, len)?;
        self.await_committed_view().await;
        match self.mode() {
            Mode::Fail => return Err(IoError::eio("device is in fail mode")),
            Mode::ReadOnly if fua => {
                return Err(IoError::eio(
                    "device is read-only after a failure; FUA refused",
                ))
            }
            _ => {}
        }
        if len == 0 {
            return Ok(());
        }
        let (edges, rs, re) = self.split_edges(offset, len);
        for (a, b) in edges {
            if self.all_hydrated(a, b) {
                p.zero_dest(a, b - a, unmap)
                    .await
                    .map_err(|e| IoError::eio(e.to_string()))?;
            } else {
                self.zero_edge(p, a, b).await?;
            }
        }
        // Whole regions, a bounded number of region locks at a time, in ascending order.
        let mut r = rs;
        while r < re {
            let chunk_end = re.min(r + ZERO_CHUNK_REGIONS);
            let mut guards = Vec::new();
            for x in r..chunk_end {
                if !self.is_hydrated(x) {
                    let g = self.locks.lock(x).await;
                    if !self.is_hydrated(x) {
                        guards.push(g);
                    }
                }
            }
            if !guards.is_empty() && self.mode() != Mode::ReadWrite {
                return Err(IoError::eio(
                    "device is read-only after a failure; cannot hydrate for this write",
                ));
            }
            let (a, l) = self.geo.regions_span(r, chunk_end - r);
            p.zero_dest(a, l, unmap)
                .await
                .map_err(|e| IoError::eio(e.to_string()))?;
            // The zeroes of every locked region are now on the destination.
            self.set_written(&guards)?;
            drop(guards);
            r = chunk_end;
        }
        self.check_fully_hydrated();
        if fua {
            self.flush(p).await?;
        }
        Ok(())
    }

    /// Writes zeroes over the partially covered edge `[a, b)` through the copy path, a piece
    /// of the shared aligned ZEROES at a time (no buffer of the edge's size: with large
    /// regions an edge can be nearly a whole region). Aligned matters: if the region is
    /// hydrated meanwhile, the buffer goes to the destination as it is, and O_DIRECT refuses
    /// unaligned buffers (EINVAL).
    async fn zero_edge<P: DataPath>(&self, p: &P, a: u64, b: u64) -> Result<(), IoError> {
        let zeroes = crate::io::ZEROES.as_slice();
        let mut pos = a;
        while pos < b {
            let n = (b - pos).min(zeroes.len() as u64);
            self.write_inner(p, pos, &zeroes[..n as usize]).await?;
            pos += n;
        }
        Ok(())
    }

    /// Whether every region touched by `[a, b)` is hydrated. (An edge range may span the end
    /// of one region and the start of the next.)
    fn all_hydrated(&self, a: u64, b: u64) -> bool {
        (self.geo.region_of(a)..=self.geo.region_of(b - 1)).all(|r| self.is_hydrated(r))
    }

    /// Splits `[offset, offset+len)` into partially covered edge ranges and the whole
    /// regions `[rs, re)` between them (empty when `rs >= re`).
    fn split_edges(&self, offset: u64, len: u64) -> (Vec<(u64, u64)>, u64, u64) {
        let end = offset + len;
        let rs = offset.div_ceil(self.geo.region_size);
        let re = if end == self.geo.size {
            self.geo.nr_regions
        } else {
            end >> self.geo.region_shift
        };
        let full_start = self.geo.region_start(rs).min(end);
        let full_end = if re > rs {
            self.geo.region_end(re - 1)
        } else {
            full_start
        };
        let mut edges = Vec::new();
        if rs >= re {
            edges.push((offset, end));
        } else {
            if offset < full_start {
                edges.push((offset, full_start));
            }
            if full_end < end {
                edges.push((full_end, end));
            }
        }
        (edges, rs, re)
    }

    //--------------------------------------------------------------------------------------
    // Discards

    /// Discard: whole covered regions that are not hydrated are marked hydrated without a
    /// copy; the range is passed down to the destination unless disabled. Partially covered
    /// unhydrated regions at the edges get zeroes written (through the copy path), so that no
    /// part of a discarded range reads back stale source data.
    pub async fn discard<P: DataPath>(&self, p: &P, offset: u64, len: u64) -> Result<(), IoError> {
        self.validate(offset, len)?;
        self.await_committed_view().await;
        match self.mode() {
            Mode::Fail => return Err(IoError::eio("device is in fail mode")),
            Mode::ReadOnly => return Ok(()),
            Mode::ReadWrite => {}
        }
        if len == 0 {
            return Ok(());
        }
        let (edges, rs, re) = self.split_edges(offset, len);
        for (a, b) in edges {
            if !self.all_hydrated(a, b) {
                self.zero_edge(p, a, b).await?;
            } else if self.config.discard_passdown {
                p.discard_dest(a, b - a)
                    .await
                    .map_err(|e| IoError::eio(e.to_string()))?;
            }
        }
        if rs >= re {
            return Ok(());
        }
        for r in rs..re {
            if !self.is_hydrated(r) {
                let g = self.locks.lock(r).await;
                if !self.is_hydrated(r) {
                    self.md.set_hydrated(r).map_err(|e| {
                        IoError::eio(format!("recording discarded region {r}: {e}"))
                    })?;
                }
                drop(g);
            }
        }
        self.check_fully_hydrated();
        if self.config.discard_passdown {
            let (full_start, full_len) = self.geo.regions_span(rs, re - rs);
            p.discard_dest(full_start, full_len)
                .await
                .map_err(|e| IoError::eio(e.to_string()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod tests;
