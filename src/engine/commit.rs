//! Flush and commit coordination (group commit).
//!
//! One commit thread runs every commit. A commit is: freeze the dirty bitmap blocks (phase 1),
//! write them to their shadow slots *while* flushing the destination, then write the
//! superblock (phase 2). The metadata API only accepts phase 2 with a `DestinationFlushed`
//! token, and that token is made by a flush issued after the freeze.
//!
//! Epochs: `started` counts commits that have begun, `completed` the last finished epoch. A
//! FLUSH arriving when `started == s` waits for epoch `s + 1`, which begins (and so flushes the
//! destination) after the FLUSH arrived; that flush covers every write completed before the
//! FLUSH on any queue (seed 003). Concurrent FLUSH and FUA requests from all queues share the
//! same epoch, and an empty FLUSH never causes a second destination flush (seed 002).
//!
//! Failure is sticky (seed 004): a failed destination flush or metadata write switches the
//! engine to read-only (or fail) mode before the epoch is marked complete, and in those modes
//! every FLUSH and FUA reports EIO, so no later FLUSH can claim lost data is safe.

use super::{DataPath, Engine, IoError, Mode};
use crate::metadata;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Default)]
pub(super) struct CommitState {
    pub started: u64,
    pub completed: u64,
    pub requested: u64,
    pub last_commit: Option<Instant>,
    pub shutdown: bool,
}

impl Engine {
    /// Asks for a commit that starts after now; returns the epoch to wait for.
    pub(super) fn request_commit(&self) -> u64 {
        let mut st = self.commit_state.lock();
        let epoch = st.started + 1;
        // BUG (test only): join the commit in flight, which may have flushed the destination
        // before this FLUSH arrived, or none at all.
        #[cfg(test)]
        let epoch = if self.config.bugs.flush_joins_old_commit {
            st.started
        } else {
            epoch
        };
        st.requested = st.requested.max(epoch);
        self.commit_cv.notify_one();
        epoch
    }

    /// FLUSH: returns once a destination flush that started after this call has completed
    /// and every region bit set before this call is durable, or EIO if the engine is not (or
    /// no longer) in read-write mode.
    ///
    /// Fast path: when no bit is waiting for a commit (nothing dirty and no commit in flight,
    /// checked under the commit lock, so no freeze can slip in), only the destination needs a
    /// flush, issued right here on the caller's data path. Otherwise the FLUSH joins the next
    /// group commit.
    pub async fn flush<P: DataPath>(&self, p: &P) -> Result<(), IoError> {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        if self.mode() != Mode::ReadWrite {
            return Err(IoError::eio(
                "the device is not in read-write mode; FLUSH refused",
            ));
        }
        let nothing_to_commit = {
            let st = self.commit_state.lock();
            st.started == st.completed && !self.md.is_dirty()
        };
        // BUG (test only): take the fast path even when bits wait for a commit.
        #[cfg(test)]
        let nothing_to_commit = nothing_to_commit || self.config.bugs.fast_flush_ignores_dirty;
        if !nothing_to_commit {
            return self.commit_flush_inner().await;
        }
        let ticket = self.flushes.begin();
        let res = p.flush_dest().await;
        if let Err(e) = &res {
            // Never retried: a later flush may "succeed" without the lost data (seed 004).
            // Degraded before the sequencer records the end of this flush.
            self.dest_flush_failed.store(true, Ordering::Release);
            self.degrade(Mode::ReadOnly, &format!("destination flush failed: {e}"));
        }
        let horizon = self
            .flushes
            .end(ticket, res.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        // Trust this flush only once every flush begun before now has ended without failure.
        let settled = self.flushes.settle(horizon).await;
        if let Err(e) = res {
            // Let the commit thread persist the mode before answering.
            let epoch = self.request_commit();
            self.commit_done
                .wait_until(|| self.commit_state.lock().completed >= epoch)
                .await;
            return Err(IoError::eio(format!("destination flush failed: {e}")));
        }
        if let Err(e) = settled {
            return Err(IoError::eio(format!(
                "a concurrent destination flush failed ({e}); FLUSH refused"
            )));
        }
        match self.mode() {
            Mode::ReadWrite => Ok(()),
            _ => Err(IoError::eio(
                "the device left read-write mode during the FLUSH",
            )),
        }
    }

    /// FLUSH through a group commit (always a commit-thread destination flush).
    pub async fn commit_flush(&self) -> Result<(), IoError> {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        if self.mode() != Mode::ReadWrite {
            return Err(IoError::eio(
                "the device is not in read-write mode; FLUSH refused",
            ));
        }
        self.commit_flush_inner().await
    }

    async fn commit_flush_inner(&self) -> Result<(), IoError> {
        let epoch = self.request_commit();
        self.commit_done
            .wait_until(|| self.commit_state.lock().completed >= epoch)
            .await;
        match self.mode() {
            Mode::ReadWrite => Ok(()),
            _ => Err(IoError::eio(
                "commit failed; the device left read-write mode",
            )),
        }
    }

    /// Blocking FLUSH for engine threads and tools (never called on a queue thread).
    pub fn flush_blocking(&self) -> Result<(), IoError> {
        futures_lite::future::block_on(self.commit_flush())
    }

    pub(super) fn commit_thread(&self) {
        loop {
            let epoch = {
                let mut st = self.commit_state.lock();
                loop {
                    if st.requested > st.started || self.mode_unpersisted.load(Ordering::Acquire) {
                        break;
                    }
                    let due = st
                        .last_commit
                        .is_none_or(|t| t.elapsed() >= self.config.commit_period);
                    if self.md.is_dirty() && due && self.mode() == Mode::ReadWrite {
                        break;
                    }
                    if st.shutdown {
                        return;
                    }
                    let wait = self.config.commit_period.min(Duration::from_millis(200));
                    self.commit_cv.wait_for(&mut st, wait);
                }
                st.started += 1;
                st.started
            };
            let result = self.commit_once();
            if let Err(e) = result {
                self.degrade(Mode::ReadOnly, &format!("commit failed: {e}"));
            }
            if self.mode_unpersisted.swap(false, Ordering::AcqRel) {
                self.revert_bitmap();
                self.persist_mode();
            }
            {
                let mut st = self.commit_state.lock();
                st.completed = epoch;
                st.last_commit = Some(Instant::now());
            }
            self.commit_done.notify();
        }
    }

    /// One commit: destination flush always; the two metadata phases when anything changed.
    fn commit_once(&self) -> Result<(), String> {
        if self.mode() != Mode::ReadWrite {
            return Err("device is not in read-write mode".into());
        }
        if !self.md.is_dirty() {
            return self.sequenced_flush(|| self.dest.flush());
        }
        let frozen = self
            .md
            .begin_commit()
            .map_err(|e| format!("metadata phase 1: {e}"))?;
        #[cfg(test)]
        if self.config.bugs.commit_before_dest_flush {
            return self.commit_before_destination_flush(frozen);
        }
        // The shadow writes and the destination flush are independent: overlap them.
        let (shadows, dest) = std::thread::scope(|s| {
            let shadows = s.spawn(|| frozen.write_shadows());
            let dest =
                self.sequenced_flush(|| metadata::flush_destination(self.dest.as_ref(), &frozen));
            (shadows.join(), dest)
        });
        let dest = dest?;
        let shadows = shadows
            .map_err(|_| "metadata shadow writer panicked".to_string())?
            .map_err(|e| format!("metadata shadow write: {e}"))?;
        self.md
            .finish_commit(frozen, shadows, dest)
            .map_err(|e| format!("metadata superblock write: {e}"))?;
        self.stats
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Everything hydrated and now committed: the bitmap is no longer needed in memory.
        if self.is_fully_hydrated() && self.md.release_bitmap_if_complete() {
            log::info!("hydration complete and committed: in-core bitmap released");
        }
        Ok(())
    }

    /// A destination flush on the commit thread, through the flush sequencer: `Ok` only if
    /// it and every flush begun before it ended succeeded (and none ever failed).
    fn sequenced_flush<T>(&self, flush: impl FnOnce() -> std::io::Result<T>) -> Result<T, String> {
        let ticket = self.flushes.begin();
        let res = flush().map_err(|e| format!("destination flush: {e}"));
        if let Err(e) = &res {
            self.dest_flush_failed.store(true, Ordering::Release);
            self.degrade(Mode::ReadOnly, e);
        }
        let horizon = self
            .flushes
            .end(ticket, res.as_ref().map(|_| ()).map_err(|e| e.clone()));
        let value = res?;
        self.flushes
            .settle_blocking(horizon)
            .map_err(|e| format!("a concurrent destination flush failed: {e}"))?;
        Ok(value)
    }

    /// BUG (test only): commits the metadata first and flushes the destination afterwards.
    /// The metadata API refuses that order by type, so the `DestinationFlushed` token is
    /// obtained by flushing a dummy device; the crash oracle must catch the result.
    #[cfg(test)]
    fn commit_before_destination_flush(
        &self,
        frozen: metadata::FrozenCommit,
    ) -> Result<(), String> {
        let not_the_destination = crate::io::mem::MemDev::new("not-the-destination", 4096);
        let shadows = frozen.write_shadows().map_err(|e| e.to_string())?;
        let token = metadata::flush_destination(&not_the_destination, &frozen)
            .map_err(|e| e.to_string())?;
        self.md
            .finish_commit(frozen, shadows, token)
            .map_err(|e| e.to_string())?;
        self.dest.flush().map_err(|e| e.to_string())?;
        self.stats
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Switches to a degraded mode (never back) in memory, at once, so that no later FLUSH
    /// can succeed; the commit thread persists it (`persist_mode`).
    pub(super) fn degrade(&self, mode: Mode, reason: &str) {
        let mut cur = self.mode.lock();
        if cur.0 >= mode {
            return;
        }
        log::error!("switching to {} mode: {reason}", mode.name());
        *cur = (mode, reason.to_string());
        // No bit may be set from now on (a write in flight that would set one fails); the
        // commit thread then reverts the bitmap to the committed one.
        self.md.seal();
        self.mode_unpersisted.store(true, Ordering::Release);
        self.commit_cv.notify_one();
    }

    /// After a failure: back to the committed bitmap, sealed (commit thread only: it must not
    /// race a commit). If the committed bitmap cannot be read back, fail mode.
    fn revert_bitmap(&self) {
        if self.mode() == Mode::ReadWrite || self.bitmap_reverted.load(Ordering::Acquire) {
            return;
        }
        if !self.dest_flush_failed.load(Ordering::Acquire) {
            // No destination flush failed (a metadata write, or hydration writes, did): the
            // destination holds what the in-core bits say; they stay, sealed by `degrade`.
            self.bitmap_reverted.store(true, Ordering::Release);
            self.commit_done.notify();
            return;
        }
        match self.md.revert_to_committed() {
            Ok(n) => {
                log::warn!(
                    "read-only: back to the committed bitmap ({n} regions hydrated); regions \
                     hydrated since the last commit are read from the source again"
                );
                let _g = self.fully_hydrated_lock.lock();
                self.fully_hydrated
                    .store(n == self.geo.nr_regions, Ordering::Release);
                self.bitmap_reverted.store(true, Ordering::Release);
            }
            Err(e) => {
                let reason = format!(
                    "{}; reloading the committed bitmap failed: {e}",
                    self.mode.lock().1
                );
                log::error!("switching to fail mode: {reason}");
                *self.mode.lock() = (Mode::Fail, reason);
            }
        }
        self.bitmap_reverted.store(true, Ordering::Release);
        // Reads and writes waiting for the committed view go on now, before the mode is
        // written to the metadata (which may be slow or hang on a failing device).
        self.commit_done.notify();
    }

    /// Records the current mode in the metadata (commit thread only: it must not race a
    /// commit). If even that fails, the engine goes to fail mode.
    fn persist_mode(&self) {
        let (mode, reason) = self.mode.lock().clone();
        let md_mode = match mode {
            Mode::ReadWrite => metadata::MetadataMode::ReadWrite,
            Mode::ReadOnly => metadata::MetadataMode::ReadOnly,
            Mode::Fail => metadata::MetadataMode::Fail,
        };
        if let Err(e) = self.md.persist_mode(md_mode, &reason) {
            let reason = format!("{reason}; persisting the mode failed too: {e}");
            log::error!("switching to fail mode: {reason}");
            *self.mode.lock() = (Mode::Fail, reason);
        }
    }
}
