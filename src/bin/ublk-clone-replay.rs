//! `ublk-clone-replay`: inspect and replay dm-log-writes logs (the kernel target's or ours),
//! with the options of xfstests' replay-log. A thin shim: arguments -> options -> one call
//! into `ublk_clone::logwrites`.

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use ublk_clone::io::file::{Access, FileDev};
use ublk_clone::logwrites::replay::{find, replay, run_check_command};
use ublk_clone::logwrites::{Check, LogReader, ReplayOptions, Start};

/// Replay a dm-log-writes log onto a device, or search it.
///
/// Without --replay or --find, prints "Log version=1, sectorsize=S, entries=N".
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The log: a file or block device written by dm-log-writes or ublk-clone.
    #[arg(long)]
    log: PathBuf,
    /// Replay onto this file or block device (at least as large as the logged device).
    #[arg(long, conflicts_with_all = ["find", "list", "num_entries"])]
    replay: Option<PathBuf>,
    /// Only search: print "<entry>@<pos>" of the first entry meeting the stop condition
    /// (--end-mark, --next-flush, --next-fua); exit 1 if there is none.
    #[arg(long, conflicts_with_all = ["list", "num_entries"])]
    find: bool,
    /// Print every entry as "<entry>@<pos> <kind>".
    #[arg(long)]
    list: bool,
    /// Print the number of entries.
    #[arg(long)]
    num_entries: bool,
    /// Stop after this many entries (counted from the start).
    #[arg(long)]
    limit: Option<u64>,
    /// Start at this 0-based entry (earlier entries are skipped, not replayed).
    #[arg(long, conflicts_with = "start_mark")]
    start_entry: Option<u64>,
    /// Start after this mark.
    #[arg(long)]
    start_mark: Option<String>,
    /// Stop after this mark (the stopping entry is replayed).
    #[arg(long)]
    end_mark: Option<String>,
    /// Stop after the next flush entry.
    #[arg(long)]
    next_flush: bool,
    /// Stop after the next FUA entry.
    #[arg(long)]
    next_fua: bool,
    /// Ignore discard entries.
    #[arg(long)]
    no_discard: bool,
    /// Replay discards as writes of zeroes (true, deterministic) or as real discards (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    discard_zeroes: bool,
    /// Command run with `sh -c` after each entry matching --check (the target is flushed
    /// first). A non-zero exit stops the replay: "Fsck errored out on entry N", exit 1.
    #[arg(long, requires_all = ["check", "replay"])]
    fsck: Option<String>,
    /// When to run --fsck: every N entries, or after each flush, fua or discard entry.
    #[arg(long, requires = "fsck")]
    check: Option<Check>,
    /// Print each replayed entry to stderr.
    #[arg(short, long)]
    verbose: bool,
}

fn options(a: &Args) -> ReplayOptions {
    let start = match (&a.start_entry, &a.start_mark) {
        (Some(n), _) => Start::Entry(*n),
        (None, Some(m)) => Start::Mark(m.clone()),
        (None, None) => Start::Beginning,
    };
    ReplayOptions {
        start,
        limit: a.limit,
        end_mark: a.end_mark.clone(),
        next_flush: a.next_flush,
        next_fua: a.next_fua,
        no_discard: a.no_discard,
        discard_zeroes: a.discard_zeroes,
        check: a.check,
        verbose: a.verbose,
    }
}

fn run(a: &Args) -> Result<ExitCode> {
    let reader = LogReader::open_path(&a.log)?;
    let opts = options(a);
    let ss = reader.sectorsize();
    if a.num_entries {
        println!("{}", reader.nr_entries());
    } else if a.list {
        for e in reader.entries() {
            let e = e?;
            println!("{}@{} {}", e.index, e.pos(ss), e.header.describe());
        }
    } else if a.find {
        match find(&reader, &opts)? {
            Some(e) => println!("{}@{}", e.index, e.pos(ss)),
            None => {
                eprintln!("{}: no entry meets the stop condition", a.log.display());
                return Ok(ExitCode::FAILURE);
            }
        }
    } else if let Some(target) = &a.replay {
        let dev = FileDev::open(target, Access::ReadWrite, false)
            .with_context(|| format!("cannot open the replay target {}", target.display()))?;
        let fsck = a.fsck.clone();
        let sum = replay(&reader, &dev, &opts, &mut |_| match &fsck {
            Some(cmd) => run_check_command(cmd),
            None => Ok(true),
        })?;
        if let Some(n) = sum.check_failed {
            println!("Fsck errored out on entry {n}");
            return Ok(ExitCode::FAILURE);
        }
    } else {
        println!("{}", reader.summary());
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ublk-clone-replay: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
