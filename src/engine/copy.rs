//! One background batch, carried out: its regions are copied from the source, or zeroed on
//! the destination where the source says they read as zeroes (hole-aware hydration: the
//! holes of a sparse file, an NBD export's zero extents), so that hydrating a mostly empty
//! image costs the time of its data, not of its size.
//!
//! Invariants (with [`super::hydrator`]): the caller holds the regions' locks; their bits are
//! set only after their data, copied or zeroed, is on the destination (a commit then flushes
//! the destination before it records them). A region is zeroed instead of copied only if the
//! source reports every byte of it as zeroes; anything else is read. Zeroing is not charged
//! to the rate limit, which meters the source.

use super::budget::COPY_CHUNK;
use super::config::Mode;
use super::hydrator::Batch;
use super::Engine;
use std::sync::atomic::Ordering;
#[cfg(test)]
use std::time::Duration;

impl Engine {
    /// Hydrates regions `[head, head+count)`: runs of regions the source reports as zeroes
    /// are zeroed on the destination, the others copied.
    pub(super) fn hydrate_regions(&self, head: u64, count: u64) -> Batch {
        if let Some(d) = self.source.link_down() {
            // Do not hold the regions' locks waiting for a source that is away.
            return Batch::SourceDown(d.reason);
        }
        let zero = match self.zero_regions(head, count) {
            Ok(z) => z,
            // Out of reach while asked for its zeroes: no copy is tried (it would hold the
            // regions' locks for another whole timeout).
            Err(e) => return Batch::SourceDown(e),
        };
        let mut r = head;
        while r < head + count {
            let z = zero[(r - head) as usize];
            let run = zero[(r - head) as usize..]
                .iter()
                .take_while(|x| **x == z)
                .count() as u64;
            let outcome = if z {
                self.zero_fill_regions(r, run)
            } else {
                self.copy_regions(r, run)
            };
            if let Batch::WriteFailed(_) | Batch::SourceDown(_) = outcome {
                return outcome;
            }
            r += run;
        }
        Batch::Copied
    }

    /// For each region of `[head, head+count)`: whether the source reports all of it as
    /// zeroes. A source that cannot tell, or fails to, reports nothing; one out of reach
    /// (disconnected, or silent past its timeout) is an error: the batch waits for it.
    fn zero_regions(&self, head: u64, count: u64) -> Result<Vec<bool>, String> {
        let (off, len) = self.geo.regions_span(head, count);
        let ranges = match self.source.zero_ranges(off, len) {
            Ok(r) => r,
            Err(e) if self.source_unreachable(&e) => return Err(e.to_string()),
            Err(e) => {
                log::debug!("{}: cannot tell its zeroes: {e}", self.source.name());
                Vec::new()
            }
        };
        let merged = merge_adjacent(&ranges);
        Ok((head..head + count)
            .map(|r| {
                let (s, l) = self.geo.regions_span(r, 1);
                merged.iter().any(|&(o, n)| o <= s && s + l <= o + n)
            })
            .collect())
    }

    /// Zeroes regions `[head, head+count)` on the destination instead of copying them.
    fn zero_fill_regions(&self, head: u64, count: u64) -> Batch {
        let (off, len) = self.geo.regions_span(head, count);
        if self.committer.mode() != Mode::ReadWrite {
            return Batch::Copied;
        }
        if let Err(e) = self.dest.write_zeroes(off, len) {
            log::error!(
                "hydration by zeroing regions {head}..{} failed: {e}",
                head + count
            );
            self.hydrator
                .dest_write_errors
                .fetch_add(1, Ordering::Relaxed);
            return Batch::WriteFailed(e.to_string());
        }
        self.finish_regions(head, count, len, true)
    }

    /// Copies regions `[head, head+count)` (locks held by the caller); on a persistent
    /// source error splits the batch to isolate failing regions.
    fn copy_regions(&self, head: u64, count: u64) -> Batch {
        let (off, len) = self.geo.regions_span(head, count);
        self.hydrator
            .charge_rate(len, self.knobs().rate_bytes_per_sec);
        #[cfg(test)]
        if self.config.bugs.bit_before_copy {
            // BUG (test only): the bits become durable before the copy is written. The wait is
            // bounded: at shutdown the commit thread may already be gone.
            let _ = self.map.md().set_range_hydrated(head, count);
            let epoch = self.committer.request_commit();
            self.committer
                .wait_epoch_blocking(epoch, Duration::from_millis(200));
        }
        // A chunk at a time from the copy budget (a batch of large regions never sits in
        // memory whole).
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(COPY_CHUNK as u64) as usize;
            let mut buf = self.copy_budget.take_blocking(n);
            let mut attempt = 0;
            let read = loop {
                let read = self.source.read_at(&mut buf, pos);
                if read.is_err() {
                    self.metrics
                        .source_read_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
                match read {
                    Ok(()) => break Ok(()),
                    Err(e) if self.source_unreachable(&e) => {
                        // Not the region's fault: nothing is marked failed.
                        return Batch::SourceDown(e.to_string());
                    }
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
                        match self.copy_regions(r, 1) {
                            Batch::WriteFailed(e) => outcome = Batch::WriteFailed(e),
                            // Away: the rest waits for it (and none of it is marked failed).
                            Batch::SourceDown(e) => return Batch::SourceDown(e),
                            _ => {}
                        }
                    }
                    return outcome;
                }
                log::error!("hydration of region {head} failed: {e}; marking it failed");
                self.hydrator.mark_failed(head);
                return Batch::Copied;
            }
            if self.committer.mode() != Mode::ReadWrite {
                return Batch::Copied;
            }
            if let Err(e) = self.dest.write_at(&buf, pos) {
                log::error!(
                    "hydration write of regions {head}..{} failed: {e}",
                    head + count
                );
                self.hydrator
                    .dest_write_errors
                    .fetch_add(1, Ordering::Relaxed);
                return Batch::WriteFailed(e.to_string());
            }
            pos += n as u64;
        }
        // The copy completed: only now may the bits be set.
        self.finish_regions(head, count, len, false)
    }

    /// Whether a source read failed because the source is out of reach (a remote source
    /// disconnected, or silent past its timeout) rather than because of the data asked for.
    pub(super) fn source_unreachable(&self, e: &std::io::Error) -> bool {
        self.source.link_down().is_some()
            || matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::NotConnected
            )
    }

    /// Sets the bits of regions `[head, head+count)`, whose `len` bytes of data are on the
    /// destination (`zeroed`: by zeroing, not a copy), and counts them.
    fn finish_regions(&self, head: u64, count: u64, len: u64, zeroed: bool) -> Batch {
        if let Err(e) = self.map.md().set_range_hydrated(head, count) {
            log::error!("recording regions {head}..{} hydrated: {e}", head + count);
            if matches!(e, crate::metadata::MetadataError::Survival { .. }) {
                // A user write to these regions would go straight to the destination, with
                // nothing that outlives the daemon to make it visible.
                self.committer.degrade(Mode::ReadOnly, &e.to_string());
            }
            return Batch::Copied;
        }
        self.hydrator
            .bytes_hydrated
            .fetch_add(len, Ordering::Relaxed);
        if zeroed {
            self.hydrator.bytes_zeroed.fetch_add(len, Ordering::Relaxed);
        }
        self.hydrator
            .regions_hydrated_bg
            .fetch_add(count, Ordering::Relaxed);
        self.map.check_fully_hydrated();
        Batch::Copied
    }
}

/// `ranges` (in order, not overlapping) with touching ones joined.
fn merge_adjacent(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(o, l) in ranges {
        match out.last_mut() {
            Some((po, pl)) if *po + *pl == o => *pl += l,
            _ => out.push((o, l)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;
    use crate::io::file::{Access, FileDev};
    use crate::io::mem::MemDev;
    use crate::io::BlockDev;
    use crate::metadata::{Expect, FormatParams, Metadata};
    use std::io;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A source that counts the bytes read from it.
    struct Counting {
        inner: FileDev,
        read: AtomicU64,
    }

    impl BlockDev for Counting {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Err(io::Error::other("the source is read-only"))
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> io::Result<()> {
            Err(io::Error::other("the source is read-only"))
        }
        fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
            self.inner.zero_ranges(offset, len)
        }
    }

    #[test]
    fn a_sparse_source_hydrates_by_reading_only_its_data() {
        const SIZE: u64 = 64 << 20;
        const REGION: u64 = 64 << 10;
        let dir = tempfile::tempdir().expect("tempdir");
        let (src_path, dst_path) = (dir.path().join("src"), dir.path().join("dst"));
        let data_regions = crate::engine::tests::sparse_source(&src_path, SIZE, REGION, 12);
        // A destination full of old data: zeroed regions must really be zeroed.
        std::fs::write(&dst_path, vec![0xaa; SIZE as usize]).expect("destination");
        let source = Arc::new(Counting {
            inner: FileDev::open(&src_path, Access::ReadOnly, false).expect("open source"),
            read: AtomicU64::new(0),
        });
        let dest: Arc<dyn BlockDev> =
            Arc::new(FileDev::open(&dst_path, Access::ReadWrite, false).expect("open dest"));
        let meta = Arc::new(MemDev::new("meta", 1 << 20));
        let params = FormatParams::from_devices(source.as_ref(), dest.as_ref(), REGION)
            .expect("fingerprint");
        Metadata::format(meta.clone(), &params, false).expect("format");
        let read_by_fingerprint = source.read.swap(0, Ordering::Relaxed);
        let expect = Expect::from_devices(source.as_ref(), dest.as_ref()).expect("expect");
        let md = Arc::new(Metadata::open(meta, &expect).expect("open").0);
        let read_by_open = source.read.swap(0, Ordering::Relaxed);
        let mut cfg = EngineConfig::new(SIZE, REGION);
        cfg.retry_backoff = Duration::ZERO;
        let engine = match Engine::start(md, source.clone(), dest.clone(), cfg) {
            Ok(e) => e,
            Err(e) => panic!("engine start: {e}"),
        };
        crate::engine::tests::hydrate_fully(&engine, Duration::from_secs(60));
        let status = engine.status();
        assert!(engine.shutdown().is_ok());
        let data_bytes = data_regions.len() as u64 * REGION;
        let read = source.read.load(Ordering::Relaxed);
        eprintln!(
            "sparse hydration: {read} bytes read for {data_bytes} bytes of data regions \
             ({read_by_fingerprint} + {read_by_open} by the fingerprint), {} zeroed",
            status.bytes_zeroed
        );
        assert_eq!(read, data_bytes, "only the regions holding data are read");
        assert_eq!(status.bytes_zeroed, SIZE - data_bytes);
        let (s, d) = (
            std::fs::read(&src_path).expect("read source"),
            std::fs::read(&dst_path).expect("read dest"),
        );
        assert!(s == d, "the destination differs from the source");
    }

    /// A source in memory whose `zero_ranges` or reads can be made to fail with an error of a
    /// given kind (its link still reported up), counting read attempts.
    struct Flaky {
        inner: MemDev,
        zeroes_fail: parking_lot::Mutex<Option<io::ErrorKind>>,
        reads_fail: parking_lot::Mutex<Option<io::ErrorKind>>,
        reads: AtomicU64,
    }

    impl BlockDev for Flaky {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            match *self.reads_fail.lock() {
                Some(k) => Err(io::Error::new(k, "injected read failure")),
                None => self.inner.read_at(buf, offset),
            }
        }
        fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
            Err(io::Error::other("the source is read-only"))
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> io::Result<()> {
            Err(io::Error::other("the source is read-only"))
        }
        fn zero_ranges(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
            match *self.zeroes_fail.lock() {
                Some(k) => Err(io::Error::new(k, "injected block status failure")),
                None => self.inner.zero_ranges(offset, len),
            }
        }
    }

    const FLAKY_REGION: u64 = 4096;

    /// An engine on a [`Flaky`] source of `regions` regions (data everywhere), in memory.
    fn flaky_engine(
        regions: u64,
        tweak: impl FnOnce(&mut EngineConfig),
    ) -> (Arc<Flaky>, Arc<Engine>) {
        let size = regions * FLAKY_REGION;
        let image: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
        let source = Arc::new(Flaky {
            inner: MemDev::from_image("flaky", image),
            zeroes_fail: parking_lot::Mutex::new(None),
            reads_fail: parking_lot::Mutex::new(None),
            reads: AtomicU64::new(0),
        });
        let dest: Arc<dyn BlockDev> = Arc::new(MemDev::new("dest", size));
        let meta = Arc::new(MemDev::new("meta", 1 << 20));
        let params = FormatParams::from_devices(source.as_ref(), dest.as_ref(), FLAKY_REGION)
            .expect("fingerprint");
        Metadata::format(meta.clone(), &params, false).expect("format");
        let expect = Expect::from_devices(source.as_ref(), dest.as_ref()).expect("expect");
        let md = Arc::new(Metadata::open(meta, &expect).expect("open").0);
        let mut cfg = EngineConfig::new(size, FLAKY_REGION);
        cfg.retry_backoff = Duration::ZERO;
        tweak(&mut cfg);
        let engine = match Engine::start(md, source.clone(), dest, cfg) {
            Ok(e) => e,
            Err(e) => panic!("engine start: {e}"),
        };
        (source, engine)
    }

    fn describe(b: &Batch) -> String {
        match b {
            Batch::Copied => "Copied".into(),
            Batch::NothingToPick => "NothingToPick".into(),
            Batch::WriteFailed(e) => format!("WriteFailed({e})"),
            Batch::SourceDown(e) => format!("SourceDown({e})"),
        }
    }

    #[test]
    fn a_source_out_of_reach_for_its_zeroes_pauses_the_batch_without_reading_it() {
        let (source, engine) = flaky_engine(16, |c| c.knobs.hydration_enabled = false);
        *source.zeroes_fail.lock() = Some(io::ErrorKind::TimedOut);
        source.reads.store(0, Ordering::Relaxed);
        // No other thread hydrates: the batch's regions are ours, as under their locks.
        let outcome = engine.hydrate_regions(0, 4);
        assert!(
            matches!(outcome, Batch::SourceDown(_)),
            "{}",
            describe(&outcome)
        );
        assert_eq!(
            source.reads.load(Ordering::Relaxed),
            0,
            "the batch read (and waited on) a source out of reach"
        );
        assert_eq!(engine.status().hydrated, 0);
        assert!(engine.status().failed_regions.is_empty());
        // A source that only cannot tell its zeroes (an error, not out of reach) is read.
        *source.zeroes_fail.lock() = Some(io::ErrorKind::Unsupported);
        let outcome = engine.hydrate_regions(0, 4);
        assert!(matches!(outcome, Batch::Copied), "{}", describe(&outcome));
        assert_eq!(engine.status().hydrated, 4);
        assert!(engine.shutdown().is_ok());
    }

    #[test]
    fn a_source_refusing_reads_with_its_link_up_is_retried_with_backoff_not_in_a_loop() {
        const WORKERS: usize = 2;
        let (source, engine) = flaky_engine(64, |c| {
            c.knobs.hydration_enabled = false;
            c.hydration_workers = WORKERS;
        });
        // A server that answers ESHUTDOWN (NotConnected) on a connection it keeps open:
        // link_down() says nothing.
        *source.reads_fail.lock() = Some(io::ErrorKind::NotConnected);
        source.reads.store(0, Ordering::Relaxed);
        let mut knobs = engine.knobs();
        knobs.hydration_enabled = true;
        engine.set_knobs(knobs);
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(1500));
        let (tries, window) = (source.reads.load(Ordering::Relaxed), t.elapsed());
        // Each worker waits at least 200 ms after each refused batch.
        let most = WORKERS as u64 * (window.as_millis() as u64 / 200 + 1);
        assert!(tries >= 1, "hydration never tried the source");
        assert!(
            tries <= most,
            "{tries} read attempts in {window:?} (at most {most} with backoff): a busy loop"
        );
        assert!(engine.status().failed_regions.is_empty());
        // The source answers again: hydration resumes by itself and completes.
        *source.reads_fail.lock() = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !engine.is_fully_hydrated() && Instant::now() < deadline {
            engine
                .hydrator
                .progress
                .wait_until_blocking(|| engine.is_fully_hydrated(), Duration::from_millis(50));
        }
        assert!(engine.is_fully_hydrated(), "{:?}", engine.status());
        assert!(engine.shutdown().is_ok());
    }

    #[test]
    fn touching_zero_ranges_are_joined() {
        assert_eq!(
            merge_adjacent(&[(0, 4), (4, 4), (10, 2), (12, 1), (20, 1)]),
            vec![(0, 8), (10, 3), (20, 1)]
        );
        assert_eq!(merge_adjacent(&[]), vec![]);
    }
}
