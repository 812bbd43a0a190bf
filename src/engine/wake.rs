//! Cross-thread wake-ups for async waiters.
//!
//! Engine waiters (a write waiting for a region lock, a FLUSH waiting for a commit) are async
//! tasks running on ublk queue threads, each parked in its own io_uring wait. Waking a task's
//! `Waker` from another thread only queues it in that thread's executor; the thread must also
//! be *kicked* out of its io_uring wait. A [`Signal`] does both: it notifies its listeners and
//! then calls every registered kick function (the ublk frontend registers one per queue, which
//! writes to an eventfd that the queue's ring is reading). On host tests, waiters run under
//! `block_on`, whose wakers unpark the thread, so no kick is needed.

use event_listener::{Event, Listener};
use parking_lot::RwLock;
use std::sync::Arc;

pub type Kick = Arc<dyn Fn() + Send + Sync>;

/// The set of kick functions, shared by every [`Signal`] of one engine.
#[derive(Default)]
pub struct Kickers(RwLock<Vec<Kick>>);

impl Kickers {
    pub fn add(&self, k: Kick) {
        self.0.write().push(k);
    }

    fn kick_all(&self) {
        for k in self.0.read().iter() {
            k();
        }
    }
}

pub struct Signal {
    event: Event,
    kickers: Arc<Kickers>,
}

impl Signal {
    pub fn new(kickers: &Arc<Kickers>) -> Signal {
        Signal {
            event: Event::new(),
            kickers: kickers.clone(),
        }
    }

    /// Wakes every current listener (and kicks the queue threads if anyone listened).
    pub fn notify(&self) {
        if self.event.notify(usize::MAX) > 0 {
            self.kickers.kick_all();
        }
    }

    /// Waits until `cond()` holds. `cond` is re-evaluated after every notification; a
    /// notification between the check and the wait is never lost because the listener is
    /// registered before the second check.
    pub async fn wait_until(&self, mut cond: impl FnMut() -> bool) {
        loop {
            if cond() {
                return;
            }
            let listener = self.event.listen();
            if cond() {
                return;
            }
            listener.await;
        }
    }

    /// Blocking variant for engine threads (never called on a queue thread).
    pub fn wait_until_blocking(
        &self,
        mut cond: impl FnMut() -> bool,
        timeout: std::time::Duration,
    ) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if cond() {
                return true;
            }
            let listener = self.event.listen();
            if cond() {
                return true;
            }
            if listener.wait_deadline(deadline).is_none() {
                return cond();
            }
        }
    }
}
