//! Tests of the metadata format and commit protocol: round trips, the crash oracle (and a
//! broken protocol it must catch), corruption detection, superblock fallback, bad input.

use super::bitmap::{self, REGIONS_PER_BITMAP_BLOCK};
use super::checksum::BLOCK_SIZE;
use super::*;
use crate::io::mem::{MemDev, Op};
use crate::io::record::{Entry, IoLog, RecordingDev};
use crate::io::BlockDev;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

const RS: u64 = 4096;

fn params(nr_regions: u64) -> FormatParams {
    FormatParams {
        region_size: RS,
        source_size: nr_regions * RS,
        dest_size: nr_regions * RS,
        source_fingerprint: [7; 32],
        dest_name: "dest".into(),
        uuid: Some(Uuid::from_u128(0x1234)),
    }
}

/// A formatted in-memory metadata device for `nr_regions` regions.
fn formatted(nr_regions: u64) -> Result<Arc<MemDev>> {
    let dev = Arc::new(MemDev::new(
        "meta",
        required_blocks(nr_regions) * BLOCK_SIZE as u64,
    ));
    Metadata::format(dev.clone(), &params(nr_regions), false)?;
    Ok(dev)
}

fn words_of(md: &Metadata) -> Vec<u64> {
    md.core
        .words
        .read()
        .iter()
        .map(|w| w.load(Ordering::SeqCst))
        .collect()
}

#[test]
fn format_open_commit_reopen_roundtrip() -> TestResult {
    let nr = 2 * REGIONS_PER_BITMAP_BLOCK + 5;
    let dev = formatted(nr)?;
    assert!(check(&*dev).is_healthy(), "{}", check(&*dev));
    let dest = MemDev::new("dest", 4096);
    let (md, rep) = Metadata::open(dev.clone(), &Expect::default())?;
    assert!(
        rep.was_clean && !rep.fell_back && rep.warnings.is_empty(),
        "{rep:?}"
    );
    assert_eq!((rep.loaded_generation, rep.generation), (1, 2));
    assert!(!md.is_dirty());
    md.set_hydrated(0)?;
    md.set_range_hydrated(REGIONS_PER_BITMAP_BLOCK - 3, 10)?;
    md.set_hydrated(nr - 1)?;
    assert!(md.set_hydrated(nr).is_err());
    assert!(md.set_range_hydrated(nr - 1, 2).is_err());
    assert!(md.is_dirty());
    let info = md.commit(&dest)?;
    assert_eq!(
        info,
        CommitInfo {
            generation: 3,
            blocks_written: 3,
            hydrated: 12
        }
    );
    assert_eq!(dest.flush_count(), 1);
    assert!(!md.is_dirty());
    let words = words_of(&md);
    md.close_clean()?;
    drop(md);
    assert!(check(&*dev).is_healthy(), "{}", check(&*dev));
    let (md2, rep2) = Metadata::read_only_open(dev.clone())?;
    assert!(rep2.was_clean);
    assert_eq!(words_of(&md2), words);
    assert_eq!(md2.nr_hydrated(), 12);
    assert!(md2.is_hydrated(0) && md2.is_hydrated(nr - 1) && !md2.is_hydrated(1));
    assert_eq!(md2.next_unhydrated(0), Some(1));
    assert!(matches!(
        md2.begin_commit(),
        Err(MetadataError::ReadOnly { .. })
    ));
    let d = dump(dev.clone())?;
    assert_eq!(
        d.hydrated_ranges,
        vec![
            [0, 1],
            [REGIONS_PER_BITMAP_BLOCK - 3, REGIONS_PER_BITMAP_BLOCK + 7],
            [nr - 1, nr]
        ]
    );
    Ok(())
}

#[test]
fn empty_commit_works() -> TestResult {
    let dev = formatted(100)?;
    let (md, _) = Metadata::open(dev, &Expect::default())?;
    let f = md.begin_commit()?;
    assert_eq!(f.nr_blocks(), 0);
    let s = f.write_shadows()?;
    let d = flush_destination(&MemDev::new("d", 4096), &f)?;
    assert_eq!(md.finish_commit(f, s, d)?.generation, 3);
    Ok(())
}

#[test]
fn shadows_and_destination_flush_overlap_with_concurrent_setters() -> TestResult {
    let nr = 4 * REGIONS_PER_BITMAP_BLOCK;
    let dev = formatted(nr)?;
    let (md, _) = Metadata::open(dev.clone(), &Expect::default())?;
    let dest = MemDev::new("dest", 4096);
    std::thread::scope(|s| -> TestResult {
        let setters: Vec<_> = (0..4u64)
            .map(|t| {
                let md = &md;
                s.spawn(move || {
                    for r in (t..nr).step_by(997) {
                        md.set_hydrated(r)?;
                    }
                    Ok::<(), MetadataError>(())
                })
            })
            .collect();
        for _ in 0..5 {
            let frozen = md.begin_commit()?;
            let (sh, fl) = std::thread::scope(|s2| {
                let h = s2.spawn(|| frozen.write_shadows());
                let fl = flush_destination(&dest, &frozen);
                (h.join(), fl)
            });
            let sh = sh.map_err(|_| "shadow thread panicked")??;
            md.finish_commit(frozen, sh, fl?)?;
        }
        for h in setters {
            h.join().map_err(|_| "setter panicked")??;
        }
        Ok(())
    })?;
    md.commit(&dest)?;
    let words = words_of(&md);
    drop(md);
    let (md2, _) = Metadata::read_only_open(dev.clone())?;
    assert_eq!(words_of(&md2), words);
    assert_eq!(md2.nr_hydrated(), md2.nr_committed_hydrated());
    assert!(check(&*dev).is_healthy(), "{}", check(&*dev));
    Ok(())
}

#[test]
fn proofs_from_another_commit_are_refused() -> TestResult {
    let dev = formatted(100)?;
    let dev2 = formatted(100)?;
    let (md, _) = Metadata::open(dev, &Expect::default())?;
    let (md2, _) = Metadata::open(dev2, &Expect::default())?;
    let dest = MemDev::new("d", 4096);
    md.set_hydrated(1)?;
    let f1 = md.begin_commit()?;
    let f2 = md2.begin_commit()?;
    let s2 = f2.write_shadows()?;
    let d1 = flush_destination(&dest, &f1)?;
    let s1 = f1.write_shadows()?;
    let e = md
        .finish_commit(f1, s2, d1)
        .err()
        .ok_or("mismatch accepted")?;
    assert!(e.to_string().contains("another commit"), "{e}");
    let _ = s1;
    // The failed commit re-marked its block dirty; a retry commits it.
    assert!(md.is_dirty());
    drop(f2);
    md.commit(&dest)?;
    assert_eq!(md.nr_committed_hydrated(), 1);
    Ok(())
}

#[test]
fn failed_commit_restores_dirty_and_never_activates_its_slots() -> TestResult {
    let nr = 2 * REGIONS_PER_BITMAP_BLOCK;
    let dev = formatted(nr)?;
    let (md, _) = Metadata::open(dev.clone(), &Expect::default())?;
    md.set_hydrated(5)?;
    md.set_hydrated(REGIONS_PER_BITMAP_BLOCK + 5)?;
    let frozen = md.begin_commit()?;
    let _shadows = frozen.write_shadows()?;
    // The destination flush fails: the engine never gets a DestinationFlushed.
    drop(frozen);
    assert!(md.is_dirty());
    md.persist_mode(MetadataMode::ReadOnly, "destination flush failed: EIO")?;
    drop(md);
    let report = check(&*dev);
    assert!(report.is_healthy(), "{report}");
    let (md2, rep) = Metadata::read_only_open(dev)?;
    assert_eq!(
        md2.nr_hydrated(),
        0,
        "bits of the failed commit must not become durable"
    );
    assert_eq!(rep.mode, MetadataMode::ReadOnly);
    assert_eq!(rep.mode_reason, "destination flush failed: EIO");
    Ok(())
}

#[test]
fn metadata_write_failure_then_retry() -> TestResult {
    let dev = formatted(1000)?;
    let (md, _) = Metadata::open(dev.clone(), &Expect::default())?;
    let dest = MemDev::new("d", 4096);
    md.set_hydrated(7)?;
    dev.set_fault(Some(Arc::new(|op: &Op| {
        matches!(op, Op::Flush).then(|| std::io::Error::other("flush failed"))
    })));
    let e = md.commit(&dest).err().ok_or("commit succeeded")?;
    assert!(e.to_string().contains("meta"), "{e}");
    assert!(md.is_dirty());
    dev.set_fault(None);
    md.commit(&dest)?;
    drop(md);
    let (md2, _) = Metadata::read_only_open(dev)?;
    assert!(md2.is_hydrated(7));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Releasing the bitmap while readers look it up: a reader must never index the emptied
// bitmap (the "released" decision is taken under the read lock).

/// An open metadata whose every region is hydrated and committed: its next
/// `release_bitmap_if_complete` releases the in-core bitmap.
fn complete(nr: u64) -> Result<Metadata> {
    let (md, _) = Metadata::open(formatted(nr)?, &Expect::default())?;
    md.set_range_hydrated(0, nr)?;
    md.commit(&MemDev::new("dest", 4096))?;
    Ok(md)
}

/// The three bitmap readers, each with what it must return once every region is hydrated.
type Reader = fn(&Metadata) -> String;
const READERS: [(&str, Reader, &str); 3] = [
    ("is_hydrated", |md| md.is_hydrated(5).to_string(), "true"),
    (
        "next_unhydrated",
        |md| format!("{:?}", md.next_unhydrated(0)),
        "None",
    ),
    (
        "set_range_hydrated",
        |md| {
            format!(
                "{:?}",
                md.set_range_hydrated(3, 2).map_err(|e| e.to_string())
            )
        },
        "Ok(())",
    ),
];

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Releases the bitmap of a [`complete`] metadata, committing first when a redundant
/// `set_range_hydrated` marked a block dirty again (it must: see its ordering comment).
fn release(md: &Metadata) -> Result<bool> {
    if md.is_dirty() {
        md.commit(&MemDev::new("dest", 4096))?;
    }
    Ok(md.release_bitmap_if_complete())
}

/// Deterministic: each reader is stopped (by the test hook) after it decided the bitmap is
/// not released and before its lookup, and the bitmap is released from another thread right
/// then. The reader must neither panic nor answer wrongly. With the decision taken under
/// the read lock the releaser waits for the reader instead (bounded: the hook stops waiting
/// for the release after 300 ms).
#[test]
fn release_between_a_readers_decision_and_its_lookup() -> TestResult {
    use std::sync::mpsc;
    use std::time::Duration;
    let mut failures = Vec::new();
    for (name, read, expected) in READERS {
        let md = complete(1000)?;
        let (in_window, reader_in_window) = mpsc::channel::<()>();
        let (released, wait_released) = mpsc::channel::<()>();
        let wait_released = Mutex::new(wait_released);
        *md.core.before_lookup.lock() = Some(Arc::new(move || {
            let _ = in_window.send(());
            let _ = wait_released
                .lock()
                .recv_timeout(Duration::from_millis(300));
        }));
        let md = &md;
        let outcome = std::thread::scope(|s| -> std::result::Result<String, String> {
            let reader = s.spawn(move || read(md));
            reader_in_window
                .recv_timeout(Duration::from_secs(10))
                .map_err(|e| format!("the reader never reached its lookup: {e}"))?;
            let releaser = s.spawn(move || {
                md.release_bitmap_if_complete();
                let _ = released.send(());
            });
            let got = reader
                .join()
                .map_err(|p| format!("panicked: {}", panic_text(p)));
            releaser.join().map_err(|_| "the releaser panicked")?;
            got
        });
        *md.core.before_lookup.lock() = None;
        match outcome {
            Ok(got) if got == expected => {}
            Ok(got) => failures.push(format!("{name}: returned {got}, expected {expected}")),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
        // Released now (after a commit if the reader was a setter): every reader answers
        // without a lookup.
        assert!(release(md)?, "{name}: the bitmap was not released");
        for (name, read, expected) in READERS {
            assert_eq!(read(md), expected, "{name} after the release");
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    Ok(())
}

/// Randomised: the readers hammer the bitmap while it is released under them (the setter
/// stops after a bounded number of calls, so that a release can succeed).
#[test]
fn readers_race_the_release_of_the_bitmap() -> TestResult {
    for _ in 0..100 {
        let md = complete(300)?;
        let md = &md;
        let stop = AtomicBool::new(false);
        let stop = &stop;
        let outcome = std::thread::scope(|s| -> TestResult {
            let readers: Vec<_> = READERS
                .iter()
                .map(|&(name, read, expected)| {
                    s.spawn(move || {
                        let mut calls = 0;
                        while !stop.load(Ordering::SeqCst) && calls < 2000 {
                            assert_eq!(read(md), expected, "{name}");
                            if name == "set_range_hydrated" {
                                calls += 1;
                            }
                        }
                    })
                })
                .collect();
            let mut released = Ok(false);
            for _ in 0..100_000 {
                released = release(md);
                if !matches!(released, Ok(false)) {
                    break;
                }
                std::thread::yield_now();
            }
            // Stop the readers before any assertion: a failing scope waits for them.
            stop.store(true, Ordering::SeqCst);
            for r in readers {
                r.join()
                    .map_err(|p| format!("reader panicked: {}", panic_text(p)))?;
            }
            assert!(released?, "the bitmap was never released");
            Ok(())
        });
        outcome?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Crash oracle.

/// A superblock write of the run: the bitmap it commits, the log index of its write and of
/// the flush that made it durable.
struct Durable {
    words: Vec<u64>,
    write_at: usize,
    flush_at: usize,
}

fn last_sb_write(log: &IoLog, from: usize, to: usize) -> Option<usize> {
    let e = log.entries();
    (from..to)
        .rev()
        .find(|&i| matches!(&e[i], Entry::Write { offset, .. } if *offset < 2 * BLOCK_SIZE as u64))
}

type BoxResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Runs one random commit sequence and checks every crash image. Returns the violations.
fn crash_sequence(seed: u64, broken: bool) -> BoxResult<Vec<String>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks = rng.gen_range(1..=3u64);
    let nr = blocks * REGIONS_PER_BITMAP_BLOCK - rng.gen_range(0..100);
    let base = formatted(nr)?;
    let log = IoLog::new();
    let rec: Arc<dyn BlockDev> = Arc::new(RecordingDev::new(base.clone(), &log)?);
    let nwords = nr.div_ceil(64) as usize;
    let initial = vec![0u64; nwords];
    let durable = record_commits(&mut rng, rec, &log, nr, broken)?;

    let mut violations = Vec::new();
    let n = log.len();
    for cut in 0..=n {
        for variant in 0..2 {
            let keep: Vec<bool> = (0..n).map(|_| variant == 0 || rng.gen_bool(0.5)).collect();
            let tear: Vec<Option<u64>> = (0..n)
                .map(|_| (variant == 1 && rng.gen_bool(0.3)).then(|| rng.gen_range(0..8)))
                .collect();
            let img = log.crash_image(0, cut, &|i| keep[i], &|i, s| {
                tear[i].map_or(s, |t| t.min(s))
            });
            let last = durable.iter().rposition(|d| d.flush_at < cut);
            let mut allowed: Vec<&Vec<u64>> = vec![last.map_or(&initial, |k| &durable[k].words)];
            if let Some(next) = durable.get(last.map_or(0, |k| k + 1)) {
                if next.write_at < cut {
                    allowed.push(&next.words);
                }
            }
            let dev = Arc::new(MemDev::from_image("crash", img));
            let what = format!("seed {seed} cut {cut}/{n} variant {variant}");
            check_crash_image(&dev, &allowed, nwords, &what, &mut violations);
        }
    }
    Ok(violations)
}

/// Runs random hydrations and commits (through the broken protocol when `broken`) on `rec`,
/// whose writes `log` records, then maybe a clean close. Returns the durable states in
/// order: the one open made durable first.
fn record_commits(
    rng: &mut StdRng,
    rec: Arc<dyn BlockDev>,
    log: &IoLog,
    nr: u64,
    broken: bool,
) -> BoxResult<Vec<Durable>> {
    let dest = MemDev::new("dest", 4096);
    let nwords = nr.div_ceil(64) as usize;
    let mut durable: Vec<Durable> = Vec::new();
    let (md, _) = Metadata::open(rec, &Expect::default())?;
    let p1 = log.len();
    durable.push(Durable {
        words: vec![0u64; nwords],
        write_at: last_sb_write(log, 0, p1).ok_or("open wrote no superblock")?,
        flush_at: p1 - 1,
    });
    let commits = rng.gen_range(1..=4);
    for _ in 0..commits {
        for _ in 0..rng.gen_range(0..6) {
            let r = rng.gen_range(0..nr);
            let n = rng.gen_range(1..=200u64).min(nr - r);
            md.set_range_hydrated(r, n)?;
        }
        let expected: Vec<u64> = words_of(&md)[..nwords].to_vec();
        let frozen = md.begin_commit()?;
        let p0 = log.len();
        if broken {
            frozen.commit_superblock_first(&md)?;
        } else {
            let s = frozen.write_shadows()?;
            let d = flush_destination(&dest, &frozen)?;
            md.finish_commit(frozen, s, d)?;
        }
        let p1 = log.len();
        let write_at = if broken {
            p0
        } else {
            last_sb_write(log, p0, p1).ok_or("no superblock write")?
        };
        durable.push(Durable {
            words: expected,
            write_at,
            flush_at: p1 - 1,
        });
    }
    // Hydrations after the last commit must never appear.
    md.set_hydrated(rng.gen_range(0..nr))?;
    if rng.gen_bool(0.5) {
        let last = durable.last().map(|d| d.words.clone()).unwrap_or_default();
        md.close_clean()?;
        let p1 = log.len();
        durable.push(Durable {
            words: last,
            write_at: last_sb_write(log, 0, p1).ok_or("no close write")?,
            flush_at: p1 - 1,
        });
    }
    Ok(durable)
}

/// Checks one crash image: check finds no damage before the open, the open succeeds with
/// one of the `allowed` bitmaps and without bits going backwards, and check finds nothing
/// after it. Records each violation, prefixed by `what`.
fn check_crash_image(
    dev: &Arc<MemDev>,
    allowed: &[&Vec<u64>],
    nwords: usize,
    what: &str,
    violations: &mut Vec<String>,
) {
    // A crash is not damage: check reports only notes (exit 0) before any open.
    let raw = check(&**dev);
    if raw.exit_code() != 0 {
        violations.push(format!("{what}: check of the crash image: {raw}"));
    }
    match Metadata::open(dev.clone(), &Expect::default()) {
        Err(e) => violations.push(format!("{what}: open failed: {e}")),
        Ok((md, _)) => {
            let got = words_of(&md)[..nwords].to_vec();
            if !allowed.iter().any(|a| **a == got) {
                violations.push(format!(
                    "{what}: bitmap ({} bits) is not a durable commit (allowed: {:?} bits)",
                    got.iter().map(|w| w.count_ones()).sum::<u32>(),
                    allowed
                        .iter()
                        .map(|a| a.iter().map(|w| w.count_ones()).sum::<u32>())
                        .collect::<Vec<_>>()
                ));
            }
            let base = allowed[0];
            if got.iter().zip(base.iter()).any(|(g, b)| b & !g != 0) {
                violations.push(format!("{what}: bits went backwards"));
            }
            drop(md);
            let rep = check(&**dev);
            if !rep.is_healthy() || !rep.notes.is_empty() {
                violations.push(format!("{what}: check after read-write open: {rep}"));
            }
        }
    }
}

#[test]
fn crash_at_every_point_yields_a_durable_commit() -> TestResult {
    let mut all = Vec::new();
    for seed in 0..200 {
        all.extend(crash_sequence(seed, false)?);
    }
    assert!(
        all.is_empty(),
        "{} violations, first: {:#?}",
        all.len(),
        &all[..all.len().min(5)]
    );
    Ok(())
}

#[test]
fn crash_oracle_catches_superblock_written_before_shadows() -> TestResult {
    let mut found = 0;
    for seed in 0..60 {
        found += crash_sequence(seed, true)?.len();
    }
    assert!(found > 0, "the oracle did not catch the broken protocol");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Corruption.

#[test]
fn check_finds_a_flipped_bit_in_every_block() -> TestResult {
    let nr = 2 * REGIONS_PER_BITMAP_BLOCK + 1;
    let dev = formatted(nr)?;
    let dest = MemDev::new("d", 4096);
    {
        let (md, _) = Metadata::open(dev.clone(), &Expect::default())?;
        md.set_range_hydrated(10, 100)?;
        md.set_hydrated(nr - 1)?;
        md.commit(&dest)?;
        md.close_clean()?;
    }
    let good = dev.snapshot();
    assert!(check(&*dev).is_healthy());
    let blocks = required_blocks(nr);
    // Bitmap blocks 0 and 2 are live in slot B (generation 3, slot A has 0): a flip there is
    // damage. A flip anywhere else looks like a write cut by a crash (a note; see
    // check_notes_what_an_interrupted_commit_leaves_and_exits_0), but is still reported.
    let live_and_newest = [bitmap::slot_blocknr(0, 1), bitmap::slot_blocknr(2, 1)];
    let mut rng = StdRng::seed_from_u64(1);
    for block in 0..blocks {
        let mut img = good.clone();
        let byte = block as usize * BLOCK_SIZE + rng.gen_range(0..BLOCK_SIZE);
        img[byte] ^= 1 << rng.gen_range(0..8);
        let r = check(&MemDev::from_image("flipped", img));
        let named = |f: &[Problem]| f.iter().any(|p| p.block == Some(block));
        assert!(
            named(&r.problems) || named(&r.notes),
            "flip in block {block} (byte {byte}) not reported: {r}"
        );
        if live_and_newest.contains(&block) {
            assert!(
                named(&r.problems) && r.exit_code() == 1,
                "flip in the live copy {block} (byte {byte}) is not damage: {r}"
            );
        }
    }
    Ok(())
}

#[test]
fn open_falls_back_to_the_other_superblock_and_says_so() -> TestResult {
    let dev = formatted(100)?;
    let (md, _) = Metadata::open(dev.clone(), &Expect::default())?;
    md.set_hydrated(3)?;
    md.commit(&MemDev::new("d", 4096))?;
    let gen = md.generation();
    drop(md);
    let mut img = dev.snapshot();
    let live = (gen % 2) as usize;
    img[live * BLOCK_SIZE + 200] ^= 0x10;
    let dev2 = Arc::new(MemDev::from_image("meta", img));
    let (md, rep) = Metadata::open(dev2.clone(), &Expect::default())?;
    assert!(rep.fell_back);
    assert_eq!(rep.loaded_generation, gen - 1);
    assert!(
        rep.warnings
            .iter()
            .any(|w| w.contains(&format!("block {live}")) && w.contains("checksum")),
        "{rep:?}"
    );
    // Generation gen-1 is the open's superblock: region 3 was committed after it.
    assert!(!md.is_hydrated(3));
    drop(md);
    assert!(check(&*dev2).is_healthy(), "{}", check(&*dev2));
    Ok(())
}

#[test]
fn read_write_open_repairs_a_torn_shadow() -> TestResult {
    let dev = formatted(100)?;
    let mut img = dev.snapshot();
    img[bitmap::slot_blocknr(0, 1) as usize * BLOCK_SIZE + 100] ^= 1;
    let dev = Arc::new(MemDev::from_image("meta", img));
    let before = check(&*dev);
    assert_only_notes(&before, &[bitmap::slot_blocknr(0, 1)]);
    let (_, rep) = Metadata::open(dev.clone(), &Expect::default())?;
    assert_eq!(rep.repaired_slots.len(), 1, "{rep:?}");
    let after = check(&*dev);
    assert!(after.is_healthy() && after.notes.is_empty(), "{after}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Check after a crash: what a read-write open repairs by design is a note (exit 0); only
// damage is a problem (exit 1).

/// A device left by a commit cut between its shadow writes and its superblock: the shadows
/// of bitmap blocks 0 and 2 (generation 3, slot B) are durable, the superblock is still
/// generation 2. Returns the device and the blocks of the two shadows.
fn interrupted_commit() -> Result<(Arc<MemDev>, [u64; 2])> {
    let nr = 3 * REGIONS_PER_BITMAP_BLOCK;
    let dev = formatted(nr)?;
    let (md, _) = Metadata::open(dev.clone(), &Expect::default())?;
    md.set_range_hydrated(10, 100)?;
    md.set_hydrated(2 * REGIONS_PER_BITMAP_BLOCK + 7)?;
    let frozen = md.begin_commit()?;
    let _shadows = frozen.write_shadows()?;
    // Crash: no destination flush, no superblock.
    Ok((
        dev,
        [bitmap::slot_blocknr(0, 1), bitmap::slot_blocknr(2, 1)],
    ))
}

/// No problem, a note for each block in `noted`, exit code 0.
fn assert_only_notes(r: &CheckReport, noted: &[u64]) {
    assert!(r.problems.is_empty() && r.is_healthy(), "{r}");
    assert_eq!(r.exit_code(), 0, "{r}");
    for b in noted {
        assert!(
            r.notes.iter().any(|n| n.block == Some(*b)),
            "no note for block {b}: {r}"
        );
    }
    assert_eq!(r.notes.len(), noted.len(), "{r}");
    assert!(r.to_string().contains("note"), "{r}");
}

#[test]
fn check_notes_what_an_interrupted_commit_leaves_and_exits_0() -> TestResult {
    let (dev, shadows) = interrupted_commit()?;
    let r = check(&*dev);
    assert_only_notes(&r, &shadows);
    assert!(r.notes.iter().all(|n| n.message.contains("newer")), "{r}");
    let json = serde_json::to_value(&r)?;
    assert_eq!(json["notes"].as_array().map(|n| n.len()), Some(2), "{json}");

    // The same cut with one shadow torn, and the superblock write of the commit torn too
    // (within its first sector: the superblock's fields all lie there; the hydrated count
    // at byte 152 stays old).
    let mut img = dev.snapshot();
    let torn = shadows[1] as usize * BLOCK_SIZE;
    img[torn + 2048..torn + BLOCK_SIZE].fill(0);
    let (md, _) = Metadata::read_only_open(dev.clone())?;
    let mut sb = md.superblock();
    drop(md);
    sb.generation += 1;
    sb.blocknr = sb.generation % 2;
    sb.hydrated = 101;
    let at = sb.blocknr as usize * BLOCK_SIZE;
    img[at..at + 64].copy_from_slice(&sb.pack()[..64]);
    let torn_dev = Arc::new(MemDev::from_image("meta", img));
    let r = check(&*torn_dev);
    assert_only_notes(&r, &[shadows[0], shadows[1], sb.blocknr]);

    // A read-write open repairs everything check noted.
    for d in [dev, torn_dev] {
        let (md, rep) = Metadata::open(d.clone(), &Expect::default())?;
        assert_eq!(md.nr_hydrated(), 0, "{rep:?}");
        drop(md);
        let r = check(&*d);
        assert!(r.problems.is_empty() && r.notes.is_empty(), "{r}");
    }
    Ok(())
}

#[test]
fn check_exits_1_on_damage() -> TestResult {
    // A committed clone: bitmap block 0 is live in slot B (generation 3, above slot A's 0).
    let dev = formatted(2 * REGIONS_PER_BITMAP_BLOCK)?;
    {
        let (md, _) = Metadata::open(dev.clone(), &Expect::default())?;
        md.set_range_hydrated(10, 100)?;
        md.commit(&MemDev::new("d", 4096))?;
    }
    let good = dev.snapshot();
    assert_eq!(check(&*dev).exit_code(), 0);
    let sb_live = 1; // generation 3
    let flip = |img: &mut Vec<u8>, block: u64, byte: usize| {
        img[block as usize * BLOCK_SIZE + byte] ^= 0x04;
    };
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, u64, Damage)> = vec![
        (
            "the live copy of a bitmap block (the other copy is older)",
            bitmap::slot_blocknr(0, 1),
            Box::new(move |img| flip(img, bitmap::slot_blocknr(0, 1), 1000)),
        ),
        (
            "both copies of a bitmap block",
            bitmap::slot_blocknr(1, 0),
            Box::new(move |img| {
                flip(img, bitmap::slot_blocknr(1, 0), 1000);
                flip(img, bitmap::slot_blocknr(1, 1), 1000);
            }),
        ),
        (
            "both superblocks",
            0,
            Box::new(move |img| {
                flip(img, 0, 300);
                flip(img, 1, 300);
            }),
        ),
        (
            "the hydrated count of the live superblock",
            sb_live,
            Box::new(move |img| {
                let b =
                    &mut img[sb_live as usize * BLOCK_SIZE..(sb_live as usize + 1) * BLOCK_SIZE];
                b[152] ^= 1;
                checksum::stamp(b, checksum::SUPERBLOCK_CSUM_XOR);
            }),
        ),
    ];
    for (what, block, damage) in cases {
        let mut img = good.clone();
        damage(&mut img);
        let r = check(&MemDev::from_image("meta", img));
        assert_eq!(r.exit_code(), 1, "{what}: {r}");
        assert!(!r.is_healthy(), "{what}: {r}");
        assert!(
            r.problems.iter().any(|p| p.block == Some(block)),
            "{what}: block {block} not named: {r}"
        );
    }
    let r = check(&MemDev::new("short", 4096));
    assert_eq!(r.exit_code(), 2, "{r}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Bad input: each refused with a clear message and nothing written.

fn unchanged_after<T>(dev: &MemDev, f: impl FnOnce() -> Result<T>) -> MetadataError {
    let before = dev.snapshot();
    let writes = dev.write_count();
    let e = match f() {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    };
    assert_eq!(dev.write_count(), writes, "{e}: something was written");
    assert!(dev.snapshot() == before, "{e}: device changed");
    e
}

#[test]
fn format_refuses_bad_input_without_writing() -> TestResult {
    let dev = Arc::new(MemDev::new("/dev/meta0", 64 * 1024));
    let p = params(1000);
    for bad in [0, 1000, 2048, 3 * 4096, 2 << 30] {
        let e = unchanged_after(&dev, || {
            Metadata::format(
                dev.clone(),
                &FormatParams {
                    region_size: bad,
                    ..p.clone()
                },
                false,
            )
        });
        assert!(matches!(e, MetadataError::BadRegionSize { .. }));
        assert!(
            e.to_string().contains("power of two") && e.to_string().contains(&bad.to_string()),
            "{e}"
        );
    }
    let huge = FormatParams {
        source_size: (MAX_REGIONS + 1) * RS,
        dest_size: (MAX_REGIONS + 1) * RS,
        ..p.clone()
    };
    let e = unchanged_after(&dev, || Metadata::format(dev.clone(), &huge, false));
    assert!(
        e.to_string().contains("too many regions") && e.to_string().contains("larger region size"),
        "{e}"
    );
    let e = unchanged_after(&dev, || {
        Metadata::format(
            dev.clone(),
            &FormatParams {
                dest_size: p.source_size - 1,
                ..p.clone()
            },
            false,
        )
    });
    assert!(
        e.to_string().contains("dest") && e.to_string().contains("at least as large"),
        "{e}"
    );
    let big = params(20 * REGIONS_PER_BITMAP_BLOCK);
    let e = unchanged_after(&dev, || Metadata::format(dev.clone(), &big, false));
    let need = required_blocks(20 * REGIONS_PER_BITMAP_BLOCK) * 4096;
    assert!(
        e.to_string().contains("/dev/meta0") && e.to_string().contains(&need.to_string()),
        "{e}"
    );
    // Already formatted.
    Metadata::format(dev.clone(), &p, false)?;
    let e = unchanged_after(&dev, || Metadata::format(dev.clone(), &p, false));
    assert!(
        e.to_string().contains("--force") && e.to_string().contains("/dev/meta0"),
        "{e}"
    );
    Metadata::format(
        dev.clone(),
        &FormatParams {
            uuid: Some(Uuid::from_u128(9)),
            ..p
        },
        true,
    )?;
    let (md, _) = Metadata::read_only_open(dev.clone())?;
    assert_eq!(md.uuid(), Uuid::from_u128(9));
    Ok(())
}

#[test]
fn open_refuses_bad_metadata_without_writing() -> TestResult {
    let dev = formatted(1000)?;
    let good = dev.snapshot();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut img = good.clone();
        f(&mut img);
        Arc::new(MemDev::from_image("/dev/meta1", img))
    };
    let open = |d: &Arc<MemDev>, x: &Expect| Metadata::open(d.clone(), x).map(|_| ());

    let zero = Arc::new(MemDev::new("/dev/meta1", 64 * 1024));
    let e = unchanged_after(&zero, || open(&zero, &Expect::default()));
    assert!(
        matches!(e, MetadataError::BadMagic { .. }) && e.to_string().contains("ublk-clone format"),
        "{e}"
    );

    let d = with(&|img| {
        for s in 0..2 {
            let b = &mut img[s * BLOCK_SIZE..(s + 1) * BLOCK_SIZE];
            b[24] = 9; // version
            checksum::stamp(b, checksum::SUPERBLOCK_CSUM_XOR);
        }
    });
    let e = unchanged_after(&d, || open(&d, &Expect::default()));
    assert!(e.to_string().contains("version 9"), "{e}");

    let d = with(&|img| {
        img[100] ^= 1;
        img[BLOCK_SIZE + 100] ^= 1;
    });
    let e = unchanged_after(&d, || open(&d, &Expect::default()));
    assert!(
        e.to_string().contains("checksum mismatch") && e.to_string().contains("superblock"),
        "{e}"
    );

    let d = with(&|img| {
        for s in 0..2 {
            img[bitmap::slot_blocknr(0, s) as usize * BLOCK_SIZE + 300] ^= 1;
        }
    });
    let e = unchanged_after(&d, || open(&d, &Expect::default()));
    assert!(
        e.to_string().contains("checksum mismatch") && e.to_string().contains("bitmap block 0"),
        "{e}"
    );

    Ok(())
}

#[test]
fn open_refuses_other_devices_without_writing() -> TestResult {
    let d = Arc::new(MemDev::from_image(
        "/dev/meta1",
        formatted(1000)?.snapshot(),
    ));
    let open = |d: &Arc<MemDev>, x: &Expect| Metadata::open(d.clone(), x).map(|_| ());
    let src = 1000 * RS;
    let e = unchanged_after(&d, || {
        open(
            &d,
            &Expect {
                source_size: Some(src + 1),
                ..Default::default()
            },
        )
    });
    assert!(
        e.to_string().contains("source size mismatch") && e.to_string().contains(&src.to_string()),
        "{e}"
    );
    let e = unchanged_after(&d, || {
        open(
            &d,
            &Expect {
                dest_size: Some(1),
                ..Default::default()
            },
        )
    });
    assert!(e.to_string().contains("destination size mismatch"), "{e}");
    let e = unchanged_after(&d, || {
        open(
            &d,
            &Expect {
                region_size: Some(8192),
                ..Default::default()
            },
        )
    });
    assert!(e.to_string().contains("region size mismatch"), "{e}");
    let other = Expect {
        source_fingerprint: Some([8; 32]),
        ..Default::default()
    };
    let e = unchanged_after(&d, || open(&d, &other));
    assert!(e.to_string().contains("--ignore-source-mismatch"), "{e}");
    let (_, rep) = Metadata::open(
        d.clone(),
        &Expect {
            ignore_source_mismatch: true,
            ..other
        },
    )?;
    assert!(rep.warnings.iter().any(|w| w.contains("fingerprint")));
    let (md, _) = Metadata::read_only_open(d)?;
    assert_eq!(md.superblock().source_fingerprint, [8; 32]);
    Ok(())
}

#[test]
fn read_only_open_never_writes() -> TestResult {
    let dev = formatted(100)?;
    let w = dev.write_count();
    let (md, _) = Metadata::read_only_open(dev.clone())?;
    assert!(md.close_clean().is_err());
    let _ = check(&*dev);
    let _ = dump(dev.clone())?;
    assert_eq!(dev.write_count(), w);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Sizing.

#[test]
fn sizing_formula_and_table() -> TestResult {
    const K: u64 = 1024;
    const G: u64 = 1 << 30;
    const T: u64 = 1 << 40;
    assert_eq!(required_size(4 * K, 1)?, 4 * 4096);
    assert_eq!(
        required_size(4 * K, REGIONS_PER_BITMAP_BLOCK * 4 * K)?,
        4 * 4096
    );
    assert_eq!(
        required_size(4 * K, REGIONS_PER_BITMAP_BLOCK * 4 * K + 1)?,
        6 * 4096
    );
    // The table in metadata-format/SPEC.md §5.
    const M1: u64 = 1 << 20;
    let table = [
        (G, 4 * K, 81_920),
        (G, 64 * K, 16_384),
        (G, M1, 16_384),
        (T, 4 * K, 67_919_872),
        (T, 64 * K, 4_259_840),
        (T, M1, 278_528),
        (16 * T, 4 * K, 1_086_488_576),
        (16 * T, 64 * K, 67_919_872),
        (16 * T, M1, 4_259_840),
    ];
    for (size, rs, bytes) in table {
        assert_eq!(required_size(rs, size)?, bytes, "{size} at {rs}");
    }
    // 2^32 regions and more are supported.
    assert_eq!(nr_regions_for((1u64 << 32) * 4096, 4096)?, 1 << 32);
    assert!(nr_regions_for(MAX_REGIONS * 4096, 4096).is_ok());
    assert!(nr_regions_for(MAX_REGIONS * 4096 + 1, 4096).is_err());
    Ok(())
}

#[test]
fn in_core_cost_is_about_one_bit_per_region() -> TestResult {
    let nr = 64 * REGIONS_PER_BITMAP_BLOCK;
    let dev = formatted(nr)?;
    let (md, _) = Metadata::read_only_open(dev)?;
    let bits_per_region = md.in_core_bytes() as f64 * 8.0 / nr as f64;
    assert!(bits_per_region <= 1.01, "{bits_per_region}");
    Ok(())
}

#[test]
fn fingerprint_is_stable_and_sensitive() -> TestResult {
    let a = MemDev::new("a", 10 << 20);
    let f1 = source_fingerprint(&a)?;
    assert_eq!(f1, source_fingerprint(&a)?);
    a.write_at(&[1], 10 << 20 >> 1)?; // not necessarily sampled
    a.write_at(&[1], (10 << 20) - 4096)?; // the last sample
    assert_ne!(f1, source_fingerprint(&a)?);
    assert_ne!(
        f1,
        source_fingerprint(&MemDev::new("b", (10 << 20) + 4096))?
    );
    let tiny = MemDev::new("t", 100);
    source_fingerprint(&tiny)?;
    Ok(())
}

/// The fingerprint reads 4 KiB samples into a buffer that need not be aligned: through
/// O_DIRECT on a 4Kn device (the bounce buffer) it must equal the one read through the page
/// cache, or a source opened with O_DIRECT would be refused as a different device.
#[test]
fn fingerprint_is_the_same_through_o_direct_and_the_page_cache() -> TestResult {
    use crate::io::file::{Access, FileDev};
    use crate::io::AlignedBuf;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("dev");
    let image: Vec<u8> = (0..4 * 4096u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &image)?;
    let dev = FileDev::open(&path, Access::ReadWrite, true)?.with_logical_block_size(4096);
    assert!(
        dev.is_direct(),
        "the test needs O_DIRECT on {}",
        path.display()
    );
    // The same writes as the io test of a 4Kn device: sector-sized, unaligned across a block
    // boundary, a whole block, the device's last bytes; from aligned and unaligned buffers.
    for (off, len) in [
        (512u64, 512usize),
        (4095, 3),
        (8192, 4096),
        (4 * 4096 - 7, 7),
    ] {
        for page_aligned in [true, false] {
            let mut data = AlignedBuf::zeroed(len + 1);
            let data = if page_aligned {
                &mut data[..len]
            } else {
                &mut data[1..]
            };
            for (i, b) in data.iter_mut().enumerate() {
                *b = (i as u8) ^ (0x5a + page_aligned as u8);
            }
            dev.write_at(data, off)?;
        }
    }
    let buffered = FileDev::open(&path, Access::ReadOnly, false)?;
    assert_eq!(source_fingerprint(&dev)?, source_fingerprint(&buffered)?);
    Ok(())
}
