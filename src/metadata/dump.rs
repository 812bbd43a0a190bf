//! `dump`: the superblock copies and the hydrated regions as JSON-ready data.
//!
//! Read-only. Hydrated regions are given as run-length `[start, end)` ranges so that the
//! output stays small for a mostly hydrated or mostly empty clone.

use super::scan;
use super::superblock::Superblock;
use super::{hex, Metadata, Result};
use crate::io::BlockDev;
use serde::{Serialize, Serializer};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Serialises a 32-byte array as lower-case hex.
pub fn hex32<S: Serializer>(v: &[u8; 32], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex(v))
}

/// One superblock slot as found on disk.
#[derive(Clone, Debug, Serialize)]
pub struct SlotDump {
    pub slot: u64,
    pub valid: bool,
    pub live: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub superblock: Option<Superblock>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DumpOutput {
    pub device: String,
    pub superblocks: Vec<SlotDump>,
    pub generation: u64,
    pub nr_regions: u64,
    pub hydrated: u64,
    pub warnings: Vec<String>,
    /// `[start, end)` region ranges that are hydrated in the live bitmap.
    pub hydrated_ranges: Vec<[u64; 2]>,
}

/// Reads the metadata on `dev` without writing and describes it.
pub fn dump(dev: Arc<dyn BlockDev>) -> Result<DumpOutput> {
    let name = dev.name().to_string();
    let slots = scan::read_superblocks(&*dev)
        .map_err(super::error::io_err(&name, "reading the superblocks"))?;
    let (md, report) = Metadata::read_only_open(dev)?;
    let live = report.superblock_slot;
    let superblocks = slots
        .iter()
        .enumerate()
        .map(|(i, s)| SlotDump {
            slot: i as u64,
            valid: s.is_ok(),
            live: i as u64 == live,
            error: s.as_ref().err().map(|e| e.to_string()),
            superblock: s.as_ref().ok().cloned(),
        })
        .collect();
    Ok(DumpOutput {
        device: name,
        superblocks,
        generation: md.generation(),
        nr_regions: md.nr_regions(),
        hydrated: md.nr_hydrated(),
        warnings: report.warnings,
        hydrated_ranges: hydrated_ranges(&md),
    })
}

/// Run-length `[start, end)` ranges of hydrated regions.
pub fn hydrated_ranges(md: &Metadata) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    let mut start: Option<u64> = None;
    let nr = md.nr_regions();
    let scanned = md.core.with_bitmap(|words| {
        for (w, word) in words.iter().enumerate() {
            let base = w as u64 * 64;
            if base >= nr {
                break;
            }
            let v = word.load(Ordering::SeqCst);
            if (v == 0 && start.is_none()) || (v == !0 && start.is_some()) {
                continue;
            }
            for bit in 0..64u64 {
                let r = base + bit;
                if r >= nr {
                    break;
                }
                let set = v & (1 << bit) != 0;
                match (set, start) {
                    (true, None) => start = Some(r),
                    (false, Some(s)) => {
                        out.push([s, r]);
                        start = None;
                    }
                    _ => {}
                }
            }
        }
    });
    if scanned.is_none() {
        // Released: every region is hydrated.
        return vec![[0, nr]];
    }
    if let Some(s) = start {
        out.push([s, nr]);
    }
    out
}
