//! User requests in service, counted per queue: background hydration's `idle` policy
//! (`--hydrate-when idle`) starts a batch only while their sum is zero.
//!
//! Each queue counts in a slot of its own cache line, so counting costs a queue thread an
//! uncontended atomic add per request, never a line shared with another queue. Invariant: a
//! slot's count is the requests its queue(s) started and have not ended; a request is ended
//! exactly once, by the queue that started it.

use std::sync::atomic::{AtomicU64, Ordering};

/// Slots; queues beyond this share them (a shared slot stays exact: it counts with atomic
/// adds, only its cache line is shared).
const SLOTS: usize = 64;

/// One queue's count, alone on its cache line.
#[repr(align(128))]
#[derive(Default)]
struct Slot(AtomicU64);

pub struct UserIo {
    slots: Box<[Slot]>,
}

impl Default for UserIo {
    fn default() -> Self {
        UserIo {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }
}

impl UserIo {
    /// Queue `queue` took a user request.
    pub fn started(&self, queue: usize) {
        self.slots[queue % SLOTS].0.fetch_add(1, Ordering::Relaxed);
    }

    /// Queue `queue` completed a request it started.
    pub fn ended(&self, queue: usize) {
        self.slots[queue % SLOTS].0.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests in service on every queue now (a moment's sum: a request may start right after).
    pub fn in_service(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_across_queues() {
        let u = UserIo::default();
        assert_eq!(u.in_service(), 0);
        u.started(0);
        u.started(3);
        u.started(3 + SLOTS);
        assert_eq!(u.in_service(), 3);
        // A request may end on a slot whose count another queue raised: the sum stays exact.
        u.ended(3);
        u.ended(0);
        assert_eq!(u.in_service(), 1);
        u.ended(3 + SLOTS);
        assert_eq!(u.in_service(), 0);
    }
}
