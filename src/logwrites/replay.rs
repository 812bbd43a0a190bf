//! Replays a dm-log-writes log onto a device, with the useful options of xfstests'
//! replay-log: start at an entry or a mark, stop at a mark / the next flush / the next FUA /
//! after N entries, search without writing (`find`), skip or zero discards, and run a check
//! after each matching entry.
//!
//! Invariant: entries are applied to the target in log order, each exactly once, and the
//! entry that meets a stop condition is applied before stopping (replay-log semantics); the
//! target is flushed before every check and at the end, so a check sees a durable image.

use super::reader::{LogEntry, LogReader};
use super::LogError;
use crate::io::BlockDev;
use std::io;

/// Largest single write used to zero a discarded range.
const ZERO_CHUNK: u64 = 1 << 20;

/// Where replay starts. Entries before it are skipped, not applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Start {
    #[default]
    Beginning,
    /// The entry with this 0-based number.
    Entry(u64),
    /// The entry after the first mark with this text.
    Mark(String),
}

/// When to run the check: `--check N|flush|fua|discard`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// After every N-th entry processed.
    Every(u64),
    Flush,
    Fua,
    Discard,
}

/// A `--check` value that is neither a positive number nor flush, fua or discard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid check {0:?}: expected a positive number, flush, fua or discard")]
pub struct BadCheck(pub String);

impl std::str::FromStr for Check {
    type Err = BadCheck;
    fn from_str(s: &str) -> Result<Check, BadCheck> {
        match s {
            "flush" => Ok(Check::Flush),
            "fua" => Ok(Check::Fua),
            "discard" => Ok(Check::Discard),
            n => match n.parse::<u64>() {
                Ok(n) if n > 0 => Ok(Check::Every(n)),
                _ => Err(BadCheck(s.to_string())),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayOptions {
    pub start: Start,
    /// Stop after this many entries (counted from the start, marks and flushes included).
    pub limit: Option<u64>,
    /// Stop after the first mark with this text.
    pub end_mark: Option<String>,
    /// Stop after the next FLUSH entry.
    pub next_flush: bool,
    /// Stop after the next FUA entry.
    pub next_fua: bool,
    /// Ignore discard entries.
    pub no_discard: bool,
    /// Replay discards as writes of zeroes (deterministic) instead of real discards.
    pub discard_zeroes: bool,
    pub check: Option<Check>,
    /// Print each replayed entry to stderr.
    pub verbose: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            start: Start::Beginning,
            limit: None,
            end_mark: None,
            next_flush: false,
            next_fua: false,
            no_discard: false,
            discard_zeroes: true,
            check: None,
            verbose: false,
        }
    }
}

impl ReplayOptions {
    /// Replay the entries `0..=entry`.
    pub fn through_entry(entry: u64) -> ReplayOptions {
        ReplayOptions {
            limit: Some(entry + 1),
            ..Default::default()
        }
    }

    fn has_stop(&self) -> bool {
        self.end_mark.is_some() || self.next_flush || self.next_fua
    }

    fn should_stop(&self, e: &LogEntry) -> bool {
        let h = &e.header;
        (self.next_flush && h.is_flush())
            || (self.next_fua && h.is_fua())
            || self
                .end_mark
                .as_ref()
                .is_some_and(|m| h.is_mark() && h.mark.as_slice() == m.as_bytes())
    }

    fn should_check(&self, e: &LogEntry, processed: u64) -> bool {
        match self.check {
            None => false,
            Some(Check::Every(n)) => processed % n == 0,
            Some(Check::Flush) => e.header.is_flush(),
            Some(Check::Fua) => e.header.is_fua(),
            Some(Check::Discard) => e.header.is_discard(),
        }
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Entries processed from the start (applied, or flushes/marks/skipped discards).
    pub processed: u64,
    /// The last entry processed.
    pub last: Option<LogEntry>,
    /// A stop condition (mark, flush, FUA) was met at `last`.
    pub stopped: bool,
    /// Checks run.
    pub checks: u64,
    /// The entry after which a check failed; replay stopped there.
    pub check_failed: Option<u64>,
}

/// The entries before the start position, skipped; returns the iterator positioned at it.
fn seek<'a, D: BlockDev>(
    reader: &'a LogReader<D>,
    start: &Start,
) -> Result<std::iter::Peekable<super::reader::Entries<'a, D>>, LogError> {
    let mut it = reader.entries().peekable();
    match start {
        Start::Beginning => {}
        Start::Entry(n) => {
            // An error stays in the iterator for the caller to see.
            while matches!(it.peek(), Some(Ok(e)) if e.index < *n) {
                it.next();
            }
        }
        Start::Mark(m) => loop {
            match it.next() {
                Some(e) => {
                    let e = e?;
                    if e.header.is_mark() && e.header.mark.as_slice() == m.as_bytes() {
                        break;
                    }
                }
                None => {
                    return Err(LogError::NotFound {
                        log: reader.name().to_string(),
                        what: format!("start mark {m:?}"),
                        entries: reader.nr_entries(),
                    })
                }
            }
        },
    }
    Ok(it)
}

/// `--find`: the first entry from `opts.start` (within `opts.limit`) that meets a stop
/// condition, without writing anything. `None` if no entry does.
pub fn find<D: BlockDev>(
    reader: &LogReader<D>,
    opts: &ReplayOptions,
) -> Result<Option<LogEntry>, LogError> {
    if !opts.has_stop() {
        return Err(LogError::Usage {
            what: "find needs a condition: an end mark, next flush or next FUA".to_string(),
        });
    }
    for (i, e) in seek(reader, &opts.start)?.enumerate() {
        let e = e?;
        if opts.should_stop(&e) {
            return Ok(Some(e));
        }
        if opts.limit.is_some_and(|l| i as u64 + 1 >= l) {
            break;
        }
    }
    Ok(None)
}

fn apply<D: BlockDev, T: BlockDev + ?Sized>(
    reader: &LogReader<D>,
    target: &T,
    e: &LogEntry,
    opts: &ReplayOptions,
) -> Result<(), LogError> {
    let h = &e.header;
    if h.nr_sectors == 0 || (h.is_discard() && opts.no_discard) {
        return Ok(());
    }
    let ss = reader.sectorsize() as u64;
    let offset = h.sector.checked_mul(ss);
    let len = h.nr_sectors.checked_mul(ss);
    let end = offset.zip(len).and_then(|(o, l)| o.checked_add(l));
    let (offset, len) = match (offset, len, end) {
        (Some(o), Some(l), Some(end)) if end <= target.size() => (o, l),
        _ => {
            return Err(LogError::TargetTooSmall {
                target: target.name().to_string(),
                entry: e.index,
                offset: h.sector.saturating_mul(ss),
                end: end.unwrap_or(u64::MAX),
                size: target.size(),
            })
        }
    };
    let tio = |err: io::Error| LogError::io(target.name(), err);
    if h.is_discard() {
        if opts.discard_zeroes {
            let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(ZERO_CHUNK);
                target
                    .write_at(&zeroes[..n as usize], offset + done)
                    .map_err(tio)?;
                done += n;
            }
        } else {
            target.discard(offset, len).map_err(tio)?;
        }
        return Ok(());
    }
    let data = reader.read_data(e)?;
    target.write_at(&data, offset).map_err(tio)
}

/// Replays `reader`'s log onto `target` as `opts` says. After each entry matching
/// `opts.check`, the target is flushed and `check(entry)` runs; `Ok(false)` from it stops the
/// replay and is reported in [`ReplaySummary::check_failed`].
pub fn replay<D: BlockDev, T: BlockDev + ?Sized>(
    reader: &LogReader<D>,
    target: &T,
    opts: &ReplayOptions,
    check: &mut dyn FnMut(&LogEntry) -> Result<bool, LogError>,
) -> Result<ReplaySummary, LogError> {
    let mut sum = ReplaySummary::default();
    for e in seek(reader, &opts.start)? {
        let e = e?;
        apply(reader, target, &e, opts)?;
        sum.processed += 1;
        if opts.verbose {
            eprintln!(
                "replayed entry {}@{}: {}",
                e.index,
                e.pos(reader.sectorsize()),
                e.header.describe()
            );
        }
        if opts.should_check(&e, sum.processed) {
            target
                .flush()
                .map_err(|err| LogError::io(target.name(), err))?;
            sum.checks += 1;
            if !check(&e)? {
                sum.check_failed = Some(e.index);
                sum.last = Some(e);
                break;
            }
        }
        let stop = opts.should_stop(&e);
        sum.last = Some(e);
        if stop {
            sum.stopped = true;
            break;
        }
        if opts.limit.is_some_and(|l| sum.processed >= l) {
            break;
        }
    }
    target
        .flush()
        .map_err(|err| LogError::io(target.name(), err))?;
    if let (Some(m), false, None) = (&opts.end_mark, sum.stopped, sum.check_failed) {
        let limit_hit = opts.limit.is_some_and(|l| sum.processed >= l);
        if !limit_hit {
            return Err(LogError::NotFound {
                log: reader.name().to_string(),
                what: format!("end mark {m:?}"),
                entries: reader.nr_entries(),
            });
        }
    }
    Ok(sum)
}

/// Runs `cmd` with `sh -c`; `Ok(true)` if it exits with status 0.
pub fn run_check_command(cmd: &str) -> Result<bool, LogError> {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map_err(|source| LogError::CheckSpawn {
            cmd: cmd.to_string(),
            source,
        })?;
    Ok(status.success())
}

#[cfg(test)]
mod tests {
    use super::super::format::EntryHeader;
    use super::super::writer::LogWriter;
    use super::*;
    use crate::io::mem::MemDev;
    use std::sync::Arc;

    /// 0 W0(1) 1 D0(2) 2 M"a" 3 W1(2) 4 F 5 U2(3); nr_entries 6.
    fn log() -> Result<LogReader<Arc<MemDev>>, LogError> {
        let dev = Arc::new(MemDev::new("log", 1 << 16));
        let mut w = LogWriter::create(Box::new(dev.clone()), 512)?;
        w.append(&EntryHeader::write(0, 1, 0), &[1; 512])?;
        w.append(
            &EntryHeader::write(0, 2, super::super::format::FLAG_DISCARD),
            &[],
        )?;
        w.mark("a")?;
        w.append(&EntryHeader::write(1, 1, 0), &[2; 512])?;
        w.append(&EntryHeader::flush(), &[])?;
        w.append(
            &EntryHeader::write(2, 1, super::super::format::FLAG_FUA),
            &[3; 512],
        )?;
        LogReader::open(dev)
    }

    fn run(opts: &ReplayOptions) -> Result<(Vec<u8>, ReplaySummary), LogError> {
        let t = MemDev::from_image("t", vec![9; 2048]);
        let sum = replay(&log()?, &t, opts, &mut |_| Ok(true))?;
        Ok((t.snapshot(), sum))
    }

    #[test]
    fn start_stop_and_discard_options() -> Result<(), LogError> {
        let (img, sum) = run(&ReplayOptions::default())?;
        assert_eq!((img[0], img[512], img[1024], img[1536]), (0, 2, 3, 9));
        assert_eq!(sum.processed, 6);

        let no_discard = ReplayOptions {
            no_discard: true,
            ..Default::default()
        };
        assert_eq!(run(&no_discard)?.0[0], 1, "discard ignored");

        let from_mark = ReplayOptions {
            start: Start::Mark("a".into()),
            next_flush: true,
            ..Default::default()
        };
        let (img, sum) = run(&from_mark)?;
        assert_eq!((img[0], img[512], img[1024]), (9, 2, 9));
        assert!(sum.stopped && sum.last.is_some_and(|e| e.index == 4));

        let from_entry = ReplayOptions {
            start: Start::Entry(5),
            ..Default::default()
        };
        assert_eq!(run(&from_entry)?.1.processed, 1);

        let to_mark = ReplayOptions {
            end_mark: Some("a".into()),
            ..Default::default()
        };
        assert_eq!(run(&to_mark)?.1.last.map(|e| e.index), Some(2));
        let missing = ReplayOptions {
            end_mark: Some("b".into()),
            ..Default::default()
        };
        assert!(matches!(run(&missing), Err(LogError::NotFound { .. })));
        let fua = ReplayOptions {
            next_fua: true,
            ..Default::default()
        };
        assert_eq!(find(&log()?, &fua)?.map(|e| e.index), Some(5));
        Ok(())
    }

    #[test]
    fn checks_run_after_matching_entries_and_stop_on_failure() -> Result<(), LogError> {
        let every2 = ReplayOptions {
            check: Some(Check::Every(2)),
            ..Default::default()
        };
        let t = MemDev::new("t", 2048);
        let mut seen = Vec::new();
        let sum = replay(&log()?, &t, &every2, &mut |e| {
            seen.push(e.index);
            Ok(e.index < 3)
        })?;
        assert_eq!(seen, [1, 3]);
        assert_eq!(sum.check_failed, Some(3));
        assert_eq!(
            t.flush_count(),
            3,
            "flushed before each check and at the end"
        );
        assert_eq!("fua".parse::<Check>(), Ok(Check::Fua));
        assert!("0".parse::<Check>().is_err());
        Ok(())
    }

    #[test]
    fn targets_too_small_are_refused() -> Result<(), LogError> {
        let small = MemDev::new("small", 1024);
        let r = replay(&log()?, &small, &ReplayOptions::default(), &mut |_| {
            Ok(true)
        });
        assert!(matches!(r, Err(LogError::TargetTooSmall { entry: 5, .. })));
        Ok(())
    }
}
