//! [`LogWriter`] appends dm-log-writes entries to a log device; [`LoggedSpace`] and
//! [`LogWritesDev`] record the I/O of one or more devices into it with the kernel target's
//! ordering (`ref-dmclone.md` §6.1).
//!
//! Invariants:
//! - the log is always parseable: the super block is written first (with 0 entries), entries
//!   are laid back to back from byte `sectorsize`, and `nr_entries` is rewritten after every
//!   FUA or MARK entry and at close, only ever growing, so a replayer never reads an entry
//!   that is not fully written;
//! - a plain write or discard is logged only when a flush issued *after it completed*
//!   completes (it waits in the "unflushed" list until then), or at close; a FUA write and a
//!   mark are logged at once, so they land before the unflushed writes, like the kernel's.
//!
//! I/O that fails on the device is not logged. A failure to write the log disables logging
//! (as the kernel does); the data I/O goes on and [`LoggedSpace::close`] reports the error.

use super::format::{self, EntryHeader, LogSuper, FLAG_DISCARD, FLAG_FUA, FLAG_MARK};
use super::{FuaWrite, LogError};
use crate::io::file::{Access, FileDev};
use crate::io::BlockDev;
use parking_lot::Mutex;
use std::io;
use std::path::Path;
use std::sync::Arc;

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
}

/// One completed write or discard waiting for a flush before it is logged.
struct Pending {
    hdr: EntryHeader,
    data: Vec<u8>,
}

/// The writes a flush covers: those completed before it was issued.
pub struct FlushTicket {
    spliced: Vec<Pending>,
}

struct State {
    writer: LogWriter,
    unflushed: Vec<Pending>,
    /// Why logging stopped, if it did.
    disabled: Option<String>,
}

/// One logged address space: the devices attached to it share one log, as dm-linear slices
/// of a single device under the kernel's log-writes target would.
pub struct LoggedSpace {
    log_name: String,
    sectorsize: u32,
    members: Mutex<Vec<(u64, Arc<dyn BlockDev>)>>,
    state: Mutex<State>,
}

impl LoggedSpace {
    pub fn new(writer: LogWriter) -> Arc<LoggedSpace> {
        Arc::new(LoggedSpace {
            log_name: writer.name().to_string(),
            sectorsize: writer.sectorsize(),
            members: Mutex::new(Vec::new()),
            state: Mutex::new(State {
                writer,
                unflushed: Vec::new(),
                disabled: None,
            }),
        })
    }

    pub fn sectorsize(&self) -> u32 {
        self.sectorsize
    }

    /// Maps `dev` at byte `base` of the address space. `base` must be sectorsize-aligned and
    /// the range must not overlap another member's.
    pub fn attach(
        self: &Arc<Self>,
        dev: Arc<dyn BlockDev>,
        base: u64,
    ) -> Result<LogWritesDev, LogError> {
        let ss = self.sectorsize as u64;
        let end = base.checked_add(dev.size());
        let mut members = self.members.lock();
        let overlaps = members.iter().any(|(b, d)| match end {
            Some(end) => *b < end && base < b + d.size(),
            None => true,
        });
        if base % ss != 0 || overlaps {
            return Err(LogError::Usage {
                what: format!(
                    "{}: cannot map it at byte {base} of the logged space of {}: the offset must be a multiple of {ss} and not overlap another device",
                    dev.name(),
                    self.log_name
                ),
            });
        }
        members.push((base, dev.clone()));
        Ok(LogWritesDev {
            space: self.clone(),
            inner: dev,
            base,
        })
    }

    fn check_aligned(&self, dev: &str, offset: u64, len: u64) -> io::Result<()> {
        let ss = self.sectorsize as u64;
        if offset % ss == 0 && len % ss == 0 {
            return Ok(());
        }
        let e = LogError::Unaligned {
            dev: dev.to_string(),
            offset,
            len,
            sectorsize: self.sectorsize,
        };
        Err(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    fn log_locked(st: &mut State, hdr: &EntryHeader, data: &[u8]) {
        if st.disabled.is_some() {
            return;
        }
        if let Err(e) = st.writer.append(hdr, data) {
            log::error!("dm-log-writes recorder: logging disabled: {e}");
            st.disabled = Some(e.to_string());
        }
    }

    /// Records a completed write of `data` at byte `offset` of the address space. A FUA
    /// write is logged at once; a plain one waits for the next flush.
    pub fn write_completed(&self, offset: u64, data: &[u8], fua: bool) {
        if data.is_empty() {
            return; // zero-length non-flush I/O is ignored, like the kernel's
        }
        let ss = self.sectorsize as u64;
        let flags = if fua { FLAG_FUA } else { 0 };
        let hdr = EntryHeader::write(offset / ss, data.len() as u64 / ss, flags);
        let mut st = self.state.lock();
        if fua {
            Self::log_locked(&mut st, &hdr, data);
        } else {
            st.unflushed.push(Pending {
                hdr,
                data: data.to_vec(),
            });
        }
    }

    /// Records a completed discard; it waits for the next flush, like a write.
    pub fn discard_completed(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let ss = self.sectorsize as u64;
        let hdr = EntryHeader::write(offset / ss, len / ss, FLAG_DISCARD);
        self.state.lock().unflushed.push(Pending {
            hdr,
            data: Vec::new(),
        });
    }

    /// A flush is issued: it takes the writes completed so far.
    pub fn flush_issued(&self) -> FlushTicket {
        FlushTicket {
            spliced: std::mem::take(&mut self.state.lock().unflushed),
        }
    }

    /// The flush completed: its writes are logged, then the flush entry.
    pub fn flush_completed(&self, ticket: FlushTicket) {
        let mut st = self.state.lock();
        for p in &ticket.spliced {
            Self::log_locked(&mut st, &p.hdr, &p.data);
        }
        Self::log_locked(&mut st, &EntryHeader::flush(), &[]);
    }

    /// The flush failed: its writes go back in front of the unflushed list, unlogged.
    pub fn flush_failed(&self, ticket: FlushTicket) {
        let mut st = self.state.lock();
        let later = std::mem::replace(&mut st.unflushed, ticket.spliced);
        st.unflushed.extend(later);
    }

    /// Logs a mark now: after everything already logged, before the unflushed writes.
    pub fn mark(&self, name: &str) -> Result<(), LogError> {
        let mut st = self.state.lock();
        self.check_enabled(&st)?;
        let hdr = EntryHeader::mark(name, self.sectorsize);
        Self::log_locked(&mut st, &hdr, &[]);
        self.check_enabled(&st)
    }

    fn check_enabled(&self, st: &State) -> Result<(), LogError> {
        match &st.disabled {
            Some(reason) => Err(LogError::Disabled {
                log: self.log_name.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Entries written to the log so far (the index the next entry will get).
    pub fn entries(&self) -> u64 {
        self.state.lock().writer.entries()
    }

    /// `Err` if logging was disabled by an error.
    pub fn status(&self) -> Result<(), LogError> {
        self.check_enabled(&self.state.lock())
    }

    /// Ends the log like removing the kernel target: logs the unflushed writes, then the
    /// `dm-log-writes-end` mark, and flushes the log. Returns the number of entries.
    /// Later I/O through the attached devices is no longer logged.
    pub fn close(&self) -> Result<u64, LogError> {
        let mut st = self.state.lock();
        if st.writer.closed {
            self.check_enabled(&st)?;
            return Ok(st.writer.entries());
        }
        for p in std::mem::take(&mut st.unflushed) {
            Self::log_locked(&mut st, &p.hdr, &p.data);
        }
        self.check_enabled(&st)?;
        st.writer.close()?;
        Ok(st.writer.entries())
    }

    fn flush_members(&self) -> io::Result<()> {
        let members: Vec<Arc<dyn BlockDev>> =
            self.members.lock().iter().map(|(_, d)| d.clone()).collect();
        for m in members {
            m.flush()?;
        }
        Ok(())
    }
}

impl Drop for LoggedSpace {
    fn drop(&mut self) {
        if !self.state.lock().writer.closed {
            if let Err(e) = self.close() {
                log::error!("dm-log-writes recorder: closing the log on drop failed: {e}");
            }
        }
    }
}

/// A device whose writes, discards, flushes and FUA writes are recorded into a shared
/// [`LoggedSpace`]. Offsets are the device's own; the log holds them shifted by
/// [`LogWritesDev::base`]. A flush flushes every device of the space (they are one device
/// to the log).
pub struct LogWritesDev {
    space: Arc<LoggedSpace>,
    inner: Arc<dyn BlockDev>,
    base: u64,
}

impl LogWritesDev {
    /// Records `dev` alone, mapped at byte 0.
    pub fn single(
        dev: Arc<dyn BlockDev>,
        log: LogWriter,
    ) -> Result<(LogWritesDev, Arc<LoggedSpace>), LogError> {
        let space = LoggedSpace::new(log);
        let d = space.attach(dev, 0)?;
        Ok((d, space))
    }

    /// Records a clone's destination (at byte 0) and metadata device (at
    /// [`super::metadata_base`] of the destination size) into one log.
    pub fn pair(
        dest: Arc<dyn BlockDev>,
        metadata: Arc<dyn BlockDev>,
        log: LogWriter,
    ) -> Result<(LogWritesDev, LogWritesDev, Arc<LoggedSpace>), LogError> {
        let space = LoggedSpace::new(log);
        let base = super::metadata_base(dest.size());
        let d = space.attach(dest, 0)?;
        let m = space.attach(metadata, base)?;
        Ok((d, m, space))
    }

    pub fn space(&self) -> &Arc<LoggedSpace> {
        &self.space
    }

    /// Byte offset of this device in the logged address space.
    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn inner(&self) -> &Arc<dyn BlockDev> {
        &self.inner
    }

    /// Logs a mark in the shared log.
    pub fn mark(&self, name: &str) -> Result<(), LogError> {
        self.space.mark(name)
    }

    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.space
            .check_aligned(self.inner.name(), offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)?;
        if fua {
            self.inner.flush()?;
        }
        self.space.write_completed(self.base + offset, buf, fua);
        Ok(())
    }
}

impl BlockDev for LogWritesDev {
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
        self.write(buf, offset, false)
    }
    fn flush(&self) -> io::Result<()> {
        let ticket = self.space.flush_issued();
        match self.space.flush_members() {
            Ok(()) => {
                self.space.flush_completed(ticket);
                Ok(())
            }
            Err(e) => {
                self.space.flush_failed(ticket);
                Err(e)
            }
        }
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.space.check_aligned(self.inner.name(), offset, len)?;
        self.inner.discard(offset, len)?;
        self.space.discard_completed(self.base + offset, len);
        Ok(())
    }
}

impl FuaWrite for LogWritesDev {
    /// Writes, makes the write durable on the device (write + flush of this device), and
    /// logs it at once with the FUA flag. Earlier unflushed writes stay unflushed in the log.
    fn write_fua(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write(buf, offset, true)
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::{END_MARK, FLAG_FLUSH};
    use super::super::reader::{LogEntry, LogReader};
    use super::super::replay::{replay, ReplayOptions, SpanDev};
    use super::*;
    use crate::io::mem::MemDev;
    use rand::{Rng, SeedableRng};
    use std::collections::HashSet;

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
            (SpanDev::pair(dz.clone(), mz.clone()), dz, mz)
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
}
