//! TEMPORARY in-core stand-in for the metadata module while the real on-disk format is
//! developed on the `metadata` branch; it has the same commit API shape. Replaced on merge.

use crate::io::BlockDev;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Other(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    ReadWrite,
    ReadOnly,
    Fail,
}

pub struct Metadata {
    dev: Arc<dyn BlockDev>,
    region_size: u64,
    nr_regions: u64,
    words: Vec<AtomicU64>,
    dirty: AtomicU64,
    generation: AtomicU64,
}

pub struct FrozenCommit {
    gen: u64,
    image: Vec<u64>,
}
pub struct ShadowsDurable(u64);
pub struct DestinationFlushed(u64);
pub struct CommitInfo {
    pub generation: u64,
}

impl Metadata {
    pub fn new_in_core(dev: Arc<dyn BlockDev>, region_size: u64, nr_regions: u64) -> Metadata {
        Metadata {
            dev,
            region_size,
            nr_regions,
            words: (0..nr_regions.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            dirty: AtomicU64::new(0),
            generation: AtomicU64::new(0),
        }
    }
    pub fn region_size(&self) -> u64 {
        self.region_size
    }
    pub fn nr_regions(&self) -> u64 {
        self.nr_regions
    }
    pub fn is_hydrated(&self, r: u64) -> bool {
        self.words[(r / 64) as usize].load(Ordering::Acquire) & (1 << (r % 64)) != 0
    }
    pub fn set_hydrated(&self, r: u64) {
        self.words[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::AcqRel);
        self.dirty.store(1, Ordering::Release);
    }
    pub fn set_range_hydrated(&self, first: u64, count: u64) {
        for r in first..first + count {
            self.set_hydrated(r);
        }
    }
    pub fn hydrated_count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire) != 0
    }
    pub fn begin_commit(&self) -> Result<FrozenCommit, MetadataError> {
        self.dirty.store(0, Ordering::Release);
        Ok(FrozenCommit {
            gen: self.generation.load(Ordering::Acquire) + 1,
            image: self
                .words
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
        })
    }
    pub fn finish_commit(
        &self,
        frozen: FrozenCommit,
        _s: ShadowsDurable,
        _d: DestinationFlushed,
    ) -> Result<CommitInfo, MetadataError> {
        let bytes: Vec<u8> = frozen.image.iter().flat_map(|w| w.to_le_bytes()).collect();
        let n = bytes.len().min(self.dev.size() as usize);
        self.dev.write_at(&bytes[..n], 0)?;
        self.dev.flush()?;
        self.generation.store(frozen.gen, Ordering::Release);
        Ok(CommitInfo {
            generation: frozen.gen,
        })
    }
    pub fn persist_mode(&self, _mode: Mode, _reason: &str) -> Result<(), MetadataError> {
        Ok(())
    }
    pub fn close_clean(&self) -> Result<(), MetadataError> {
        Ok(())
    }
}

impl FrozenCommit {
    pub fn write_shadows(&self) -> Result<ShadowsDurable, MetadataError> {
        Ok(ShadowsDurable(self.gen))
    }
}

pub fn flush_destination(
    dest: &dyn BlockDev,
    frozen: &FrozenCommit,
) -> io::Result<DestinationFlushed> {
    dest.flush()?;
    Ok(DestinationFlushed(frozen.gen))
}

/// TEMPORARY: stand-in until the real format lands.
pub fn open_or_format(
    dev: Arc<crate::io::file::FileDev>,
    source: &dyn BlockDev,
    _dest: &dyn BlockDev,
    region_size: u64,
    _force: bool,
) -> Result<Metadata, MetadataError> {
    Ok(Metadata::new_in_core(dev, region_size, source.size().div_ceil(region_size)))
}
