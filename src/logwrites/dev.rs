//! [`LogWritesDev`]: a [`BlockDev`] whose writes, discards, flushes and FUA writes are recorded
//! into a shared [`LoggedSpace`].
//!
//! Invariant: an I/O is reported to the space only after it succeeded on the device, and a
//! flush is announced to the space before the devices are flushed, so the space logs exactly
//! the writes the flush covers.

use super::space::LoggedSpace;
use super::writer::LogWriter;
use super::LogError;
use crate::io::BlockDev;
use std::io;
use std::sync::Arc;

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
    pub(super) fn new(space: Arc<LoggedSpace>, inner: Arc<dyn BlockDev>, base: u64) -> Self {
        LogWritesDev { space, inner, base }
    }

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
    /// Writes, makes the write durable on the device (write + flush of this device), and
    /// logs it at once with the FUA flag. Earlier unflushed writes stay unflushed in the log.
    fn write_fua(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write(buf, offset, true)
    }
}
