//! Tests of the recorder: the kernel target's ordering, FUA writes and marks, errors, and
//! random workloads on a destination and a metadata device replayed back.

use super::format::{END_MARK, FLAG_FLUSH};
use super::reader::{LogEntry, LogReader};
use super::replay::{replay, ReplayOptions};
use super::*;
use crate::io::mem::MemDev;
use crate::io::BlockDev;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::io;
use std::sync::Arc;

fn mem_log(size: u64, ss: u32) -> Result<(Arc<MemDev>, LogWriter), LogError> {
    let dev = Arc::new(MemDev::new("log", size));
    let w = LogWriter::create(Box::new(dev.clone()), ss)?;
    Ok((dev, w))
}

fn read_all(log: &Arc<MemDev>) -> Result<Vec<(LogEntry, Vec<u8>)>, LogError> {
    let r = LogReader::open(log.clone())?;
    let mut out = Vec::new();
    for e in r.entries() {
        let e = e?;
        let d = r.read_data(&e)?;
        out.push((e, d));
    }
    Ok(out)
}

/// Compact form of a log for comparisons: "W<sector>", "F", "U<sector>" (FUA),
/// "D<sector>", "M<text>".
fn shape(entries: &[(LogEntry, Vec<u8>)]) -> Vec<String> {
    entries
        .iter()
        .map(|(e, _)| {
            let h = &e.header;
            if h.is_mark() {
                format!("M{}", h.mark_text())
            } else if h.is_flush() {
                "F".to_string()
            } else if h.is_fua() {
                format!("U{}", h.sector)
            } else if h.is_discard() {
                format!("D{}", h.sector)
            } else {
                format!("W{}", h.sector)
            }
        })
        .collect()
}

#[test]
fn kernel_doc_example_ordering() -> Result<(), LogError> {
    // W1, W2, W3 issued; W3 and W2 complete; a flush is issued; W1 completes; the flush
    // completes. The flush covers W3 and W2 only; W1 waits for the next flush (here, the
    // close).
    let (log, w) = mem_log(1 << 20, 512)?;
    let space = LoggedSpace::new(w);
    space.write_completed(3 * 512, &[3; 512], false);
    space.write_completed(2 * 512, &[2; 512], false);
    let flush = space.flush_issued();
    space.write_completed(512, &[1; 512], false);
    space.flush_completed(flush);
    space.close()?;
    let entries = read_all(&log)?;
    assert_eq!(
        shape(&entries),
        ["W3", "W2", "F", "W1", &format!("M{END_MARK}")]
    );
    assert_eq!(entries[2].0.header.flags, FLAG_FLUSH);
    assert_eq!(entries[2].0.header.nr_sectors, 0, "empty flush");
    assert_eq!(entries[0].1, vec![3; 512], "data follows its entry");
    Ok(())
}

#[test]
fn fua_writes_and_marks_go_before_unflushed_writes() -> Result<(), LogError> {
    let (log, w) = mem_log(1 << 20, 512)?;
    let dev = Arc::new(MemDev::new("d", 1 << 16));
    let (d, space) = LogWritesDev::single(dev.clone(), w)?;
    d.write_at(&[1; 1024], 0)
        .map_err(|e| LogError::io("d", e))?;
    d.write_fua(&[2; 512], 4096)
        .map_err(|e| LogError::io("d", e))?;
    d.mark("m")?;
    d.discard(8192, 4096).map_err(|e| LogError::io("d", e))?;
    d.flush().map_err(|e| LogError::io("d", e))?;
    assert_eq!(dev.flush_count(), 2, "FUA and flush both reach the device");
    space.close()?;
    assert_eq!(
        shape(&read_all(&log)?),
        ["U8", "Mm", "W0", "D16", "F", &format!("M{END_MARK}")]
    );
    Ok(())
}

#[test]
fn unaligned_io_and_full_log_are_reported() -> Result<(), LogError> {
    let (_log, w) = mem_log(4096, 4096)?;
    let dev = Arc::new(MemDev::new("dest.img", 1 << 16));
    let (d, space) = LogWritesDev::single(dev, w)?;
    let err = d.write_at(&[0; 512], 0).err().map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("dest.img") && e.contains("sectorsize 4096")),
        "{err:?}"
    );
    // The log has room for the super block only: the first flush disables logging, the
    // data I/O still succeeds, and close reports it.
    d.write_at(&[1; 4096], 0)
        .map_err(|e| LogError::io("d", e))?;
    d.flush().map_err(|e| LogError::io("d", e))?;
    let closed = space.close();
    assert!(
        matches!(&closed, Err(LogError::Disabled { reason, .. }) if reason.contains("larger log")),
        "{closed:?}"
    );
    Ok(())
}

/// A random workload on a destination and a metadata device sharing one log. Replaying
/// the whole log reproduces both final images; replaying through each flush entry gives
/// exactly the durable images right after that flush.
fn random_pair_workload(seed: u64, ss: u32) -> Result<(), LogError> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let ssz = ss as u64;
    let (log, w) = mem_log(64 << 20, ss)?;
    let dest = Arc::new(MemDev::new("dest", 300 * 1024 / ssz * ssz));
    let meta = Arc::new(MemDev::new("meta", 64 * 1024));
    let (d, m, space) = LogWritesDev::pair(dest.clone(), meta.clone(), w)?;
    let io = |e: io::Error| LogError::io("workload", e);
    // Sectors (in the logged space) written or discarded since the last flush: a FUA
    // write over them would be logged before them and replayed in the wrong order (the
    // kernel format has the same limit), so FUA writes avoid them.
    let mut dirty: HashSet<u64> = HashSet::new();
    let mut flush_points = Vec::new();
    for step in 0..400 {
        let to_meta = rng.gen_bool(0.3);
        let dev: &LogWritesDev = if to_meta { &m } else { &d };
        let secs = dev.size() / ssz;
        let sector = rng.gen_range(0..secs);
        let n = rng.gen_range(1..=(secs - sector).min(8));
        let span: Vec<u64> = (0..n).map(|i| (dev.base() / ssz) + sector + i).collect();
        match rng.gen_range(0..100) {
            0..=54 => {
                let data: Vec<u8> = (0..n * ssz).map(|_| rng.gen()).collect();
                dev.write_at(&data, sector * ssz).map_err(io)?;
                dirty.extend(span);
            }
            55..=64 => {
                if span.iter().all(|s| !dirty.contains(s)) {
                    let data: Vec<u8> = (0..n * ssz).map(|_| rng.gen()).collect();
                    dev.write_fua(&data, sector * ssz).map_err(io)?;
                }
            }
            65..=74 => {
                dev.discard(sector * ssz, n * ssz).map_err(io)?;
                dirty.extend(span);
            }
            75..=97 => {
                dev.flush().map_err(io)?;
                dirty.clear();
                flush_points.push((space.entries() - 1, dest.durable(), meta.durable()));
            }
            _ => dev.mark(&format!("step{step}"))?,
        }
    }
    space.close()?;
    assert!(flush_points.len() > 20);

    let reader = LogReader::open(log.clone())?;
    let zeroed = || {
        let dz = Arc::new(MemDev::new("rd", dest.size()));
        let mz = Arc::new(MemDev::new("rm", meta.size()));
        (pair_span(dz.clone(), mz.clone()), dz, mz)
    };
    let (span, dz, mz) = zeroed();
    replay(&reader, &span, &ReplayOptions::default(), &mut |_| Ok(true))?;
    assert!(
        dz.snapshot() == dest.snapshot(),
        "seed {seed}: dest differs"
    );
    assert!(
        mz.snapshot() == meta.snapshot(),
        "seed {seed}: meta differs"
    );

    for (entry, d_img, m_img) in flush_points {
        let (span, dz, mz) = zeroed();
        let sum = replay(
            &reader,
            &span,
            &ReplayOptions::through_entry(entry),
            &mut |_| Ok(true),
        )?;
        assert!(sum.last.is_some_and(|e| e.header.is_flush()));
        assert!(dz.snapshot() == d_img, "seed {seed}: dest at flush {entry}");
        assert!(mz.snapshot() == m_img, "seed {seed}: meta at flush {entry}");
    }
    Ok(())
}

#[test]
fn random_pair_workload_replays_to_final_and_flushed_states() -> Result<(), LogError> {
    for seed in 0..4 {
        random_pair_workload(seed, 512)?;
    }
    random_pair_workload(100, 4096)
}
