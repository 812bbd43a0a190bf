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

use super::wake::{Kickers, Signal};
use crate::io::AlignedBuf;
use parking_lot::Mutex;
use std::sync::Arc;

/// Largest buffer one copy step uses.
pub const COPY_CHUNK: usize = 4 << 20;

pub struct CopyBudget {
    limit: u64,
    used: Mutex<u64>,
    freed: Signal,
}

/// A buffer taken from the budget; returned to it when dropped.
pub struct BudgetBuf<'a> {
    buf: AlignedBuf,
    budget: &'a CopyBudget,
}

impl CopyBudget {
    pub fn new(limit: u64, kickers: &Arc<Kickers>) -> CopyBudget {
        CopyBudget {
            limit: limit.max(COPY_CHUNK as u64),
            used: Mutex::new(0),
            freed: Signal::new(kickers),
        }
    }

    fn try_take(&self, len: u64) -> bool {
        let mut used = self.used.lock();
        if *used == 0 || *used + len <= self.limit {
            *used += len;
            return true;
        }
        false
    }

    /// A zeroed, aligned buffer of `len` bytes, once the budget allows it.
    pub async fn take(&self, len: usize) -> BudgetBuf<'_> {
        self.freed.wait_until(|| self.try_take(len as u64)).await;
        BudgetBuf {
            buf: AlignedBuf::zeroed(len),
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
            buf: AlignedBuf::zeroed(len),
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
        *self.budget.used.lock() -= self.buf.len() as u64;
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
}
