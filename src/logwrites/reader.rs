//! [`LogReader`]: parses a dm-log-writes log, written by the kernel target or by
//! [`super::LogWriter`].
//!
//! Invariant: the reader yields exactly the super block's `nr_entries` entries, in log
//! order, each validated as replay-log validates it and checked to lie wholly inside the log
//! device; the first bad entry ends the iteration with an error naming the log, the entry
//! number and its byte offset.

use super::format::{EntryHeader, LogSuper, SUPER_SIZE};
use super::LogError;
use crate::io::file::{Access, FileDev};
use crate::io::BlockDev;
use std::path::Path;

/// One entry of a log and where it lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// 0-based entry number (replay-log's numbering).
    pub index: u64,
    /// Byte offset of the entry block in the log.
    pub offset: u64,
    pub header: EntryHeader,
    /// Byte offset just after the entry's data: where the next entry starts.
    pub end: u64,
}

impl LogEntry {
    /// Byte offset of the entry's data in the log.
    pub fn data_offset(&self, sectorsize: u32) -> u64 {
        self.offset + sectorsize as u64
    }

    /// replay-log's `pos`: the log offset after the entry's data, in sectorsize units.
    pub fn pos(&self, sectorsize: u32) -> u64 {
        self.end / sectorsize as u64
    }
}

pub struct LogReader<D: BlockDev> {
    log: D,
    sup: LogSuper,
}

impl LogReader<FileDev> {
    /// Opens the log file or block device at `path` read-only.
    pub fn open_path(path: &Path) -> Result<LogReader<FileDev>, LogError> {
        let dev = FileDev::open(path, Access::ReadOnly, false)
            .map_err(|e| LogError::io(&path.display().to_string(), e))?;
        LogReader::open(dev)
    }
}

impl<D: BlockDev> LogReader<D> {
    /// Reads and checks the super block of the log on `log`.
    pub fn open(log: D) -> Result<LogReader<D>, LogError> {
        let mut b = [0u8; SUPER_SIZE];
        if log.size() < SUPER_SIZE as u64 {
            return Err(LogError::Truncated {
                log: log.name().to_string(),
                entry: 0,
                offset: 0,
                need: SUPER_SIZE as u64,
                size: log.size(),
            });
        }
        log.read_at(&mut b, 0)
            .map_err(|e| LogError::io(log.name(), e))?;
        let sup = LogSuper::unpack(&b).map_err(|source| LogError::Super {
            log: log.name().to_string(),
            source,
        })?;
        Ok(LogReader { log, sup })
    }

    pub fn name(&self) -> &str {
        self.log.name()
    }

    pub fn super_block(&self) -> LogSuper {
        self.sup
    }

    pub fn sectorsize(&self) -> u32 {
        self.sup.sectorsize
    }

    pub fn nr_entries(&self) -> u64 {
        self.sup.nr_entries
    }

    /// replay-log's summary line.
    pub fn summary(&self) -> String {
        format!(
            "Log version={}, sectorsize={}, entries={}",
            super::format::LOG_VERSION,
            self.sup.sectorsize,
            self.sup.nr_entries
        )
    }

    /// The entries, in order; stops after `nr_entries` or at the first error.
    pub fn entries(&self) -> Entries<'_, D> {
        Entries {
            reader: self,
            index: 0,
            offset: self.sup.sectorsize as u64,
            failed: false,
        }
    }

    /// The data written by `e` (empty for flushes, marks and discards).
    pub fn read_data(&self, e: &LogEntry) -> Result<Vec<u8>, LogError> {
        let mut data = vec![0u8; e.header.data_bytes(self.sup.sectorsize) as usize];
        self.log
            .read_at(&mut data, e.data_offset(self.sup.sectorsize))
            .map_err(|err| LogError::io(self.log.name(), err))?;
        Ok(data)
    }

    fn read_entry(&self, index: u64, offset: u64) -> Result<LogEntry, LogError> {
        let ss = self.sup.sectorsize as u64;
        let size = self.log.size();
        let truncated = |need| LogError::Truncated {
            log: self.log.name().to_string(),
            entry: index,
            offset,
            need,
            size,
        };
        if past(offset.checked_add(ss), size) {
            return Err(truncated(ss));
        }
        let mut block = vec![0u8; ss as usize];
        self.log
            .read_at(&mut block, offset)
            .map_err(|e| LogError::io(self.log.name(), e))?;
        let header =
            EntryHeader::unpack(&block, self.sup.sectorsize).map_err(|source| LogError::Entry {
                log: self.log.name().to_string(),
                entry: index,
                offset,
                source,
            })?;
        let need = header.data_bytes(self.sup.sectorsize).saturating_add(ss);
        let end = offset.checked_add(need);
        if past(end, size) {
            return Err(truncated(need));
        }
        Ok(LogEntry {
            index,
            offset,
            header,
            end: offset + need,
        })
    }
}

/// `None` (overflow) or a value past `limit`.
fn past(end: Option<u64>, limit: u64) -> bool {
    match end {
        Some(end) => end > limit,
        None => true,
    }
}

/// Iterator over a log's entries; see [`LogReader::entries`].
pub struct Entries<'a, D: BlockDev> {
    reader: &'a LogReader<D>,
    index: u64,
    offset: u64,
    failed: bool,
}

impl<D: BlockDev> Iterator for Entries<'_, D> {
    type Item = Result<LogEntry, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.index >= self.reader.sup.nr_entries {
            return None;
        }
        match self.reader.read_entry(self.index, self.offset) {
            Ok(e) => {
                self.index += 1;
                self.offset = e.end;
                Some(Ok(e))
            }
            Err(err) => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::{FLAG_DISCARD, FLAG_FLUSH, FLAG_FUA, FLAG_MARK};
    use super::super::writer::LogWriter;
    use super::*;
    use crate::io::mem::MemDev;
    use std::sync::Arc;

    /// A small log built by hand, byte by byte, as the kernel would lay it out.
    fn golden_log() -> Vec<u8> {
        let ss = 512usize;
        let mut log = vec![0u8; ss * 8];
        // super: magic "rhswfsj\0", version 1, nr_entries 4, sectorsize 512
        log[0..8].copy_from_slice(b"rhswfsj\0");
        log[8] = 1;
        log[16] = 4;
        log[24..26].copy_from_slice(&[0x00, 0x02]);
        // entry 0 at 512: write sector 3, 2 sectors, flags 0; data 0xaa.. then 0xbb..
        log[512] = 3;
        log[520] = 2;
        log[1024..1536].fill(0xaa);
        log[1536..2048].fill(0xbb);
        // entry 1 at 2048: discard sector 8, 4 sectors, no data
        log[2048] = 8;
        log[2056] = 4;
        log[2064] = FLAG_DISCARD as u8;
        // entry 2 at 2560: empty flush
        log[2576] = FLAG_FLUSH as u8;
        // entry 3 at 3072: mark "mkfs"
        log[3088] = FLAG_MARK as u8;
        log[3096] = 4;
        log[3104..3108].copy_from_slice(b"mkfs");
        log
    }

    #[test]
    fn golden_log_matches_writer_and_reader() -> Result<(), LogError> {
        let golden = golden_log();
        let dev = Arc::new(MemDev::new("log", golden.len() as u64));
        let mut w = LogWriter::create(Box::new(dev.clone()), 512)?;
        w.append(
            &EntryHeader::write(3, 2, 0),
            &[[0xaa; 512], [0xbb; 512]].concat(),
        )?;
        w.append(&EntryHeader::write(8, 4, FLAG_DISCARD), &[])?;
        w.append(&EntryHeader::flush(), &[])?;
        w.mark("mkfs")?;
        assert_eq!(dev.snapshot(), golden, "writer output is byte-identical");

        let r = LogReader::open(MemDev::from_image("golden", golden))?;
        assert_eq!(r.summary(), "Log version=1, sectorsize=512, entries=4");
        let es: Vec<LogEntry> = r.entries().collect::<Result<_, _>>()?;
        assert_eq!(es.len(), 4);
        assert_eq!(es[0].header, EntryHeader::write(3, 2, 0));
        assert_eq!(r.read_data(&es[0])?[511..513], [0xaa, 0xbb]);
        assert_eq!((es[1].offset, es[1].pos(512)), (2048, 5));
        assert!(es[1].header.is_discard());
        assert!(es[2].header.is_flush() && es[2].header.nr_sectors == 0);
        assert_eq!(es[3].header.mark_text(), "mkfs");
        assert_eq!(es[3].pos(512), 7);
        Ok(())
    }

    #[test]
    fn nr_entries_only_advances_at_fua_mark_and_close() -> Result<(), LogError> {
        let dev = Arc::new(MemDev::new("log", 1 << 20));
        let mut w = LogWriter::create(Box::new(dev.clone()), 4096)?;
        let count = || LogReader::open(dev.clone()).map(|r| r.nr_entries());
        w.append(&EntryHeader::write(0, 1, 0), &[1; 4096])?;
        w.append(&EntryHeader::flush(), &[])?;
        assert_eq!(
            count()?,
            0,
            "plain writes and flushes do not update the super"
        );
        w.append(&EntryHeader::write(1, 1, FLAG_FUA), &[2; 4096])?;
        assert_eq!(count()?, 3);
        w.append(&EntryHeader::write(2, 1, 0), &[3; 4096])?;
        w.close()?;
        let r = LogReader::open(dev.clone())?;
        let es: Vec<LogEntry> = r.entries().collect::<Result<_, _>>()?;
        assert_eq!(es.len(), 5);
        assert_eq!(es[4].header.mark_text(), super::super::END_MARK);
        Ok(())
    }

    #[test]
    fn corrupt_logs_are_rejected_with_clear_errors() {
        let mut bad_magic = golden_log();
        bad_magic[0] = b'x';
        let e = LogReader::open(MemDev::from_image("l", bad_magic)).err();
        assert!(
            matches!(&e, Some(LogError::Super { .. }))
                && e.as_ref()
                    .is_some_and(|e| e.to_string().contains("bad magic")),
            "{e:?}"
        );

        let mut bad_version = golden_log();
        bad_version[8] = 7;
        let e = LogReader::open(MemDev::from_image("l", bad_version)).err();
        assert!(e.is_some_and(|e| e.to_string().contains("version 7")));

        // Cut in the middle of entry 0's data.
        let truncated = golden_log()[..1200].to_vec();
        let r = LogReader::open(MemDev::from_image("l", truncated));
        let first = r.map(|r| r.entries().next().map(|x| x.map(|_| ())));
        match first {
            Ok(Some(Err(LogError::Truncated { entry: 0, .. }))) => {}
            other => panic!("expected a truncation error, got {other:?}"),
        }

        // nr_entries claims one more entry than is there: the all-zero header is rejected.
        let mut overcount = golden_log();
        overcount[16] = 5;
        let r = LogReader::open(MemDev::from_image("l", overcount));
        let last = r.map(|r| r.entries().last().map(|x| x.map(|_| ())));
        match last {
            Ok(Some(Err(e @ LogError::Entry { entry: 4, .. }))) => {
                assert!(e.to_string().contains("all-zero"), "{e}")
            }
            other => panic!("expected an all-zero header error, got {other:?}"),
        }
    }
}
