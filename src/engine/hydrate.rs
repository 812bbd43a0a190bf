//! Background hydration: copies unhydrated regions from the source to the destination.
//!
//! Better than dm-clone's sweep:
//! - it never pauses for user I/O (it is bounded by `threshold` regions in flight, which
//!   counts write-triggered hydrations too, and by an optional byte rate limit);
//! - regions that users read are queued as hints and hydrated first;
//! - a source read error is retried a bounded number of times with backoff; then the region is
//!   marked failed (reads of it return EIO), reported in the status, and the sweep goes on.
//!
//! - a destination write that fails is retried with exponential backoff; after
//!   `DEST_WRITE_RETRIES` failures in a row the clone degrades to read-only (it never spins);
//! - once only failed regions are left, the sweep stops scanning the bitmap until something
//!   changes (a region gets hydrated by a write or discard, the knobs change, a restart).
//!
//! Invariants: a region is copied only while its region lock is held and only if its bit is
//! clear under the lock; the bit is set after the destination write completed and before the
//! lock is released (see `regions`). No region lock is held while waiting for the rate limit
//! or a backoff: a user write to those regions never waits for them.

use super::budget::COPY_CHUNK;
use super::{Engine, Mode};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Token bucket for the hydration rate limit: a copy is charged after it was made, and the
/// next batch is picked only once the bucket is out of debt (`wait_for_rate`).
pub(super) struct RateLimiter {
    pub tokens: f64,
    pub last: Instant,
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

/// Destination write failures in a row before background hydration degrades the clone.
const DEST_WRITE_RETRIES: u32 = 5;
/// First backoff after a failed destination write; doubles with each further failure.
const DEST_WRITE_BACKOFF: Duration = Duration::from_millis(20);

impl Engine {
    pub(super) fn hydration_worker(&self) {
        loop {
            if self.hydrate_stop.load(Ordering::Acquire) {
                return;
            }
            let knobs = self.knobs();
            let runnable = knobs.hydration_enabled
                && knobs.threshold > 0
                && self.mode() == Mode::ReadWrite
                && !self.fully_hydrated.load(Ordering::Acquire);
            if !runnable {
                self.hydrate_wake.wait_until_blocking(
                    || self.hydrate_stop.load(Ordering::Acquire) || self.hydration_runnable(),
                    Duration::from_millis(500),
                );
                continue;
            }
            if self.only_failed_regions_left() {
                // Nothing to copy: wait for a change instead of rescanning the bitmap.
                let hydrated = self.md.nr_hydrated();
                self.hydrate_wake.wait_until_blocking(
                    || {
                        self.hydrate_stop.load(Ordering::Acquire)
                            || self.md.nr_hydrated() != hydrated
                            || self.knobs() != knobs
                    },
                    Duration::from_secs(5),
                );
                continue;
            }
            // The rate limit is waited for before any region is locked.
            if !self.wait_for_rate() {
                continue;
            }
            let batch = knobs.batch_size.max(1).min(knobs.threshold);
            // Reserve budget before picking regions.
            let reserved = loop {
                let cur = self.hydrations_in_flight.load(Ordering::Acquire);
                if cur + batch > knobs.threshold {
                    break None;
                }
                if self
                    .hydrations_in_flight
                    .compare_exchange(cur, cur + batch, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    break Some(batch);
                }
            };
            let Some(reserved) = reserved else {
                self.hydrate_wake.wait_until_blocking(
                    || {
                        self.hydrate_stop.load(Ordering::Acquire)
                            || self.hydrations_in_flight.load(Ordering::Acquire) + batch
                                <= self.knobs().threshold
                    },
                    Duration::from_millis(200),
                );
                continue;
            };
            self.stats.hydration_scans.fetch_add(1, Ordering::Relaxed);
            let outcome = self.hydrate_next_batch(reserved);
            self.hydrations_in_flight
                .fetch_sub(reserved, Ordering::AcqRel);
            self.hydrate_wake.notify();
            match outcome {
                Batch::Copied => self.dest_write_failures.store(0, Ordering::Release),
                Batch::NothingToPick => {
                    self.check_fully_hydrated();
                    // Everything left is locked by writers (which hydrate it) or failed: wait
                    // until a writer makes progress.
                    let hydrated = self.md.nr_hydrated();
                    self.hydrate_wake.wait_until_blocking(
                        || {
                            self.hydrate_stop.load(Ordering::Acquire)
                                || self.md.nr_hydrated() != hydrated
                        },
                        Duration::from_millis(500),
                    );
                }
                Batch::WriteFailed(e) => self.after_dest_write_failure(&e),
            }
        }
    }

    /// Whether every region that is not hydrated is a failed one.
    fn only_failed_regions_left(&self) -> bool {
        if !self.has_failed.load(Ordering::Acquire) {
            return false;
        }
        // Only failed regions that are still unhydrated count: a write or discard may have
        // hydrated a failed region since.
        let failed = self
            .failed
            .lock()
            .iter()
            .filter(|r| !self.md.is_hydrated(**r))
            .count() as u64;
        self.md.nr_hydrated() + failed >= self.geo.nr_regions
    }

    /// A background copy could not be written to the destination: back off (no region
    /// lock held), and after `DEST_WRITE_RETRIES` failures in a row degrade to read-only.
    fn after_dest_write_failure(&self, e: &str) {
        let n = self.dest_write_failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= DEST_WRITE_RETRIES {
            self.degrade(
                Mode::ReadOnly,
                &format!("background hydration: {n} destination writes failed in a row: {e}"),
            );
            return;
        }
        let backoff = DEST_WRITE_BACKOFF * (1 << (n - 1));
        self.hydrate_wake
            .wait_until_blocking(|| self.hydrate_stop.load(Ordering::Acquire), backoff);
    }

    fn hydration_runnable(&self) -> bool {
        let k = self.knobs();
        k.hydration_enabled
            && k.threshold > 0
            && self.mode() == Mode::ReadWrite
            && !self.fully_hydrated.load(Ordering::Acquire)
    }

    /// Picks up to `max` contiguous unhydrated, unlocked regions (hints first) and copies them.
    fn hydrate_next_batch(&self, max: u64) -> Batch {
        let nr = self.geo.nr_regions;
        let mut first = None;
        while let Some(r) = self.hints.lock().pop_front() {
            if r < nr && !self.md.is_hydrated(r) && !self.is_failed(r) {
                first = Some(r);
                break;
            }
        }
        let mut guards = Vec::new();
        if let Some(r) = first {
            if let Some(g) = self.locks.try_lock(r) {
                guards.push(g);
            }
        }
        if guards.is_empty() {
            let mut cursor = self.cursor.lock();
            let start = *cursor;
            // Scan [start, nr) then wrap to [0, start).
            for (from, to) in [(start, nr), (0, start)] {
                let mut r = from;
                while let Some(n) = self.md.next_unhydrated(r).filter(|n| *n < to) {
                    if !self.is_failed(n) {
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
        // Extend to contiguous regions.
        let head = guards[0].region();
        while (guards.len() as u64) < max {
            let r = head + guards.len() as u64;
            if r >= nr || self.md.is_hydrated(r) || self.is_failed(r) {
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
            .is_some_and(|g| self.md.is_hydrated(g.region()))
        {
            guards.remove(0);
        }
        if let Some(pos) = guards.iter().position(|g| self.md.is_hydrated(g.region())) {
            guards.truncate(pos);
        }
        let Some(head) = guards.first().map(|g| g.region()) else {
            return Batch::Copied;
        };
        let count = guards.len() as u64;
        let outcome = self.copy_regions(head, count);
        drop(guards);
        outcome
    }

    /// Copies regions `[head, head+count)` (locks held by the caller); on a persistent
    /// source error splits the batch to isolate failing regions.
    fn copy_regions(&self, head: u64, count: u64) -> Batch {
        let (off, len) = self.geo.regions_span(head, count);
        self.charge_rate(len);
        #[cfg(test)]
        if self.config.bugs.bit_before_copy {
            // BUG (test only): the bits become durable before the copy is written. The wait is
            // bounded: at shutdown the commit thread may already be gone.
            let _ = self.md.set_range_hydrated(head, count);
            let epoch = self.request_commit();
            self.commit_done.wait_until_blocking(
                || self.commit_state.lock().completed >= epoch,
                Duration::from_millis(200),
            );
        }
        // A chunk at a time from the copy budget (a batch of large regions never sits in
        // memory whole).
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(COPY_CHUNK as u64) as usize;
            let mut buf = self.copy_budget.take_blocking(n);
            let mut attempt = 0;
            let read = loop {
                match self.source.read_at(&mut buf, pos) {
                    Ok(()) => break Ok(()),
                    Err(e) if count > 1 => break Err(e),
                    Err(e) => {
                        if attempt >= self.config.source_retries {
                            break Err(e);
                        }
                        std::thread::sleep(self.config.retry_backoff * (1 << attempt.min(10)));
                        attempt += 1;
                    }
                }
            };
            if let Err(e) = read {
                drop(buf);
                if count > 1 {
                    let mut outcome = Batch::Copied;
                    for r in head..head + count {
                        if let Batch::WriteFailed(e) = self.copy_regions(r, 1) {
                            outcome = Batch::WriteFailed(e);
                        }
                    }
                    return outcome;
                }
                log::error!("hydration of region {head} failed: {e}; marking it failed");
                self.failed.lock().insert(head);
                self.has_failed.store(true, Ordering::Release);
                return Batch::Copied;
            }
            if self.mode() != Mode::ReadWrite {
                return Batch::Copied;
            }
            if let Err(e) = self.dest.write_at(&buf, pos) {
                log::error!(
                    "hydration write of regions {head}..{} failed: {e}",
                    head + count
                );
                self.stats.dest_write_errors.fetch_add(1, Ordering::Relaxed);
                return Batch::WriteFailed(e.to_string());
            }
            pos += n as u64;
        }
        // The copy completed: only now may the bits be set.
        if let Err(e) = self.md.set_range_hydrated(head, count) {
            log::error!("recording regions {head}..{} hydrated: {e}", head + count);
            return Batch::Copied;
        }
        self.stats.bytes_hydrated.fetch_add(len, Ordering::Relaxed);
        self.stats
            .regions_hydrated_bg
            .fetch_add(count, Ordering::Relaxed);
        self.check_fully_hydrated();
        Batch::Copied
    }

    /// Waits, holding no region lock, until the rate limit allows another copy. Returns
    /// false when hydration is stopping. The wait is cut into short steps so that a changed
    /// `--rate` takes effect at once.
    fn wait_for_rate(&self) -> bool {
        loop {
            if self.hydrate_stop.load(Ordering::Acquire) {
                return false;
            }
            let rate = self.knobs().rate_bytes_per_sec;
            if rate == 0 {
                return true;
            }
            let wait = {
                let mut rl = self.rate.lock();
                rl.refill(rate);
                if rl.tokens >= 0.0 {
                    return true;
                }
                Duration::from_secs_f64(-rl.tokens / rate as f64)
            };
            let rate_changed = || self.knobs().rate_bytes_per_sec != rate;
            self.hydrate_wake.wait_until_blocking(
                || self.hydrate_stop.load(Ordering::Acquire) || rate_changed(),
                wait.min(Duration::from_millis(500)),
            );
        }
    }

    /// Charges a copy of `bytes` to the rate limit (never waits).
    fn charge_rate(&self, bytes: u64) {
        let rate = self.knobs().rate_bytes_per_sec;
        if rate == 0 {
            return;
        }
        let mut rl = self.rate.lock();
        rl.refill(rate);
        rl.tokens -= bytes as f64;
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
}
