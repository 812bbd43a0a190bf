//! [`LogWriter`]: appends dm-log-writes entries to a log device.
//!
//! Invariant: the log is always parseable: the super block is written first (with 0 entries),
//! entries are laid back to back from byte `sectorsize`, and `nr_entries` is rewritten after
//! every FUA or MARK entry and at close, only ever growing, so a replayer never reads an entry
//! that is not fully written.

use super::format::{self, EntryHeader, LogSuper, FLAG_FUA, FLAG_MARK};
use super::LogError;
use crate::io::file::{Access, FileDev};
use crate::io::BlockDev;
use std::path::Path;

/// Appends entries to a log device.
pub struct LogWriter {
    log: Box<dyn BlockDev>,
    sectorsize: u32,
    /// Byte offset of the next entry block.
    next: u64,
    /// Entries written so far; `nr_entries` in the super lags behind until the next update.
    entries: u64,
    closed: bool,
}

impl LogWriter {
    /// Starts a new, empty log on `log`: writes a super block with `nr_entries = 0`.
    pub fn create(log: Box<dyn BlockDev>, sectorsize: u32) -> Result<LogWriter, LogError> {
        format::check_sectorsize(sectorsize).map_err(|source| LogError::Super {
            log: log.name().to_string(),
            source,
        })?;
        let mut w = LogWriter {
            log,
            sectorsize,
            next: sectorsize as u64,
            entries: 0,
            closed: false,
        };
        w.reserve(0, sectorsize as u64)?;
        w.write_super()?;
        Ok(w)
    }

    /// Creates (or truncates) a sparse log file of `size` bytes at `path` and starts a log
    /// in it.
    pub fn create_file(path: &Path, size: u64, sectorsize: u32) -> Result<LogWriter, LogError> {
        let name = path.display().to_string();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .map_err(|e| LogError::io(&name, e))?;
        f.set_len(size).map_err(|e| LogError::io(&name, e))?;
        drop(f);
        let dev =
            FileDev::open(path, Access::ReadWrite, false).map_err(|e| LogError::io(&name, e))?;
        Self::create(Box::new(dev), sectorsize)
    }

    pub fn name(&self) -> &str {
        self.log.name()
    }

    pub fn sectorsize(&self) -> u32 {
        self.sectorsize
    }

    /// Entries written so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Byte offset where the next entry goes.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    fn reserve(&self, offset: u64, len: u64) -> Result<(), LogError> {
        if offset
            .checked_add(len)
            .is_some_and(|end| end <= self.log.size())
        {
            Ok(())
        } else {
            Err(LogError::Full {
                log: self.name().to_string(),
                size: self.log.size(),
                offset,
                needed: len,
            })
        }
    }

    /// Rewrites the super block with the current entry count.
    pub fn write_super(&mut self) -> Result<(), LogError> {
        let sup = LogSuper {
            nr_entries: self.entries,
            sectorsize: self.sectorsize,
        };
        self.log
            .write_at(&sup.pack(), 0)
            .map_err(|e| LogError::io(self.log.name(), e))
    }

    /// Appends one entry and its data (`nr_sectors * sectorsize` bytes, none for discards,
    /// flushes and marks); returns its index. Rewrites the super after FUA and MARK entries.
    pub fn append(&mut self, hdr: &EntryHeader, data: &[u8]) -> Result<u64, LogError> {
        if self.closed {
            return Err(LogError::Closed {
                log: self.name().to_string(),
            });
        }
        let index = self.entries;
        let bad = |source| LogError::Entry {
            log: self.name().to_string(),
            entry: index,
            offset: self.next,
            source,
        };
        let mut block = hdr.pack(self.sectorsize).map_err(bad)?;
        if data.len() as u64 != hdr.data_bytes(self.sectorsize) {
            return Err(LogError::Usage {
                what: format!(
                    "{}: entry {index} ({}) comes with {} bytes of data, expected {}",
                    self.name(),
                    hdr.describe(),
                    data.len(),
                    hdr.data_bytes(self.sectorsize)
                ),
            });
        }
        self.reserve(self.next, block.len() as u64 + data.len() as u64)?;
        block.extend_from_slice(data);
        self.log
            .write_at(&block, self.next)
            .map_err(|e| LogError::io(self.log.name(), e))?;
        self.next += block.len() as u64;
        self.entries += 1;
        if hdr.flags & (FLAG_FUA | FLAG_MARK) != 0 {
            self.write_super()?;
        }
        Ok(index)
    }

    /// Appends a mark (text cut to `sectorsize - 33` bytes, like the kernel's).
    pub fn mark(&mut self, text: &str) -> Result<u64, LogError> {
        self.append(&EntryHeader::mark(text, self.sectorsize), &[])
    }

    /// Ends the log like the kernel's target removal: a final [`format::END_MARK`] mark
    /// (which updates `nr_entries`), then a flush of the log device.
    pub fn close(&mut self) -> Result<(), LogError> {
        if self.closed {
            return Ok(());
        }
        self.mark(format::END_MARK)?;
        self.closed = true;
        self.log
            .flush()
            .map_err(|e| LogError::io(self.log.name(), e))
    }

    /// Whether [`LogWriter::close`] ended the log.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}
