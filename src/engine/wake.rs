//! Cross-thread wake-ups for async waiters.
//!
//! Engine waiters (a write waiting for a region lock, a FLUSH waiting for a commit) are async
//! tasks running on ublk queue threads, each parked in its own io_uring wait. Waking a task's
//! `Waker` from another thread only queues it in that thread's executor; the thread must also
//! be *kicked* out of its io_uring wait. A [`Signal`] does both: it notifies its listeners and
//! then calls every registered kick function (the ublk frontend registers one per queue, which
//! writes to an eventfd that the queue's ring is reading). On host tests, waiters run under
//! `block_on`, whose wakers unpark the thread, so no kick is needed.
//!
//! A signal kicks the queues only while an async waiter is listening: a thread blocked in
//! [`Signal::wait_until_blocking`] is woken by the notification alone, and kicking every
//! queue for it (an eventfd write and a wake-up of each queue thread) would cost every
//! notifier a system call per queue for nothing.

use event_listener::{Event, Listener};
use parking_lot::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Async waiters between their first look at the condition and their return.
    async_waiters: AtomicUsize,
}

impl Signal {
    pub fn new(kickers: &Arc<Kickers>) -> Signal {
        Signal {
            event: Event::new(),
            kickers: kickers.clone(),
            async_waiters: AtomicUsize::new(0),
        }
    }

    /// Wakes every current listener (and kicks the queue threads if anyone listened).
    pub fn notify(&self) {
        // A waiter counts itself before it registers its listener, so a notification that
        // reaches a listener also sees its count.
        if self.event.notify(usize::MAX) > 0 && self.async_waiters.load(Ordering::SeqCst) > 0 {
            self.kickers.kick_all();
        }
    }

    /// Waits until `cond()` holds. `cond` is re-evaluated after every notification; a
    /// notification between the check and the wait is never lost because the listener is
    /// registered before the second check.
    pub async fn wait_until(&self, mut cond: impl FnMut() -> bool) {
        if cond() {
            return;
        }
        let _counted = AsyncWaiter::count(&self.async_waiters);
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

/// One async waiter of a [`Signal`], counted from before its first listener until it returns
/// or is dropped (a cancelled wait).
struct AsyncWaiter<'a>(&'a AtomicUsize);

impl<'a> AsyncWaiter<'a> {
    fn count(n: &'a AtomicUsize) -> AsyncWaiter<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        AsyncWaiter(n)
    }
}

impl Drop for AsyncWaiter<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Waker};

    fn counted_kicks() -> (Arc<Kickers>, Arc<AtomicUsize>) {
        let kickers = Arc::new(Kickers::default());
        let kicks = Arc::new(AtomicUsize::new(0));
        let k = kicks.clone();
        kickers.add(Arc::new(move || {
            k.fetch_add(1, Ordering::SeqCst);
        }));
        (kickers, kicks)
    }

    #[test]
    fn an_async_waiter_is_kicked_and_a_blocking_one_is_not() {
        let (kickers, kicks) = counted_kicks();
        let signal = Signal::new(&kickers);
        // Nobody listens: no kick.
        signal.notify();
        assert_eq!(kicks.load(Ordering::SeqCst), 0);

        // A blocking waiter, listening: woken, and the queues are not kicked.
        let done = AtomicBool::new(false);
        let looked = AtomicUsize::new(0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let woken = signal.wait_until_blocking(
                    || {
                        // The second look comes after the listener is registered.
                        if looked.fetch_add(1, Ordering::SeqCst) == 1 {
                            let _ = tx.send(());
                        }
                        done.load(Ordering::SeqCst)
                    },
                    std::time::Duration::from_secs(60),
                );
                assert!(woken);
            });
            rx.recv().unwrap();
            done.store(true, Ordering::SeqCst);
            signal.notify();
        });
        assert_eq!(kicks.load(Ordering::SeqCst), 0);

        // An async waiter, listening: the queues are kicked.
        let ready = AtomicBool::new(false);
        let mut wait = pin!(signal.wait_until(|| ready.load(Ordering::SeqCst)));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        ready.store(true, Ordering::SeqCst);
        signal.notify();
        assert_eq!(kicks.load(Ordering::SeqCst), 1);
        assert!(wait.as_mut().poll(&mut cx).is_ready());

        // Once it returned, it no longer counts.
        let _blocking_listener = signal.event.listen();
        signal.notify();
        assert_eq!(kicks.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_cancelled_async_wait_no_longer_counts() {
        let (kickers, kicks) = counted_kicks();
        let signal = Signal::new(&kickers);
        {
            let mut wait = pin!(signal.wait_until(|| false));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(wait.as_mut().poll(&mut cx).is_pending());
        }
        let _blocking_listener = signal.event.listen();
        signal.notify();
        assert_eq!(kicks.load(Ordering::SeqCst), 0);
    }
}
