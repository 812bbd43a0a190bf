//! Per-region serialisation: FIFO ticket locks keyed by region number, and the one place that
//! locks regions for writing.
//!
//! Invariant: a region that is not hydrated is only ever written (by a hydration copy, a user
//! write, a zeroing or a discard marking it hydrated) by the holder of its lock, and its
//! hydrated bit is set before the lock is released. So a hydration copy read from the source
//! can never land over newer user data: a user write to a region being hydrated waits for the
//! lock, then finds the region hydrated and writes to the destination after the copy. Writers
//! take their locks through [`RegionLocks::lock_unhydrated`], which re-checks each region's
//! state under its lock; the background sweep takes them with [`RegionLocks::try_lock`] and
//! re-checks the same way before copying. Writes waiting on the same region are served in
//! arrival order (tickets), which keeps their order. Lock order is ascending region number
//! everywhere, so multi-region holders cannot deadlock.

use super::wake::{Kickers, Signal};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

struct Entry {
    next: u64,
    serving: u64,
}

pub struct RegionLocks {
    map: Mutex<HashMap<u64, Entry>>,
    signal: Signal,
}

pub struct RegionGuard<'a> {
    locks: &'a RegionLocks,
    region: u64,
}

impl RegionLocks {
    pub fn new(kickers: &Arc<Kickers>) -> RegionLocks {
        RegionLocks {
            map: Mutex::new(HashMap::new()),
            signal: Signal::new(kickers),
        }
    }

    /// Waits for the lock of `region`, in FIFO order among waiters.
    pub async fn lock(&self, region: u64) -> RegionGuard<'_> {
        let ticket = {
            let mut map = self.map.lock();
            let e = map.entry(region).or_insert(Entry {
                next: 0,
                serving: 0,
            });
            e.next += 1;
            e.next - 1
        };
        self.signal
            .wait_until(|| {
                self.map
                    .lock()
                    .get(&region)
                    .is_some_and(|e| e.serving == ticket)
            })
            .await;
        RegionGuard {
            locks: self,
            region,
        }
    }

    /// Locks every region of `regions` that is not hydrated, in ascending order, and checks
    /// each one again under its lock: a region hydrated meanwhile (by the sweep or another
    /// writer) is released at once. The guards returned are exactly the regions that are not
    /// hydrated and cannot become hydrated by anyone else while they are held; the caller
    /// writes their data and sets their bits before dropping the guards.
    pub async fn lock_unhydrated(
        &self,
        regions: std::ops::Range<u64>,
        is_hydrated: impl Fn(u64) -> bool,
    ) -> Vec<RegionGuard<'_>> {
        let mut guards = Vec::new();
        for r in regions {
            if !is_hydrated(r) {
                let g = self.lock(r).await;
                if !is_hydrated(r) {
                    guards.push(g);
                }
            }
        }
        guards
    }

    /// Takes the lock of `region` only if nobody holds or waits for it.
    pub fn try_lock(&self, region: u64) -> Option<RegionGuard<'_>> {
        let mut map = self.map.lock();
        if map.contains_key(&region) {
            return None;
        }
        map.insert(
            region,
            Entry {
                next: 1,
                serving: 0,
            },
        );
        Some(RegionGuard {
            locks: self,
            region,
        })
    }

    pub fn is_locked(&self, region: u64) -> bool {
        self.map.lock().contains_key(&region)
    }

    /// How many wait for the lock of `region` (besides its holder).
    #[cfg(test)]
    pub fn waiters(&self, region: u64) -> u64 {
        self.map
            .lock()
            .get(&region)
            .map_or(0, |e| e.next - e.serving - 1)
    }

    fn unlock(&self, region: u64) {
        let waiters = {
            let mut map = self.map.lock();
            match map.get_mut(&region) {
                Some(e) => {
                    e.serving += 1;
                    if e.serving == e.next {
                        map.remove(&region);
                        false
                    } else {
                        true
                    }
                }
                None => false,
            }
        };
        if waiters {
            self.signal.notify();
        }
    }
}

impl RegionGuard<'_> {
    pub fn region(&self) -> u64 {
        self.region
    }
}

impl Drop for RegionGuard<'_> {
    fn drop(&mut self) {
        self.locks.unlock(self.region);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn waiters_are_served_in_order() {
        let locks = Arc::new(RegionLocks::new(&Arc::new(Kickers::default())));
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = block_on(locks.lock(7));
        assert!(locks.try_lock(7).is_none());
        let mut handles = Vec::new();
        for i in 0..4 {
            let (l, o) = (locks.clone(), order.clone());
            handles.push(std::thread::spawn(move || {
                let g = block_on(l.lock(7));
                o.lock().push(i);
                drop(g);
            }));
            // Wait until thread i holds its ticket, so tickets are taken in order i.
            while locks.map.lock().get(&7).map(|e| e.next) != Some(i as u64 + 2) {
                std::thread::yield_now();
            }
        }
        drop(first);
        for h in handles {
            h.join().map_err(|_| "thread panicked").unwrap_or(());
        }
        assert_eq!(*order.lock(), vec![0, 1, 2, 3]);
        assert!(!locks.is_locked(7));
    }
}
