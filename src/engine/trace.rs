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

/// A traced extent: the byte offset and length of a region first read.
pub type Extent = (u64, u64);

/// A trace file: a comment line, then the byte offset and length of each region first read,
/// one per line (bytes, not region numbers: a trace taken at one region size serves another,
/// each traced region becoming every region it overlaps).
pub fn format_trace(order: &[u64], region_size: u64) -> String {
    let mut s = format!(
        "# ublk-clone read trace: first reads, in order; region size {region_size}; {} regions\n\
         # offset length\n",
        order.len()
    );
    for r in order {
        s += &format!("{} {region_size}\n", r * region_size);
    }
    s
}

/// The extents of a trace file (a line with an offset only stands for the region holding
/// that byte); an error names the first bad line.
pub fn parse_trace(text: &str) -> Result<Vec<Extent>, String> {
    let mut v = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut cols = l.split_whitespace().map(str::parse::<u64>);
        let e = match (cols.next(), cols.next(), cols.next()) {
            (Some(Ok(o)), None, None) => (o, 1),
            (Some(Ok(o)), Some(Ok(n)), None) if n > 0 => (o, n),
            _ => {
                return Err(format!(
                    "line {}: '{l}' is not a byte offset and length",
                    i + 1
                ))
            }
        };
        v.push(e);
    }
    Ok(v)
}

/// The regions of `extents` (in regions of `region_size`, of which there are `nr`), in
/// order, each once; what lies past the device is dropped.
pub fn regions_of(extents: &[Extent], region_size: u64, nr: u64) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for &(o, n) in extents {
        if seen.len() as u64 >= nr {
            break; // every region is in already (a trace of whole-device lines costs no more)
        }
        let first = o / region_size;
        let last = (o.saturating_add(n - 1) / region_size).min(nr.saturating_sub(1));
        for r in first..=last {
            if r < nr && seen.insert(r) {
                out.push(r);
            }
        }
    }
    out
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
        let extents = parse_trace(&text).expect("parse");
        assert_eq!(
            extents,
            [(5 * 65536, 65536), (3 * 65536, 65536), (9 * 65536, 65536)]
        );
        assert_eq!(regions_of(&extents, 65536, 100), [5, 3, 9]);
        // At 128 KiB regions 5 and 3 land in 2 and 1; 9 in 4; repeats are dropped.
        assert_eq!(regions_of(&extents, 131072, 100), [2, 1, 4]);
        // At 16 KiB each traced region is 4 regions: all of them, not only the first.
        assert_eq!(
            regions_of(&extents[..2], 16384, 100),
            [20, 21, 22, 23, 12, 13, 14, 15]
        );
        assert_eq!(regions_of(&extents, 65536, 6), [5, 3]);
        assert_eq!(regions_of(&[(5 * 65536, 131072)], 65536, 6), [5]);
        // An offset alone: the region holding it.
        assert_eq!(parse_trace("# c\n70000\n"), Ok(vec![(70000, 1)]));
        assert_eq!(regions_of(&[(70000, 1)], 16384, 100), [4]);
        for bad in ["x", "10 0", "10 20 30", "10 -1"] {
            assert_eq!(
                parse_trace(&format!("# c\n10\n{bad}\n")),
                Err(format!("line 3: '{bad}' is not a byte offset and length"))
            );
        }
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
