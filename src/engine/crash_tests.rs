//! Crash-consistency oracle for the engine.
//!
//! A randomized concurrent workload (reads, writes, FUA writes, WRITE_ZEROES, discards,
//! FLUSHes, background hydration, periodic commits) runs on a destination and a metadata device that are both
//! wrapped in [`RecordingDev`]s sharing one [`IoLog`], so the log keeps the relative order of
//! their writes and flushes. The workload keeps a history of every acknowledged operation.
//! Then crash states are rebuilt from the log (at every flush point, at every FLUSH
//! completion, and at random cuts, each with random subsets of the unflushed writes lost and
//! torn at sector granularity) and checked:
//! - the metadata opens;
//! - the hydrated set never goes backwards: every crash state holds at least the regions of
//!   the state that lost every unflushed write at the latest flush point before it;
//! - every sector of a region marked hydrated holds an acceptable value in the destination;
//! - a fresh engine (hydration off) on the crash state reads an acceptable value everywhere.
//!
//! Acceptable values of a sector at a cut: the sector's history is the source value followed
//! by every write and discard of it in completion order (the test serialises overlapping
//! operations with a range lock). The newest *durable* version (acknowledged before a FLUSH
//! was issued that completed before the cut, or a FUA write completed before the cut) and any
//! newer version issued before the cut are acceptable; a discard among them makes the sector
//! unconstrained.
//!
//! The recorders are created after formatting, so the initial metadata image is the
//! formatted one; opening the metadata (which writes a superblock) is recorded.
//!
//! `UBLK_CLONE_CRASH_LONG=1` runs many more seeds.

use super::tests::RangeLocks;
use super::tests::{pattern, random_span};
use super::*;
use crate::io::mem::MemDev;
use crate::io::record::{IoLog, RecordingDev};
use crate::metadata::{survival_size, Expect, FormatParams, SurvivalFile};
use futures_lite::future::block_on;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

const SECTOR: u64 = 512;
const DEST: usize = 0;
const META: usize = 1;
const SURV: usize = 2;
/// The boot the recorded run happened in (its survival copy is merged in the same boot).
const BOOT: [u8; 16] = [0x42; 16];

type RecDev = RecordingDev<Arc<MemDev>>;

struct CrashRig {
    source: Arc<MemDev>,
    log: Arc<IoLog>,
    engine: Arc<Engine>,
    path: SyncPath,
    expect: Expect,
    size: u64,
    region_size: u64,
}

/// Like `tests::rig`, with the destination and the metadata recorded into one log.
fn crash_rig(size: u64, region_size: u64, tweak: impl FnOnce(&mut EngineConfig)) -> CrashRig {
    let source = Arc::new(MemDev::from_image("source", pattern(size, 1)));
    let dest_mem = Arc::new(MemDev::new("dest", size + 4096));
    let meta_mem = Arc::new(MemDev::new("meta", 1 << 20));
    let params = FormatParams::from_devices(source.as_ref(), dest_mem.as_ref(), region_size)
        .expect("fingerprint");
    let m: Arc<dyn BlockDev> = meta_mem.clone();
    Metadata::format(m, &params, false).expect("format");
    let log = IoLog::new();
    let dest: Arc<RecDev> = Arc::new(RecordingDev::new(dest_mem, &log).expect("record dest"));
    let meta: Arc<RecDev> = Arc::new(RecordingDev::new(meta_mem, &log).expect("record meta"));
    let nr_regions = size.div_ceil(region_size);
    let surv_mem = Arc::new(MemDev::new("surv", survival_size(nr_regions)));
    let surv: Arc<RecDev> = Arc::new(RecordingDev::new(surv_mem, &log).expect("record surv"));
    assert_eq!((dest.id(), meta.id(), surv.id()), (DEST, META, SURV));
    let expect = Expect::from_devices(source.as_ref(), dest.as_ref()).expect("fingerprint");
    let (md, _) = Metadata::open(meta.clone(), &expect).expect("open metadata");
    md.attach_survival(surv, BOOT, None)
        .expect("attach the survival copy");
    let mut cfg = EngineConfig::new(size, region_size);
    cfg.retry_backoff = Duration::ZERO;
    cfg.knobs.batch_size = 2;
    cfg.knobs.threshold = 4;
    cfg.commit_period = Duration::from_millis(20);
    tweak(&mut cfg);
    let engine =
        Engine::start(Arc::new(md), source.clone(), dest.clone(), cfg).expect("engine start");
    let path = SyncPath {
        source: source.clone(),
        dest,
    };
    CrashRig {
        source,
        log,
        engine,
        path,
        expect,
        size,
        region_size,
    }
}

/// One version of a sector: a write (index into `History::writes`) or a discard.
#[derive(Clone, Copy, Debug)]
struct Version {
    write: Option<usize>,
    /// Log length when the operation was issued: its device I/O lies at or after it.
    issued: usize,
    /// Log length after the operation returned.
    acked_at: usize,
    /// Logical time of the acknowledgement (compared with FLUSH issue times).
    ack_t: u64,
    fua: bool,
}

struct WriteRec {
    off: u64,
    data: Vec<u8>,
}

struct FlushRec {
    /// Logical time the FLUSH (or FUA write) was issued.
    issue_t: u64,
    /// Log length after it completed.
    completed_at: usize,
}

#[derive(Default)]
struct History {
    writes: Vec<WriteRec>,
    /// Per sector, its versions after the source value, in completion order.
    sectors: Vec<Vec<Version>>,
    flushes: Vec<FlushRec>,
    /// Mismatches seen by reads during the run (the plain model check).
    live_violations: Vec<String>,
}

struct Workload {
    threads: usize,
    ops: usize,
    /// Background hydration rate limit (0 = unlimited); a limit keeps hydration running
    /// through the whole workload instead of finishing in its first milliseconds.
    rate: u64,
}

impl Workload {
    /// The workload of `seed`: odd seeds hydrate slowly.
    fn for_seed(seed: u64, threads: usize, ops: usize) -> Workload {
        Workload {
            threads,
            ops,
            rate: if seed % 2 == 1 { 256 << 10 } else { 0 },
        }
    }
}

/// What the workload's threads share.
struct Shared<'a> {
    r: &'a CrashRig,
    seed: u64,
    history: Mutex<History>,
    /// Logical time: acknowledgements and FLUSH issues are ordered by it.
    clock: AtomicU64,
    locks: RangeLocks,
    /// The source image (the value of every sector before its first write).
    src: Vec<u8>,
}

/// The sectors `[a, b)` of one operation, and the log length when it was issued.
struct Span {
    a: u64,
    b: u64,
    issued: usize,
}

impl Span {
    fn off(&self) -> u64 {
        self.a * SECTOR
    }

    fn len(&self) -> u64 {
        (self.b - self.a) * SECTOR
    }
}

impl Shared<'_> {
    /// One random operation on a random range, recorded in the history once acknowledged.
    fn one_op(&self, rng: &mut StdRng) {
        let sectors = self.r.size / SECTOR;
        let (a, b) = random_span(rng, sectors, self.r.region_size / SECTOR);
        self.locks.lock(a, b);
        let span = Span {
            a,
            b,
            issued: self.r.log.len(),
        };
        match rng.gen_range(0..100) {
            0..=29 => self.read_and_compare(&span),
            30..=74 => self.write(rng, &span),
            75..=81 => self.discard(&span),
            _ => self.flush(),
        }
        self.locks.unlock(a, b);
    }

    /// Reads the span and records a live violation for every sector that does not hold its
    /// newest version (a discarded sector may hold anything).
    fn read_and_compare(&self, span: &Span) {
        let r = self.r;
        let mut buf = vec![0u8; span.len() as usize];
        let res = block_on(r.engine.read(&r.path, span.off(), &mut buf));
        assert_eq!(res, Ok(()));
        let mut h = self.history.lock();
        for sec in span.a..span.b {
            let want = match h.sectors[sec as usize].last() {
                None => &self.src[(sec * SECTOR) as usize..][..SECTOR as usize],
                Some(Version { write: None, .. }) => continue,
                Some(Version { write: Some(i), .. }) => {
                    let w = &h.writes[*i];
                    &w.data[(sec * SECTOR - w.off) as usize..][..SECTOR as usize]
                }
            };
            let at = ((sec - span.a) * SECTOR) as usize;
            if buf[at..at + SECTOR as usize] != *want {
                let msg = format!("seed {}: live read of sector {sec}", self.seed);
                h.live_violations.push(msg);
            }
        }
    }

    /// A write of random data, or (one in eight) a WRITE_ZEROES; one in ten is FUA.
    fn write(&self, rng: &mut StdRng, span: &Span) {
        let r = self.r;
        let (off, len) = (span.off(), span.len());
        let zeroes = rng.gen_range(0..8) == 0;
        let data: Vec<u8> = if zeroes {
            vec![0; len as usize]
        } else {
            (0..len).map(|_| rng.gen()).collect()
        };
        let fua = rng.gen_range(0..10) == 0;
        let issue_t = self.clock.fetch_add(1, Ordering::SeqCst);
        let res = if zeroes {
            let unmap = rng.gen();
            block_on(r.engine.write_zeroes(&r.path, off, len, unmap, fua))
        } else {
            block_on(r.engine.write(&r.path, off, &data, fua))
        };
        assert_eq!(res, Ok(()));
        let ack_t = self.clock.fetch_add(1, Ordering::SeqCst);
        let acked_at = r.log.len();
        let mut h = self.history.lock();
        let idx = h.writes.len();
        h.writes.push(WriteRec { off, data });
        for sec in span.a..span.b {
            h.sectors[sec as usize].push(Version {
                write: Some(idx),
                issued: span.issued,
                acked_at,
                ack_t,
                fua,
            });
        }
        if fua {
            // A FUA write also acts as a FLUSH issued when it was.
            h.flushes.push(FlushRec {
                issue_t,
                completed_at: acked_at,
            });
        }
    }

    fn discard(&self, span: &Span) {
        let r = self.r;
        let res = block_on(r.engine.discard(&r.path, span.off(), span.len()));
        assert_eq!(res, Ok(()));
        let ack_t = self.clock.fetch_add(1, Ordering::SeqCst);
        let acked_at = r.log.len();
        let mut h = self.history.lock();
        for sec in span.a..span.b {
            h.sectors[sec as usize].push(Version {
                write: None,
                issued: span.issued,
                acked_at,
                ack_t,
                fua: false,
            });
        }
    }

    fn flush(&self) {
        let issue_t = self.clock.fetch_add(1, Ordering::SeqCst);
        assert_eq!(block_on(self.r.engine.flush(&self.r.path)), Ok(()));
        let completed_at = self.r.log.len();
        self.history.lock().flushes.push(FlushRec {
            issue_t,
            completed_at,
        });
    }
}

/// Runs the workload and returns its history; the engine is shut down at the end (its final
/// commit and clean close are part of the log).
fn run_workload(r: &CrashRig, seed: u64, w: &Workload) -> History {
    let sectors = r.size / SECTOR;
    let shared = Shared {
        r,
        seed,
        history: Mutex::new(History {
            sectors: vec![Vec::new(); sectors as usize],
            ..History::default()
        }),
        clock: AtomicU64::new(1),
        locks: RangeLocks::new(sectors),
        src: r.source.snapshot(),
    };
    std::thread::scope(|s| {
        for t in 0..w.threads {
            let shared = &shared;
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed * 1000 + t as u64);
                for _ in 0..w.ops {
                    shared.one_op(&mut rng);
                }
            });
        }
    });
    assert_eq!(r.engine.shutdown().map_err(|e| e.to_string()), Ok(()));
    shared.history.into_inner()
}

/// What kind of crash a state models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Crash {
    /// Power loss: unflushed writes may be lost or torn; the survival copy (on tmpfs) is gone.
    Power,
    /// The daemon process died: every completed write is on its device; the restarted daemon
    /// merges the survival copy unless `merge` is false (the behaviour without one).
    Process { merge: bool },
}

/// What a sector may hold at a cut.
enum Allowed {
    /// A discard may be visible: anything goes.
    Any,
    /// One of these versions (`None` = the source value).
    Versions(Vec<Option<usize>>),
}

/// The crash oracle over one recorded run.
struct Oracle<'a> {
    r: &'a CrashRig,
    h: &'a History,
    src: Vec<u8>,
    seed: u64,
    states: u64,
    read_throughs: u64,
    violations: Vec<String>,
}

impl<'a> Oracle<'a> {
    fn new(r: &'a CrashRig, h: &'a History, seed: u64) -> Oracle<'a> {
        Oracle {
            r,
            h,
            src: r.source.snapshot(),
            seed,
            states: 0,
            read_throughs: 0,
            violations: Vec::new(),
        }
    }

    /// The counts and violations of the states checked so far, with the run's live ones.
    fn outcome(self) -> Outcome {
        Outcome {
            states: self.states,
            read_throughs: self.read_throughs,
            violations: self.violations,
            live_violations: self.h.live_violations.clone(),
        }
    }

    /// Acceptable versions of every sector for a crash at `cut`.
    fn allowed(&self, cut: usize) -> Vec<Allowed> {
        self.allowed_after(cut, Crash::Power)
    }

    /// Acceptable versions of every sector after a crash of the given kind at `cut`. After
    /// a power loss, what a completed FLUSH (or FUA) covered is durable; after a process
    /// death, every acknowledged write is (the devices keep every completed write).
    fn allowed_after(&self, cut: usize, crash: Crash) -> Vec<Allowed> {
        let durable_t = self
            .h
            .flushes
            .iter()
            .filter(|f| f.completed_at <= cut)
            .map(|f| f.issue_t)
            .max();
        self.h
            .sectors
            .iter()
            .map(|versions| {
                let durable = |v: &Version| match crash {
                    Crash::Power => {
                        durable_t.is_some_and(|t| v.ack_t < t) || (v.fua && v.acked_at <= cut)
                    }
                    Crash::Process { .. } => v.acked_at <= cut,
                };
                // The newest durable version (or the source value) and every later version
                // issued before the cut.
                let mut out = Vec::new();
                let rest = match versions.iter().rposition(durable) {
                    None => {
                        out.push(None);
                        versions.as_slice()
                    }
                    Some(i) => {
                        match versions[i].write {
                            None => return Allowed::Any,
                            Some(w) => out.push(Some(w)),
                        }
                        &versions[i + 1..]
                    }
                };
                for v in rest.iter().take_while(|v| v.issued < cut) {
                    match v.write {
                        None => return Allowed::Any,
                        Some(i) => out.push(Some(i)),
                    }
                }
                Allowed::Versions(out)
            })
            .collect()
    }

    fn value(&self, sec: u64, v: Option<usize>) -> &[u8] {
        match v {
            None => &self.src[(sec * SECTOR) as usize..][..SECTOR as usize],
            Some(i) => {
                let w = &self.h.writes[i];
                &w.data[(sec * SECTOR - w.off) as usize..][..SECTOR as usize]
            }
        }
    }

    fn sector_ok(&self, allowed: &Allowed, sec: u64, got: &[u8]) -> bool {
        match allowed {
            Allowed::Any => true,
            Allowed::Versions(vs) => vs.iter().any(|v| self.value(sec, *v) == got),
        }
    }

    fn describe(&self, allowed: &Allowed, sec: u64, got: &[u8]) -> String {
        let Allowed::Versions(vs) = allowed else {
            return "anything".into();
        };
        let newest_older = self.h.sectors[sec as usize]
            .iter()
            .enumerate()
            .rev()
            .find(|(_, v)| v.write.is_some_and(|i| self.value(sec, Some(i)) == got))
            .map(|(i, _)| format!("version {}", i + 1));
        let what = if got == self.value(sec, None) {
            "the source value".to_string()
        } else if got.iter().all(|b| *b == 0) {
            "zeroes".to_string()
        } else {
            newest_older.unwrap_or_else(|| "unknown data".into())
        };
        let writes: Vec<String> = vs
            .iter()
            .map(|v| match v {
                None => "source".to_string(),
                Some(i) => {
                    let w = &self.h.writes[*i];
                    let zero = w.data.iter().all(|b| *b == 0);
                    format!("write {i} at {} len {} zeroes {zero}", w.off, w.data.len())
                }
            })
            .collect();
        format!("holds {what}; acceptable: {writes:?}")
    }

    /// Builds and checks one crash state; returns its hydrated bitmap when the metadata
    /// opened.
    fn check_state(
        &mut self,
        cut: usize,
        allowed: &[Allowed],
        scenario: &Scenario,
        baseline: Option<&[bool]>,
    ) -> Option<Vec<bool>> {
        self.states += 1;
        let n = self.r.log.len();
        let what = format!("seed {} cut {cut}/{n} {}", self.seed, scenario.label);
        let (md, dest) = self.open_crash_state(cut, scenario, &what)?;
        let bitmap: Vec<bool> = (0..md.nr_regions()).map(|r| md.is_hydrated(r)).collect();
        if let Some(base) = baseline {
            if let Some(r) = (0..bitmap.len()).find(|&r| base[r] && !bitmap[r]) {
                self.violations.push(format!(
                    "{what}: region {r} was hydrated at an earlier flush point but is not now"
                ));
            }
        }
        self.check_hydrated_regions(&bitmap, &dest.snapshot(), allowed, &what);
        self.read_through(md, dest, allowed, &what);
        Some(bitmap)
    }

    /// The crash state's destination and its metadata, opened (after a process death with
    /// `merge`, with the survival copy merged into it); `None` if the metadata does not open.
    fn open_crash_state(
        &mut self,
        cut: usize,
        scenario: &Scenario,
        what: &str,
    ) -> Option<(Metadata, Arc<MemDev>)> {
        let keep = |i| scenario.kept.keep(i);
        let tear = |i, s| scenario.kept.tear(i, s);
        let dest_img = self.r.log.crash_image(DEST, cut, &keep, &tear);
        let meta_img = self.r.log.crash_image(META, cut, &keep, &tear);
        let dest = Arc::new(MemDev::from_image("crash-dest", dest_img));
        let meta: Arc<dyn BlockDev> = Arc::new(MemDev::from_image("crash-meta", meta_img));
        let md = match Metadata::open(meta, &self.r.expect) {
            Ok((md, _)) => md,
            Err(e) => {
                self.violations
                    .push(format!("{what}: metadata open failed: {e}"));
                return None;
            }
        };
        if scenario.crash == (Crash::Process { merge: true }) {
            let surv_img = self.r.log.crash_image(SURV, cut, &keep, &tear);
            let surv = MemDev::from_image("crash-surv", surv_img);
            match SurvivalFile::read(&surv, md.uuid(), BOOT, md.nr_regions()) {
                Ok(Some(survived)) if survived.poisoned.is_none() => {
                    if let Err(e) = md.merge_survived(&survived) {
                        self.violations.push(format!("{what}: merge failed: {e}"));
                    }
                }
                Ok(_) => {}
                Err(e) => self
                    .violations
                    .push(format!("{what}: survival copy unreadable: {e}")),
            }
        }
        Some((md, dest))
    }

    /// Hydrated regions must hold acceptable data in the destination image `img`.
    fn check_hydrated_regions(
        &mut self,
        bitmap: &[bool],
        img: &[u8],
        allowed: &[Allowed],
        what: &str,
    ) {
        let sectors = self.r.size / SECTOR;
        let region_sectors = self.r.region_size / SECTOR;
        for (region, _) in bitmap.iter().enumerate().filter(|(_, h)| **h) {
            let first = region as u64 * region_sectors;
            for sec in first..(first + region_sectors).min(sectors) {
                let got = &img[(sec * SECTOR) as usize..][..SECTOR as usize];
                if !self.sector_ok(&allowed[sec as usize], sec, got) {
                    let d = self.describe(&allowed[sec as usize], sec, got);
                    self.violations.push(format!(
                        "{what}: hydrated region {region}, destination sector {sec} {d}"
                    ));
                    break;
                }
            }
        }
    }

    /// End to end: reads everything through a fresh engine (hydration off) on the crash
    /// state; every sector must hold an acceptable value.
    fn read_through(&mut self, md: Metadata, dest: Arc<MemDev>, allowed: &[Allowed], what: &str) {
        self.read_throughs += 1;
        let mut cfg = EngineConfig::new(self.r.size, self.r.region_size);
        cfg.knobs.hydration_enabled = false;
        cfg.hydration_workers = 1;
        cfg.commit_period = Duration::from_secs(3600);
        let engine = match Engine::start(Arc::new(md), self.r.source.clone(), dest.clone(), cfg) {
            Ok(e) => e,
            Err(e) => {
                self.violations
                    .push(format!("{what}: engine start failed: {e}"));
                return;
            }
        };
        let path = SyncPath {
            source: self.r.source.clone(),
            dest,
        };
        let mut buf = vec![0u8; self.r.size as usize];
        match block_on(engine.read(&path, 0, &mut buf)) {
            Err(e) => self.violations.push(format!("{what}: read failed: {e}")),
            Ok(()) => {
                for sec in 0..self.r.size / SECTOR {
                    let got = &buf[(sec * SECTOR) as usize..][..SECTOR as usize];
                    if !self.sector_ok(&allowed[sec as usize], sec, got) {
                        let d = self.describe(&allowed[sec as usize], sec, got);
                        self.violations.push(format!(
                            "{what}: read through a reopened engine, sector {sec} {d}"
                        ));
                        break;
                    }
                }
            }
        }
        if let Err(e) = engine.shutdown() {
            self.violations
                .push(format!("{what}: reopened engine shutdown: {e}"));
        }
    }

    /// 1. Every flush point: the state that lost every unflushed write (the baseline for the
    ///    monotonic check), the one that kept them all, and two random ones.
    fn flush_point_states(&mut self, flush_points: &[usize], rng: &mut StdRng) -> Baselines {
        let n = self.r.log.len();
        let mut baselines: Vec<(usize, Vec<bool>)> = Vec::new();
        for &cut in flush_points {
            let allowed = self.allowed(cut);
            let prev = baselines.last().map(|(_, b)| b.clone());
            let keep_none = Scenario::power(Kept::Nothing, "keep none");
            if let Some(b) = self.check_state(cut, &allowed, &keep_none, prev.as_deref()) {
                baselines.push((cut, b));
            }
            let base = baselines.last().map(|(_, b)| b.clone());
            let keep_all = Scenario::power(Kept::Everything, "keep all");
            self.check_state(cut, &allowed, &keep_all, base.as_deref());
            for v in 0..2 {
                let label = format!("random {v}");
                let random = Scenario::power(random_choice(rng, n), &label);
                self.check_state(cut, &allowed, &random, base.as_deref());
            }
        }
        Baselines(baselines)
    }

    /// 2. Every FLUSH / FUA completion: what it promised must be there.
    fn flush_completion_states(&mut self, baselines: &Baselines, rng: &mut StdRng) {
        let n = self.r.log.len();
        let mut completions: Vec<usize> = self.h.flushes.iter().map(|f| f.completed_at).collect();
        completions.sort_unstable();
        completions.dedup();
        for cut in completions {
            let allowed = self.allowed(cut);
            let base = baselines.at(cut);
            let keep_none = Scenario::power(Kept::Nothing, "FLUSH done, keep none");
            self.check_state(cut, &allowed, &keep_none, base.as_deref());
            let random = Scenario::power(random_choice(rng, n), "FLUSH done, random");
            self.check_state(cut, &allowed, &random, base.as_deref());
        }
    }

    /// 3. Random cuts with random subsets of the unflushed writes lost or torn.
    fn random_cut_states(&mut self, baselines: &Baselines, cuts: usize, rng: &mut StdRng) {
        let n = self.r.log.len();
        for _ in 0..cuts {
            let cut = rng.gen_range(0..=n);
            let allowed = self.allowed(cut);
            let base = baselines.at(cut);
            let random = Scenario::power(random_choice(rng, n), "random cut");
            self.check_state(cut, &allowed, &random, base.as_deref());
        }
    }
}

/// The hydrated bitmap of the state that lost every unflushed write, at each flush point
/// where the metadata opened, in log order.
struct Baselines(Vec<(usize, Vec<bool>)>);

impl Baselines {
    /// The baseline of the latest flush point at or before `cut`.
    fn at(&self, cut: usize) -> Option<Vec<bool>> {
        self.0
            .iter()
            .rev()
            .find(|(c, _)| *c <= cut)
            .map(|(_, b)| b.clone())
    }
}

/// Which log entries (writes) a crash state keeps, and how much of each.
enum Kept {
    /// None of the unflushed ones.
    Nothing,
    /// All of them, whole.
    Everything,
    /// Entry `i` is kept if `keep[i]`, and torn after `tear[i]` sectors if that is set.
    Random {
        keep: Vec<bool>,
        tear: Vec<Option<u64>>,
    },
}

impl Kept {
    fn keep(&self, i: usize) -> bool {
        match self {
            Kept::Nothing => false,
            Kept::Everything => true,
            Kept::Random { keep, .. } => keep[i],
        }
    }

    /// How many of the `s` sectors of entry `i` reach the device.
    fn tear(&self, i: usize, s: u64) -> u64 {
        match self {
            Kept::Nothing | Kept::Everything => s,
            Kept::Random { tear, .. } => tear[i].map_or(s, |t| t.min(s)),
        }
    }
}

/// One crash state to build at a cut: what survives, the kind of crash, and its label in
/// violation messages.
struct Scenario<'a> {
    kept: Kept,
    crash: Crash,
    label: &'a str,
}

impl Scenario<'_> {
    fn power(kept: Kept, label: &str) -> Scenario<'_> {
        Scenario {
            kept,
            crash: Crash::Power,
            label,
        }
    }
}

/// Random keep/tear choices for one crash state.
fn random_choice(rng: &mut StdRng, n: usize) -> Kept {
    let p = [0.1, 0.5, 0.9][rng.gen_range(0..3)];
    let keep = (0..n).map(|_| rng.gen_bool(p)).collect();
    let tear = (0..n)
        .map(|_| rng.gen_bool(0.3).then(|| rng.gen_range(0..8)))
        .collect();
    Kept::Random { keep, tear }
}

struct Outcome {
    states: u64,
    read_throughs: u64,
    /// Crash-state violations found by the oracle.
    violations: Vec<String>,
    /// Reads during the run that did not match the model (not crash related).
    live_violations: Vec<String>,
}

/// Records one run of the workload, then checks its crash states.
fn crash_run(seed: u64, bugs: Bugs, w: &Workload, random_cuts: usize) -> Outcome {
    let r = crash_rig(48 * 4096 + 1024, 4096, |c| {
        c.bugs = bugs;
        c.knobs.rate_bytes_per_sec = w.rate;
    });
    let h = run_workload(&r, seed, w);
    let mut o = Oracle::new(&r, &h, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_c0de);
    let flush_points = r.log.flush_points();
    let baselines = o.flush_point_states(&flush_points, &mut rng);
    o.flush_completion_states(&baselines, &mut rng);
    o.random_cut_states(&baselines, random_cuts, &mut rng);
    eprintln!(
        "seed {seed}: {} log entries, {} flush points, {} FLUSH/FUA, {} writes, {} states",
        r.log.len(),
        flush_points.len(),
        h.flushes.len(),
        h.writes.len(),
        o.states
    );
    o.outcome()
}

fn long_mode() -> bool {
    std::env::var("UBLK_CLONE_CRASH_LONG").is_ok_and(|v| v == "1")
}

#[test]
fn crash_states_of_random_workloads_are_consistent() {
    let start = Instant::now();
    // The number of states per seed depends on thread timing, so run seeds until the target
    // count of crash states is reached (at least `min_seeds`, at most 4x that).
    let (min_seeds, target) = if long_mode() {
        (160, 100_000)
    } else {
        (16, 10_000)
    };
    let (mut states, mut reads, mut violations) = (0, 0, Vec::new());
    let mut seed = 0;
    while seed < min_seeds || (states < target && seed < 4 * min_seeds) {
        let w = Workload::for_seed(seed, 3, 100);
        let o = crash_run(seed, Bugs::default(), &w, 200);
        states += o.states;
        reads += o.read_throughs;
        violations.extend(o.violations);
        violations.extend(o.live_violations);
        seed += 1;
    }
    eprintln!(
        "crash oracle: {states} crash states checked ({reads} read through a reopened engine), \
         {} violations, {:.1} s{}",
        violations.len(),
        start.elapsed().as_secs_f64(),
        if long_mode() { " (long mode)" } else { "" }
    );
    // At least 10,000 crash states per run, in the quick mode too.
    assert!(states >= target, "only {states} crash states were built");
    assert!(
        violations.is_empty(),
        "{} violations, first: {:#?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
}

/// Runs a broken engine over fixed seeds; the oracle must report violations.
fn assert_caught(name: &str, bugs: Bugs) {
    let mut found = Vec::new();
    for seed in 0..2 {
        let w = Workload::for_seed(seed, 3, 40);
        found.extend(crash_run(seed, bugs, &w, 20).violations);
    }
    eprintln!(
        "{name}: {} violations, first: {:?}",
        found.len(),
        found.first()
    );
    assert!(
        !found.is_empty(),
        "the crash oracle did not catch {name} (live read mismatches do not count)"
    );
}

#[test]
fn crash_oracle_catches_commit_before_destination_flush() {
    assert_caught(
        "commit before the destination flush",
        Bugs {
            commit_before_dest_flush: true,
            ..Bugs::default()
        },
    );
}

#[test]
fn crash_oracle_catches_bit_set_before_copy() {
    assert_caught(
        "bit set before the copy completed",
        Bugs {
            bit_before_copy: true,
            ..Bugs::default()
        },
    );
}

#[test]
fn crash_oracle_catches_flush_without_covering_destination_flush() {
    assert_caught(
        "FLUSH completed without a covering destination flush",
        Bugs {
            flush_joins_old_commit: true,
            ..Bugs::default()
        },
    );
}

#[test]
fn crash_oracle_catches_fast_flush_that_skips_a_needed_commit() {
    assert_caught(
        "FLUSH fast path taken while region bits wait for a commit",
        Bugs {
            fast_flush_ignores_dirty: true,
            ..Bugs::default()
        },
    );
}

/// Records one run of the workload, then checks process-crash states: the daemon dies at
/// every acknowledgement and at random cuts, every completed write stays on its device, and
/// a new engine starts from the metadata plus (with `merge`) the survival copy. Every
/// acknowledged write must read back.
fn process_crash_run(
    seed: u64,
    bugs: Bugs,
    w: &Workload,
    random_cuts: usize,
    merge: bool,
) -> Outcome {
    let r = crash_rig(48 * 4096 + 1024, 4096, |c| {
        c.bugs = bugs;
        c.knobs.rate_bytes_per_sec = w.rate;
    });
    let h = run_workload(&r, seed, w);
    let mut o = Oracle::new(&r, &h, seed);
    let n = r.log.len();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xdead_da3a);
    let mut cuts: Vec<usize> = h.sectors.iter().flatten().map(|v| v.acked_at).collect();
    cuts.extend((0..random_cuts).map(|_| rng.gen_range(0..=n)));
    cuts.sort_unstable();
    cuts.dedup();
    let crash = Crash::Process { merge };
    for cut in cuts {
        let allowed = o.allowed_after(cut, crash);
        let scenario = Scenario {
            kept: Kept::Everything,
            crash,
            label: "process crash",
        };
        o.check_state(cut, &allowed, &scenario, None);
    }
    o.outcome()
}

#[test]
fn process_crash_states_keep_every_acknowledged_write() {
    let start = Instant::now();
    let (min_seeds, target) = if long_mode() {
        (160, 100_000)
    } else {
        (8, 10_000)
    };
    let (mut states, mut violations) = (0, Vec::new());
    let mut seed = 0;
    // States per seed depend on how the workload's threads interleave (fewer on a loaded
    // machine: seen once with the other tests running on 2 cores), so seeds go on until the
    // target is reached, within a generous cap.
    while seed < min_seeds || (states < target && seed < 40 * min_seeds) {
        let w = Workload::for_seed(seed, 3, 100);
        let o = process_crash_run(seed, Bugs::default(), &w, 200, true);
        states += o.states;
        violations.extend(o.violations);
        violations.extend(o.live_violations);
        seed += 1;
    }
    eprintln!(
        "process-crash oracle: {states} states over {seed} seeds, {} violations, {:.1} s",
        violations.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        states >= target,
        "only {states} process-crash states were built"
    );
    assert!(
        violations.is_empty(),
        "{} violations, first: {:#?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
}

/// Runs the process-crash oracle over fixed seeds; it must report violations.
fn assert_process_crash_caught(name: &str, bugs: Bugs, merge: bool) {
    let mut found = Vec::new();
    for seed in 0..4 {
        let w = Workload::for_seed(seed, 3, 60);
        found.extend(process_crash_run(seed, bugs, &w, 50, merge).violations);
    }
    eprintln!(
        "{name}: {} violations, first: {:?}",
        found.len(),
        found.first()
    );
    assert!(
        !found.is_empty(),
        "the process-crash oracle did not catch {name}"
    );
}

#[test]
fn process_crash_oracle_catches_region_state_persisted_after_the_ack() {
    assert_process_crash_caught(
        "a region bit written to the survival copy after the acknowledgement",
        Bugs {
            survival_after_ack: true,
            ..Bugs::default()
        },
        true,
    );
}

#[test]
fn without_the_survival_copy_a_daemon_death_loses_acknowledged_writes() {
    // The behaviour before the survival copy: the restarted daemon has the committed bitmap
    // only, and writes acknowledged since the last commit read back from the source.
    assert_process_crash_caught(
        "a restart from the committed bitmap alone",
        Bugs::default(),
        false,
    );
}
