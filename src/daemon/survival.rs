//! The clone's survival copy on the daemon side: where it lives, what a starting daemon does
//! with the one a dead daemon left, and its removal after a clean stop.
//!
//! The file is `<run dir>/<metadata UUID>.bits` (the run directory is on tmpfs: `/run`). A
//! daemon that starts reads the file left in the same boot and merges its bits before the
//! engine starts; the first commit then makes them durable, destination flush first. If the
//! file records a failed destination flush, nothing is merged and the clone starts read-only
//! with that reason. Invariant: the file is removed only after a clean shutdown (final
//! commit done, metadata marked clean), when the committed bitmap holds every bit it has.
//!
//! A moved destination (`--dest-moved`, a copy of the old one) may be older than the bits
//! in the file, so the file is not merged then.

use super::config::DaemonConfig;
use super::control::run_dir;
use super::error::{refuse, Named, Result};
use crate::io::file::{Access, FileDev};
use crate::metadata::{survival_size, Metadata, MetadataMode, SurvivalFile};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The survival copy's path for the clone whose metadata has `uuid`.
pub fn survival_path(uuid: &uuid::Uuid) -> PathBuf {
    run_dir().join(format!("{uuid}.bits"))
}

/// This boot's ID (`/proc/sys/kernel/random/boot_id`): a survival copy from another boot
/// (before a reboot or a power loss) is never merged.
pub(super) fn boot_id() -> Result<[u8; 16]> {
    const PATH: &str = "/proc/sys/kernel/random/boot_id";
    let text = std::fs::read_to_string(PATH).named(|| format!("cannot read {PATH}"))?;
    match uuid::Uuid::parse_str(text.trim()) {
        Ok(u) => Ok(*u.as_bytes()),
        Err(e) => refuse!("{PATH}: not a boot ID ({e}): {text:?}"),
    }
}

/// Set (to anything) in the daemon's environment, no survival copy is kept: for measuring its
/// cost only.
pub const BENCH_NO_SURVIVAL: &str = "UBLK_CLONE_BENCH_NO_SURVIVAL";

/// The degraded mode a dead daemon was in, and why: the new daemon starts in it.
pub(super) type Degraded = Option<(MetadataMode, String)>;

/// Merges what a dead daemon of this clone left, then starts the survival copy that this
/// daemon writes every region bit through to. Returns its path, and the degraded mode the
/// dead daemon was in (the engine starts in it).
pub(super) fn resume(cfg: &DaemonConfig, md: &Metadata) -> Result<(PathBuf, Degraded)> {
    let path = survival_path(&md.uuid());
    let dir = run_dir();
    std::fs::create_dir_all(&dir).named(|| format!("cannot create {}", dir.display()))?;
    // Benchmarks only (tools/bench-survival.sh measures what the copy costs): what an earlier
    // daemon left is still merged (or its poison honoured), but this daemon keeps no copy,
    // so its death loses the bits set since its last commit, as before issue 11.
    let attach = std::env::var_os(BENCH_NO_SURVIVAL).is_none();
    if !attach {
        log::warn!("{BENCH_NO_SURVIVAL} is set: no survival copy (benchmarks only)");
    }
    let degraded = resume_at(&path, cfg.dest_moved, md, boot_id()?, attach, cfg.recover)?;
    Ok((path, degraded))
}

/// [`resume`] with the survival copy at `path`, in boot `boot`.
fn resume_at(
    path: &Path,
    dest_moved: bool,
    md: &Metadata,
    boot: [u8; 16],
    attach: bool,
    recovering: bool,
) -> Result<Degraded> {
    let dev = open_file(path, survival_size(md.nr_regions()))?;
    let mut degraded = None;
    match SurvivalFile::read(&dev, md.uuid(), boot, md.nr_regions())? {
        None => {}
        // A failed destination flush is kept even when the destination moved (it may be a
        // copy of the one that lost the writes); only the bits are not merged.
        Some(s) if dest_moved && s.poisoned.is_none() => log::warn!(
            "{}: not merged: the destination moved, and the copy may be older than these \
             region bits",
            path.display()
        ),
        Some(s) => match s.poisoned {
            Some(reason) => {
                let reason =
                    format!("a destination flush failed before the daemon was restarted: {reason}");
                log::error!("{}: {reason}; starting read-only", path.display());
                if md.mode().0 == MetadataMode::ReadWrite {
                    md.persist_mode(MetadataMode::ReadOnly, &reason)?;
                }
                // A recovery continues a dead daemon that had gone further, to fail mode.
                degraded = s
                    .degraded
                    .filter(|(m, _)| recovering && *m == MetadataMode::Fail);
            }
            None => {
                let n = md.merge_survived(&s)?;
                log::warn!(
                    "{}: a daemon of this clone died; {n} regions hydrated since its last \
                         commit are taken back from its survival copy",
                    path.display()
                );
                // Only a recovery continues the dead daemon's mode: the file system above it
                // still runs and must not see a FLUSH succeed. A new device (after a stop, or
                // when the device is gone) starts in the mode the metadata records, which
                // `reset-mode` governs.
                let severity = crate::engine::Mode::from_metadata;
                degraded = s
                    .degraded
                    .filter(|(m, _)| recovering && severity(*m) > severity(md.mode().0));
                if let Some((m, reason)) = &degraded {
                    log::error!(
                        "{}: the dead daemon was in {m:?} mode ({reason}); so is this one",
                        path.display()
                    );
                }
            }
        },
    }
    if attach {
        // Until the metadata records a degraded mode carried over, the new copy does (in its
        // first header write): a death before then must not bring the clone back read-write.
        let carried = degraded.as_ref().map(|(m, r)| (*m, r.as_str()));
        md.attach_survival(Arc::new(dev), boot, carried)?;
    }
    Ok(degraded)
}

/// Opens (creating it if needed) the survival file, at least `size` bytes long.
fn open_file(path: &Path, size: u64) -> Result<FileDev> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .named(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata().named(|| format!("{}", path.display()))?.len();
    if len < size {
        f.set_len(size)
            .named(|| format!("cannot size {}", path.display()))?;
    }
    drop(f);
    Ok(FileDev::open(path, Access::ReadWrite, false)?)
}

/// After a clean shutdown: the committed bitmap holds every bit; the copy is not needed.
pub(super) fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemDev;
    use crate::io::BlockDev;
    use crate::metadata::{Expect, FormatParams};

    const BOOT: [u8; 16] = [3; 16];

    struct Clone {
        source: Arc<MemDev>,
        dest: Arc<MemDev>,
        meta: Arc<MemDev>,
    }

    impl Clone {
        fn new() -> Clone {
            let c = Clone {
                source: Arc::new(MemDev::new("source", 64 * 4096)),
                dest: Arc::new(MemDev::new("dest", 64 * 4096)),
                meta: Arc::new(MemDev::new("meta", 1 << 20)),
            };
            let params = FormatParams::from_devices(c.source.as_ref(), c.dest.as_ref(), 4096)
                .expect("fingerprint");
            let m: Arc<dyn BlockDev> = c.meta.clone();
            Metadata::format(m, &params, false).expect("format");
            c
        }

        /// Opens the metadata as a (re)starting daemon does.
        fn open(&self) -> Metadata {
            let expect =
                Expect::from_devices(self.source.as_ref(), self.dest.as_ref()).expect("expect");
            let m: Arc<dyn BlockDev> = self.meta.clone();
            Metadata::open(m, &expect).expect("open").0
        }
    }

    #[test]
    fn a_restarted_daemon_takes_back_the_bits_of_a_dead_one_in_the_same_boot_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clone.bits");
        let c = Clone::new();
        let md = c.open();
        resume_at(&path, false, &md, BOOT, true, true).expect("first start");
        md.set_hydrated(5).expect("set");
        // The daemon dies: nothing committed, nothing closed.
        drop(md);
        let md = c.open();
        assert!(!md.is_hydrated(5), "the bit was never committed");
        resume_at(&path, false, &md, BOOT, true, true).expect("restart");
        assert!(
            md.is_hydrated(5),
            "the dead daemon's bit was not taken back"
        );
        assert!(md.is_dirty(), "the merged bit must be committed");
        drop(md);
        // After a reboot the copy describes nothing durable: not merged.
        let md = c.open();
        resume_at(&path, false, &md, [4; 16], true, true).expect("other boot");
        assert!(!md.is_hydrated(5));
        drop(md);
        // A moved destination may be older than the copy: not merged.
        let md = c.open();
        resume_at(&path, false, &md, BOOT, true, true).expect("restart");
        md.set_hydrated(6).expect("set");
        drop(md);
        let md = c.open();
        resume_at(&path, true, &md, BOOT, true, true).expect("moved");
        assert!(!md.is_hydrated(6));
    }

    #[test]
    fn after_a_failed_destination_flush_the_bits_are_not_trusted_and_the_clone_starts_read_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clone.bits");
        let c = Clone::new();
        let md = c.open();
        resume_at(&path, false, &md, BOOT, true, true).expect("first start");
        md.set_hydrated(9).expect("set");
        md.poison_survival("destination flush: EIO");
        drop(md);
        let md = c.open();
        assert_eq!(
            resume_at(&path, false, &md, BOOT, true, true).expect("restart"),
            None,
            "the poison's mode is in the metadata"
        );
        assert!(
            !md.is_hydrated(9),
            "a bit set before the failed flush was merged"
        );
        let (mode, reason) = md.mode();
        assert_eq!(mode, MetadataMode::ReadOnly);
        assert!(reason.contains("destination flush: EIO"), "{reason}");
        // A dead daemon that had gone on to fail mode: a recovery continues in it; a new
        // start after a stop comes up read-only.
        let c = Clone::new();
        let path = dir.path().join("failed.bits");
        let md = c.open();
        resume_at(&path, false, &md, BOOT, true, true).expect("first start");
        md.poison_survival("destination flush: EIO");
        md.degrade_survival(MetadataMode::Fail, "reloading the committed bitmap failed");
        drop(md);
        let md = c.open();
        let (mode, reason) = resume_at(&path, false, &md, BOOT, true, true)
            .expect("recover")
            .expect("fail mode was not continued");
        assert_eq!(mode, MetadataMode::Fail);
        assert!(
            reason.contains("destination flush"),
            "the first failure: {reason}"
        );
        drop(md);
        let md = c.open();
        assert_eq!(
            resume_at(&path, false, &md, BOOT, true, false).expect("start"),
            None
        );
        assert_eq!(md.mode().0, MetadataMode::ReadOnly);
        // The same with the destination moved (`start --dest-moved`): still read-only.
        let path = dir.path().join("moved.bits");
        let c = Clone::new();
        let md = c.open();
        resume_at(&path, false, &md, BOOT, true, true).expect("first start");
        md.poison_survival("destination flush: EIO");
        drop(md);
        let md = c.open();
        resume_at(&path, true, &md, BOOT, true, false).expect("start, moved");
        assert_eq!(
            md.mode().0,
            MetadataMode::ReadOnly,
            "a moved destination dropped the failed flush"
        );
    }

    #[test]
    fn reverting_to_the_committed_bitmap_rewrites_the_survival_copy_of_a_small_clone() {
        // 64 regions: one word in the survival copy, a whole bitmap block (512 words) in
        // core. The revert after a failed destination flush rewrote every in-core word, past
        // the end of the copy, and failed: fail mode instead of read-only (VM test
        // fault_dest_error_writes).
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("small.bits");
        let c = Clone::new();
        let md = c.open();
        resume_at(&path, false, &md, BOOT, true, true).expect("start");
        md.set_hydrated(5).expect("set");
        assert_eq!(md.revert_to_committed().expect("revert"), 0);
        assert!(!md.is_hydrated(5));
        let dev = FileDev::open(&path, crate::io::file::Access::ReadOnly, false).expect("open");
        let s = SurvivalFile::read(&dev, md.uuid(), BOOT, md.nr_regions())
            .expect("read")
            .expect("same boot");
        assert_eq!(
            s.words[0] & (1 << 5),
            0,
            "the reverted bit is still in the copy"
        );
    }

    #[test]
    fn a_dead_daemons_degraded_mode_comes_back_with_its_bits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("clone.bits");
        let c = Clone::new();
        let md = c.open();
        resume_at(&path, false, &md, BOOT, true, true).expect("first start");
        md.set_hydrated(7).expect("set");
        // A commit failed; the metadata could not record the mode either.
        md.degrade_survival(MetadataMode::ReadOnly, "commit failed: EIO");
        drop(md);
        let md = c.open();
        assert_eq!(md.mode().0, MetadataMode::ReadWrite);
        let degraded = resume_at(&path, false, &md, BOOT, true, true).expect("restart");
        assert_eq!(
            degraded,
            Some((MetadataMode::ReadOnly, "commit failed: EIO".to_string()))
        );
        assert!(
            md.is_hydrated(7),
            "the bits of a degraded daemon are trusted"
        );
        // The new copy records it too: a second death before the metadata does.
        drop(md);
        let md = c.open();
        let again = resume_at(&path, false, &md, BOOT, true, true).expect("second restart");
        assert_eq!(again, degraded);
        // A new device, not a recovery (after a stop): the metadata's mode applies.
        drop(md);
        let md = c.open();
        let fresh = resume_at(&path, false, &md, BOOT, true, false).expect("start");
        assert_eq!(fresh, None);
    }

    #[test]
    fn a_bit_is_in_the_survival_copy_before_anyone_can_see_it() {
        // A user write on another queue that finds a region's bit set goes straight to the
        // destination and is acknowledged: the bit must outlive the daemon by then.
        use crate::io::mem::Op;
        use std::sync::atomic::{AtomicU8, Ordering};
        let c = Clone::new();
        let md = Arc::new(c.open());
        let nr = md.nr_regions();
        let surv = Arc::new(MemDev::new("surv", survival_size(nr)));
        md.attach_survival(surv.clone(), BOOT, None)
            .expect("attach");
        // 0: no write seen; 1: the bit was visible during the copy's write; 2: it was not.
        let seen = Arc::new(AtomicU8::new(0));
        let (m, s) = (Arc::downgrade(&md), seen.clone());
        surv.set_fault(Some(Arc::new(move |op: &Op| {
            if let (Op::Write { .. }, Some(m)) = (op, m.upgrade()) {
                s.store(if m.is_hydrated(5) { 1 } else { 2 }, Ordering::SeqCst);
            }
            None
        })));
        md.set_hydrated(5).expect("set");
        assert_eq!(
            seen.load(Ordering::SeqCst),
            2,
            "the bit was visible before the survival copy held it"
        );
        assert!(md.is_hydrated(5));
        // A survival copy that cannot be written: the bit is not set at all.
        surv.set_fault(Some(Arc::new(|op: &Op| {
            matches!(op, Op::Write { .. }).then(|| std::io::Error::other("tmpfs full"))
        })));
        assert!(md.set_hydrated(6).is_err());
        assert!(!md.is_hydrated(6), "a bit the survival copy lacks was set");
    }
}
