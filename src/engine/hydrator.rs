//! Background hydration: copies unhydrated regions from the source to the destination.
//!
//! Better than dm-clone's sweep:
//! - by default it does not pause for user I/O (it is bounded by `threshold` regions in
//!   flight, which counts write-triggered hydrations too, and by an optional byte rate
//!   limit); with `--hydrate-when idle` it starts a batch only while users have no request in
//!   service, as dm-clone's sweep does;
//! - regions that users read are queued as hints and hydrated first;
//! - a source read error is retried a bounded number of times with backoff; then the region is
//!   marked failed (reads of it return EIO), reported in the status, and the sweep goes on;
//! - a destination write that fails is retried with exponential backoff; after
//!   `DEST_WRITE_RETRIES` failures in a row the clone degrades to read-only (it never spins);
//! - once only failed regions are left, the sweep stops scanning the bitmap until something
//!   changes (a region gets hydrated by a write or discard, the knobs change, a restart).
//!
//! [`Hydrator`] holds the sweep's state (cursor, hints, failed regions, rate limiter, regions
//! in flight, counters); the worker threads (`Engine::hydration_worker`) use it together with
//! the region locks and the region map.
//!
//! Invariants: a region is copied only while its region lock is held and only if its bit is
//! clear under the lock; the bit is set after the destination write completed and before the
//! lock is released (see `regions`). No region lock is held while waiting for the rate limit
//! or a backoff: a user write to those regions never waits for them.

use super::config::{HydrateWhen, Knobs, Mode};
use super::wake::{Kickers, Signal};
use super::Engine;
use parking_lot::Mutex;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Destination write failures in a row before background hydration degrades the clone.
const DEST_WRITE_RETRIES: u32 = 5;
/// First backoff after a failed destination write; doubles with each further failure.
const DEST_WRITE_BACKOFF: Duration = Duration::from_millis(20);
/// Most read hints queued at once (more are dropped: the sweep reaches them anyway).
const MAX_HINTS: usize = 4096;
/// First wait after a batch found the source out of reach; doubles with each further such
/// batch in a row (per worker), up to the last; a batch that copies resets it.
const SOURCE_BACKOFF_FIRST: Duration = Duration::from_millis(200);
const SOURCE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// While the source reports its link down: how often it is looked at, and for how long
/// at most per wait.
const SOURCE_POLL: Duration = Duration::from_millis(200);
const SOURCE_POLL_MAX: Duration = Duration::from_secs(5);
/// With `--hydrate-when idle`, how often a sweep waiting for users to pause looks again (the
/// queues do not signal the moment they go idle: that would cost every request a wake-up).
const IDLE_POLL: Duration = Duration::from_millis(5);
/// Largest background batch while users have requests in service (or one region, if
/// larger), for a local source. A batch holds its regions' locks until its copy is written,
/// and a user write to one of them waits that long; its reads and writes also queue ahead of
/// users' on the same devices. A 4 MiB batch under TCG held a write for tens of milliseconds,
/// and the queue slot with it (fio 4k randrw qd8 at 4K regions: 0.75x of the hydrated clone's
/// IOPS at --rate 16M; 0.95x with the cut). Smaller copies cost more per byte, so an idle
/// device gets the full batch; so does a remote source (`full_batches_under_load`).
const BUSY_BATCH_BYTES: u64 = 256 << 10;

/// Token bucket for the hydration rate limit: a copy is charged after it was made, and the
/// next batch is picked only once the bucket is out of debt (`Engine::wait_for_rate`).
struct RateLimiter {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    fn refill(&mut self, rate: u64) {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * rate as f64;
        // At most one second of burst.
        self.tokens = (self.tokens + refill).min(rate as f64);
        self.last = now;
    }
}

/// The background sweep's state.
pub(crate) struct Hydrator {
    /// Control changes (stop, knobs, failed regions restored): wakes every waiting worker
    /// (see [`Hydrator::poke`]).
    wake: Signal,
    /// Progress: hydrations ended (room under the threshold), bits set. Only workers that
    /// wait for room or for writers to finish listen: a worker waiting out the rate limit or
    /// with hydration off is not woken by every user write.
    pub progress: Signal,
    stop: AtomicBool,
    /// Regions being hydrated, background and write-triggered: bounded by the threshold.
    in_flight: AtomicU64,
    pub cursor: Mutex<u64>,
    hints: Mutex<VecDeque<u64>>,
    failed: Mutex<BTreeSet<u64>>,
    has_failed: AtomicBool,
    rate: Mutex<RateLimiter>,
    /// (when, bytes hydrated then, rate measured then) for `status`.
    rate_sample: Mutex<(Instant, u64, u64)>,
    /// Background destination writes that failed in a row.
    pub dest_write_failures: AtomicU32,
    pub bytes_hydrated: AtomicU64,
    /// Of which hydrated by zeroing (the source reported zeroes), not copied.
    pub bytes_zeroed: AtomicU64,
    pub regions_hydrated_bg: AtomicU64,
    pub dest_write_errors: AtomicU64,
    /// Background batches picked (each one a look at the bitmap).
    pub scans: AtomicU64,
    /// Microseconds the sweep's workers waited because users had requests in service
    /// (`--hydrate-when idle`), summed over the workers.
    pub idle_wait_us: AtomicU64,
}

impl Hydrator {
    pub fn new(kickers: &Arc<Kickers>) -> Hydrator {
        Hydrator {
            wake: Signal::new(kickers),
            progress: Signal::new(kickers),
            stop: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            cursor: Mutex::new(0),
            hints: Mutex::new(VecDeque::new()),
            failed: Mutex::new(BTreeSet::new()),
            has_failed: AtomicBool::new(false),
            rate: Mutex::new(RateLimiter {
                tokens: 0.0,
                last: Instant::now(),
            }),
            rate_sample: Mutex::new((Instant::now(), 0, 0)),
            dest_write_failures: AtomicU32::new(0),
            bytes_hydrated: AtomicU64::new(0),
            bytes_zeroed: AtomicU64::new(0),
            regions_hydrated_bg: AtomicU64::new(0),
            dest_write_errors: AtomicU64::new(0),
            scans: AtomicU64::new(0),
            idle_wait_us: AtomicU64::new(0),
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Tells the workers to exit.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.poke();
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Reserves `n` regions under `threshold`; false if they do not fit.
    pub fn try_begin_hydrations(&self, n: u64, threshold: u64) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur + n <= threshold).then_some(cur + n)
            })
            .is_ok()
    }

    /// Counts `n` write-triggered hydrations (they may exceed the threshold: a write never
    /// waits for room).
    pub fn begin_hydrations(&self, n: u64) {
        self.in_flight.fetch_add(n, Ordering::AcqRel);
    }

    /// Ends `n` hydrations and wakes the workers waiting for room (or for writers).
    pub fn end_hydrations(&self, n: u64) {
        self.in_flight.fetch_sub(n, Ordering::AcqRel);
        self.progress.notify();
    }

    /// Wakes every waiting worker to look again: after a change of knobs, of failed regions,
    /// or a stop.
    pub fn poke(&self) {
        self.wake.notify();
        self.progress.notify();
    }

    /// A user read an unhydrated region: queue it for early hydration.
    pub fn hint(&self, r: u64) {
        let mut hints = self.hints.lock();
        if hints.len() < MAX_HINTS {
            hints.push_back(r);
        }
    }

    fn pop_hint(&self) -> Option<u64> {
        self.hints.lock().pop_front()
    }

    pub fn is_failed(&self, r: u64) -> bool {
        self.has_failed.load(Ordering::Acquire) && self.failed.lock().contains(&r)
    }

    pub fn mark_failed(&self, r: u64) {
        self.failed.lock().insert(r);
        self.has_failed.store(true, Ordering::Release);
    }

    pub fn failed_regions(&self) -> Vec<u64> {
        self.failed.lock().iter().copied().collect()
    }

    /// Failed regions for which `keep` holds; `None` if no region ever failed.
    fn count_failed(&self, keep: impl Fn(u64) -> bool) -> Option<u64> {
        if !self.has_failed.load(Ordering::Acquire) {
            return None;
        }
        Some(self.failed.lock().iter().filter(|r| keep(**r)).count() as u64)
    }

    /// How long to wait before the next copy at `rate` bytes/s; `None`: copy now.
    fn rate_wait(&self, rate: u64) -> Option<Duration> {
        if rate == 0 {
            return None;
        }
        let mut rl = self.rate.lock();
        rl.refill(rate);
        (rl.tokens < 0.0).then(|| Duration::from_secs_f64(-rl.tokens / rate as f64))
    }

    /// Charges a copy of `bytes` to the rate limit (never waits).
    pub(super) fn charge_rate(&self, bytes: u64, rate: u64) {
        if rate == 0 {
            return;
        }
        let mut rl = self.rate.lock();
        rl.refill(rate);
        rl.tokens -= bytes as f64;
    }

    /// The hydration rate over the last second or more (for `status`).
    pub fn measured_rate(&self) -> u64 {
        let bytes = self.bytes_hydrated.load(Ordering::Relaxed);
        let mut s = self.rate_sample.lock();
        let dt = s.0.elapsed().as_secs_f64();
        if dt >= 1.0 {
            s.2 = ((bytes - s.1) as f64 / dt) as u64;
            *s = (Instant::now(), bytes, s.2);
        }
        s.2
    }
}

impl Engine {
    /// A hydration thread: picks and copies batches until hydration stops.
    pub(super) fn hydration_worker(&self) {
        let mut source_backoff = SOURCE_BACKOFF_FIRST;
        while !self.hydrator.stopping() {
            let knobs = self.knobs();
            if !self.ready_to_copy(&knobs) {
                continue;
            }
            let mut batch = knobs.batch_size.max(1).min(knobs.threshold);
            if !self.config.full_batches_under_load && self.user_io.in_service() > 0 {
                batch = batch.min((BUSY_BATCH_BYTES / self.geo.region_size).max(1));
            }
            // Reserve room under the threshold before picking regions.
            if !self.hydrator.try_begin_hydrations(batch, knobs.threshold) {
                self.hydrator.progress.wait_until_blocking(
                    || {
                        self.hydrator.stopping()
                            || self.hydrator.in_flight() + batch <= self.knobs().threshold
                    },
                    Duration::from_millis(200),
                );
                continue;
            }
            let reserved = batch;
            self.hydrator.scans.fetch_add(1, Ordering::Relaxed);
            let outcome = self.hydrate_next_batch(reserved);
            self.hydrator.end_hydrations(reserved);
            match outcome {
                Batch::Copied => {
                    self.hydrator
                        .dest_write_failures
                        .store(0, Ordering::Release);
                    source_backoff = SOURCE_BACKOFF_FIRST;
                }
                Batch::NothingToPick => {
                    self.map.check_fully_hydrated();
                    // Everything left is locked by writers (which hydrate it) or failed: wait
                    // until a writer makes progress.
                    let hydrated = self.map.md().nr_hydrated();
                    self.hydrator.progress.wait_until_blocking(
                        || self.hydrator.stopping() || self.map.md().nr_hydrated() != hydrated,
                        Duration::from_millis(500),
                    );
                }
                Batch::WriteFailed(e) => self.after_dest_write_failure(&e),
                Batch::SourceDown(e) => {
                    log::warn!(
                        "hydration paused: the source is out of reach: {e}; \
                         trying again in {source_backoff:?} or later"
                    );
                    // Waited for even when the source says its link is up (a server that
                    // refuses reads on a connection it keeps open): never a busy loop.
                    self.wait_for_source(source_backoff);
                    source_backoff = (source_backoff * 2).min(SOURCE_BACKOFF_MAX);
                }
            }
        }
    }

    /// Waits while there is nothing to do (hydration off, degraded, complete, or only failed
    /// regions left) and for the rate limit. True when a batch may be picked now; false to
    /// look again.
    fn ready_to_copy(&self, knobs: &Knobs) -> bool {
        let runnable = knobs.hydration_enabled
            && knobs.threshold > 0
            && self.committer.mode() == Mode::ReadWrite
            && !self.map.is_fully_hydrated();
        if !runnable {
            self.hydrator.wake.wait_until_blocking(
                || self.hydrator.stopping() || self.hydration_runnable(),
                Duration::from_millis(500),
            );
            return false;
        }
        // First (a cheap look, every poll while users are busy), and again right before the
        // batch is picked.
        if !self.users_idle(knobs) {
            return false;
        }
        if self.source.link_down().is_some() {
            // A remote source that is away: pause until it is back (no region is picked, so
            // none is marked failed for it).
            self.wait_for_source(Duration::ZERO);
            return false;
        }
        if self.only_failed_regions_left() {
            // Nothing to copy: wait for a change instead of rescanning the bitmap.
            let hydrated = self.map.md().nr_hydrated();
            self.hydrator.progress.wait_until_blocking(
                || {
                    self.hydrator.stopping()
                        || self.map.md().nr_hydrated() != hydrated
                        || self.knobs() != *knobs
                },
                Duration::from_secs(5),
            );
            return false;
        }
        // The rate limit is waited for before any region is locked, then (with the `idle`
        // policy) a moment without user requests, right before the batch is picked.
        self.wait_for_rate() && self.users_idle(knobs)
    }

    /// With `--hydrate-when idle`: true when users have no request in service; otherwise
    /// waits a poll interval (holding no region lock) and returns false to look again.
    fn users_idle(&self, knobs: &Knobs) -> bool {
        if knobs.hydrate_when != HydrateWhen::Idle || self.user_io.in_service() == 0 {
            return true;
        }
        let t = Instant::now();
        self.hydrator.wake.wait_until_blocking(
            || self.hydrator.stopping() || self.knobs().hydrate_when != HydrateWhen::Idle,
            IDLE_POLL,
        );
        self.hydrator
            .idle_wait_us
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        false
    }

    /// Waits, holding no region lock, for a source out of reach: at least `at_least`, then on
    /// while the source reports its link down (polling; at most a few seconds past
    /// `at_least` per call). Ends early when hydration stops.
    fn wait_for_source(&self, at_least: Duration) {
        let start = Instant::now();
        let (min_end, max_end) = (start + at_least, start + at_least + SOURCE_POLL_MAX);
        loop {
            if self.hydrator.stopping() {
                return;
            }
            let now = Instant::now();
            if now >= max_end || (now >= min_end && self.source.link_down().is_none()) {
                return;
            }
            let until = if now < min_end { min_end } else { max_end };
            self.hydrator
                .wake
                .wait_until_blocking(|| self.hydrator.stopping(), (until - now).min(SOURCE_POLL));
        }
    }

    /// Whether every region that is not hydrated is a failed one.
    fn only_failed_regions_left(&self) -> bool {
        let md = self.map.md();
        // Only failed regions that are still unhydrated count: a write or discard may have
        // hydrated a failed region since.
        match self.hydrator.count_failed(|r| !md.is_hydrated(r)) {
            None => false,
            Some(failed) => md.nr_hydrated() + failed >= self.geo.nr_regions,
        }
    }

    /// A background copy could not be written to the destination: back off (no region
    /// lock held), and after `DEST_WRITE_RETRIES` failures in a row degrade to read-only.
    fn after_dest_write_failure(&self, e: &str) {
        let n = self
            .hydrator
            .dest_write_failures
            .fetch_add(1, Ordering::AcqRel)
            + 1;
        if n >= DEST_WRITE_RETRIES {
            self.committer.degrade(
                Mode::ReadOnly,
                &format!("background hydration: {n} destination writes failed in a row: {e}"),
            );
            return;
        }
        let backoff = DEST_WRITE_BACKOFF * (1 << (n - 1));
        self.hydrator
            .wake
            .wait_until_blocking(|| self.hydrator.stopping(), backoff);
    }

    fn hydration_runnable(&self) -> bool {
        let k = self.knobs();
        k.hydration_enabled
            && k.threshold > 0
            && self.committer.mode() == Mode::ReadWrite
            && !self.map.is_fully_hydrated()
    }

    /// Picks up to `max` contiguous unhydrated, unlocked regions (hints first) and copies them.
    fn hydrate_next_batch(&self, max: u64) -> Batch {
        let nr = self.geo.nr_regions;
        let mut first = None;
        while let Some(r) = self.hydrator.pop_hint() {
            if r < nr && !self.map.md().is_hydrated(r) && !self.hydrator.is_failed(r) {
                first = Some(r);
                break;
            }
        }
        let mut prefetching = false;
        if first.is_none() {
            // Then the prefetch list (`--prefetch`), ahead of the sweep.
            first = self
                .prefetch
                .next(|r| r < nr && !self.map.md().is_hydrated(r) && !self.hydrator.is_failed(r));
            prefetching = first.is_some();
        }
        let mut guards = Vec::new();
        if let Some(r) = first {
            if let Some(g) = self.locks.try_lock(r) {
                guards.push(g);
            }
        }
        // A prefetched region a writer holds is the writer's to hydrate: sweep instead.
        prefetching &= !guards.is_empty();
        if guards.is_empty() {
            let mut cursor = self.hydrator.cursor.lock();
            let start = *cursor;
            // Scan [start, nr) then wrap to [0, start).
            for (from, to) in [(start, nr), (0, start)] {
                let mut r = from;
                while let Some(n) = self.map.md().next_unhydrated(r).filter(|n| *n < to) {
                    if !self.hydrator.is_failed(n) {
                        if let Some(g) = self.locks.try_lock(n) {
                            guards.push(g);
                            *cursor = (n + 1) % nr;
                            break;
                        }
                    }
                    r = n + 1;
                }
                if !guards.is_empty() {
                    break;
                }
            }
            if guards.is_empty() {
                return Batch::NothingToPick;
            }
        }
        // Extend to contiguous regions (a prefetch batch only over the list's next regions:
        // what was read comes first, not its neighbours).
        let head = guards[0].region();
        while (guards.len() as u64) < max {
            let r = head + guards.len() as u64;
            if r >= nr || self.map.md().is_hydrated(r) || self.hydrator.is_failed(r) {
                break;
            }
            if prefetching && !self.prefetch.take_if_next(r) {
                break;
            }
            match self.locks.try_lock(r) {
                Some(g) => guards.push(g),
                None => break,
            }
        }
        // Re-check under the locks: a writer may have hydrated the head meanwhile.
        while guards
            .first()
            .is_some_and(|g| self.map.md().is_hydrated(g.region()))
        {
            guards.remove(0);
        }
        if let Some(pos) = guards
            .iter()
            .position(|g| self.map.md().is_hydrated(g.region()))
        {
            guards.truncate(pos);
        }
        let Some(head) = guards.first().map(|g| g.region()) else {
            return Batch::Copied;
        };
        let count = guards.len() as u64;
        let outcome = self.hydrate_regions(head, count);
        drop(guards);
        outcome
    }

    /// Waits, holding no region lock, until the rate limit allows another copy. Returns
    /// false when hydration is stopping. The wait is cut into short steps so that a changed
    /// `--rate` takes effect at once.
    fn wait_for_rate(&self) -> bool {
        loop {
            if self.hydrator.stopping() {
                return false;
            }
            let rate = self.knobs().rate_bytes_per_sec;
            let Some(wait) = self.hydrator.rate_wait(rate) else {
                return true;
            };
            let rate_changed = || self.knobs().rate_bytes_per_sec != rate;
            self.hydrator.wake.wait_until_blocking(
                || self.hydrator.stopping() || rate_changed(),
                wait.min(Duration::from_millis(500)),
            );
        }
    }
}

/// What one background batch did.
pub(super) enum Batch {
    /// Copied (or found nothing left to copy in what it picked, or isolated failed regions).
    Copied,
    /// No unhydrated region could be picked: all locked by writers, or failed.
    NothingToPick,
    /// The destination write failed.
    WriteFailed(String),
    /// The source is out of reach (a remote source whose connections are down, or that did
    /// not answer in time): nothing was marked failed; hydration waits for it.
    SourceDown(String),
}
