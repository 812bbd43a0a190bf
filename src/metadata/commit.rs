//! The two-phase commit protocol that makes the in-core bitmap durable.
//!
//! ```text
//! begin_commit        freeze: swap the dirty set to empty, copy the frozen blocks' words
//!   |        \
//! write_shadows     flush_destination     (may run concurrently; both need &FrozenCommit)
//!   |  ShadowsDurable   | DestinationFlushed
//! finish_commit       superblock N+1 to slot (N+1)%2, flush; then update the in-core state
//! ```
//!
//! Invariants this module keeps:
//! - a superblock of generation N+1 is written only after (a) every bitmap image of the
//!   commit is durable in its non-live slot and (b) a destination flush that *started
//!   after the freeze* completed. (a) and (b) are proven by the [`ShadowsDurable`] and
//!   [`DestinationFlushed`] values, which only [`FrozenCommit::write_shadows`] and
//!   [`flush_destination`] (or [`flush_destination_with`]) can construct, and which carry
//!   the commit's id;
//! - the live slot of a bitmap block and the current superblock slot are never written while
//!   they are live;
//! - a commit that does not finish re-marks its blocks dirty (so a retry commits them) and
//!   remembers that their non-live slots now hold uncommitted images ("tainted"), which are
//!   overwritten before any later superblock could make them current.

use super::bitmap::{self, BitmapHeader, WORDS_PER_BITMAP_BLOCK};
use super::checksum::BLOCK_SIZE;
use super::error::{io_err, MetadataError, Result};
use super::incore::{Core, LiveSlot, State};
use super::superblock::{
    self, truncate_utf8, MetadataMode, Superblock, FLAG_CLEAN_SHUTDOWN, MODE_REASON_LEN,
};
use super::Metadata;
use crate::io::BlockDev;
use serde::Serialize;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Source of unique commit ids (shared by every open metadata in the process).
static NEXT_COMMIT_ID: AtomicU64 = AtomicU64::new(1);

/// One bitmap block image frozen by phase 1.
struct FrozenBlock {
    index: u64,
    /// The non-live slot the image goes to.
    slot: u8,
    count: u32,
    image: Vec<u8>,
}

/// Phase 1's result: the frozen images of every dirty bitmap block, for generation N+1.
///
/// Dropping it without a successful [`Metadata::finish_commit`] re-marks its blocks dirty.
pub struct FrozenCommit {
    core: Arc<Core>,
    id: u64,
    generation: u64,
    blocks: Vec<FrozenBlock>,
    /// Hydrated regions in the bitmap this commit makes durable.
    hydrated: u64,
    shadows_started: AtomicBool,
    finished: bool,
}

/// Proof that the shadow images of commit `commit` are durable on the metadata device.
#[derive(Debug)]
pub struct ShadowsDurable {
    commit: u64,
}

/// Proof that a destination flush started after commit `commit` was frozen, and completed.
#[derive(Debug)]
pub struct DestinationFlushed {
    commit: u64,
}

/// What a finished commit did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CommitInfo {
    pub generation: u64,
    pub blocks_written: usize,
    pub hydrated: u64,
}

/// The bitmap blocks whose in-core image differs from their live slot: those marked dirty
/// (the marks are taken) and those `tainted` by a failed commit; sorted, no duplicates.
pub(super) fn take_changed_blocks(core: &Core, tainted: &[u64]) -> Vec<u64> {
    let mut indices: Vec<u64> = Vec::new();
    for (w, d) in core.dirty.iter().enumerate() {
        let mut bits = d.swap(0, Ordering::SeqCst);
        while bits != 0 {
            indices.push(w as u64 * 64 + bits.trailing_zeros() as u64);
            bits &= bits - 1;
        }
    }
    indices.extend(tainted.iter().copied());
    indices.sort_unstable();
    indices.dedup();
    indices
}

/// Clears `Core::committing` when dropped (for superblock writes outside a commit).
pub(super) struct CommitGuard<'a>(pub(super) &'a AtomicBool);

impl Drop for CommitGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Core {
    /// Writes `sb` to slot `generation % 2` and flushes the metadata device.
    pub(super) fn write_superblock(&self, sb: &Superblock) -> Result<()> {
        let slot = sb.generation % superblock::SUPERBLOCK_SLOTS;
        self.dev
            .write_at(&sb.pack(), slot * BLOCK_SIZE as u64)
            .map_err(io_err(
                self.name(),
                format!(
                    "writing superblock generation {} to slot {slot}",
                    sb.generation
                ),
            ))?;
        self.dev.flush().map_err(io_err(
            self.name(),
            format!("flushing superblock generation {}", sb.generation),
        ))
    }

    /// Reads the live copy of bitmap block `index` (as recorded in `state`) into `block`
    /// and validates it.
    pub(super) fn read_live_copy(&self, state: &State, index: u64, block: &mut [u8]) -> Result<()> {
        let live = state.live[index as usize];
        let from = bitmap::slot_blocknr(index, live.slot);
        self.dev
            .read_at(block, from * BLOCK_SIZE as u64)
            .map_err(io_err(self.name(), format!("reading bitmap block {index}")))?;
        bitmap::validate(block, index, live.slot, &state.sb.uuid).map_err(|e| {
            MetadataError::ChecksumMismatch {
                dev: self.name().to_string(),
                what: format!("live copy of bitmap block {index} (block {from}): {e}"),
            }
        })?;
        Ok(())
    }
}

impl Metadata {
    /// Whether any bitmap block changed since the last freeze (or a failed commit left
    /// work to redo).
    pub fn is_dirty(&self) -> bool {
        self.core
            .dirty
            .iter()
            .any(|d| d.load(Ordering::SeqCst) != 0)
            || !self.core.state.lock().tainted.is_empty()
    }

    fn start_exclusive(&self, what: &'static str) -> Result<()> {
        if !self.core.writable {
            return Err(MetadataError::ReadOnly {
                dev: self.name().to_string(),
                what,
            });
        }
        if self.core.committing.swap(true, Ordering::SeqCst) {
            return Err(MetadataError::CommitInProgress {
                dev: self.name().to_string(),
            });
        }
        Ok(())
    }

    /// Phase 1: freezes the dirty set. Hydrations recorded after the swap belong to the next
    /// transaction (they may also appear in this one's images; `metadata-format/SPEC.md`
    /// §4.2 says why that is safe). No I/O. Only one commit may be in flight.
    pub fn begin_commit(&self) -> Result<FrozenCommit> {
        self.start_exclusive("committed")?;
        let core = &self.core;
        let state = core.state.lock();
        let indices = take_changed_blocks(core, &state.tainted);
        let generation = state.sb.generation + 1;
        let uuid = state.sb.uuid;
        let mut hydrated = state.sb.hydrated;
        let mut blocks = Vec::with_capacity(indices.len());
        let core_words = core.words.read();
        for index in indices {
            let live = state.live[index as usize];
            debug_assert!(live.generation < generation);
            let slot = 1 - live.slot;
            let mut image = vec![0u8; BLOCK_SIZE];
            let first = index as usize * WORDS_PER_BITMAP_BLOCK;
            let words = core_words[first..first + WORDS_PER_BITMAP_BLOCK]
                .iter()
                .map(|w| w.load(Ordering::SeqCst));
            let mut count = 0u32;
            bitmap::put_payload(&mut image, words.inspect(|w| count += w.count_ones()));
            BitmapHeader {
                blocknr: bitmap::slot_blocknr(index, slot),
                index,
                generation,
                uuid,
            }
            .pack_into(&mut image);
            hydrated = hydrated - live.count as u64 + count as u64;
            blocks.push(FrozenBlock {
                index,
                slot,
                count,
                image,
            });
        }
        drop(state);
        Ok(FrozenCommit {
            core: self.core.clone(),
            id: NEXT_COMMIT_ID.fetch_add(1, Ordering::SeqCst),
            generation,
            blocks,
            hydrated,
            shadows_started: AtomicBool::new(false),
            finished: false,
        })
    }

    /// Phase 2: makes the superblock of generation N+1 durable, then updates the in-core
    /// generation and live-slot map. Needs both proofs of this commit. On error the
    /// commit's blocks are re-marked dirty; the caller should then switch to read-only
    /// mode and try [`persist_mode`](Self::persist_mode).
    pub fn finish_commit(
        &self,
        mut frozen: FrozenCommit,
        shadows: ShadowsDurable,
        dest: DestinationFlushed,
    ) -> Result<CommitInfo> {
        if !Arc::ptr_eq(&frozen.core, &self.core)
            || shadows.commit != frozen.id
            || dest.commit != frozen.id
        {
            return Err(MetadataError::CommitMismatch {
                dev: self.name().to_string(),
                frozen: frozen.id,
                shadows: shadows.commit,
                flushed: dest.commit,
            });
        }
        let info = self.write_commit_superblock(&frozen)?;
        frozen.finished = true;
        Ok(info)
    }

    /// Writes the superblock of `frozen` and, once durable, adopts it in core.
    fn write_commit_superblock(&self, frozen: &FrozenCommit) -> Result<CommitInfo> {
        let mut state = self.core.state.lock();
        let mut sb = state.sb.clone();
        sb.generation = frozen.generation;
        sb.blocknr = sb.generation % superblock::SUPERBLOCK_SLOTS;
        sb.hydrated = frozen.hydrated;
        sb.flags &= !FLAG_CLEAN_SHUTDOWN;
        self.core.write_superblock(&sb)?;
        // Only now, with the new superblock durable, do the written slots become live.
        for b in &frozen.blocks {
            state.live[b.index as usize] = LiveSlot {
                slot: b.slot,
                generation: frozen.generation,
                count: b.count,
            };
        }
        state
            .tainted
            .retain(|t| frozen.blocks.binary_search_by_key(t, |b| b.index).is_err());
        state.sb = sb;
        Ok(CommitInfo {
            generation: frozen.generation,
            blocks_written: frozen.blocks.len(),
            hydrated: frozen.hydrated,
        })
    }

    /// Convenience: runs the whole protocol, with the shadow writes and the destination
    /// flush overlapping on two threads.
    pub fn commit(&self, dest: &dyn BlockDev) -> Result<CommitInfo> {
        let frozen = self.begin_commit()?;
        let (shadows, flushed) = std::thread::scope(|s| {
            let h = s.spawn(|| frozen.write_shadows());
            let flushed = flush_destination(dest, &frozen);
            let shadows = h.join().unwrap_or_else(|_| {
                Err(MetadataError::Io {
                    dev: self.name().to_string(),
                    context: "writing bitmap shadows".into(),
                    error: io::Error::other("the shadow writer thread panicked"),
                })
            });
            (shadows, flushed)
        });
        let shadows = shadows?;
        let flushed = flushed.map_err(io_err(
            dest.name(),
            "flushing the destination before a metadata commit",
        ))?;
        self.finish_commit(frozen, shadows, flushed)
    }

    /// Records `mode` and `reason` in a new superblock generation with the same bitmap
    /// (best effort after a failure; the error says why it could not).
    pub fn persist_mode(&self, mode: MetadataMode, reason: &str) -> Result<()> {
        self.write_state_superblock("given a new mode", |sb| {
            sb.mode = mode;
            sb.mode_reason = truncate_utf8(&reason.replace('\0', " "), MODE_REASON_LEN).to_string();
        })
    }

    /// Writes a final superblock with the clean-shutdown flag set. Only the committed
    /// bitmap is recorded: commit first (bits set since the last commit are otherwise lost,
    /// which is safe: their regions are read from the source again).
    pub fn close_clean(&self) -> Result<()> {
        self.write_state_superblock("closed", |sb| sb.flags |= FLAG_CLEAN_SHUTDOWN)
    }

    /// Writes superblock N+1 = the current one changed by `change`, after overwriting any
    /// tainted slots with their live image so that N+1 cannot make them current.
    fn write_state_superblock(
        &self,
        what: &'static str,
        change: impl FnOnce(&mut superblock::Superblock),
    ) -> Result<()> {
        self.start_exclusive(what)?;
        let _guard = CommitGuard(&self.core.committing);
        let core = &self.core;
        let mut state = core.state.lock();
        if !state.tainted.is_empty() {
            for &index in &state.tainted {
                let live = state.live[index as usize];
                let mut block = vec![0u8; BLOCK_SIZE];
                core.read_live_copy(&state, index, &mut block)?;
                let other = 1 - live.slot;
                let mut h = BitmapHeader::unpack(&block);
                h.blocknr = bitmap::slot_blocknr(index, other);
                h.pack_into(&mut block);
                core.dev
                    .write_at(&block, h.blocknr * BLOCK_SIZE as u64)
                    .map_err(io_err(
                        core.name(),
                        format!("rewriting bitmap block {index}"),
                    ))?;
            }
            core.dev
                .flush()
                .map_err(io_err(core.name(), "flushing rewritten bitmap blocks"))?;
            state.tainted.clear();
        }
        let mut sb = state.sb.clone();
        sb.generation += 1;
        sb.blocknr = sb.generation % superblock::SUPERBLOCK_SLOTS;
        change(&mut sb);
        core.write_superblock(&sb)?;
        state.sb = sb;
        Ok(())
    }
}

impl FrozenCommit {
    /// Unique id of this commit.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Generation the commit will have once finished.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of bitmap blocks the commit writes.
    pub fn nr_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Phase 1b: writes every image to its block's non-live slot, then flushes the metadata
    /// device. May run concurrently with [`flush_destination`].
    pub fn write_shadows(&self) -> Result<ShadowsDurable> {
        if !self.blocks.is_empty() {
            self.shadows_started.store(true, Ordering::SeqCst);
            let dev = &self.core.dev;
            for b in &self.blocks {
                dev.write_at(
                    &b.image,
                    bitmap::slot_blocknr(b.index, b.slot) * BLOCK_SIZE as u64,
                )
                .map_err(io_err(
                    dev.name(),
                    format!(
                        "writing bitmap block {} for generation {}",
                        b.index, self.generation
                    ),
                ))?;
            }
            dev.flush().map_err(io_err(
                dev.name(),
                format!("flushing bitmap blocks of generation {}", self.generation),
            ))?;
        }
        Ok(ShadowsDurable { commit: self.id })
    }

    /// Test-only broken protocol: writes the superblock *before* the shadow images are
    /// durable. The crash oracle must catch it.
    #[cfg(test)]
    pub(crate) fn commit_superblock_first(mut self, md: &Metadata) -> Result<CommitInfo> {
        let dev = self.core.dev.clone();
        let mut sb = md.core.state.lock().sb.clone();
        sb.generation = self.generation;
        sb.blocknr = sb.generation % 2;
        sb.hydrated = self.hydrated;
        dev.write_at(&sb.pack(), sb.blocknr * BLOCK_SIZE as u64)
            .map_err(io_err(dev.name(), "broken commit"))?;
        for b in &self.blocks {
            dev.write_at(
                &b.image,
                bitmap::slot_blocknr(b.index, b.slot) * BLOCK_SIZE as u64,
            )
            .map_err(io_err(dev.name(), "broken commit"))?;
        }
        let info = md.write_commit_superblock(&self)?;
        self.finished = true;
        Ok(info)
    }
}

impl Drop for FrozenCommit {
    fn drop(&mut self) {
        if !self.finished {
            for b in &self.blocks {
                self.core.mark_dirty(b.index);
            }
            if self.shadows_started.load(Ordering::SeqCst) {
                let mut state = self.core.state.lock();
                state.tainted.extend(self.blocks.iter().map(|b| b.index));
                state.tainted.sort_unstable();
                state.tainted.dedup();
            }
        }
        self.core.committing.store(false, Ordering::SeqCst);
    }
}

/// Flushes the destination device for `frozen`. The only way to obtain a
/// [`DestinationFlushed`]: borrowing the frozen commit proves that the flush starts after
/// the freeze, so it covers every data write whose region bit is in the frozen images.
pub fn flush_destination(
    dest: &dyn BlockDev,
    frozen: &FrozenCommit,
) -> io::Result<DestinationFlushed> {
    flush_destination_with(frozen, || dest.flush())
}

/// [`flush_destination`] where `flush` flushes the destination (e.g. on another thread, while
/// the caller writes the shadows): it is called after the freeze, and must issue a flush of
/// the destination device and return once that flush has completed.
pub(crate) fn flush_destination_with(
    frozen: &FrozenCommit,
    flush: impl FnOnce() -> io::Result<()>,
) -> io::Result<DestinationFlushed> {
    flush()?;
    Ok(DestinationFlushed { commit: frozen.id })
}
