//! Trace-driven prefetch. A clone started with `--trace-reads` records the order in which its
//! regions were first read (`ublk-clone trace` writes it out, e.g. after a VM booted from the
//! clone); a clone started with `--prefetch FILE` hydrates those regions first, in that order,
//! ahead of the sequential sweep and without waiting for reads to ask (the hints of reads
//! that arrive still go first: they are needed now).
//!
//! Invariants: a region is recorded once, at its first read, whether hydrated or not; the
//! record costs one atomic bit test per region of a read once the region is recorded.
//! Prefetching only reorders background hydration: a prefetched region is copied under its
//! lock like any other, and one already hydrated (or failed) is skipped.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

/// The first-read order of a clone's regions.
pub struct ReadTrace {
    seen: Vec<AtomicU64>,
    order: Mutex<Vec<u64>>,
}

impl ReadTrace {
    pub fn new(nr_regions: u64) -> ReadTrace {
        ReadTrace {
            seen: (0..nr_regions.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            order: Mutex::new(Vec::new()),
        }
    }

    /// Records regions `[first, last]` read.
    pub fn record(&self, first: u64, last: u64) {
        for r in first..=last {
            let Some(word) = self.seen.get((r / 64) as usize) else {
                return;
            };
            let bit = 1u64 << (r % 64);
            if word.load(Ordering::Relaxed) & bit != 0 {
                continue;
            }
            if word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                self.order.lock().push(r);
            }
        }
    }

    /// The regions read so far, in the order of their first read.
    pub fn order(&self) -> Vec<u64> {
        self.order.lock().clone()
    }
}

/// Regions to hydrate ahead of the sweep, in order.
#[derive(Default)]
pub struct Prefetch {
    queue: Mutex<VecDeque<u64>>,
}

impl Prefetch {
    pub fn new(regions: impl IntoIterator<Item = u64>) -> Prefetch {
        Prefetch {
            queue: Mutex::new(regions.into_iter().collect()),
        }
    }

    /// The next region for which `wanted` holds (the others are dropped).
    pub fn next(&self, wanted: impl Fn(u64) -> bool) -> Option<u64> {
        let mut q = self.queue.lock();
        while let Some(r) = q.pop_front() {
            if wanted(r) {
                return Some(r);
            }
        }
        None
    }

    /// Takes `r` off the list if it is the next region on it.
    pub fn take_if_next(&self, r: u64) -> bool {
        let mut q = self.queue.lock();
        if q.front() == Some(&r) {
            q.pop_front();
            return true;
        }
        false
    }

    pub fn remaining(&self) -> usize {
        self.queue.lock().len()
    }
}

/// A trace file: a comment line, then the byte offset of each region first read, one per
/// line (offsets, not region numbers: a trace taken at one region size serves another).
pub fn format_trace(order: &[u64], region_size: u64) -> String {
    let mut s = format!(
        "# ublk-clone read trace: first reads, in order; region size {region_size}; {} regions\n",
        order.len()
    );
    for r in order {
        s += &format!("{}\n", r * region_size);
    }
    s
}

/// The byte offsets of a trace file; an error names the first bad line.
pub fn parse_trace(text: &str) -> Result<Vec<u64>, String> {
    let mut v = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        match l.parse::<u64>() {
            Ok(o) => v.push(o),
            Err(_) => return Err(format!("line {}: '{l}' is not a byte offset", i + 1)),
        }
    }
    Ok(v)
}

/// The regions of `offsets` (in regions of `region_size`, of which there are `nr`), in
/// order, each once; offsets past the device are dropped.
pub fn regions_of(offsets: &[u64], region_size: u64, nr: u64) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    offsets
        .iter()
        .map(|o| o / region_size)
        .filter(|r| *r < nr && seen.insert(*r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reads_are_recorded_once_in_order() {
        let t = ReadTrace::new(200);
        t.record(5, 5);
        t.record(3, 6);
        t.record(5, 5);
        t.record(199, 199);
        t.record(300, 301); // past the device: ignored
        assert_eq!(t.order(), [5, 3, 4, 6, 199]);
    }

    #[test]
    fn a_trace_file_round_trips_across_region_sizes() {
        let text = format_trace(&[5, 3, 9], 65536);
        assert!(text.starts_with("# ublk-clone read trace"));
        let offsets = parse_trace(&text).expect("parse");
        assert_eq!(offsets, [5 * 65536, 3 * 65536, 9 * 65536]);
        assert_eq!(regions_of(&offsets, 65536, 100), [5, 3, 9]);
        // At 128 KiB regions 5 and 3 land in 2 and 1; 9 in 4; repeats are dropped.
        assert_eq!(regions_of(&offsets, 131072, 100), [2, 1, 4]);
        assert_eq!(regions_of(&offsets, 65536, 6), [5, 3]);
        assert_eq!(
            parse_trace("# c\n10\nx\n"),
            Err("line 3: 'x' is not a byte offset".into())
        );
    }

    #[test]
    fn prefetch_skips_what_is_not_wanted() {
        let p = Prefetch::new([7, 2, 9]);
        assert_eq!(p.next(|r| r != 7), Some(2));
        assert_eq!(p.remaining(), 1);
        assert!(!p.take_if_next(8));
        assert!(p.take_if_next(9));
        assert_eq!(p.next(|_| true), None);
    }
}
