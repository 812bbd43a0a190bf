//! Flush sequencing: every destination flush, wherever it runs (a queue's fast path, the
//! commit thread), goes through one [`FlushSequencer`].
//!
//! Why: all destination flushes share one file description, and a device or the
//! kernel reports a lost write to one flush only (a failed cache flush may drop the device's
//! volatile cache; with buffered I/O a writeback error is reported to one fsync per file
//! description). Two FLUSHes on two queues: the first one's flush fails, the second one's
//! succeeds without the lost data. Unless the second waits for the first, it can acknowledge
//! data that is gone.
//!
//! Invariant: a flush is reported successful only when every destination flush that *began*
//! before it completed has completed too, and none has ever failed. Each flush takes a
//! generation when it begins; when it ends, its waiter waits until every generation begun
//! up to that moment has ended, then reads the sticky failure. A failure is recorded before its
//! generation counts as ended, so nobody can see a later success without seeing it.

use super::wake::{Kickers, Signal};
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::sync::Arc;

#[derive(Default)]
struct State {
    /// Generations handed out (the last one begun).
    begun: u64,
    /// Every generation up to this one has ended.
    ended_through: u64,
    /// Ended generations above `ended_through` (flushes end out of order).
    ended_above: BTreeSet<u64>,
    /// The first failure, sticky.
    failed: Option<FlushFailed>,
}

/// A destination flush failed (sticky: every later settle reports the first failure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FlushFailed(pub String);

pub struct FlushSequencer {
    state: Mutex<State>,
    ended: Signal,
}

/// A destination flush in progress: end it with [`FlushSequencer::end`]. One dropped without
/// being ended (its task was cancelled) counts as failed: nobody knows what its flush did, and
/// every later settle would otherwise wait for it forever.
#[must_use = "a begun flush must be ended"]
pub struct FlushTicket<'a> {
    seq: &'a FlushSequencer,
    gen: u64,
    ended: bool,
}

impl Drop for FlushTicket<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.seq.record_end(
                self.gen,
                Err(FlushFailed("a destination flush was abandoned".into())),
            );
        }
    }
}

impl FlushSequencer {
    pub fn new(kickers: &Arc<Kickers>) -> FlushSequencer {
        FlushSequencer {
            state: Mutex::new(State::default()),
            ended: Signal::new(kickers),
        }
    }

    /// Call right before issuing a destination flush.
    pub fn begin(&self) -> FlushTicket<'_> {
        let mut st = self.state.lock();
        st.begun += 1;
        FlushTicket {
            seq: self,
            gen: st.begun,
            ended: false,
        }
    }

    /// Records how the flush of `ticket` ended. Returns the generation its caller must wait
    /// for (every flush begun so far) before trusting a success.
    pub fn end(&self, mut ticket: FlushTicket<'_>, result: Result<(), FlushFailed>) -> u64 {
        ticket.ended = true;
        self.record_end(ticket.gen, result)
    }

    fn record_end(&self, gen: u64, result: Result<(), FlushFailed>) -> u64 {
        let horizon = {
            let mut st = self.state.lock();
            if let Err(e) = result {
                st.failed.get_or_insert(e);
            }
            if gen == st.ended_through + 1 {
                st.ended_through = gen;
                loop {
                    let next = st.ended_through + 1;
                    if !st.ended_above.remove(&next) {
                        break;
                    }
                    st.ended_through = next;
                }
            } else {
                st.ended_above.insert(gen);
            }
            st.begun
        };
        self.ended.notify();
        horizon
    }

    /// The sticky failure, once every flush begun up to `horizon` has ended: `Ok` only if
    /// no destination flush ever failed.
    pub async fn settle(&self, horizon: u64) -> Result<(), FlushFailed> {
        self.ended
            .wait_until(|| self.state.lock().ended_through >= horizon)
            .await;
        self.failure()
    }

    /// Blocking [`settle`](Self::settle), for engine threads.
    pub fn settle_blocking(&self, horizon: u64) -> Result<(), FlushFailed> {
        while !self.ended.wait_until_blocking(
            || self.state.lock().ended_through >= horizon,
            std::time::Duration::from_secs(1),
        ) {}
        self.failure()
    }

    /// The first destination flush failure, if any.
    pub fn failure(&self) -> Result<(), FlushFailed> {
        match &self.state.lock().failed {
            None => Ok(()),
            Some(e) => Err(e.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_waits_for_an_earlier_flush_and_sees_its_failure() {
        let seq = FlushSequencer::new(&Arc::new(Kickers::default()));
        let a = seq.begin();
        let b = seq.begin();
        let hb = seq.end(b, Ok(()));
        // `b` cannot be trusted while `a` is in flight.
        assert_eq!(seq.state.lock().ended_through, 0);
        let ha = seq.end(a, Err(FlushFailed("EIO".into())));
        assert_eq!(seq.settle_blocking(hb), Err(FlushFailed("EIO".into())));
        assert_eq!(seq.settle_blocking(ha), Err(FlushFailed("EIO".into())));
        // Sticky: a later flush that succeeds still reports the failure.
        let abandoned = seq.begin();
        drop(abandoned);
        assert_eq!(seq.state.lock().ended_through, 3, "an abandoned flush ends");
        let c = seq.begin();
        let hc = seq.end(c, Ok(()));
        assert_eq!(seq.settle_blocking(hc), Err(FlushFailed("EIO".into())));
    }

    #[test]
    fn flushes_that_all_succeed_settle_ok_in_any_order() {
        let seq = FlushSequencer::new(&Arc::new(Kickers::default()));
        let t: Vec<FlushTicket> = (0..5).map(|_| seq.begin()).collect();
        let mut horizons = Vec::new();
        for x in t.into_iter().rev() {
            horizons.push(seq.end(x, Ok(())));
        }
        for h in horizons {
            assert_eq!(seq.settle_blocking(h), Ok(()));
        }
        assert_eq!(seq.state.lock().ended_through, 5);
        assert!(seq.state.lock().ended_above.is_empty());
    }
}
