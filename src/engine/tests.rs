//! Engine tests on in-memory devices: a model-based randomized test with concurrent queues and
//! background hydration, plus fault tests.

use super::*;
use crate::io::mem::{MemDev, Op};
use futures_lite::future::block_on;
use parking_lot::Condvar;
use rand::{Rng, SeedableRng};
use std::io;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const SECTOR: u64 = 512;

pub(crate) struct Rig {
    pub source: Arc<MemDev>,
    pub dest: Arc<MemDev>,
    pub meta: Arc<MemDev>,
    pub engine: Arc<Engine>,
    pub path: SyncPath,
}

pub(crate) fn pattern(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..size).map(|_| rng.gen()).collect()
}

pub(crate) fn rig(size: u64, region_size: u64, tweak: impl FnOnce(&mut EngineConfig)) -> Rig {
    rig_prepared(size, region_size, |_| {}, tweak)
}

/// [`rig`], with `prepare` called on the metadata before the engine starts.
fn rig_prepared(
    size: u64,
    region_size: u64,
    prepare: impl FnOnce(&Metadata),
    tweak: impl FnOnce(&mut EngineConfig),
) -> Rig {
    let source = Arc::new(MemDev::from_image("source", pattern(size, 1)));
    let dest = Arc::new(MemDev::new("dest", size + 4096));
    let meta = Arc::new(MemDev::new("meta", 1 << 20));
    let md = Arc::new(open_md(&meta, &source, &dest, region_size));
    prepare(&md);
    let mut cfg = EngineConfig::new(size, region_size);
    cfg.retry_backoff = Duration::ZERO;
    tweak(&mut cfg);
    let engine = match Engine::start(md, source.clone(), dest.clone(), cfg) {
        Ok(e) => e,
        Err(e) => panic!("engine start: {e}"),
    };
    let path = SyncPath {
        source: source.clone(),
        dest: dest.clone(),
    };
    Rig {
        source,
        dest,
        meta,
        engine,
        path,
    }
}

/// Formats (if blank) and opens metadata on `meta` for `source` -> `dest`.
pub(crate) fn open_md(
    meta: &Arc<MemDev>,
    source: &Arc<MemDev>,
    dest: &Arc<MemDev>,
    region_size: u64,
) -> Metadata {
    use crate::metadata::{Expect, FormatParams};
    let m: Arc<dyn BlockDev> = meta.clone();
    if meta.snapshot()[..8192].iter().all(|b| *b == 0) {
        let params = FormatParams::from_devices(source.as_ref(), dest.as_ref(), region_size)
            .expect("fingerprint");
        Metadata::format(m.clone(), &params, false).expect("format");
    }
    let expect = Expect::from_devices(source.as_ref(), dest.as_ref()).expect("fingerprint");
    Metadata::open(m, &expect).expect("open metadata").0
}

fn no_hydration(c: &mut EngineConfig) {
    c.knobs.hydration_enabled = false;
}

/// Test-level range lock so that overlapping operations from different threads are
/// serialised and the reference model stays deterministic (shared with `crash_tests`).
pub(crate) struct RangeLocks {
    busy: Mutex<Vec<bool>>,
    cv: Condvar,
}

impl RangeLocks {
    pub(crate) fn new(sectors: u64) -> RangeLocks {
        RangeLocks {
            busy: Mutex::new(vec![false; sectors as usize]),
            cv: Condvar::new(),
        }
    }
    pub(crate) fn lock(&self, a: u64, b: u64) {
        let mut busy = self.busy.lock();
        loop {
            if busy[a as usize..b as usize].iter().all(|x| !x) {
                busy[a as usize..b as usize].fill(true);
                return;
            }
            self.cv.wait(&mut busy);
        }
    }
    pub(crate) fn unlock(&self, a: u64, b: u64) {
        self.busy.lock()[a as usize..b as usize].fill(false);
        self.cv.notify_all();
    }
}

/// A random operation range `[a, b)` in sectors, on a device of `sectors` sectors with regions
/// of `region_sectors`: most cover up to two regions, some up to 8 sectors, a few up to five
/// regions (shared with `crash_tests`, whose workload draws its ranges the same way).
pub(crate) fn random_span(rng: &mut impl Rng, sectors: u64, region_sectors: u64) -> (u64, u64) {
    let len_sectors = match rng.gen_range(0..10) {
        0..=5 => rng.gen_range(1..=region_sectors * 2),
        6..=8 => rng.gen_range(1..=8),
        _ => rng.gen_range(1..=region_sectors * 5),
    }
    .min(sectors);
    let a = rng.gen_range(0..=sectors - len_sectors);
    (a, a + len_sectors)
}

/// The expected content: `None` for discarded bytes (undefined).
struct Model {
    bytes: Mutex<Vec<Option<u8>>>,
}

impl Model {
    /// Sets the expected content of `[off, off + len)` to `value(i)` for byte `i` of the range.
    fn set(&self, off: u64, len: u64, value: impl Fn(usize) -> Option<u8>) {
        let mut m = self.bytes.lock();
        for i in 0..len as usize {
            m[off as usize + i] = value(i);
        }
    }
}

/// What the threads of one random workload share.
struct RandomRun<'a> {
    r: &'a Rig,
    model: Model,
    locks: RangeLocks,
    seed: u64,
    sectors: u64,
    region_sectors: u64,
}

impl RandomRun<'_> {
    /// One random operation on a random range, checked against (or applied to) the model.
    fn one_op(&self, rng: &mut rand::rngs::StdRng) {
        let r = self.r;
        let (a, b) = random_span(rng, self.sectors, self.region_sectors);
        let (off, len) = (a * SECTOR, (b - a) * SECTOR);
        self.locks.lock(a, b);
        match rng.gen_range(0..100) {
            0..=44 => self.read_and_compare(off, len),
            45..=84 => {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let fua = rng.gen_range(0..10) == 0;
                assert_eq!(block_on(r.engine.write(&r.path, off, &data, fua)), Ok(()));
                self.model.set(off, len, |i| Some(data[i]));
            }
            85..=88 => {
                assert_eq!(block_on(r.engine.discard(&r.path, off, len)), Ok(()));
                self.model.set(off, len, |_| None);
            }
            89..=91 => {
                let (unmap, fua) = (rng.gen(), rng.gen_range(0..10) == 0);
                let res = r.engine.write_zeroes(&r.path, off, len, unmap, fua);
                assert_eq!(block_on(res), Ok(()));
                self.model.set(off, len, |_| Some(0));
            }
            _ => assert_eq!(block_on(r.engine.flush(&r.path)), Ok(())),
        }
        self.locks.unlock(a, b);
    }

    /// Reads `[off, off + len)` through the engine; every byte the model defines must match.
    fn read_and_compare(&self, off: u64, len: u64) {
        let r = self.r;
        let mut buf = vec![0u8; len as usize];
        let res = block_on(r.engine.read(&r.path, off, &mut buf));
        assert_eq!(res, Ok(()));
        let m = self.model.bytes.lock();
        for (i, got) in buf.iter().enumerate() {
            if let Some(want) = m[off as usize + i] {
                assert_eq!(
                    *got,
                    want,
                    "seed {}: byte {} read back wrong",
                    self.seed,
                    off as usize + i
                );
            }
        }
    }
}

fn run_random_workload(seed: u64, threads: usize, ops: usize, region_size: u64, size: u64) {
    let r = rig(size, region_size, |c| {
        c.knobs.batch_size = 2;
        c.knobs.threshold = 4;
        c.commit_period = Duration::from_millis(20);
    });
    let sectors = size / SECTOR;
    let run = RandomRun {
        r: &r,
        model: Model {
            bytes: Mutex::new(pattern(size, 1).into_iter().map(Some).collect()),
        },
        locks: RangeLocks::new(sectors),
        seed,
        sectors,
        region_sectors: region_size / SECTOR,
    };
    std::thread::scope(|s| {
        for t in 0..threads {
            let run = &run;
            s.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + t as u64);
                for _ in 0..ops {
                    run.one_op(&mut rng);
                }
            });
        }
    });
    wait_until_hydrated(&r, seed);
    assert_eq!(r.engine.shutdown().map_err(|e| e.to_string()), Ok(()));
    check_against_model(&r, &run.model, seed, size);
}

/// Lets background hydration finish (up to 20 s); it must.
fn wait_until_hydrated(r: &Rig, seed: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !r.engine.is_fully_hydrated() && Instant::now() < deadline {
        r.engine
            .hydrator
            .progress
            .wait_until_blocking(|| r.engine.is_fully_hydrated(), Duration::from_millis(50));
    }
    assert!(
        r.engine.is_fully_hydrated(),
        "seed {seed}: hydration did not finish: {:?}",
        r.engine.status()
    );
}

/// The destination holds the model wherever the model is defined, and the source is untouched.
fn check_against_model(r: &Rig, model: &Model, seed: u64, size: u64) {
    let dest = r.dest.snapshot();
    let m = model.bytes.lock();
    for (i, want) in m.iter().enumerate() {
        if let Some(want) = want {
            assert_eq!(
                dest[i], *want,
                "seed {seed}: destination byte {i} differs from the model"
            );
        }
    }
    assert_eq!(
        r.source.snapshot(),
        pattern(size, 1),
        "the source must never be written"
    );
    let _ = &r.meta;
}

#[test]
fn random_concurrent_workload_matches_model() {
    for seed in 0..12 {
        run_random_workload(seed, 4, 150, 4096, 64 * 4096 + 1024);
    }
}

#[test]
fn random_workload_large_regions() {
    for seed in 100..104 {
        run_random_workload(seed, 3, 100, 64 * 1024, 16 * 64 * 1024);
    }
}

#[test]
fn reads_of_unhydrated_regions_come_from_the_source() {
    let r = rig(16 * 4096, 4096, no_hydration);
    let mut buf = vec![0u8; 16 * 4096];
    assert_eq!(block_on(r.engine.read(&r.path, 0, &mut buf)), Ok(()));
    assert_eq!(buf, r.source.snapshot());
    assert_eq!(r.dest.write_count(), 0, "reads must not write");
}

#[test]
fn partial_write_keeps_the_rest_of_the_region_from_the_source() {
    let r = rig(16 * 4096, 4096, no_hydration);
    assert_eq!(
        block_on(r.engine.write(&r.path, 4096 + 512, &[0xAB; 1024], false)),
        Ok(())
    );
    let src = r.source.snapshot();
    let dest = r.dest.snapshot();
    assert_eq!(&dest[4096..4096 + 512], &src[4096..4096 + 512]);
    assert_eq!(&dest[4096 + 512..4096 + 1536], &[0xAB; 1024]);
    assert_eq!(&dest[4096 + 1536..8192], &src[4096 + 1536..8192]);
    assert_eq!(r.engine.status().hydrated, 1);
}

#[test]
fn whole_region_write_does_not_read_the_source() {
    let r = rig(16 * 4096, 4096, no_hydration);
    r.source.set_fault(Some(Arc::new(|op: &Op| {
        matches!(op, Op::Read { .. }).then(|| io::Error::other("no"))
    })));
    assert_eq!(
        block_on(r.engine.write(&r.path, 8192, &[1; 8192], false)),
        Ok(())
    );
    assert_eq!(r.engine.status().hydrated, 2);
}

#[test]
fn flush_commits_and_flushes_destination_once() {
    // No periodic commit: it could run between the write and the FLUSH and change the counts.
    let r = rig(16 * 4096, 4096, |c| {
        no_hydration(c);
        c.commit_period = Duration::from_secs(3600);
    });
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[1; 512], false)),
        Ok(())
    );
    let before = r.dest.flush_count();
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    assert_eq!(
        r.dest.flush_count(),
        before + 1,
        "one destination flush per commit"
    );
    assert!(r.meta.flush_count() > 0, "metadata committed");
    assert_eq!(r.engine.status().commits, 1);
    // An empty FLUSH with nothing changed still flushes the destination (covers writes).
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    assert_eq!(r.dest.flush_count(), before + 2);
    assert_eq!(
        r.engine.status().commits,
        1,
        "no metadata commit when nothing changed"
    );
}

#[test]
fn concurrent_flushes_share_commits() {
    let r = rig(64 * 4096, 4096, no_hydration);
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let r = &r;
            s.spawn(move || {
                for i in 0..20u64 {
                    let off = ((t * 8 + i % 8) % 64) * 4096;
                    assert_eq!(
                        block_on(r.engine.write(&r.path, off, &[t as u8; 4096], false)),
                        Ok(())
                    );
                    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
                }
            });
        }
    });
    let st = r.engine.status();
    assert_eq!(st.flushes, 160);
    assert!(
        r.dest.flush_count() <= 160,
        "never more destination flushes than FLUSHes"
    );
}

#[test]
fn flush_covers_writes_completed_on_other_threads() {
    // A write completed on "queue" A before a FLUSH on "queue" B must be durable after it.
    let r = rig(16 * 4096, 4096, no_hydration);
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(
                block_on(r.engine.write(&r.path, 4096, &[7; 4096], false)),
                Ok(())
            )
        })
        .join()
        .map_err(|_| "writer panicked")
        .unwrap_or(());
        s.spawn(|| assert_eq!(block_on(r.engine.flush(&r.path)), Ok(())));
    });
    assert_eq!(&r.dest.durable()[4096..8192], &[7; 4096]);
}

#[test]
fn destination_flush_failure_is_sticky_read_only() {
    let r = rig(16 * 4096, 4096, no_hydration);
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[1; 4096], false)),
        Ok(())
    );
    // Region 0's bit committed: read-only mode keeps it (bits set after the last commit
    // are dropped, see the next tests).
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    r.dest.set_fault(Some(Arc::new(|op: &Op| {
        (*op == Op::Flush).then(|| io::Error::other("cache died"))
    })));
    let e = block_on(r.engine.flush(&r.path));
    assert_eq!(e.as_ref().map_err(|e| e.errno), Err(libc::EIO));
    assert_eq!(r.engine.mode(), Mode::ReadOnly);
    r.dest.set_fault(None);
    // The device recovered, but a later FLUSH must not pretend the lost data is safe.
    assert_eq!(
        block_on(r.engine.flush(&r.path)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[2; 512], true)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
    // Writes needing hydration fail, writes to hydrated regions and reads work.
    assert_eq!(
        block_on(r.engine.write(&r.path, 8192, &[2; 512], false)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[3; 512], false)),
        Ok(())
    );
    let mut buf = [0u8; 512];
    assert_eq!(block_on(r.engine.read(&r.path, 0, &mut buf)), Ok(()));
    assert_eq!(buf, [3; 512]);
    assert!(r.engine.status().mode_reason.contains("cache died"));
    // The mode and its reason survive a restart: reopen the metadata as the daemon would.
    let reopened: Arc<dyn BlockDev> = Arc::new(MemDev::from_image("meta-after", r.meta.durable()));
    let (_, report) =
        Metadata::open(reopened, &crate::metadata::Expect::default()).expect("reopen");
    assert_eq!(report.mode, crate::metadata::MetadataMode::ReadOnly);
    assert!(
        report.mode_reason.contains("cache died"),
        "reason: {}",
        report.mode_reason
    );
}

#[test]
fn metadata_write_failure_is_sticky() {
    let r = rig(16 * 4096, 4096, no_hydration);
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[1; 4096], false)),
        Ok(())
    );
    r.meta.set_fault(Some(Arc::new(|op: &Op| {
        matches!(op, Op::Write { .. }).then(|| io::Error::other("md dead"))
    })));
    assert!(block_on(r.engine.flush(&r.path)).is_err());
    assert_ne!(r.engine.mode(), Mode::ReadWrite);
    r.meta.set_fault(None);
    assert!(block_on(r.engine.flush(&r.path)).is_err());
}

#[test]
fn destination_write_error_fails_the_write_only() {
    let r = rig(16 * 4096, 4096, no_hydration);
    r.dest.set_fault(Some(Arc::new(|op: &Op| {
        matches!(op, Op::Write { .. }).then(|| io::Error::other("bad sector"))
    })));
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[1; 512], false)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
    assert_eq!(
        r.engine.status().hydrated,
        0,
        "a failed hydration must not set the bit"
    );
    r.dest.set_fault(None);
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[1; 512], false)),
        Ok(())
    );
    assert_eq!(r.engine.mode(), Mode::ReadWrite);
}

#[test]
fn source_read_errors_mark_the_region_failed_and_hydration_continues() {
    let size = 16 * 4096;
    let r = rig(size, 4096, |c| {
        c.knobs.batch_size = 4;
        c.knobs.threshold = 4;
        c.knobs.hydration_enabled = false;
    });
    // Region 5 is unreadable; then hydration is enabled at run time.
    r.source.set_fault(Some(Arc::new(|op: &Op| match op {
        Op::Read { offset, len } if *offset < 6 * 4096 && offset + len > 5 * 4096 => {
            Some(io::Error::other("medium error"))
        }
        _ => None,
    })));
    let mut knobs = r.engine.knobs();
    knobs.hydration_enabled = true;
    r.engine.set_knobs(knobs);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = r.engine.status();
        if st.hydrated + st.failed_regions.len() as u64 == st.regions || Instant::now() > deadline {
            break;
        }
        r.engine
            .hydrator
            .progress
            .wait_until_blocking(|| false, Duration::from_millis(20));
    }
    let st = r.engine.status();
    assert_eq!(st.failed_regions, vec![5]);
    assert_eq!(
        st.hydrated,
        st.regions - 1,
        "hydration continued past the bad region"
    );
    let mut buf = [0u8; 512];
    assert_eq!(
        block_on(r.engine.read(&r.path, 5 * 4096, &mut buf)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
    assert_eq!(r.engine.mode(), Mode::ReadWrite);
}

/// The source-error metric counts user I/O's failed source reads too (a read of an
/// unhydrated region, a copy-on-write's), not only background hydration's.
#[test]
fn user_source_read_errors_are_counted() {
    let r = rig(16 * 4096, 4096, no_hydration);
    r.source.set_fault(Some(Arc::new(|op: &Op| match op {
        Op::Read { .. } => Some(io::Error::other("medium error")),
        _ => None,
    })));
    let errors = || r.engine.metrics().snapshot().source_read_errors;
    assert_eq!(errors(), 0);
    let mut buf = [0u8; 512];
    assert!(block_on(r.engine.read(&r.path, 3 * 4096, &mut buf)).is_err());
    assert_eq!(errors(), 1, "a user read's source error");
    assert!(block_on(r.engine.write(&r.path, 7 * 4096 + 512, &[1; 512], false)).is_err());
    assert!(
        errors() >= 2,
        "a copy-on-write's source error: {}",
        errors()
    );
}

#[test]
fn discard_marks_whole_regions_without_copy_and_zeroes_partial_edges() {
    let r = rig(16 * 4096, 4096, |c| {
        no_hydration(c);
        c.discard_passdown = false;
    });
    r.source.set_fault(Some(Arc::new(|op: &Op| match op {
        Op::Read { offset, .. } if *offset >= 4096 && *offset < 3 * 4096 => {
            Some(io::Error::other("must not copy"))
        }
        _ => None,
    })));
    // [1024, 3*4096+1024): regions 1 and 2 whole, region 0 and 3 partial.
    assert_eq!(block_on(r.engine.discard(&r.path, 1024, 3 * 4096)), Ok(()));
    r.source.set_fault(None);
    let mut buf = vec![0u8; 4 * 4096];
    assert_eq!(block_on(r.engine.read(&r.path, 0, &mut buf)), Ok(()));
    let src = r.source.snapshot();
    assert_eq!(
        &buf[..1024],
        &src[..1024],
        "undiscarded head keeps its data"
    );
    assert!(
        buf[1024..4096].iter().all(|b| *b == 0),
        "partial head reads zeroes, not source data"
    );
    assert!(
        buf[3 * 4096..3 * 4096 + 1024].iter().all(|b| *b == 0),
        "partial tail reads zeroes"
    );
    assert_eq!(&buf[3 * 4096 + 1024..], &src[3 * 4096 + 1024..4 * 4096]);
    assert_eq!(r.engine.status().hydrated, 4);
}

#[test]
fn write_zeroes_hydrates_whole_regions_without_copy_and_keeps_partial_edges() {
    let r = rig(16 * 4096, 4096, no_hydration);
    // Regions 1 and 2 are covered whole: their source data must never be read.
    r.source.set_fault(Some(Arc::new(|op: &Op| match op {
        Op::Read { offset, len } if *offset < 3 * 4096 && offset + len > 4096 => {
            Some(io::Error::other("must not copy"))
        }
        _ => None,
    })));
    // Region 2 is hydrated first (a whole-region write), so both kinds are zeroed.
    let ones = vec![0xffu8; 4096];
    assert_eq!(
        block_on(r.engine.write(&r.path, 2 * 4096, &ones, false)),
        Ok(())
    );
    // [3072, 3*4096+1024): region 0 and 3 partial, 1 and 2 whole.
    let res = r
        .engine
        .write_zeroes(&r.path, 3072, 2 * 4096 + 2048, true, false);
    assert_eq!(block_on(res), Ok(()));
    r.source.set_fault(None);
    let mut buf = vec![0u8; 4 * 4096];
    assert_eq!(block_on(r.engine.read(&r.path, 0, &mut buf)), Ok(()));
    let src = r.source.snapshot();
    assert_eq!(
        &buf[..3072],
        &src[..3072],
        "head of region 0 keeps its data"
    );
    assert!(
        buf[3072..3 * 4096 + 1024].iter().all(|b| *b == 0),
        "the zeroed range reads zeroes"
    );
    assert_eq!(
        &buf[3 * 4096 + 1024..],
        &src[3 * 4096 + 1024..4 * 4096],
        "tail of region 3 keeps its data"
    );
    assert_eq!(r.engine.status().hydrated, 4);
    // Durable like a write: a FLUSH commits the bits, and the destination holds the zeroes.
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    let dest = r.dest.snapshot();
    assert!(dest[3072..3 * 4096 + 1024].iter().all(|b| *b == 0));
    assert_eq!(r.engine.shutdown().map_err(|e| e.to_string()), Ok(()));
}

#[test]
fn zeroes_and_discards_across_two_partial_regions_treat_each_region() {
    // An edge range may end one region and start the next; each must be handled on its own
    // state (regression: only the first region's state was looked at).
    for discard in [false, true] {
        let r = rig(16 * 4096, 4096, no_hydration);
        let ones = vec![0xffu8; 4096];
        // Region 2 hydrated, region 3 not; region 5 not, region 6 hydrated.
        for at in [2 * 4096, 6 * 4096] {
            assert_eq!(block_on(r.engine.write(&r.path, at, &ones, false)), Ok(()));
        }
        for at in [2 * 4096 + 3072, 5 * 4096 + 3072] {
            let res = if discard {
                block_on(r.engine.discard(&r.path, at, 2048))
            } else {
                block_on(r.engine.write_zeroes(&r.path, at, 2048, true, false))
            };
            assert_eq!(res, Ok(()));
        }
        let mut buf = vec![0u8; 16 * 4096];
        assert_eq!(block_on(r.engine.read(&r.path, 0, &mut buf)), Ok(()));
        let src = r.source.snapshot();
        for (lo, hi) in [(3 * 4096, 3 * 4096 + 1024), (5 * 4096 + 3072, 6 * 4096)] {
            assert!(
                buf[lo..hi].iter().all(|b| *b == 0),
                "discard {discard}: the unhydrated part [{lo}, {hi}) must read zeroes"
            );
        }
        if !discard {
            assert!(buf[2 * 4096 + 3072..3 * 4096].iter().all(|b| *b == 0));
            assert!(buf[6 * 4096..6 * 4096 + 1024].iter().all(|b| *b == 0));
        }
        assert_eq!(
            &buf[3 * 4096 + 1024..4 * 4096],
            &src[3 * 4096 + 1024..4 * 4096]
        );
        assert_eq!(
            &buf[5 * 4096..5 * 4096 + 3072],
            &src[5 * 4096..5 * 4096 + 3072]
        );
        assert_eq!(&buf[6 * 4096 + 1024..7 * 4096], &ones[1024..]);
        assert_eq!(r.engine.shutdown().map_err(|e| e.to_string()), Ok(()));
    }
}

#[test]
fn write_zeroes_in_read_only_mode_refuses_to_hydrate() {
    let r = rig(16 * 4096, 4096, no_hydration);
    r.engine.committer.degrade(Mode::ReadOnly, "test");
    let res = r.engine.write_zeroes(&r.path, 0, 2 * 4096, true, false);
    assert_eq!(block_on(res).map_err(|e| e.errno), Err(libc::EIO));
    let res = r.engine.write_zeroes(&r.path, 0, 4096, true, true);
    assert_eq!(block_on(res).map_err(|e| e.errno), Err(libc::EIO));
    assert_eq!(r.engine.status().hydrated, 0);
}

#[test]
fn out_of_range_and_unaligned_io_is_rejected() {
    let r = rig(16 * 4096, 4096, no_hydration);
    let mut buf = vec![0u8; 512];
    assert_eq!(
        block_on(r.engine.read(&r.path, 16 * 4096, &mut buf)).map_err(|e| e.errno),
        Err(libc::EINVAL)
    );
    assert_eq!(
        block_on(r.engine.write(&r.path, 100, &buf, false)).map_err(|e| e.errno),
        Err(libc::EINVAL)
    );
    assert_eq!(r.dest.write_count(), 0);
}

#[test]
fn background_hydration_completes_and_switches_to_pass_through() {
    let size = 64 * 4096 + 512;
    let r = rig(size, 4096, |_| {});
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.engine.is_fully_hydrated() && Instant::now() < deadline {
        r.engine
            .hydrator
            .progress
            .wait_until_blocking(|| r.engine.is_fully_hydrated(), Duration::from_millis(20));
    }
    assert!(r.engine.is_fully_hydrated());
    assert_eq!(
        &r.dest.snapshot()[..size as usize],
        &r.source.snapshot()[..]
    );
    // Once that state is committed, the in-core bitmap is released (dm-clone keeps it).
    let before = r.engine.status().bitmap_bytes;
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    let after = r.engine.status().bitmap_bytes;
    assert!(
        after < before && after <= 64,
        "bitmap not released: {before} -> {after} bytes"
    );
    assert_eq!(r.engine.status().hydrated, r.engine.status().regions);
    // Pass-through: reads no longer touch the source.
    r.source.set_fault(Some(Arc::new(|_: &Op| {
        Some(io::Error::other("source gone"))
    })));
    let mut buf = vec![0u8; 4096];
    assert_eq!(block_on(r.engine.read(&r.path, 0, &mut buf)), Ok(()));
    assert_eq!(r.engine.shutdown().map_err(|e| e.to_string()), Ok(()));
}

#[test]
fn fast_path_flush_failure_is_sticky_and_persisted() {
    // Nothing to commit: the FLUSH takes the fast path (destination flush on the data path).
    let r = rig(16 * 4096, 4096, no_hydration);
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[1; 4096], false)),
        Ok(())
    );
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    let commits = r.engine.status().commits;
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    assert_eq!(r.engine.status().commits, commits, "fast path: no commit");
    r.dest.set_fault(Some(Arc::new(|op: &Op| {
        (*op == Op::Flush).then(|| io::Error::other("cache lost"))
    })));
    assert_eq!(
        block_on(r.engine.flush(&r.path)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
    r.dest.set_fault(None);
    assert_eq!(
        block_on(r.engine.flush(&r.path)).map_err(|e| e.errno),
        Err(libc::EIO),
        "sticky"
    );
    assert_eq!(r.engine.mode(), Mode::ReadOnly);
    let reopened: Arc<dyn BlockDev> = Arc::new(MemDev::from_image("meta-after", r.meta.durable()));
    let (_, report) =
        Metadata::open(reopened, &crate::metadata::Expect::default()).expect("reopen");
    assert_eq!(
        report.mode,
        crate::metadata::MetadataMode::ReadOnly,
        "mode persisted"
    );
    assert!(
        report.mode_reason.contains("cache lost"),
        "reason: {}",
        report.mode_reason
    );
}

/// A data path whose destination flush, once it has run, waits for `gate` before it
/// returns: the FLUSH that issued it is held between its device flush and its reaction.
struct GatedFlushPath {
    inner: SyncPath,
    gate: smol::channel::Receiver<()>,
}

impl DataPath for GatedFlushPath {
    async fn read(&self, side: Side, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read(side, buf, offset).await
    }
    async fn write_dest(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_dest(buf, offset).await
    }
    async fn discard_dest(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard_dest(offset, len).await
    }
    async fn zero_dest(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner.zero_dest(offset, len, unmap).await
    }
    async fn flush_dest(&self) -> io::Result<()> {
        let res = self.inner.flush_dest().await;
        let _ = self.gate.recv().await;
        res
    }
}

/// Fails the next `n` flushes of `dev`, which then lose the device's unflushed writes.
fn fail_flushes_losing_cache(dev: &MemDev, n: u64) {
    let left = Arc::new(AtomicU64::new(n));
    dev.set_failed_flush_loses_cache(true);
    dev.set_fault(Some(Arc::new(move |op: &Op| {
        (*op == Op::Flush
            && left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(1))
                .is_ok())
        .then(|| io::Error::other("the cache died"))
    })));
}

/// Two FLUSHes on two queues. The first one's destination
/// flush fails and loses the cache, and before it has reacted the second one's flush
/// succeeds (nothing left to flush). The second must not acknowledge: the data written before
/// it arrived is gone.
#[test]
fn a_flush_that_loses_the_cache_fails_a_concurrent_flush_on_another_path() {
    let r = rig(16 * 4096, 4096, no_hydration);
    // Region 0 hydrated and committed: later FLUSHes take the fast path.
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[1; 4096], false)),
        Ok(())
    );
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    // An acknowledged write, not flushed yet.
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[2; 4096], false)),
        Ok(())
    );
    fail_flushes_losing_cache(&r.dest, 1);
    let (tx, rx) = smol::channel::bounded(1);
    let first = GatedFlushPath {
        inner: SyncPath {
            source: r.source.clone(),
            dest: r.dest.clone(),
        },
        gate: rx,
    };
    let (a, b) = block_on(async {
        let release = async {
            futures_lite::future::yield_now().await;
            let _ = tx.send(()).await;
        };
        let (ab, ()) = futures_lite::future::zip(
            futures_lite::future::zip(r.engine.flush(&first), r.engine.flush(&r.path)),
            release,
        )
        .await;
        ab
    });
    assert_eq!(r.dest.snapshot()[..4096], [1; 4096], "the write was lost");
    assert_eq!(a.map_err(|e| e.errno), Err(libc::EIO), "the failed flush");
    assert_eq!(
        b.map_err(|e| e.errno),
        Err(libc::EIO),
        "the second FLUSH acknowledged data the first one's flush lost"
    );
    assert_eq!(r.engine.mode(), Mode::ReadOnly);
}

/// After a failed destination flush, a region hydrated since the last
/// commit may hold data the flush lost; read-only mode falls back to the committed bitmap
/// (as dm-clone does), so it is read from the source again.
#[test]
fn read_only_mode_reads_regions_hydrated_after_the_last_commit_from_the_source() {
    let r = rig(16 * 4096, 4096, no_hydration);
    let src = pattern(16 * 4096, 1);
    // Region 1: hydrated and committed.
    assert_eq!(
        block_on(r.engine.write(&r.path, 4096, &[7; 4096], false)),
        Ok(())
    );
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    // Region 2: hydrated by copy-on-write, not committed.
    assert_eq!(
        block_on(r.engine.write(&r.path, 2 * 4096 + 512, &[9; 512], false)),
        Ok(())
    );
    assert_eq!(r.engine.status().hydrated, 2);
    fail_flushes_losing_cache(&r.dest, 1);
    assert_eq!(
        block_on(r.engine.flush(&r.path)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
    assert_eq!(r.engine.mode(), Mode::ReadOnly);
    r.dest.set_fault(None);
    let mut buf = vec![0u8; 4096];
    assert_eq!(block_on(r.engine.read(&r.path, 2 * 4096, &mut buf)), Ok(()));
    assert!(
        buf == src[2 * 4096..3 * 4096],
        "region 2 was read from the destination, which lost it (first bytes {:?})",
        &buf[..8]
    );
    assert_eq!(block_on(r.engine.read(&r.path, 4096, &mut buf)), Ok(()));
    assert_eq!(
        buf,
        vec![7; 4096],
        "committed region 1 still reads from the destination"
    );
    assert_eq!(
        r.engine.status().hydrated,
        1,
        "back to the committed bitmap"
    );
    // No bit can be set any more: a write that needs region 2 hydrated fails.
    assert_eq!(
        block_on(r.engine.write(&r.path, 2 * 4096, &[3; 512], false)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
}

/// A clone whose metadata records read-only mode starts in it: reads
/// work (its data can be copied off), FLUSH and writes that need a bit fail.
#[test]
fn a_clone_whose_metadata_is_read_only_starts_read_only() {
    let r = rig(16 * 4096, 4096, no_hydration);
    assert_eq!(
        block_on(r.engine.write(&r.path, 4096, &[7; 4096], false)),
        Ok(())
    );
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    fail_flushes_losing_cache(&r.dest, 1);
    assert!(block_on(r.engine.flush(&r.path)).is_err());
    r.dest.set_fault(None);
    assert!(r.engine.shutdown().is_ok());
    let meta = Arc::new(MemDev::from_image("meta-after", r.meta.durable()));
    let md = Arc::new(open_md(&meta, &r.source, &r.dest, 4096));
    let engine = match Engine::start(
        md,
        r.source.clone(),
        r.dest.clone(),
        EngineConfig::new(16 * 4096, 4096),
    ) {
        Ok(e) => e,
        Err(e) => panic!("a read-only clone must start: {e}"),
    };
    assert_eq!(engine.mode(), Mode::ReadOnly);
    assert!(engine.status().mode_reason.contains("the cache died"));
    let mut buf = vec![0u8; 4096];
    assert_eq!(block_on(engine.read(&r.path, 4096, &mut buf)), Ok(()));
    assert_eq!(buf, vec![7; 4096]);
    assert_eq!(block_on(engine.read(&r.path, 0, &mut buf)), Ok(()));
    assert!(buf == pattern(16 * 4096, 1)[..4096]);
    assert_eq!(
        block_on(engine.flush(&r.path)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
    assert_eq!(
        block_on(engine.write(&r.path, 0, &[1; 512], false)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
    assert_eq!(engine.status().hydrated, 1);
    assert!(engine.shutdown().is_ok());
}

/// A data path over real files opened with O_DIRECT and no bounce buffer, as the ublk
/// queues' io_uring path is: an unaligned buffer fails with EINVAL. The kernel's own memory
/// alignment rule depends on the device under the file system (as little as 4 bytes here);
/// this path enforces the strictest one a destination can have (4096 bytes: a 4Kn device),
/// which the engine promises for every buffer it hands down.
struct DirectFilePath {
    source: std::fs::File,
    dest: std::fs::File,
}

fn dio_aligned(buf: &[u8]) -> io::Result<()> {
    if buf.as_ptr() as usize % 4096 != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

impl DataPath for DirectFilePath {
    async fn read(&self, side: Side, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        dio_aligned(buf)?;
        match side {
            Side::Source => self.source.read_exact_at(buf, offset),
            Side::Dest => self.dest.read_exact_at(buf, offset),
        }
    }
    async fn write_dest(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        dio_aligned(buf)?;
        self.dest.write_all_at(buf, offset)
    }
    async fn discard_dest(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    async fn zero_dest(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.dest
            .write_all_at(&crate::io::ZEROES[..len as usize], offset)
    }
    async fn flush_dest(&self) -> io::Result<()> {
        self.dest.sync_data()
    }
}

/// A partial discard edge over a region that a hydration copy finishes
/// while the discard waits for its lock goes to the destination as it is; with O_DIRECT an
/// unaligned buffer there is EINVAL (fstrim gets EIO).
#[test]
fn discard_edge_on_an_o_direct_destination_uses_an_aligned_buffer() {
    use crate::io::file::{Access, FileDev};
    use std::os::unix::fs::OpenOptionsExt;
    let size = 16 * 4096u64;
    let dir = tempfile::tempdir().expect("tempdir");
    let (sp, dp) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::write(&sp, pattern(size, 1)).expect("source");
    std::fs::write(&dp, vec![0u8; size as usize]).expect("dest");
    let open = |p: &std::path::Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(p)
            .expect("O_DIRECT open")
    };
    let path = DirectFilePath {
        source: open(&sp),
        dest: open(&dp),
    };
    // The test only means something where O_DIRECT enforces alignment.
    let unaligned = vec![0u8; 4096 + 1];
    assert_eq!(
        block_on(path.write_dest(&unaligned[1..], 0))
            .map_err(|e| e.raw_os_error())
            .err(),
        Some(Some(libc::EINVAL)),
        "this file system does not enforce O_DIRECT alignment"
    );
    let source = Arc::new(FileDev::open(&sp, Access::ReadOnly, true).expect("source"));
    let dest = Arc::new(FileDev::open(&dp, Access::ReadWrite, true).expect("dest"));
    let meta = Arc::new(MemDev::new("meta", 1 << 20));
    let m: Arc<dyn BlockDev> = meta.clone();
    let params = crate::metadata::FormatParams::from_devices(source.as_ref(), dest.as_ref(), 4096)
        .expect("fingerprint");
    Metadata::format(m.clone(), &params, false).expect("format");
    let expect =
        crate::metadata::Expect::from_devices(source.as_ref(), dest.as_ref()).expect("expect");
    let md = Arc::new(Metadata::open(m, &expect).expect("open").0);
    let mut cfg = EngineConfig::new(size, 4096);
    no_hydration(&mut cfg);
    let engine = Engine::start(md, source, dest, cfg).expect("engine");
    // Region 3 is being hydrated: its lock is held.
    let guard = block_on(engine.locks.lock(3));
    let (res, ()) = block_on(futures_lite::future::zip(
        // Discard from the middle of region 3 into region 4: a partial edge on region 3.
        engine.discard(&path, 3 * 4096 + 1024, 4096 + 3072),
        async {
            while engine.locks.waiters(3) == 0 {
                futures_lite::future::yield_now().await;
            }
            // The copy finishes: data on the destination, bit set, lock released.
            use std::os::unix::fs::FileExt;
            let region = crate::io::AlignedBuf::zeroed(4096);
            path.dest.write_all_at(&region, 3 * 4096).expect("copy");
            engine.map.md().set_hydrated(3).expect("bit");
            drop(guard);
        },
    ));
    assert_eq!(res, Ok(()), "discard of a partial edge");
    assert!(engine.shutdown().is_ok());
}

/// Waits up to `secs` for `cond` (a liveness bound, not a timing assertion).
fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// The rate limiter must not wait while holding region locks. With a
/// rate of 1 byte/s, a batch of 16 KiB owes hours; a user write to a region of that batch
/// must still complete at once.
#[test]
fn the_rate_limit_is_waited_for_without_region_locks() {
    let r = rig(64 * 4096, 4096, |c| {
        c.knobs.rate_bytes_per_sec = 1;
        c.knobs.batch_size = 4;
        c.knobs.threshold = 4;
        c.hydration_workers = 1;
    });
    // The first batch (regions 0..4) has been picked: locked, or already copied.
    assert!(eventually(10, || r.engine.locks.is_locked(1)
        || r.engine.status().hydrated > 0));
    let (tx, rx) = std::sync::mpsc::channel();
    let (engine, path) = (
        r.engine.clone(),
        SyncPath {
            source: r.source.clone(),
            dest: r.dest.clone(),
        },
    );
    // Not scoped: if the write hangs, the test fails instead of hanging with it.
    std::thread::spawn(move || {
        let _ = tx.send(block_on(engine.write(&path, 4096 + 512, &[5; 512], false)));
    });
    let res = rx.recv_timeout(Duration::from_secs(20));
    assert!(
        matches!(res, Ok(Ok(()))),
        "a write to a region of the rate-limited batch did not complete: {res:?}"
    );
    // The wait for the rate limit also ends at shutdown.
    assert!(r.engine.shutdown().is_ok());
}

/// A destination that refuses every hydration write: bounded retries
/// with backoff, then read-only mode (not an endless loop of copies).
#[test]
fn failing_hydration_writes_back_off_and_degrade() {
    let r = rig(64 * 4096, 4096, |c| {
        c.knobs.batch_size = 4;
        c.knobs.threshold = 4;
        c.hydration_workers = 1;
        c.knobs.hydration_enabled = false;
    });
    let attempts = Arc::new(AtomicU64::new(0));
    let a = attempts.clone();
    r.dest.set_fault(Some(Arc::new(move |op: &Op| {
        matches!(op, Op::Write { .. }).then(|| {
            a.fetch_add(1, Ordering::SeqCst);
            io::Error::other("no space")
        })
    })));
    enable_hydration(&r.engine);
    assert!(
        eventually(20, || r.engine.mode() == Mode::ReadOnly),
        "still {:?} after {} failed hydration writes",
        r.engine.mode(),
        attempts.load(Ordering::SeqCst)
    );
    let n = attempts.load(Ordering::SeqCst);
    assert!(n <= 5, "{n} hydration writes for 5 retries");
    assert!(r.engine.status().mode_reason.contains("no space"));
    r.dest.set_fault(None);
    assert!(r.engine.shutdown().is_ok());
}

/// Once only failed regions are left, the sweep stops scanning the
/// bitmap (it used to rescan it every 50 ms).
#[test]
fn only_failed_regions_left_stops_the_sweep() {
    let r = rig(32 * 4096, 4096, |c| {
        c.knobs.batch_size = 4;
        c.knobs.threshold = 8;
        c.knobs.hydration_enabled = false;
    });
    r.source.set_fault(Some(Arc::new(|op: &Op| {
        matches!(op, Op::Read { offset, len } if *offset <= 5 * 4096 && 5 * 4096 < offset + len)
            .then(|| io::Error::other("bad sector"))
    })));
    enable_hydration(&r.engine);
    assert!(
        eventually(20, || {
            let s = r.engine.status();
            s.hydrated == 31 && s.failed_regions == vec![5]
        }),
        "{:?}",
        r.engine.status()
    );
    // Let the workers settle into their wait, then count batches over a while.
    assert!(eventually(5, || r.engine.status().hydrating == 0));
    std::thread::sleep(Duration::from_millis(100));
    let before = r.engine.hydrator.scans.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(600));
    let after = r.engine.hydrator.scans.load(Ordering::Relaxed);
    assert_eq!(
        after - before,
        0,
        "bitmap scans while only a failed region is left"
    );
    assert!(r.engine.shutdown().is_ok());
}

/// Copy-on-write into large cold regions must not allocate whole-region
/// buffers per request. 24 concurrent 4 KiB writes into 24 cold 16 MiB regions: no single
/// source or destination I/O (hence no buffer) is larger than a copy chunk, the copy budget
/// is never exceeded, and the data is right.
#[test]
fn copy_on_write_into_large_regions_is_chunked_and_budgeted() {
    const RS: u64 = 16 << 20;
    let size = 24 * RS;
    let r = rig(size, RS, |c| {
        no_hydration(c);
        c.copy_budget = 2 * budget::COPY_CHUNK as u64;
    });
    let largest = record_largest_io(&[&r.source, &r.dest]);
    let peak = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Acquire) {
                peak.fetch_max(r.engine.copy_budget.in_use(), Ordering::SeqCst);
                std::thread::yield_now();
            }
        });
        let writers: Vec<_> = (0..24u64)
            .map(|i| {
                let r = &r;
                s.spawn(move || {
                    // In the middle of region i: a head and a tail to copy.
                    block_on(
                        r.engine
                            .write(&r.path, i * RS + RS / 2, &[i as u8 + 1; 4096], false),
                    )
                })
            })
            .collect();
        for w in writers {
            assert_eq!(w.join().ok(), Some(Ok(())));
        }
        done.store(true, Ordering::Release);
    });
    let src = pattern(size, 1);
    let snap = r.dest.snapshot();
    for i in 0..24u64 {
        let at = (i * RS + RS / 2) as usize;
        assert!(snap[at..at + 4096].iter().all(|b| *b == i as u8 + 1));
        let head = (i * RS) as usize;
        assert!(snap[head..at] == src[head..at], "head of region {i}");
        let tail = ((i + 1) * RS) as usize;
        assert!(
            snap[at + 4096..tail] == src[at + 4096..tail],
            "tail of region {i}"
        );
    }
    assert_eq!(r.engine.status().hydrated, 24);
    let largest = largest.load(Ordering::SeqCst);
    assert!(
        largest <= budget::COPY_CHUNK as u64,
        "a {largest}-byte I/O: whole-region buffers"
    );
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= 2 * budget::COPY_CHUNK as u64,
        "budget exceeded: {peak}"
    );
}

/// A failed region that a discard later hydrates must not be counted as
/// "only failed regions left" (hydration used to stall one region short).
#[test]
fn a_failed_region_hydrated_later_does_not_stall_hydration() {
    let r = rig(32 * 4096, 4096, |c| {
        c.knobs.batch_size = 1;
        c.knobs.threshold = 1;
        c.hydration_workers = 1;
        c.knobs.hydration_enabled = false;
    });
    r.source.set_fault(Some(Arc::new(|op: &Op| {
        matches!(op, Op::Read { offset, len } if *offset <= 5 * 4096 && 5 * 4096 < offset + len)
            .then(|| io::Error::other("bad sector"))
    })));
    // Region 31 is held (a writer, say) so hydration cannot finish before the discard.
    let guard = block_on(r.engine.locks.lock(31));
    enable_hydration(&r.engine);
    assert!(eventually(20, || r.engine.status().failed_regions
        == vec![5]
        && r.engine.status().hydrated == 30));
    // The failed region is discarded (marked hydrated), then region 31 is released.
    assert_eq!(block_on(r.engine.discard(&r.path, 5 * 4096, 4096)), Ok(()));
    drop(guard);
    r.engine.hydrator.poke();
    assert!(
        eventually(20, || r.engine.is_fully_hydrated()),
        "hydration stalled: {:?}",
        r.engine.status()
    );
    assert!(r.engine.shutdown().is_ok());
}

/// A partial discard edge of a large cold region is zeroed a piece at a
/// time, not through a buffer of the edge's size.
#[test]
fn discard_edges_of_large_regions_use_bounded_buffers() {
    const RS: u64 = 16 << 20;
    let r = rig(4 * RS, RS, no_hydration);
    let largest = record_largest_io(&[&r.source, &r.dest]);
    // From 4 KiB into region 0 to the middle of region 2: two partial edges of ~16 MiB / 8 MiB.
    assert_eq!(
        block_on(r.engine.discard(&r.path, 4096, 2 * RS + RS / 2 - 4096)),
        Ok(())
    );
    let snap = r.dest.snapshot();
    assert!(snap[4096..(RS as usize)].iter().all(|b| *b == 0));
    assert!(snap[(2 * RS) as usize..(2 * RS + RS / 2) as usize]
        .iter()
        .all(|b| *b == 0));
    let src = pattern(4 * RS, 1);
    assert!(snap[..4096] == src[..4096], "head of region 0 kept");
    let largest = largest.load(Ordering::SeqCst);
    assert!(largest <= budget::COPY_CHUNK as u64, "a {largest}-byte I/O");
}

/// A clone over a 4Kn source or destination has 4096-byte logical blocks;
/// anything not aligned to them is refused (EINVAL) before it reaches a device, on every path.
#[test]
fn io_not_aligned_to_a_4096_byte_logical_block_is_rejected() {
    let r = rig(16 * 4096, 8192, |c| {
        no_hydration(c);
        c.block_size = 4096;
    });
    assert_eq!(r.engine.block_size(), 4096);
    let einval = Err(libc::EINVAL);
    let mut buf = vec![0u8; 8192];
    for (off, len) in [
        (512u64, 512usize),
        (0, 512),
        (4096, 4096 + 512),
        (2048, 4096),
    ] {
        let res = block_on(r.engine.read(&r.path, off, &mut buf[..len]));
        assert_eq!(res.clone().map_err(|e| e.errno), einval, "read {off}+{len}");
        let msg = res.err().map(|e| e.msg).unwrap_or_default();
        assert!(
            msg.contains("4096"),
            "the message names the block size: {msg}"
        );
        let res = block_on(r.engine.write(&r.path, off, &buf[..len], false));
        assert_eq!(res.map_err(|e| e.errno), einval, "write {off}+{len}");
        let res = block_on(r.engine.write_zeroes(&r.path, off, len as u64, true, false));
        assert_eq!(res.map_err(|e| e.errno), einval, "write zeroes {off}+{len}");
        let res = block_on(r.engine.discard(&r.path, off, len as u64));
        assert_eq!(res.map_err(|e| e.errno), einval, "discard {off}+{len}");
        assert_eq!(r.engine.direct_route(off, len as u64, false), None);
    }
    assert_eq!(r.dest.write_count(), 0, "nothing reached the destination");
    assert_eq!(r.engine.status().hydrated, 0);
    // Whole logical blocks work, also inside a region (copy-on-write of the rest).
    assert_eq!(
        block_on(r.engine.read(&r.path, 4096, &mut buf[..4096])),
        Ok(())
    );
    assert!(buf[..4096] == pattern(16 * 4096, 1)[4096..8192]);
    assert_eq!(
        block_on(r.engine.write(&r.path, 4096, &[9; 4096], false)),
        Ok(())
    );
    assert_eq!(block_on(r.engine.read(&r.path, 0, &mut buf)), Ok(()));
    assert!(buf[..4096] == pattern(16 * 4096, 1)[..4096]);
    assert!(buf[4096..] == [9; 4096]);
    assert_eq!(r.engine.status().hydrated, 1);
    assert!(r.engine.shutdown().is_ok());
}

/// The block size must fit the regions and the device: a region smaller than a logical block,
/// or a device size that is not a whole number of blocks, is refused at start.
#[test]
fn start_refuses_a_block_size_the_regions_or_the_size_do_not_fit() {
    for (size, region, block, what) in [
        (16 * 4096, 4096, 8192, "smaller than"),
        (16 * 4096 + 512, 4096, 4096, "not a multiple"),
        (16 * 4096, 4096, 1000, "power of two"),
    ] {
        let source = Arc::new(MemDev::from_image("source", pattern(size, 1)));
        let dest = Arc::new(MemDev::new("dest", size));
        let meta = Arc::new(MemDev::new("meta", 1 << 20));
        let md = Arc::new(open_md(&meta, &source, &dest, region));
        let mut cfg = EngineConfig::new(size, region);
        cfg.block_size = block;
        match Engine::start(md, source, dest, cfg) {
            Ok(e) => {
                let _ = e.shutdown();
                panic!("started with block size {block}, region {region}, size {size}");
            }
            Err(e) => assert!(e.to_string().contains(what), "{e}"),
        }
    }
}

/// A clone degraded by failing hydration writes (a full thin pool), not by a failed flush,
/// keeps its in-core bitmap: regions hydrated since the last commit are on the destination,
/// and writes to them still work (VM test fault_dest_enospc).
#[test]
fn degraded_by_hydration_write_failures_keeps_the_in_core_bitmap() {
    let r = rig(64 * 4096, 4096, |c| {
        c.knobs.batch_size = 4;
        c.knobs.threshold = 4;
        c.hydration_workers = 1;
        c.commit_period = Duration::from_secs(3600);
        c.knobs.hydration_enabled = false;
    });
    // Regions 0..4 hydrated by writes (not committed), then the destination refuses new data.
    assert_eq!(
        block_on(r.engine.write(&r.path, 0, &[1; 4 * 4096], false)),
        Ok(())
    );
    r.dest.set_fault(Some(Arc::new(|op: &Op| {
        matches!(op, Op::Write { offset, .. } if *offset >= 16 * 4096)
            .then(|| io::Error::from_raw_os_error(libc::ENOSPC))
    })));
    enable_hydration(&r.engine);
    assert!(eventually(20, || r.engine.mode() == Mode::ReadOnly));
    let hydrated = r.engine.status().hydrated;
    assert!(hydrated >= 4);
    assert_eq!(
        block_on(r.engine.write(&r.path, 4096, &[3; 512], false)),
        Ok(())
    );
    let mut buf = [0u8; 512];
    assert_eq!(block_on(r.engine.read(&r.path, 4096, &mut buf)), Ok(()));
    assert_eq!(buf, [3; 512]);
    assert_eq!(r.engine.status().hydrated, hydrated, "bits kept");
    r.dest.set_fault(None);
    assert!(r.engine.shutdown().is_ok());
}

/// Turns background hydration on (tests start with it off to arm faults first).
fn enable_hydration(engine: &Engine) {
    let mut k = engine.knobs();
    k.hydration_enabled = true;
    engine.set_knobs(k);
}

/// Records the largest read or write any of `devs` sees (the largest buffer behind it).
fn record_largest_io(devs: &[&Arc<MemDev>]) -> Arc<AtomicU64> {
    let largest = Arc::new(AtomicU64::new(0));
    for dev in devs {
        let l = largest.clone();
        dev.set_fault(Some(Arc::new(move |op: &Op| {
            if let Op::Read { len, .. } | Op::Write { len, .. } = op {
                l.fetch_max(*len, Ordering::SeqCst);
            }
            None
        })));
    }
    largest
}

/// A clone whose survival copy is attached, as a daemon runs it; returns the rig's parts and
/// the copy's device.
fn rig_with_survival(size: u64, region_size: u64) -> (Rig, Arc<MemDev>) {
    let nr = size / region_size;
    let surv = Arc::new(MemDev::new("surv", crate::metadata::survival_size(nr)));
    let attach = |md: &Metadata| {
        md.attach_survival(surv.clone(), [5; 16], None)
            .expect("attach")
    };
    (rig_prepared(size, region_size, attach, no_hydration), surv)
}

#[test]
fn a_failed_commit_is_in_the_survival_copy_before_the_flush_fails() {
    // Seed 004 across a daemon death: the metadata may not record the degraded mode (its
    // write is what failed), so the survival copy must, before the FLUSH is answered.
    let (r, surv) = rig_with_survival(16 * 4096, 4096);
    assert_eq!(
        block_on(r.engine.write(&r.path, 2 * 4096, &[6; 4096], false)),
        Ok(())
    );
    // Only the commit's first metadata write fails; recording the mode then succeeds, so
    // only the switch to read-only itself can have written the survival copy.
    let failed_once = Arc::new(AtomicBool::new(false));
    let f = failed_once.clone();
    r.meta.set_fault(Some(Arc::new(move |op: &Op| {
        (matches!(op, Op::Write { .. }) && !f.swap(true, Ordering::SeqCst))
            .then(|| io::Error::other("md write lost"))
    })));
    assert!(block_on(r.engine.flush(&r.path)).is_err());
    let uuid = r.engine.map.md().uuid();
    // The daemon dies now: what the next one finds.
    let s = crate::metadata::SurvivalFile::read(surv.as_ref(), uuid, [5; 16], 16)
        .expect("read")
        .expect("same boot");
    assert_eq!(s.poisoned, None, "the destination flush did not fail");
    let (mode, reason) = s
        .degraded
        .expect("the degraded mode is not in the survival copy");
    assert_eq!(mode, crate::metadata::MetadataMode::ReadOnly);
    assert!(reason.contains("md write lost"), "{reason}");
    assert_eq!(s.words[0] & (1 << 2), 1 << 2, "the written region's bit");
    let _ = r.engine.shutdown();
}

#[test]
fn an_engine_started_in_a_dead_daemons_degraded_mode_refuses_flushes_and_records_it() {
    let size = 16 * 4096;
    let r = rig(size, 4096, no_hydration);
    assert_eq!(
        block_on(r.engine.write(&r.path, 4096, &[7; 4096], false)),
        Ok(())
    );
    assert_eq!(block_on(r.engine.flush(&r.path)), Ok(()));
    assert!(r.engine.shutdown().is_ok());
    let md = Arc::new(open_md(&r.meta, &r.source, &r.dest, 4096));
    assert_eq!(md.mode().0, crate::metadata::MetadataMode::ReadWrite);
    let mut cfg = EngineConfig::new(size, 4096);
    no_hydration(&mut cfg);
    cfg.start_mode = Some((Mode::ReadOnly, "commit failed: EIO".into()));
    let engine = match Engine::start(md, r.source.clone(), r.dest.clone(), cfg) {
        Ok(e) => e,
        Err(e) => panic!("engine start: {e}"),
    };
    assert_eq!(engine.mode(), Mode::ReadOnly);
    assert_eq!(
        block_on(engine.flush(&r.path)).map_err(|e| e.errno),
        Err(libc::EIO)
    );
    let mut buf = vec![0u8; 4096];
    assert_eq!(block_on(engine.read(&r.path, 4096, &mut buf)), Ok(()));
    assert_eq!(buf, vec![7; 4096]);
    let _ = engine.shutdown();
    // The commit thread recorded the mode in the metadata.
    let md = open_md(&r.meta, &r.source, &r.dest, 4096);
    let (mode, reason) = md.mode();
    assert_eq!(mode, crate::metadata::MetadataMode::ReadOnly);
    assert!(reason.contains("commit failed: EIO"), "{reason}");
}

/// `--prefetch`: the listed regions are hydrated first, in order, ahead of the sweep (which
/// starts at region 0); `--trace-reads` records first reads once each, in order.
#[test]
fn prefetched_regions_are_hydrated_before_the_sweep() {
    const REGION: u64 = 4096;
    let r = rig(64 * REGION, REGION, |c| {
        c.hydration_workers = 1;
        c.knobs.batch_size = 1;
        c.knobs.threshold = 1;
        // About 8 regions a second: the order shows.
        c.knobs.rate_bytes_per_sec = 8 * REGION;
        c.prefetch = vec![7, 2, 30];
        c.trace_reads = true;
    });
    let md = r.engine.map.md();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while md.nr_hydrated() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let hydrated: Vec<u64> = (0..64).filter(|x| md.is_hydrated(*x)).collect();
    // The sweep (from region 0) may have taken one more region since, never before the list.
    assert!(
        hydrated == [2, 7, 30] || hydrated == [0, 2, 7, 30],
        "{hydrated:?}"
    );
    r.engine.trace_read(5 * REGION, 2 * REGION);
    r.engine.trace_read(3 * REGION, 512);
    r.engine.trace_read(5 * REGION, 512);
    assert_eq!(r.engine.read_trace(), Some(vec![5, 6, 3]));
    assert!(r.engine.shutdown().is_ok());
}

/// A sparse source file of `size` bytes at `path` in which about 10% of the `region`-sized
/// regions hold data, some of them only one 4 KiB block (the rest of such a region is a hole,
/// but the region must still be read); the regions holding data.
pub(crate) fn sparse_source(
    path: &std::path::Path,
    size: u64,
    region: u64,
    seed: u64,
) -> std::collections::BTreeSet<u64> {
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::create(path).expect("source");
    src.set_len(size).expect("size");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let nr = size / region;
    let mut data_regions = std::collections::BTreeSet::new();
    while data_regions.len() < (nr / 10) as usize {
        let r = rng.gen_range(0..nr);
        let len = if rng.gen_bool(0.5) { region } else { 4096 };
        let at = r * region
            + if len == 4096 {
                4096 * rng.gen_range(0..region / 4096)
            } else {
                0
            };
        let bytes: Vec<u8> = (0..len).map(|_| rng.gen_range(1..=255)).collect();
        src.write_all_at(&bytes, at).expect("data");
        data_regions.insert(r);
    }
    src.sync_all().expect("sync");
    data_regions
}

/// Waits (up to `within`) for `engine` to be fully hydrated; fails the test if it is not.
pub(crate) fn hydrate_fully(engine: &Engine, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while !engine.is_fully_hydrated() && std::time::Instant::now() < deadline {
        engine
            .hydrator
            .progress
            .wait_until_blocking(|| engine.is_fully_hydrated(), Duration::from_millis(50));
    }
    assert!(engine.is_fully_hydrated(), "{:?}", engine.status());
}

/// A copy-on-write reads the region's source in one I/O; when that fails, it reads only the
/// head and the tail. A source error under the part the write covers does not fail the
/// write; one under the rest does, and leaves the region cold.
#[test]
fn copy_on_write_over_a_bad_source_block_reads_around_it() {
    const RS: u64 = 64 * 1024;
    let r = rig(8 * RS, RS, no_hydration);
    let (under, beside) = (2 * RS + 8192, 3 * RS);
    r.source.set_fault(Some(Arc::new(move |op: &Op| {
        matches!(op, Op::Read { offset, len }
            if [under, beside].iter().any(|b| *offset <= *b && *b < offset + len))
        .then(|| io::Error::other("bad sector"))
    })));
    assert_eq!(
        block_on(r.engine.write(&r.path, under, &[7u8; 4096], false)),
        Ok(())
    );
    let src = pattern(8 * RS, 1);
    let snap = r.dest.snapshot();
    let (a, b) = (under as usize, under as usize + 4096);
    assert!(snap[a..b].iter().all(|x| *x == 7));
    assert!(snap[2 * RS as usize..a] == src[2 * RS as usize..a], "head");
    assert!(snap[b..3 * RS as usize] == src[b..3 * RS as usize], "tail");
    let res = block_on(r.engine.write(&r.path, beside + 8192, &[8u8; 4096], false));
    assert_eq!(res.map_err(|e| e.errno), Err(libc::EIO));
    assert_eq!(r.engine.status().hydrated, 1);
    // A source that does not answer (a remote one timed out) is not asked again for the head
    // and the tail: the write fails after one wait.
    let reads = Arc::new(AtomicU64::new(0));
    let counted = reads.clone();
    r.source.set_fault(Some(Arc::new(move |op: &Op| {
        let Op::Read { offset, .. } = op else {
            return None;
        };
        (*offset >= 5 * RS && *offset < 6 * RS).then(|| {
            counted.fetch_add(1, Ordering::SeqCst);
            io::Error::new(io::ErrorKind::TimedOut, "no answer")
        })
    })));
    let res = block_on(r.engine.write(&r.path, 5 * RS + 8192, &[9u8; 4096], false));
    assert_eq!(res.map_err(|e| e.errno), Err(libc::EIO));
    assert_eq!(
        reads.load(Ordering::SeqCst),
        1,
        "the source was asked again"
    );
    assert!(r.engine.shutdown().is_ok());
}

/// `--hydrate-when idle`: while a user request is in service the sweep copies nothing; once
/// users are idle it hydrates everything. With `always` a request in service does not hold
/// it back.
#[test]
fn the_idle_policy_copies_nothing_while_a_user_request_is_in_service() {
    let r = rig(32 * 4096, 4096, |c| {
        c.knobs.batch_size = 4;
        c.knobs.threshold = 8;
        c.knobs.hydration_enabled = false;
        c.knobs.hydrate_when = super::HydrateWhen::Idle;
    });
    r.engine.user_io().started(1);
    enable_hydration(&r.engine);
    // The workers have looked several times and found the request in service.
    assert!(
        eventually(20, || r.engine.status().hydration_idle_wait_ms >= 50),
        "{:?}",
        r.engine.status()
    );
    let s = r.engine.status();
    assert_eq!(
        (s.hydrated, s.bytes_hydrated),
        (0, 0),
        "copied while a user request was in service"
    );
    r.engine.user_io().ended(1);
    assert!(
        eventually(20, || r.engine.is_fully_hydrated()),
        "{:?}",
        r.engine.status()
    );
    assert!(r.engine.shutdown().is_ok());

    let r = rig(32 * 4096, 4096, |c| {
        c.knobs.batch_size = 4;
        c.knobs.threshold = 8;
    });
    r.engine.user_io().started(0);
    assert!(
        eventually(20, || r.engine.is_fully_hydrated()),
        "`always` waited for users: {:?}",
        r.engine.status()
    );
    assert_eq!(r.engine.status().hydration_idle_wait_ms, 0);
    r.engine.user_io().ended(0);
    assert!(r.engine.shutdown().is_ok());
}

/// While users have a request in service, background batches are cut to 256 KiB (a batch
/// holds its regions' locks, and a user write to one of them, until its copy is written); an
/// idle device gets the whole batch.
#[test]
fn batches_are_small_while_users_have_requests_in_service() {
    let largest_copy = |busy: bool| {
        let r = rig(2 << 20, 4096, |c| {
            c.knobs.batch_size = 128;
            c.knobs.threshold = 256;
            c.knobs.hydration_enabled = false;
            // One worker: two would shorten each other's batches.
            c.hydration_workers = 1;
        });
        let largest = record_largest_io(&[&r.source]);
        if busy {
            r.engine.user_io().started(0);
        }
        enable_hydration(&r.engine);
        assert!(
            eventually(20, || r.engine.is_fully_hydrated()),
            "{:?}",
            r.engine.status()
        );
        if busy {
            r.engine.user_io().ended(0);
        }
        assert!(r.engine.shutdown().is_ok());
        largest.load(Ordering::SeqCst)
    };
    assert_eq!(largest_copy(true), 256 << 10, "a batch under user load");
    assert_eq!(largest_copy(false), 512 << 10, "a batch on an idle device");
}
