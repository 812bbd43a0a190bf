//! The in-core state of open metadata: the hydrated-region bitmap, the dirty set, and the
//! last durable superblock with the live slot of every bitmap block.
//!
//! Owns the bitmap operations: looking bits up, setting them, releasing the bitmap once
//! everything is hydrated and committed, and sealing or reverting it after a failure.
//! Invariants:
//! - a bit is only ever set, never cleared, except by [`Metadata::revert_to_committed`],
//!   which returns every bitmap block to its committed contents and seals the bitmap;
//! - a setter sets the bit before it marks the block dirty, so a commit that takes the
//!   dirty mark also copies the bit;
//! - once released (every region hydrated and committed) the bitmap is empty and every
//!   region reads as hydrated; the decision is taken under the bitmap's read lock
//!   (`Core::with_bitmap`).

use super::bitmap::{self, WORDS_PER_BITMAP_BLOCK};
use super::checksum::BLOCK_SIZE;
use super::commit::{take_changed_blocks, CommitGuard};
use super::error::{MetadataError, Result};
use super::format::valid_mask;
use super::superblock::{MetadataMode, Superblock};
use super::survival::{SurvivalFile, Survived};
use super::Metadata;
use crate::io::BlockDev;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Where the live copy of a bitmap block is, and how many bits it has set.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LiveSlot {
    pub slot: u8,
    pub generation: u64,
    pub count: u32,
}

/// Mutable state changed only by commits (serialised by `Core::committing`).
pub(crate) struct State {
    /// The last durable superblock.
    pub sb: Superblock,
    pub live: Vec<LiveSlot>,
    /// Bitmap blocks whose non-live slot was written by a commit that failed: that slot
    /// must be rewritten before any later superblock makes its generation current.
    pub tainted: Vec<u64>,
}

pub(crate) struct Core {
    pub dev: Arc<dyn BlockDev>,
    pub writable: bool,
    pub nr_regions: u64,
    pub nr_bitmap_blocks: u64,
    /// In-core bitmap: `nr_bitmap_blocks * WORDS_PER_BITMAP_BLOCK` words. Emptied (and
    /// `released` set) once every region is hydrated and committed: from then on every
    /// region reads as hydrated without a lookup, and a fully hydrated clone holds no
    /// bitmap memory. Readers go through [`Core::with_bitmap`], which decides "released"
    /// under the read lock.
    pub words: RwLock<Vec<AtomicU64>>,
    pub released: AtomicBool,
    /// No bit may be set any more: the clone is read-only after a failure and the in-core
    /// bitmap is the committed one (`revert_to_committed`, `seal`).
    pub sealed: AtomicBool,
    /// One bit per bitmap block changed since the last freeze.
    pub dirty: Vec<AtomicU64>,
    /// Bits set in `words`.
    pub hydrated: AtomicU64,
    /// A commit (or another superblock write) is in progress.
    pub committing: AtomicBool,
    /// The survival copy every bit is written through to (see `survival`), once attached.
    pub survival: OnceLock<SurvivalFile>,
    pub state: Mutex<State>,
    /// Test-only: run by the bitmap readers right before they look a word up (after deciding
    /// that the bitmap is not released), so a test can release it from another thread there.
    #[cfg(test)]
    pub before_lookup: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Core {
    /// The in-core state of metadata loaded from `dev`: the superblock `sb`, the bitmap
    /// `words` (`sb.nr_bitmap_blocks * WORDS_PER_BITMAP_BLOCK` of them) and the live slot of
    /// every bitmap block. Nothing dirty, nothing released.
    pub fn new(
        dev: Arc<dyn BlockDev>,
        writable: bool,
        sb: Superblock,
        words: Vec<u64>,
        live: Vec<LiveSlot>,
    ) -> Core {
        let nbb = sb.nr_bitmap_blocks;
        let hydrated = live.iter().map(|l| l.count as u64).sum();
        Core {
            dev,
            writable,
            nr_regions: sb.nr_regions,
            nr_bitmap_blocks: nbb,
            words: RwLock::new(words.into_iter().map(AtomicU64::new).collect()),
            released: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            dirty: (0..nbb.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            hydrated: AtomicU64::new(hydrated),
            committing: AtomicBool::new(false),
            survival: OnceLock::new(),
            state: Mutex::new(State {
                sb,
                live,
                tainted: Vec::new(),
            }),
            #[cfg(test)]
            before_lookup: Mutex::new(None),
        }
    }

    /// Runs `lookup` on the in-core bitmap words, or returns `None` once the bitmap is
    /// released (every region hydrated and committed). The one place that decides between
    /// the two: `release_bitmap_if_complete` empties the words under the write lock, so the
    /// decision is taken again while holding the read lock, and the words cannot be emptied
    /// until `lookup` returns. (Deciding before taking the lock let a reader preempted
    /// across the release index an empty vector and panic on a queue thread.)
    pub fn with_bitmap<T>(&self, lookup: impl FnOnce(&[AtomicU64]) -> T) -> Option<T> {
        // Fast path: `released` never goes back to false.
        if self.released.load(Ordering::Acquire) {
            return None;
        }
        let words = self.words.read();
        if self.released.load(Ordering::Acquire) {
            return None;
        }
        #[cfg(test)]
        self.before_lookup();
        Some(lookup(&words))
    }

    #[cfg(test)]
    fn before_lookup(&self) {
        let hook = self.before_lookup.lock().clone();
        if let Some(hook) = hook {
            hook();
        }
    }

    pub fn name(&self) -> &str {
        self.dev.name()
    }

    pub fn mark_dirty(&self, index: u64) {
        let w = &self.dirty[(index / 64) as usize];
        let bit = 1u64 << (index % 64);
        if w.load(Ordering::SeqCst) & bit == 0 {
            w.fetch_or(bit, Ordering::SeqCst);
        }
    }
}

impl Metadata {
    /// Regions hydrated in core (committed or not).
    pub fn nr_hydrated(&self) -> u64 {
        self.core.hydrated.load(Ordering::SeqCst)
    }

    /// Regions hydrated according to the last durable commit.
    pub fn nr_committed_hydrated(&self) -> u64 {
        self.core.state.lock().sb.hydrated
    }

    pub fn all_hydrated(&self) -> bool {
        self.nr_hydrated() == self.core.nr_regions
    }

    /// Whether `region` is hydrated in core. Regions beyond the end read as not hydrated.
    pub fn is_hydrated(&self, region: u64) -> bool {
        region < self.core.nr_regions
            && self
                .core
                .with_bitmap(|words| {
                    words[(region / 64) as usize].load(Ordering::SeqCst) & (1 << (region % 64)) != 0
                })
                .unwrap_or(true)
    }

    /// The first region at or after `from` that is not hydrated.
    pub fn next_unhydrated(&self, from: u64) -> Option<u64> {
        let nr_regions = self.core.nr_regions;
        // Released: every region is hydrated.
        self.core
            .with_bitmap(|words| {
                let mut r = from;
                while r < nr_regions {
                    let w =
                        words[(r / 64) as usize].load(Ordering::SeqCst) | ((1u64 << (r % 64)) - 1);
                    if w != !0 {
                        let candidate = (r / 64) * 64 + (!w).trailing_zeros() as u64;
                        return (candidate < nr_regions).then_some(candidate);
                    }
                    r = (r / 64 + 1) * 64;
                }
                None
            })
            .flatten()
    }

    /// Records that `region` is hydrated. Call only after the region's data write to the
    /// destination completed: the bit may be committed by any commit frozen after this.
    pub fn set_hydrated(&self, region: u64) -> Result<()> {
        self.set_range_hydrated(region, 1)
    }

    /// [`set_hydrated`](Self::set_hydrated) for `count` regions from `first`. Takes only the
    /// bitmap's read lock (shared by all setters).
    pub fn set_range_hydrated(&self, first: u64, count: u64) -> Result<()> {
        self.set_bits(first, count, true)
    }

    /// Test only: sets bits without writing them to the survival copy (the crash oracle's
    /// teeth: a bit that reaches the survival copy only later).
    #[cfg(test)]
    pub fn set_hydrated_unmirrored(&self, region: u64) -> Result<()> {
        self.set_bits(region, 1, false)
    }

    /// Sets the bits of regions `[first, first+count)` and, with `mirror`, writes them to the
    /// survival copy before returning.
    fn set_bits(&self, first: u64, count: u64, mirror: bool) -> Result<()> {
        let core = &self.core;
        let end = first
            .checked_add(count)
            .filter(|e| *e <= core.nr_regions)
            .ok_or_else(|| MetadataError::RegionOutOfRange {
                dev: core.name().to_string(),
                region: first.saturating_add(count.saturating_sub(1)),
                nr_regions: core.nr_regions,
            })?;
        // Released (`None`): everything is hydrated and committed already.
        core.with_bitmap(|words| {
            // Checked under the read lock: `revert_to_committed` seals under the write lock.
            if core.sealed.load(Ordering::Acquire) {
                return Err(MetadataError::ReadOnly {
                    dev: core.name().to_string(),
                    what: "marked hydrated (the clone is read-only after a failure)",
                });
            }
            let mut masks = Vec::new();
            let mut r = first;
            while r < end {
                let bit = r % 64;
                let n = (64 - bit).min(end - r);
                let mask = if n == 64 {
                    !0
                } else {
                    ((1u64 << n) - 1) << bit
                };
                masks.push(((r / 64) as usize, mask));
                r += n;
            }
            let publish = || {
                for &(w, mask) in &masks {
                    // Order matters: the bit first, then the dirty mark. A commit that sees
                    // the dirty mark (swap in begin_commit) therefore also sees the bit when
                    // it copies the words.
                    let old = words[w].fetch_or(mask, Ordering::SeqCst);
                    let new = mask & !old;
                    if new != 0 {
                        core.hydrated
                            .fetch_add(new.count_ones() as u64, Ordering::SeqCst);
                    }
                    core.mark_dirty(w as u64 / WORDS_PER_BITMAP_BLOCK as u64);
                }
            };
            // The survival copy gets the bits before anyone can see them: a user write that
            // finds a bit set (on any queue, without a region lock) goes to the destination
            // and is acknowledged, so the bit must already outlive the daemon. If the copy
            // cannot be written, the bits are not set.
            match core.survival.get() {
                Some(s) if mirror && end > first => s
                    .write_words_then(words, &masks, publish)
                    .map_err(|error| MetadataError::Survival {
                        dev: core.name().to_string(),
                        error,
                    }),
                _ => {
                    publish();
                    Ok(())
                }
            }
        })
        .unwrap_or(Ok(()))
    }

    /// Drops the in-core bitmap once every region is hydrated and that state is committed
    /// (nothing dirty). Returns whether the bitmap is released now.
    pub fn release_bitmap_if_complete(&self) -> bool {
        if self.core.released.load(Ordering::Acquire) {
            return true;
        }
        // Under the write lock no setter is between its bit and its dirty mark, and checking
        // `committing` excludes a commit between its freeze and its image copy.
        let mut words = self.core.words.write();
        if self.core.committing.load(Ordering::SeqCst)
            || self.nr_committed_hydrated() != self.core.nr_regions
            || self.is_dirty()
        {
            return false;
        }
        self.core.released.store(true, Ordering::Release);
        *words = Vec::new();
        true
    }

    /// Bytes of memory used by the in-core bitmap and dirty set.
    pub fn in_core_bytes(&self) -> u64 {
        // One lock at a time: the commit thread takes `state` then `words`.
        let words = self.core.words.read().len();
        let live = self.core.state.lock().live.len();
        (words + self.core.dirty.len()) as u64 * 8
            + live as u64 * std::mem::size_of::<LiveSlot>() as u64
    }

    /// Read-only mode after a failure (dm-clone falls back to the committed bitmap): forgets
    /// every bit set since the last durable commit and refuses new ones. A region hydrated
    /// since then may hold data the failed flush lost, so it must be read from the source
    /// again. The bitmap blocks that changed since that commit (dirty or tainted) are reloaded
    /// from their live slots. Returns the number of hydrated regions left.
    pub fn revert_to_committed(&self) -> Result<u64> {
        if self.core.committing.swap(true, Ordering::SeqCst) {
            return Err(MetadataError::CommitInProgress {
                dev: self.name().to_string(),
            });
        }
        let _guard = CommitGuard(&self.core.committing);
        let core = &self.core;
        // Lock order: `words` before `state`, as `release_bitmap_if_complete`.
        let words = core.words.write();
        let state = core.state.lock();
        core.sealed.store(true, Ordering::Release);
        if core.released.load(Ordering::Acquire) {
            // Released only once everything was hydrated and committed.
            return Ok(core.nr_regions);
        }
        let stale = take_changed_blocks(core, &state.tainted);
        let mut block = vec![0u8; BLOCK_SIZE];
        for index in stale {
            core.read_live_copy(&state, index, &mut block)?;
            let first = index * WORDS_PER_BITMAP_BLOCK as u64;
            for i in 0..WORDS_PER_BITMAP_BLOCK {
                let w =
                    bitmap::payload_word(&block, i) & valid_mask(core.nr_regions, first + i as u64);
                words[first as usize + i].store(w, Ordering::SeqCst);
            }
        }
        let committed: u64 = state.live.iter().map(|l| l.count as u64).sum();
        core.hydrated.store(committed, Ordering::SeqCst);
        // The survival copy goes back too: the bits forgotten here may describe lost data.
        if let Some(s) = core.survival.get() {
            s.write_all(&words)
                .map_err(|error| MetadataError::Survival {
                    dev: core.name().to_string(),
                    error,
                })?;
        }
        Ok(committed)
    }

    /// Merges the bits a previous daemon of this clone left in its survival copy (in the
    /// same boot: their data reached the destination before each bit was set). They are
    /// marked dirty, so the next commit makes them durable, destination flush first. Returns
    /// the number of regions that were not hydrated in the committed bitmap.
    pub fn merge_survived(&self, survived: &Survived) -> Result<u64> {
        let core = &self.core;
        let added = core.with_bitmap(|words| {
            let mut added = 0;
            for (i, (w, s)) in words.iter().zip(&survived.words).enumerate() {
                let s = s & valid_mask(core.nr_regions, i as u64);
                let new = s & !w.fetch_or(s, Ordering::SeqCst);
                if new != 0 {
                    added += new.count_ones() as u64;
                    core.mark_dirty(i as u64 / WORDS_PER_BITMAP_BLOCK as u64);
                }
            }
            added
        });
        let added = added.unwrap_or(0);
        core.hydrated.fetch_add(added, Ordering::SeqCst);
        Ok(added)
    }

    /// Starts writing every bit through to a survival copy in `dev`, which first receives
    /// the in-core bitmap as it is. No bit can be set meanwhile (the bitmap's write lock is
    /// held), so the copy misses none.
    pub fn attach_survival(
        &self,
        dev: Arc<dyn BlockDev>,
        boot_id: [u8; 16],
        degraded: Option<(MetadataMode, &str)>,
    ) -> Result<()> {
        let core = &self.core;
        let words = core.words.write();
        let snapshot: Vec<u64> = if core.released.load(Ordering::Acquire) {
            vec![!0; core.nr_regions.div_ceil(64) as usize]
        } else {
            words.iter().map(|w| w.load(Ordering::SeqCst)).collect()
        };
        let name = dev.name().to_string();
        let file = SurvivalFile::create(
            dev,
            self.uuid(),
            boot_id,
            core.nr_regions,
            &snapshot,
            degraded,
        )
        .map_err(|error| MetadataError::Survival { dev: name, error })?;
        // Attached once per open: a second attach keeps the first copy.
        let _ = core.survival.set(file);
        Ok(())
    }

    /// Records in the survival copy that the bits set since the last commit cannot be
    /// trusted (a destination flush failed). Best effort: the failure is also being made
    /// sticky in the metadata.
    pub fn poison_survival(&self, reason: &str) {
        if let Some(s) = self.core.survival.get() {
            if let Err(e) = s.poison(reason) {
                log::error!(
                    "{}: recording the flush failure in the survival copy: {e}",
                    self.name()
                );
            }
        }
    }

    /// Records in the survival copy that the daemon switched to the degraded `mode`: a later
    /// daemon starts in it. Best effort, like [`Self::poison_survival`].
    pub fn degrade_survival(&self, mode: MetadataMode, reason: &str) {
        if let Some(s) = self.core.survival.get() {
            if let Err(e) = s.degrade(mode, reason) {
                log::error!(
                    "{}: recording the {mode:?} mode in the survival copy: {e}",
                    self.name()
                );
            }
        }
    }

    /// Refuses every later attempt to set a bit (the clone starts read-only; the in-core
    /// bitmap is the committed one it was opened with).
    pub fn seal(&self) {
        let _words = self.core.words.write();
        self.core.sealed.store(true, Ordering::Release);
    }
}
