//! The region map: which regions user I/O must treat as hydrated.
//!
//! It is the metadata's in-core bitmap plus two facts about it: `fully_hydrated` (every region
//! hydrated: the pass-through fast path, and the bitmap may be released once committed) and
//! `settled` (after a failure, the bitmap has been made final: reverted to the committed one
//! after a failed destination flush, or kept and sealed after other failures).
//!
//! Invariant: `fully_hydrated` is never set after a revert cleared it. A check that started
//! before a failure and a revert's final store are serialised by `settle_lock`, and the check
//! does nothing once the map is settled.

use crate::metadata::{Metadata, MetadataError};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub(crate) struct RegionMap {
    md: Arc<Metadata>,
    nr_regions: u64,
    fully_hydrated: AtomicBool,
    /// In read-only or fail mode, the bitmap is final (see the module doc).
    settled: AtomicBool,
    /// Serialises setting `fully_hydrated` with a revert's final store.
    settle_lock: Mutex<()>,
}

impl RegionMap {
    /// `degraded`: the engine starts in a degraded mode, so the bitmap just loaded (the
    /// committed one) is already final.
    pub fn new(md: Arc<Metadata>, degraded: bool) -> RegionMap {
        let map = RegionMap {
            nr_regions: md.nr_regions(),
            md,
            fully_hydrated: AtomicBool::new(false),
            settled: AtomicBool::new(degraded),
            settle_lock: Mutex::new(()),
        };
        map.check_fully_hydrated();
        map
    }

    pub fn md(&self) -> &Metadata {
        &self.md
    }

    pub fn is_hydrated(&self, r: u64) -> bool {
        self.fully_hydrated.load(Ordering::Acquire) || self.md.is_hydrated(r)
    }

    pub fn is_fully_hydrated(&self) -> bool {
        self.fully_hydrated.load(Ordering::Acquire)
    }

    /// Sets `fully_hydrated` if every region is hydrated and the map is not settled.
    pub fn check_fully_hydrated(&self) {
        if self.fully_hydrated.load(Ordering::Acquire) {
            return;
        }
        let _g = self.settle_lock.lock();
        if !self.settled.load(Ordering::Acquire) && self.md.nr_hydrated() == self.nr_regions {
            self.fully_hydrated.store(true, Ordering::Release);
        }
    }

    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Makes the map final as it is: after a failure that did not lose destination writes
    /// (the in-core bits stay, sealed by the caller), or in fail mode.
    pub fn mark_settled(&self) {
        self.settled.store(true, Ordering::Release);
    }

    /// After a failed destination flush: back to the committed bitmap, sealed, and final.
    /// Returns the number of hydrated regions in it. On error the map is not settled: the
    /// caller switches to fail mode first, then calls [`mark_settled`](Self::mark_settled).
    pub fn settle_reverting(&self) -> Result<u64, MetadataError> {
        let n = self.md.revert_to_committed()?;
        let _g = self.settle_lock.lock();
        self.fully_hydrated
            .store(n == self.nr_regions, Ordering::Release);
        self.settled.store(true, Ordering::Release);
        Ok(n)
    }
}
