//! The memory budget of copy buffers: copy-on-write and background hydration take their
//! buffers from it and wait while it is spent.
//!
//! Without it, memory grew with the region size times the number of requests in flight
//! (128 concurrent writes into cold 1 GiB regions asked for 128 GiB). Copies larger than
//! [`COPY_CHUNK`] are made a chunk at a time under the region locks, so one copy never holds
//! more than a chunk; the budget bounds the sum over all copies in flight.
//!
//! Invariant: the bytes handed out never exceed the budget, except that a single request
//! larger than the whole budget is let through alone (it waits until nothing else is out).
//!
//! Buffers given back are kept for reuse (up to [`POOL_BYTES`], by exact length): a fresh
//! multi-megabyte allocation per copy cost page faults and the kernel's page clearing on
//! every batch. A buffer handed out therefore holds whatever its last copy left in it (another
//! region's data): every caller fills it whole before writing it anywhere, and a buffer whose
//! read failed is dropped or read again, never written.

use super::wake::{Kickers, Signal};
use crate::io::AlignedBuf;
use parking_lot::Mutex;
use std::mem::ManuallyDrop;
use std::sync::Arc;

/// Largest buffer one copy step uses.
pub const COPY_CHUNK: usize = 4 << 20;
/// Most bytes of given-back buffers kept for reuse (held while the daemon idles).
pub const POOL_BYTES: usize = 4 * COPY_CHUNK;

pub struct CopyBudget {
    limit: u64,
    used: Mutex<u64>,
    freed: Signal,
    /// Buffers given back, for reuse by a copy of the same length; at most `POOL_BYTES` in all.
    pool: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    bufs: Vec<AlignedBuf>,
    bytes: usize,
}

impl Pool {
    fn take(&mut self, len: usize) -> Option<AlignedBuf> {
        let i = self.bufs.iter().rposition(|b| b.len() == len)?;
        let buf = self.bufs.swap_remove(i);
        self.bytes -= len;
        Some(buf)
    }

    /// Keeps `buf` if there is room; the oldest buffers make room for it otherwise (the
    /// lengths in use now are the ones worth keeping).
    /// Returns the buffers that no longer fit, to be freed outside the pool's lock.
    #[must_use]
    fn give_back(&mut self, buf: AlignedBuf) -> Vec<AlignedBuf> {
        let len = buf.len();
        if len == 0 || len > POOL_BYTES {
            return vec![buf];
        }
        let mut evicted = Vec::new();
        while self.bytes + len > POOL_BYTES {
            let old = self.bufs.remove(0);
            self.bytes -= old.len();
            evicted.push(old);
        }
        self.bytes += len;
        self.bufs.push(buf);
        evicted
    }
}

/// A buffer taken from the budget; returned to it when dropped.
pub struct BudgetBuf<'a> {
    /// Moved out (to the pool) only in `drop`.
    buf: ManuallyDrop<AlignedBuf>,
    budget: &'a CopyBudget,
}

impl CopyBudget {
    pub fn new(limit: u64, kickers: &Arc<Kickers>) -> CopyBudget {
        CopyBudget {
            limit: limit.max(COPY_CHUNK as u64),
            used: Mutex::new(0),
            freed: Signal::new(kickers),
            pool: Mutex::new(Pool::default()),
        }
    }

    /// An aligned buffer of `len` bytes: a given-back one of that length, else a new one.
    fn buffer(&self, len: usize) -> AlignedBuf {
        let pooled = self.pool.lock().take(len);
        pooled.unwrap_or_else(|| AlignedBuf::zeroed(len))
    }

    fn try_take(&self, len: u64) -> bool {
        let mut used = self.used.lock();
        if *used == 0 || *used + len <= self.limit {
            *used += len;
            return true;
        }
        false
    }

    /// An aligned buffer of `len` bytes, once the budget allows it. Its contents are those
    /// of an earlier copy (see the module's doc): fill it whole before writing it.
    pub async fn take(&self, len: usize) -> BudgetBuf<'_> {
        self.freed.wait_until(|| self.try_take(len as u64)).await;
        BudgetBuf {
            buf: ManuallyDrop::new(self.buffer(len)),
            budget: self,
        }
    }

    /// Blocking [`take`](Self::take), for engine threads.
    pub fn take_blocking(&self, len: usize) -> BudgetBuf<'_> {
        while !self.freed.wait_until_blocking(
            || self.try_take(len as u64),
            std::time::Duration::from_secs(1),
        ) {}
        BudgetBuf {
            buf: ManuallyDrop::new(self.buffer(len)),
            budget: self,
        }
    }

    /// Bytes handed out now.
    pub fn in_use(&self) -> u64 {
        *self.used.lock()
    }
}

impl std::ops::Deref for BudgetBuf<'_> {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        &self.buf
    }
}

impl std::ops::DerefMut for BudgetBuf<'_> {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        &mut self.buf
    }
}

impl Drop for BudgetBuf<'_> {
    fn drop(&mut self) {
        // SAFETY: `drop` runs once and `self.buf` is not touched after this move; the
        // ManuallyDrop keeps it from being dropped a second time.
        let buf = unsafe { ManuallyDrop::take(&mut self.buf) };
        *self.budget.used.lock() -= buf.len() as u64;
        let evicted = self.budget.pool.lock().give_back(buf);
        drop(evicted);
        self.budget.freed.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;

    #[test]
    fn takes_wait_while_the_budget_is_spent() {
        const C: usize = COPY_CHUNK;
        let b = CopyBudget::new(2 * C as u64, &Arc::new(Kickers::default()));
        let one = b.take_blocking(C);
        let two = b.take_blocking(C);
        assert_eq!(b.in_use(), 2 * C as u64);
        assert!(!b.try_take(1), "over the budget");
        drop(one);
        let three = block_on(b.take(C));
        assert_eq!(b.in_use(), 2 * C as u64);
        drop((two, three));
        assert_eq!(b.in_use(), 0);
        // Larger than the whole budget: allowed alone.
        let big = b.take_blocking(3 * C);
        assert!(!b.try_take(1));
        drop(big);
    }

    #[test]
    fn given_back_buffers_are_reused_up_to_the_pool_limit() {
        let b = CopyBudget::new(64 * COPY_CHUNK as u64, &Arc::new(Kickers::default()));
        let first = b.take_blocking(COPY_CHUNK);
        let addr = first.as_ptr() as usize;
        drop(first);
        let again = b.take_blocking(COPY_CHUNK);
        assert_eq!(
            again.as_ptr() as usize,
            addr,
            "the given-back buffer is reused"
        );
        drop(again);
        // Another length does not get it.
        let other = b.take_blocking(4096);
        assert_ne!(other.as_ptr() as usize, addr);
        drop(other);
        // More given back than the pool holds: it keeps POOL_BYTES.
        let many: Vec<_> = (0..8).map(|_| b.take_blocking(COPY_CHUNK)).collect();
        drop(many);
        let pool = b.pool.lock();
        assert_eq!(pool.bytes, POOL_BYTES, "bytes kept");
        assert_eq!(pool.bytes, pool.bufs.iter().map(|b| b.len()).sum::<usize>());
    }
}
