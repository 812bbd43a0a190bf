//! Counters and latency histograms for monitoring (`ublk-clone metrics`, `--metrics ADDR`):
//! user I/O by operation, FLUSH and commit latency, source read errors. Lock-free (relaxed
//! atomics): the queues count every request, so counting must cost next to nothing.
//!
//! Invariant: a histogram's buckets are cumulative only when read ([`Histogram::snapshot`]);
//! each observation increments exactly one bucket, so a snapshot taken while observations
//! run may be a few observations behind, never inconsistent with itself by more than that.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency buckets: 100 µs to 10 s.
pub const LATENCY_BOUNDS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0, 10.0,
];

/// A latency histogram over [`LATENCY_BOUNDS`] (and +Inf).
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

/// A histogram as read: per-bucket counts (not cumulative), the count and the sum.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket of [`LATENCY_BOUNDS`], the last one above them all.
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().sum(),
            buckets,
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// User operations, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Discard,
}

impl OpKind {
    pub const ALL: [OpKind; 5] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::WriteZeroes,
        OpKind::Discard,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::Discard => "discard",
        }
    }
}

/// The engine's monitoring counters.
#[derive(Default)]
pub struct Metrics {
    ops: [AtomicU64; 5],
    op_bytes: [AtomicU64; 5],
    /// FLUSH requests, arrival to completion.
    pub flush: Histogram,
    /// Commits (destination flush and metadata), start to end.
    pub commit: Histogram,
    /// Source reads that failed: background hydration's (each attempt) and user I/O's.
    pub source_read_errors: AtomicU64,
    /// The slowest commit since [`Metrics::take_slowest_commit`] last looked, in µs.
    slowest_commit_us: AtomicU64,
    /// Requests served by one backend I/O straight from the queue (the direct path).
    pub direct_ios: AtomicU64,
    /// Direct I/Os, and fixed I/Os of in-place requests, that did not transfer everything
    /// and were redone through the daemon's buffers.
    pub direct_redone: AtomicU64,
    /// Requests of the full path whose data stayed in the request's own pages (zero copy).
    pub in_place_ios: AtomicU64,
}

/// The counters as read, for the control socket.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MetricsSnapshot {
    /// `[name, requests, bytes]` per operation.
    pub ops: Vec<(String, u64, u64)>,
    pub flush: HistogramSnapshot,
    pub commit: HistogramSnapshot,
    pub source_read_errors: u64,
}

impl Metrics {
    /// Counts a user request of `len` bytes.
    pub fn count_op(&self, op: OpKind, len: u64) {
        let i = op as usize;
        self.ops[i].fetch_add(1, Ordering::Relaxed);
        self.op_bytes[i].fetch_add(len, Ordering::Relaxed);
    }

    pub fn observe_commit(&self, d: Duration) {
        self.commit.observe(d);
        self.slowest_commit_us
            .fetch_max(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// The slowest commit since the last call (and resets it).
    pub fn take_slowest_commit(&self) -> Duration {
        Duration::from_micros(self.slowest_commit_us.swap(0, Ordering::Relaxed))
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            ops: OpKind::ALL
                .iter()
                .map(|op| {
                    let i = *op as usize;
                    (
                        op.name().to_string(),
                        self.ops[i].load(Ordering::Relaxed),
                        self.op_bytes[i].load(Ordering::Relaxed),
                    )
                })
                .collect(),
            flush: self.flush.snapshot(),
            commit: self.commit.snapshot(),
            source_read_errors: self.source_read_errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50)); // <= 100 µs
        h.observe(Duration::from_micros(100)); // <= 100 µs (bounds are inclusive)
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(60)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.buckets[5], 1);
        assert_eq!(s.buckets[LATENCY_BOUNDS.len()], 1);
        assert!((s.sum_seconds - 60.00315).abs() < 1e-9, "{}", s.sum_seconds);
    }

    #[test]
    fn ops_and_the_slowest_commit_are_counted() {
        let m = Metrics::default();
        m.count_op(OpKind::Write, 4096);
        m.count_op(OpKind::Write, 8192);
        m.count_op(OpKind::Discard, 1 << 20);
        m.observe_commit(Duration::from_millis(3));
        m.observe_commit(Duration::from_millis(40));
        let s = m.snapshot();
        assert_eq!(s.ops[1], ("write".to_string(), 2, 12288));
        assert_eq!(s.ops[4], ("discard".to_string(), 1, 1 << 20));
        assert_eq!(s.ops[0].1, 0);
        assert_eq!(m.take_slowest_commit(), Duration::from_millis(40));
        assert_eq!(m.take_slowest_commit(), Duration::ZERO);
        assert_eq!(s.commit.count, 2);
    }
}
