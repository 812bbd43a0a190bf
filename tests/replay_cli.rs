//! Drives the built `ublk-clone-replay` binary on logs recorded with the library.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use ublk_clone::io::mem::MemDev;
use ublk_clone::io::BlockDev;
use ublk_clone::logwrites::{LogWriter, LogWritesDev};

type Error = Box<dyn std::error::Error>;
type Res = Result<(), Error>;

/// A recorded log, the device image at mark "mkfs" and at the end.
struct Recorded {
    log: PathBuf,
    at_mkfs: Vec<u8>,
    end: Vec<u8>,
}

const DEV_SIZE: u64 = 64 * 1024;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ublk-clone-replay"))
}

fn run(args: &[&str]) -> std::io::Result<Output> {
    bin().args(args).output()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Records a small workload into `dir/log`. Entries:
/// 0 W0  1 F  2 M"mkfs"  3 U8 (FUA)  4 W16  5 W24  6 D24  7 F  8 M"end-of-work" (a mark
/// goes before the unflushed writes)  9 W2  10 W4 (logged at close)  11 M"dm-log-writes-end".
fn record(dir: &Path) -> Result<Recorded, Error> {
    let log = dir.join("log");
    let w = LogWriter::create_file(&log, 1 << 20, 512)?;
    let dev = Arc::new(MemDev::new("dev", DEV_SIZE));
    let (d, space) = LogWritesDev::single(dev.clone(), w)?;
    d.write_at(&[1; 512], 0)?;
    d.flush()?;
    d.mark("mkfs")?;
    let at_mkfs = dev.snapshot();
    d.write_fua(&[2; 512], 8 * 512)?;
    d.write_at(&[3; 1024], 16 * 512)?;
    d.write_at(&[9; 512], 24 * 512)?;
    d.discard(24 * 512, 512)?;
    d.flush()?;
    d.write_at(&[4; 512], 2 * 512)?;
    d.mark("end-of-work")?;
    d.write_at(&[5; 512], 4 * 512)?;
    assert_eq!(space.close()?, 12);
    Ok(Recorded {
        log,
        at_mkfs,
        end: dev.snapshot(),
    })
}

fn zeroed_target(dir: &Path) -> std::io::Result<PathBuf> {
    let p = dir.join("target");
    std::fs::write(&p, vec![0u8; DEV_SIZE as usize])?;
    Ok(p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

#[test]
fn summary_and_num_entries() -> Res {
    let dir = tempfile::tempdir()?;
    let log = record(dir.path())?.log;
    let o = run(&["--log", s(&log)])?;
    assert!(o.status.success());
    assert_eq!(stdout(&o), "Log version=1, sectorsize=512, entries=12\n");
    let o = run(&["--log", s(&log), "--num-entries"])?;
    assert_eq!(stdout(&o), "12\n");
    Ok(())
}

#[test]
fn find_marks_flushes_and_fuas() -> Res {
    let dir = tempfile::tempdir()?;
    let log = record(dir.path())?.log;
    let find = |extra: &[&str]| -> std::io::Result<Output> {
        let mut a = vec!["--log", s(&log), "--find"];
        a.extend_from_slice(extra);
        run(&a)
    };
    // pos = log offset after the entry's data / 512: super 1, W0 2, F 1, M 1 -> 5;
    // then U8 2, W16 3, W24 2, D24 1, F 1 -> 14.
    assert_eq!(stdout(&find(&["--end-mark", "mkfs"])?), "2@5\n");
    assert_eq!(
        stdout(&find(&["--next-fua", "--start-entry", "2"])?),
        "3@7\n"
    );
    assert_eq!(
        stdout(&find(&["--next-flush", "--start-entry", "2"])?),
        "7@14\n"
    );
    assert_eq!(
        stdout(&find(&["--next-flush", "--start-mark", "mkfs"])?),
        "7@14\n"
    );
    let none = find(&["--next-fua", "--start-entry", "4"])?;
    assert_eq!(none.status.code(), Some(1));
    assert!(stdout(&none).is_empty());
    let nomark = find(&["--end-mark", "nosuch"])?;
    assert_eq!(nomark.status.code(), Some(1));
    Ok(())
}

#[test]
fn replay_to_mark_and_whole() -> Res {
    let dir = tempfile::tempdir()?;
    let Recorded { log, at_mkfs, end } = record(dir.path())?;
    let t = zeroed_target(dir.path())?;
    let o = run(&["--log", s(&log), "--replay", s(&t), "--end-mark", "mkfs"])?;
    assert!(o.status.success(), "{o:?}");
    assert!(std::fs::read(&t)? == at_mkfs);
    let t = zeroed_target(dir.path())?;
    let o = run(&["--log", s(&log), "--replay", s(&t)])?;
    assert!(o.status.success(), "{o:?}");
    assert!(std::fs::read(&t)? == end);
    // A mark that is not in the log is an error, after replaying everything.
    let o = run(&["--log", s(&log), "--replay", s(&t), "--end-mark", "nosuch"])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("end mark \"nosuch\" not found"));
    Ok(())
}

#[test]
fn fsck_runs_at_each_check_and_failure_exits_1() -> Res {
    let dir = tempfile::tempdir()?;
    let log = record(dir.path())?.log;
    let t = zeroed_target(dir.path())?;
    let calls = dir.path().join("calls");
    let cmd = format!("echo x >> {}", s(&calls));
    let o = run(&[
        "--log",
        s(&log),
        "--replay",
        s(&t),
        "--fsck",
        &cmd,
        "--check",
        "flush",
    ])?;
    assert!(o.status.success(), "{o:?}");
    assert_eq!(std::fs::read_to_string(&calls)?.lines().count(), 2);

    let o = run(&[
        "--log",
        s(&log),
        "--replay",
        s(&t),
        "--start-mark",
        "mkfs",
        "--fsck",
        "exit 3",
        "--check",
        "fua",
    ])?;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o), "Fsck errored out on entry 3\n");
    Ok(())
}

#[test]
fn bad_input_is_reported() -> Res {
    let dir = tempfile::tempdir()?;
    let log = record(dir.path())?.log;
    let missing = run(&["--log", "/nonexistent/log"])?;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/log"));

    let mut bytes = std::fs::read(&log)?;
    bytes[0] = 0;
    let corrupt = dir.path().join("corrupt");
    std::fs::write(&corrupt, &bytes)?;
    let o = run(&["--log", s(&corrupt)])?;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad magic"));

    let o = run(&["--log", s(&log), "--fsck", "true"])?;
    assert_eq!(
        o.status.code(),
        Some(2),
        "--fsck needs --check and --replay"
    );
    let o = run(&["--log", s(&log), "--bogus"])?;
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["--help"])?;
    assert!(o.status.success() && stdout(&o).contains("--next-fua"));
    Ok(())
}
