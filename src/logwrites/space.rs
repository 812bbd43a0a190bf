//! [`LoggedSpace`]: one logged address space, shared by the devices recorded into one log, and
//! the kernel target's ordering of what it logs.
//!
//! Invariants:
//! - a plain write or discard is logged only when a flush issued *after it completed*
//!   completes (it waits in the "unflushed" list until then), or at close; a FUA write and a
//!   mark are logged at once, so they land before the unflushed writes, like the kernel's;
//! - I/O that failed on the device is never reported here, so never logged. A failure to write
//!   the log disables logging (as the kernel does); the data I/O goes on and
//!   [`LoggedSpace::close`] reports the error.

use super::dev::LogWritesDev;
use super::format::{EntryHeader, FLAG_DISCARD, FLAG_FUA};
use super::writer::LogWriter;
use super::LogError;
use crate::io::BlockDev;
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;

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
        Ok(LogWritesDev::new(self.clone(), dev, base))
    }

    pub(super) fn check_aligned(&self, dev: &str, offset: u64, len: u64) -> io::Result<()> {
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
        if st.writer.is_closed() {
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

    pub(super) fn flush_members(&self) -> io::Result<()> {
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
        if !self.state.lock().writer.is_closed() {
            if let Err(e) = self.close() {
                log::error!("dm-log-writes recorder: closing the log on drop failed: {e}");
            }
        }
    }
}
