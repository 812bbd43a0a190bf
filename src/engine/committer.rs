//! The committer: the engine's mode, flush sequencing, and the commit thread (group commit).
//!
//! One commit thread runs every commit. A commit is: freeze the dirty bitmap blocks (phase 1),
//! write them to their shadow slots *while* flushing the destination, then write the
//! superblock (phase 2). The metadata API only accepts phase 2 with a `DestinationFlushed`
//! token, and that token is made by a flush issued after the freeze: a region is committed
//! hydrated only after a destination flush that covers its data.
//!
//! Epochs: `started` counts commits that have begun, `completed` the last finished epoch. A
//! FLUSH arriving when `started == s` waits for epoch `s + 1`, which begins (and so flushes the
//! destination) after the FLUSH arrived; that flush covers every write completed before the
//! FLUSH on any queue, not only on the FLUSH's own. Concurrent FLUSH and FUA requests from all
//! queues share the same epoch, and an empty FLUSH never causes a second destination flush.
//!
//! Failure is sticky: a failed destination flush or metadata write switches the engine to
//! read-only (or fail) mode before the epoch is marked complete, and in those modes every
//! FLUSH and FUA reports EIO, so no later FLUSH can claim that lost data is safe. Every
//! destination flush goes through one [`FlushSequencer`], so a flush that succeeds after
//! another one failed is never trusted either.

use super::config::Mode;
use super::error::{CommitError, IoError};
use super::flush::{FlushFailed, FlushSequencer};
use super::view::RegionMap;
use super::wake::{Kickers, Signal};
use super::DataPath;
use crate::io::BlockDev;
use crate::metadata::{self, Metadata};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Default)]
struct CommitState {
    started: u64,
    completed: u64,
    requested: u64,
    last_commit: Option<Instant>,
    shutdown: bool,
}

pub(crate) struct Committer {
    md: Arc<Metadata>,
    dest: Arc<dyn BlockDev>,
    map: Arc<RegionMap>,
    commit_period: Duration,
    #[cfg(test)]
    bugs: super::config::Bugs,
    state: Mutex<CommitState>,
    cv: Condvar,
    /// Notified when an epoch completes and when the map is settled after a failure.
    done: Signal,
    mode: Mutex<(Mode, String)>,
    /// The mode changed and the commit thread has not recorded it in the metadata yet.
    mode_unpersisted: AtomicBool,
    flushes: FlushSequencer,
    /// A destination flush failed: the destination may have lost writes made since the last
    /// commit, so the bits set since then cannot be trusted.
    dest_flush_failed: AtomicBool,
    commits: AtomicU64,
    flush_requests: AtomicU64,
    metrics: Arc<super::metrics::Metrics>,
}

impl Committer {
    pub fn new(
        md: Arc<Metadata>,
        dest: Arc<dyn BlockDev>,
        map: Arc<RegionMap>,
        config: &super::EngineConfig,
        mode: (Mode, String),
        kickers: &Arc<Kickers>,
        metrics: Arc<super::metrics::Metrics>,
    ) -> Committer {
        Committer {
            md,
            dest,
            map,
            commit_period: config.commit_period,
            #[cfg(test)]
            bugs: config.bugs,
            // The periodic commit runs a commit period after start, not at once.
            state: Mutex::new(CommitState {
                last_commit: Some(Instant::now()),
                ..CommitState::default()
            }),
            cv: Condvar::new(),
            done: Signal::new(kickers),
            mode: Mutex::new(mode),
            mode_unpersisted: AtomicBool::new(false),
            flushes: FlushSequencer::new(kickers),
            dest_flush_failed: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            flush_requests: AtomicU64::new(0),
            metrics,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode.lock().0
    }

    /// The mode the engine started in is not recorded in the metadata yet: the commit thread
    /// records it.
    pub(super) fn persist_start_mode(&self) {
        self.mode_unpersisted.store(true, Ordering::Release);
        self.cv.notify_one();
    }

    pub fn mode_and_reason(&self) -> (Mode, String) {
        self.mode.lock().clone()
    }

    /// Commits completed, and FLUSH requests seen (for `status`).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.commits.load(Ordering::Relaxed),
            self.flush_requests.load(Ordering::Relaxed),
        )
    }

    /// Asks for a commit that starts after now; returns the epoch to wait for.
    pub fn request_commit(&self) -> u64 {
        let mut st = self.state.lock();
        let epoch = st.started + 1;
        // BUG (test only): join the commit in flight, which may have flushed the destination
        // before this FLUSH arrived, or none at all.
        #[cfg(test)]
        let epoch = if self.bugs.flush_joins_old_commit {
            st.started
        } else {
            epoch
        };
        st.requested = st.requested.max(epoch);
        self.cv.notify_one();
        epoch
    }

    fn epoch_completed(&self, epoch: u64) -> bool {
        self.state.lock().completed >= epoch
    }

    async fn wait_epoch(&self, epoch: u64) {
        self.done.wait_until(|| self.epoch_completed(epoch)).await;
    }

    /// Waits at most `timeout` for `epoch` (engine threads; the commit thread may be gone).
    #[cfg(test)]
    pub fn wait_epoch_blocking(&self, epoch: u64, timeout: Duration) {
        self.done
            .wait_until_blocking(|| self.epoch_completed(epoch), timeout);
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
        self.flush_requests.fetch_add(1, Ordering::Relaxed);
        if self.mode() != Mode::ReadWrite {
            return Err(IoError::eio(
                "the device is not in read-write mode; FLUSH refused",
            ));
        }
        let nothing_to_commit = {
            let st = self.state.lock();
            st.started == st.completed && !self.md.is_dirty()
        };
        // BUG (test only): take the fast path even when bits wait for a commit.
        #[cfg(test)]
        let nothing_to_commit = nothing_to_commit || self.bugs.fast_flush_ignores_dirty;
        if !nothing_to_commit {
            return self.commit_flush_inner().await;
        }
        self.fast_flush(p).await
    }

    /// The FLUSH fast path: a destination flush on the caller's data path, trusted only once
    /// every destination flush begun before it has ended without failure.
    async fn fast_flush<P: DataPath>(&self, p: &P) -> Result<(), IoError> {
        let ticket = self.flushes.begin();
        let res = p.flush_dest().await;
        if let Err(e) = &res {
            // Never retried: a later flush may "succeed" without the lost data.
            // Degraded before the sequencer records the end of this flush.
            self.destination_flush_failed(&format!("destination flush failed: {e}"));
        }
        let horizon = self.flushes.end(
            ticket,
            res.as_ref()
                .map(|_| ())
                .map_err(|e| FlushFailed(e.to_string())),
        );
        let settled = self.flushes.settle(horizon).await;
        if let Err(e) = res {
            // Let the commit thread persist the mode before answering.
            let epoch = self.request_commit();
            self.wait_epoch(epoch).await;
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
        self.flush_requests.fetch_add(1, Ordering::Relaxed);
        if self.mode() != Mode::ReadWrite {
            return Err(IoError::eio(
                "the device is not in read-write mode; FLUSH refused",
            ));
        }
        self.commit_flush_inner().await
    }

    async fn commit_flush_inner(&self) -> Result<(), IoError> {
        let epoch = self.request_commit();
        self.wait_epoch(epoch).await;
        match self.mode() {
            Mode::ReadWrite => Ok(()),
            _ => Err(IoError::eio(
                "commit failed; the device left read-write mode",
            )),
        }
    }

    /// Right after a failure the in-core bitmap may still hold bits set since the last
    /// commit, whose data the failed flush may have lost; the commit thread settles the map
    /// (see `view`). Until it has, user I/O waits here (normally a few milliseconds).
    pub async fn await_settled_map(&self) {
        if self.mode() != Mode::ReadWrite && !self.map.is_settled() {
            self.done
                .wait_until(|| self.map.is_settled() || self.mode() == Mode::Fail)
                .await;
        }
    }

    /// Tells the commit thread to exit once no commit is requested.
    pub fn stop(&self) {
        self.state.lock().shutdown = true;
        self.cv.notify_all();
    }

    /// The commit thread. It keeps a second thread that flushes the destination while it
    /// writes a commit's bitmap blocks (see [`DestFlusher`]).
    pub fn run(&self) {
        let flusher = DestFlusher::default();
        std::thread::scope(|s| {
            let helper = std::thread::Builder::new()
                .name("ubc-dest-flush".into())
                .spawn_scoped(s, || flusher.serve(self.dest.as_ref()));
            let overlap = match helper {
                Ok(_) => Some(&flusher),
                Err(e) => {
                    log::warn!(
                        "cannot start the destination flush thread ({e}): commits flush the \
                         destination, then write the bitmap"
                    );
                    None
                }
            };
            // Shut the flusher down however the loop ends (a panic included): the scope
            // waits for it.
            let _stop = StopFlusher(&flusher);
            self.commit_loop(overlap);
        });
    }

    fn commit_loop(&self, flusher: Option<&DestFlusher>) {
        while let Some(epoch) = self.next_epoch() {
            let t = Instant::now();
            let res = self.commit_once(flusher);
            self.metrics.observe_commit(t.elapsed());
            if let Err(e) = res {
                self.degrade(Mode::ReadOnly, &format!("commit failed: {e}"));
            }
            if self.mode_unpersisted.swap(false, Ordering::AcqRel) {
                self.settle_map();
                self.persist_mode();
            }
            {
                let mut st = self.state.lock();
                st.completed = epoch;
                st.last_commit = Some(Instant::now());
            }
            self.done.notify();
        }
    }

    /// Waits until a commit is requested or due (or a mode change must be persisted) and
    /// starts its epoch; `None` at shutdown.
    fn next_epoch(&self) -> Option<u64> {
        let mut st = self.state.lock();
        loop {
            if st.requested > st.started || self.mode_unpersisted.load(Ordering::Acquire) {
                break;
            }
            let due = st
                .last_commit
                .is_none_or(|t| t.elapsed() >= self.commit_period);
            if self.md.is_dirty() && due && self.mode() == Mode::ReadWrite {
                break;
            }
            if st.shutdown {
                return None;
            }
            let wait = self.commit_period.min(Duration::from_millis(200));
            self.cv.wait_for(&mut st, wait);
        }
        st.started += 1;
        Some(st.started)
    }

    /// One commit: destination flush always; the two metadata phases when anything changed.
    fn commit_once(&self, flusher: Option<&DestFlusher>) -> Result<(), CommitError> {
        if self.mode() != Mode::ReadWrite {
            return Err(CommitError::NotReadWrite);
        }
        if !self.md.is_dirty() {
            return self.sequenced_flush(|| self.dest.flush());
        }
        let frozen = self.md.begin_commit().map_err(CommitError::Freeze)?;
        #[cfg(test)]
        if self.bugs.commit_before_dest_flush {
            return self.commit_before_destination_flush(frozen);
        }
        // The shadow writes and the destination flush are independent: overlap them.
        let mut shadows = None;
        let dest = match flusher {
            Some(f) => self.sequenced_flush(|| {
                metadata::flush_destination_with(&frozen, || {
                    let (flushed, written) = f.flush_while(|| frozen.write_shadows());
                    shadows = Some(written);
                    flushed
                })
            }),
            None => {
                shadows = Some(frozen.write_shadows());
                self.sequenced_flush(|| metadata::flush_destination(self.dest.as_ref(), &frozen))
            }
        };
        let dest = dest?;
        let shadows = shadows
            .ok_or(CommitError::ShadowsNotWritten)?
            .map_err(CommitError::Shadows)?;
        super::pause::point(super::pause::Point::Commit);
        self.md
            .finish_commit(frozen, shadows, dest)
            .map_err(CommitError::Superblock)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        // Everything hydrated and now committed: the bitmap is no longer needed in memory.
        if self.map.is_fully_hydrated() && self.md.release_bitmap_if_complete() {
            log::info!("hydration complete and committed: in-core bitmap released");
        }
        Ok(())
    }

    /// A destination flush on the commit thread, through the flush sequencer: `Ok` only if
    /// it and every flush begun before it ended succeeded (and none ever failed).
    fn sequenced_flush<T>(
        &self,
        flush: impl FnOnce() -> std::io::Result<T>,
    ) -> Result<T, CommitError> {
        let ticket = self.flushes.begin();
        let res = flush().map_err(|e| CommitError::DestinationFlush(e.to_string()));
        if let Err(e) = &res {
            self.destination_flush_failed(&e.to_string());
        }
        let horizon = self.flushes.end(
            ticket,
            res.as_ref()
                .map(|_| ())
                .map_err(|e| FlushFailed(e.to_string())),
        );
        let value = res?;
        self.flushes
            .settle_blocking(horizon)
            .map_err(CommitError::ConcurrentFlush)?;
        Ok(value)
    }

    /// BUG (test only): commits the metadata first and flushes the destination afterwards.
    /// The metadata API refuses that order by type, so the `DestinationFlushed` token is
    /// obtained by flushing a dummy device; the crash oracle must catch the result.
    #[cfg(test)]
    fn commit_before_destination_flush(
        &self,
        frozen: metadata::FrozenCommit,
    ) -> Result<(), CommitError> {
        let not_the_destination = crate::io::mem::MemDev::new("not-the-destination", 4096);
        let shadows = frozen.write_shadows().map_err(CommitError::Shadows)?;
        let token = metadata::flush_destination(&not_the_destination, &frozen)
            .map_err(|e| CommitError::DestinationFlush(e.to_string()))?;
        self.md
            .finish_commit(frozen, shadows, token)
            .map_err(CommitError::Superblock)?;
        self.dest
            .flush()
            .map_err(|e| CommitError::DestinationFlush(e.to_string()))?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A destination flush failed: the bits set since the last commit cannot be trusted, in
    /// this daemon (the map is settled back to the committed bitmap) or in a later one (the
    /// survival copy is poisoned first).
    fn destination_flush_failed(&self, reason: &str) {
        self.md.poison_survival(reason);
        self.dest_flush_failed.store(true, Ordering::Release);
        self.degrade(Mode::ReadOnly, reason);
    }

    /// Switches to a degraded mode (never back) in memory, at once, so that no later FLUSH
    /// can succeed; the commit thread persists it (`persist_mode`).
    pub fn degrade(&self, mode: Mode, reason: &str) {
        let mut cur = self.mode.lock();
        if cur.0 >= mode {
            return;
        }
        log::error!("switching to {} mode: {reason}", mode.name());
        // Before anything is reported: a daemon started after this one dies starts degraded.
        self.md.degrade_survival(mode.to_metadata(), reason);
        *cur = (mode, reason.to_string());
        // No bit may be set from now on (a write in flight that would set one fails); the
        // commit thread then settles the map.
        self.md.seal();
        self.mode_unpersisted.store(true, Ordering::Release);
        self.cv.notify_one();
    }

    /// After a failure: makes the region map final (commit thread only: it must not race a
    /// commit). After a failed destination flush that is the committed bitmap again; if it
    /// cannot be read back, fail mode.
    fn settle_map(&self) {
        if self.mode() == Mode::ReadWrite || self.map.is_settled() {
            return;
        }
        if !self.dest_flush_failed.load(Ordering::Acquire) {
            // No destination flush failed (a metadata write, or hydration writes, did): the
            // destination holds what the in-core bits say; they stay, sealed by `degrade`.
            self.map.mark_settled();
            self.done.notify();
            return;
        }
        match self.map.settle_reverting() {
            Ok(n) => log::warn!(
                "read-only: back to the committed bitmap ({n} regions hydrated); regions \
                 hydrated since the last commit are read from the source again"
            ),
            Err(e) => {
                let reason = format!(
                    "{}; reloading the committed bitmap failed: {e}",
                    self.mode.lock().1
                );
                log::error!("switching to fail mode: {reason}");
                // Before anyone sees it: a daemon recovering after this one dies starts in
                // fail mode too.
                self.md
                    .degrade_survival(crate::metadata::MetadataMode::Fail, &reason);
                *self.mode.lock() = (Mode::Fail, reason);
                // Fail mode first: no user I/O reads the map after this.
                self.map.mark_settled();
            }
        }
        // User I/O waiting for the settled map goes on now, before the mode is written to
        // the metadata (which may be slow or hang on a failing device).
        self.done.notify();
    }

    /// Records the current mode in the metadata (commit thread only: it must not race a
    /// commit). If even that fails, the engine goes to fail mode.
    fn persist_mode(&self) {
        let (mode, reason) = self.mode_and_reason();
        if let Err(e) = self.md.persist_mode(mode.to_metadata(), &reason) {
            let reason = format!("{reason}; persisting the mode failed too: {e}");
            log::error!("switching to fail mode: {reason}");
            self.md
                .degrade_survival(crate::metadata::MetadataMode::Fail, &reason);
            *self.mode.lock() = (Mode::Fail, reason);
        }
    }
}

/// A thread that flushes the destination when the commit thread asks, so that a commit
/// overlaps its destination flush with its bitmap writes without starting a thread each
/// time (which costs more than both on a fast device). Only the commit thread asks.
#[derive(Default)]
struct DestFlusher {
    state: Mutex<FlusherState>,
    cv: Condvar,
}

#[derive(Default)]
struct FlusherState {
    requested: u64,
    done: u64,
    result: Option<std::io::Result<()>>,
    shutdown: bool,
}

impl DestFlusher {
    /// The flusher thread's body: one destination flush per request, until shutdown.
    fn serve(&self, dest: &dyn BlockDev) {
        let mut st = self.state.lock();
        loop {
            if st.requested > st.done {
                let n = st.requested;
                // A panic is a failed flush: the commit thread must get an answer.
                let res = parking_lot::MutexGuard::unlocked(&mut st, || {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dest.flush()))
                        .unwrap_or_else(|_| Err(std::io::Error::other("the flush panicked")))
                });
                st.result = Some(res);
                st.done = n;
                self.cv.notify_all();
            } else if st.shutdown {
                return;
            } else {
                self.cv.wait(&mut st);
            }
        }
    }

    /// Flushes the destination on the flusher thread (the flush starts after this call)
    /// while this thread runs `meanwhile`; returns the flush's result and `meanwhile`'s.
    fn flush_while<T>(&self, meanwhile: impl FnOnce() -> T) -> (std::io::Result<()>, T) {
        let n = {
            let mut st = self.state.lock();
            st.requested += 1;
            self.cv.notify_all();
            st.requested
        };
        let value = meanwhile();
        let mut st = self.state.lock();
        while st.done < n {
            self.cv.wait(&mut st);
        }
        let flushed = st
            .result
            .take()
            .unwrap_or_else(|| Err(std::io::Error::other("the flusher reported no result")));
        (flushed, value)
    }

    fn shutdown(&self) {
        self.state.lock().shutdown = true;
        self.cv.notify_all();
    }
}

/// Shuts the flusher down when dropped.
struct StopFlusher<'a>(&'a DestFlusher);

impl Drop for StopFlusher<'_> {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemDev;
    use std::sync::mpsc;

    /// A device whose flush waits for a go from the test, then records that it ended.
    struct GatedFlush {
        inner: MemDev,
        go: Mutex<mpsc::Receiver<()>>,
        ended: AtomicBool,
        panic: bool,
    }

    impl BlockDev for GatedFlush {
        fn name(&self) -> &str {
            "gated"
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.inner.discard(offset, len)
        }
        fn flush(&self) -> std::io::Result<()> {
            let _ = self.go.lock().recv();
            if self.panic {
                panic!("flush");
            }
            self.ended.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    /// `flush_while` returns only once the flush it asked for has ended, and a flush that
    /// panics is reported as failed instead of leaving the commit thread waiting.
    #[test]
    fn flush_while_waits_for_its_flush_and_survives_a_panicking_one() {
        for panic in [false, true] {
            let (tx, rx) = mpsc::channel();
            let dev = GatedFlush {
                inner: MemDev::new("m", 4096),
                go: Mutex::new(rx),
                ended: AtomicBool::new(false),
                panic,
            };
            let flusher = DestFlusher::default();
            std::thread::scope(|s| {
                s.spawn(|| flusher.serve(&dev));
                let _stop = StopFlusher(&flusher);
                for round in 0..2 {
                    dev.ended.store(false, Ordering::SeqCst);
                    let (flushed, seen) = flusher.flush_while(|| {
                        let seen = dev.ended.load(Ordering::SeqCst);
                        let _ = tx.send(());
                        seen
                    });
                    assert!(!seen, "round {round}: the flush ended before it was let go");
                    assert_eq!(flushed.is_ok(), !panic, "round {round}: {flushed:?}");
                    assert_eq!(dev.ended.load(Ordering::SeqCst), !panic);
                }
            });
        }
    }
}
