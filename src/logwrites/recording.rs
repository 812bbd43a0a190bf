//! [`Recording`]: the recorder of a destination whose I/O a data path does by itself (the
//! ublk queues' io_uring path), as an [`IoObserver`] of that path.
//!
//! The destination is mapped at byte 0 of the logged space and the metadata device at
//! [`super::metadata_base`] (the layout of [`super::LogWritesDev::pair`]); the metadata's
//! own I/O goes through its [`super::LogWritesDev`].
//!
//! Invariants, those of the kernel target: a destination write or discard is logged only
//! after it completed; a FLUSH is logged after it completed, after the writes that completed
//! before it was issued; and since the log sees one device, a destination FLUSH that is
//! logged also covers the metadata device: it is flushed after the destination, before the
//! FLUSH entry is logged, and a failure of either leaves the flush unlogged.

use super::space::{FlushTicket, LoggedSpace};
use crate::io::observe::{IoObserver, IssuedFlush};
use crate::io::BlockDev;
use std::io;
use std::sync::Arc;

/// A live dm-log-writes recording of the destination and the metadata (`create
/// --log-writes`), told of the destination I/O by the data path that does it.
pub struct Recording {
    pub space: Arc<LoggedSpace>,
    /// The metadata device itself (not its recorder). It shares the logged space with the
    /// destination, so a FLUSH of the space must cover it too.
    pub metadata: Arc<dyn BlockDev>,
}

impl IoObserver for Recording {
    fn write_completed(&self, offset: u64, data: &[u8]) {
        self.space.write_completed(offset, data, false);
    }

    fn discard_completed(&self, offset: u64, len: u64) {
        self.space.discard_completed(offset, len);
    }

    fn flush_issued(&self) -> Box<dyn IssuedFlush> {
        Box::new(RecordedFlush {
            ticket: self.space.flush_issued(),
            space: self.space.clone(),
            metadata: self.metadata.clone(),
        })
    }
}

/// A destination flush in flight, with the writes it covers.
struct RecordedFlush {
    ticket: FlushTicket,
    space: Arc<LoggedSpace>,
    metadata: Arc<dyn BlockDev>,
}

impl IssuedFlush for RecordedFlush {
    fn completed(self: Box<Self>, outcome: io::Result<()>) -> io::Result<()> {
        // The metadata is flushed synchronously on the caller's thread (a ublk queue thread):
        // recording is a test mode, and the metadata device is small.
        let res = match outcome {
            Ok(()) => self.metadata.flush(),
            Err(e) => Err(e),
        };
        match &res {
            Ok(()) => self.space.flush_completed(self.ticket),
            Err(_) => self.space.flush_failed(self.ticket),
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::{MemDev, Op};
    use crate::logwrites::{LogReader, LogWriter, LogWritesDev};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The observer keeps the recorder's ordering: a write reported after a flush was issued
    /// is not covered by it; a logged flush made the metadata durable too; a failed
    /// destination or metadata flush is not logged and its writes wait for the next flush
    /// (here the close); the metadata is not flushed after a failed destination flush.
    #[test]
    fn observed_destination_io_is_logged_with_the_kernel_ordering() -> io::Result<()> {
        let log = Arc::new(MemDev::new("log", 1 << 20));
        let w = LogWriter::create(Box::new(log.clone()), 512).map_err(io::Error::other)?;
        let dest: Arc<dyn BlockDev> = Arc::new(MemDev::new("dest", 1 << 16));
        let meta = Arc::new(MemDev::new("meta", 1 << 16));
        let meta_dyn: Arc<dyn BlockDev> = meta.clone();
        let (_d, m, space) =
            LogWritesDev::pair(dest, meta_dyn.clone(), w).map_err(io::Error::other)?;
        let rec = Recording {
            space: space.clone(),
            metadata: meta_dyn,
        };
        m.write_at(&[5; 512], 0)?;
        rec.write_completed(0, &[1; 512]);
        rec.discard_completed(1024, 512);
        let flush = rec.flush_issued();
        rec.write_completed(512, &[2; 512]);
        flush.completed(Ok(()))?;
        assert_eq!(
            meta.durable()[..512],
            [5; 512],
            "the flush covers the metadata"
        );

        let fail = Arc::new(AtomicBool::new(true));
        let f = fail.clone();
        meta.set_fault(Some(Arc::new(move |op: &Op| {
            (*op == Op::Flush && f.swap(false, Ordering::SeqCst))
                .then(|| io::Error::other("metadata flush failed"))
        })));
        let flush = rec.flush_issued();
        assert!(flush.completed(Ok(())).is_err(), "metadata flush failure");
        let flushes = meta.flush_count();
        let flush = rec.flush_issued();
        let dest_failed = flush.completed(Err(io::Error::other("dest flush failed")));
        assert!(dest_failed.is_err());
        assert_eq!(
            meta.flush_count(),
            flushes,
            "no metadata flush after a failed one"
        );
        space.close().map_err(io::Error::other)?;
        let r = LogReader::open(log).map_err(io::Error::other)?;
        let base = crate::logwrites::metadata_base(1 << 16) / 512;
        let shape: Vec<String> = r
            .entries()
            .map(|e| {
                e.map(|e| {
                    let h = e.header;
                    if h.is_flush() {
                        "F".to_string()
                    } else if h.is_mark() {
                        "M".to_string()
                    } else if h.is_discard() {
                        format!("D{}", h.sector)
                    } else {
                        format!("W{}", h.sector)
                    }
                })
            })
            .collect::<Result<_, _>>()
            .map_err(io::Error::other)?;
        let meta_w = format!("W{base}");
        assert_eq!(shape, [meta_w.as_str(), "W0", "D2", "F", "W1", "M"]);
        Ok(())
    }
}
