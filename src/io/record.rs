//! [`RecordingDev`]: records every write, discard and flush of one or more devices into a
//! single ordered [`IoLog`], so that crash states can be rebuilt at any point.
//!
//! Each recorded device has an id in the log. A write is logged when it completes. A flush is
//! logged when it completes, together with the log position at which it *started*: it covers
//! exactly the writes logged before that position (writes completing while it runs may or may
//! not be covered, so crash states treat them as unflushed).

use super::{BlockDev, SECTOR_SIZE};
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Write {
        dev: usize,
        offset: u64,
        data: Vec<u8>,
    },
    Discard {
        dev: usize,
        offset: u64,
        len: u64,
    },
    /// A completed flush of `dev` covering the entries before index `covers`.
    Flush {
        dev: usize,
        covers: usize,
    },
    Mark(String),
}

#[derive(Default)]
pub struct IoLog {
    entries: Mutex<Vec<Entry>>,
    initial: Mutex<Vec<Vec<u8>>>,
}

impl IoLog {
    pub fn new() -> Arc<IoLog> {
        Arc::new(IoLog::default())
    }

    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().clone()
    }

    pub fn mark(&self, name: &str) {
        self.entries.lock().push(Entry::Mark(name.to_string()));
    }

    /// Initial image of each recorded device, indexed by device id.
    pub fn initial_images(&self) -> Vec<Vec<u8>> {
        self.initial.lock().clone()
    }

    fn push(&self, e: Entry) -> usize {
        let mut v = self.entries.lock();
        v.push(e);
        v.len()
    }

    /// Builds the image of device `dev` after a crash at log position `cut` (entries
    /// `[0, cut)` happened). Writes covered by a completed flush of `dev` are kept; each
    /// other write is kept when `keep(index)` says so, cut to `tear(index, sectors)` sectors.
    /// Discarded ranges read back as zeroes or as old data; this model zeroes them only when
    /// `keep` says so.
    pub fn crash_image(
        &self,
        dev: usize,
        cut: usize,
        keep: &dyn Fn(usize) -> bool,
        tear: &dyn Fn(usize, u64) -> u64,
    ) -> Vec<u8> {
        let entries = self.entries.lock();
        let cut = cut.min(entries.len());
        let covered = entries[..cut]
            .iter()
            .filter_map(|e| match e {
                Entry::Flush { dev: d, covers } if *d == dev => Some(*covers),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let mut img = self.initial.lock().get(dev).cloned().unwrap_or_default();
        for (i, e) in entries[..cut].iter().enumerate() {
            let durable = i < covered;
            match e {
                Entry::Write {
                    dev: d,
                    offset,
                    data,
                } if *d == dev => {
                    if !durable && !keep(i) {
                        continue;
                    }
                    let sectors = (data.len() as u64).div_ceil(SECTOR_SIZE);
                    let n = if durable {
                        sectors
                    } else {
                        tear(i, sectors).min(sectors)
                    };
                    let len = ((n * SECTOR_SIZE) as usize).min(data.len());
                    img[*offset as usize..*offset as usize + len].copy_from_slice(&data[..len]);
                }
                Entry::Discard {
                    dev: d,
                    offset,
                    len,
                } if *d == dev && (durable || keep(i)) => {
                    img[*offset as usize..(*offset + *len) as usize].fill(0);
                }
                _ => {}
            }
        }
        img
    }

    /// Positions just after each completed flush (useful crash points).
    pub fn flush_points(&self) -> Vec<usize> {
        self.entries
            .lock()
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Entry::Flush { .. }))
            .map(|(i, _)| i + 1)
            .collect()
    }
}

pub struct RecordingDev<D: BlockDev> {
    inner: D,
    log: Arc<IoLog>,
    id: usize,
}

impl<D: BlockDev> RecordingDev<D> {
    /// Wraps `inner`, snapshotting its current contents as the device's initial image.
    pub fn new(inner: D, log: &Arc<IoLog>) -> io::Result<RecordingDev<D>> {
        let mut image = vec![0u8; inner.size() as usize];
        inner.read_at(&mut image, 0)?;
        let mut initial = log.initial.lock();
        initial.push(image);
        let id = initial.len() - 1;
        drop(initial);
        Ok(RecordingDev {
            inner,
            log: log.clone(),
            id,
        })
    }

    pub fn id(&self) -> usize {
        self.id
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: BlockDev> BlockDev for RecordingDev<D> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        self.log.push(Entry::Write {
            dev: self.id,
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let covers = self.log.len();
        self.inner.flush()?;
        self.log.push(Entry::Flush {
            dev: self.id,
            covers,
        });
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)?;
        self.log.push(Entry::Discard {
            dev: self.id,
            offset,
            len,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::mem::MemDev;
    use super::*;

    #[test]
    fn crash_image_respects_flush_coverage_per_device() -> io::Result<()> {
        let log = IoLog::new();
        let a = RecordingDev::new(MemDev::new("a", 4096), &log)?;
        let b = RecordingDev::new(MemDev::new("b", 4096), &log)?;
        a.write_at(&[1; 512], 0)?;
        b.write_at(&[2; 512], 0)?;
        a.flush()?;
        a.write_at(&[3; 512], 512)?;
        let n = log.len();
        let none = |_: usize| false;
        let full = |_: usize, s: u64| s;
        assert_eq!(
            log.crash_image(0, n, &none, &full)[0],
            1,
            "flushed write survives"
        );
        assert_eq!(
            log.crash_image(0, n, &none, &full)[512],
            0,
            "unflushed write lost"
        );
        assert_eq!(
            log.crash_image(1, n, &none, &full)[0],
            0,
            "b was never flushed"
        );
        assert_eq!(log.crash_image(1, n, &|_| true, &full)[0], 2);
        assert_eq!(
            log.crash_image(0, 2, &none, &full)[0],
            0,
            "cut before the flush"
        );
        Ok(())
    }
}
