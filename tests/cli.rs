//! CLI contract tests on the host (no ublk needed): help, bad options, missing files, wrong
//! sizes, another clone's metadata, corrupt metadata. Each bad input must fail with a message
//! naming the problem, a non-zero exit, and nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ublk-clone")
}

fn run(args: &[&str]) -> Output {
    match Command::new(bin()).args(args).output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run {}: {e}", bin()),
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout)
}

fn file(dir: &Path, name: &str, size: u64, fill: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![fill; size as usize]).expect("write test file");
    p
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn help_lists_the_subcommands() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for sub in [
        "create",
        "list",
        "status",
        "set",
        "stop",
        "format",
        "check",
        "dump",
        "reset-mode",
        "mark",
    ] {
        assert!(text.contains(sub), "--help does not mention {sub}");
    }
}

#[test]
fn bad_option_is_rejected() {
    let o = run(&["create", "--frobnicate"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--frobnicate"));
}

#[test]
fn create_rejects_bad_input_before_writing_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = file(dir.path(), "src", 1 << 20, 0x5a);
    let dst = file(dir.path(), "dst", 1 << 20, 0);
    let small = file(dir.path(), "small", 1 << 19, 0);
    let meta = file(dir.path(), "meta", 1 << 20, 0);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--source",
                "/nonexistent/src",
                "--dest",
                s(&dst),
                "--metadata",
                s(&meta),
            ],
            "no such file",
        ),
        (
            vec![
                "--source",
                s(&src),
                "--dest",
                s(&small),
                "--metadata",
                s(&meta),
            ],
            "smaller than the source",
        ),
        (
            vec![
                "--source",
                s(&src),
                "--dest",
                s(&dst),
                "--metadata",
                s(&meta),
                "--region-size",
                "3K",
            ],
            "power of two",
        ),
        (
            vec![
                "--source",
                s(&src),
                "--dest",
                s(&dst),
                "--metadata",
                s(&meta),
                "--region-size",
                "4Q",
            ],
            "suffix",
        ),
        (
            vec![
                "--source",
                s(&src),
                "--dest",
                s(&dst),
                "--metadata",
                s(&meta),
                "--depth",
                "0",
            ],
            "depth",
        ),
    ];
    let old_log = file(dir.path(), "old.log", 4096, 0x77);
    let new_log = dir.path().join("new.log");
    let base = [
        "--source",
        s(&src),
        "--dest",
        s(&dst),
        "--metadata",
        s(&meta),
    ];
    let with = |extra: &[&'static str], log: &Path| -> Vec<String> {
        let mut v: Vec<String> = base.iter().map(|a| a.to_string()).collect();
        v.push("--log-writes".into());
        v.push(s(log).to_string());
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    let log_cases: Vec<(Vec<String>, &str)> = vec![
        (with(&[], &old_log), "never overwritten"),
        (
            with(&["--log-writes-size", "100K"], &new_log),
            "at least 1M",
        ),
        (
            with(&[], &dir.path().join("no-such-dir/x.log")),
            "directory does not exist",
        ),
    ];
    let mut cases: Vec<(Vec<String>, &str)> = cases
        .into_iter()
        .map(|(a, w)| (a.iter().map(|x| x.to_string()).collect(), w))
        .collect();
    cases.extend(log_cases);
    for (args, want) in cases {
        let mut full = vec!["create"];
        full.extend(args.iter().map(String::as_str));
        let o = run(&full);
        assert!(!o.status.success(), "{full:?} succeeded");
        assert!(
            stderr(&o).contains(want),
            "{full:?}: '{}' does not mention '{want}'",
            stderr(&o)
        );
        assert!(
            std::fs::read(&meta).expect("meta").iter().all(|b| *b == 0),
            "{full:?} wrote metadata"
        );
        assert!(
            std::fs::read(&dst).expect("dst").iter().all(|b| *b == 0),
            "{full:?} wrote the destination"
        );
        assert!(
            std::fs::read(&old_log)
                .expect("log")
                .iter()
                .all(|b| *b == 0x77),
            "{full:?} overwrote an existing log"
        );
        assert!(!new_log.exists(), "{full:?} created a log");
    }
}

#[test]
fn format_check_dump_and_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = file(dir.path(), "src", 1 << 20, 0x5a);
    let src2 = file(dir.path(), "src2", 1 << 20, 0xa5);
    let dst = file(dir.path(), "dst", 1 << 20, 0);
    let meta = file(dir.path(), "meta", 1 << 20, 0);
    let fmt = |source: &Path, force: bool| {
        let mut a = vec![
            "format",
            "--metadata",
            s(&meta),
            "--source",
            s(source),
            "--dest",
            s(&dst),
            "--region-size",
            "4K",
        ];
        if force {
            a.push("--force");
        }
        run(&a)
    };
    assert!(fmt(&src, false).status.success());
    let check = run(&["check", s(&meta)]);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    let dump = run(&["dump", s(&meta)]);
    assert!(dump.status.success());
    let v: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("dump is JSON");
    assert!(v.to_string().contains("4096"), "dump shows the region size");

    // Formatting over an existing clone is refused without --force, and writes nothing.
    let before = std::fs::read(&meta).expect("meta");
    let again = fmt(&src2, false);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(std::fs::read(&meta).expect("meta"), before);

    // Another source against this metadata is refused by `create` (before any ublk work).
    let other = run(&[
        "create",
        "--source",
        s(&src2),
        "--dest",
        s(&dst),
        "--metadata",
        s(&meta),
    ]);
    assert!(!other.status.success());
    assert!(stderr(&other).contains("--force"), "{}", stderr(&other));
    assert_eq!(
        std::fs::read(&meta).expect("meta"),
        before,
        "refused create wrote metadata"
    );

    // A flipped bit in one copy of a bitmap block is reported; after format both copies are
    // identical, so it is a note (a torn write looks the same; open repairs it): exit 0.
    let mut bytes = before.clone();
    bytes[4096 * 2 + 100] ^= 0x10;
    std::fs::write(&meta, &bytes).expect("corrupt");
    let check = run(&["check", s(&meta)]);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert!(stderr(&check).contains("block 2"), "{}", stderr(&check));
    // The same flip in both copies is damage (exit 1).
    bytes[4096 * 3 + 100] ^= 0x10;
    std::fs::write(&meta, &bytes).expect("corrupt");
    let check = run(&["check", s(&meta)]);
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    // Missing metadata: exit 2.
    assert_eq!(run(&["check", "/nonexistent/meta"]).status.code(), Some(2));
    std::fs::write(&meta, &before).expect("restore");
    // `start` needs the configuration saved when the device first started.
    let start = run(&["start", "--metadata", s(&meta)]);
    assert!(!start.status.success());
    assert!(
        stderr(&start).contains("no saved configuration"),
        "{}",
        stderr(&start)
    );
    // reset-mode on a healthy read-write clone is a no-op.
    std::fs::write(&meta, &before).expect("restore");
    let reset = run(&["reset-mode", s(&meta)]);
    assert!(reset.status.success(), "{}", stderr(&reset));
    assert!(stderr(&reset).contains("nothing to do"));
}

#[test]
fn status_of_an_unknown_device_names_it() {
    let o = run(&["status", "/dev/ublkb4242"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ublkb4242"));
}

#[test]
fn create_reaches_the_daemon_with_all_options() {
    // Regression: the daemon is spawned with the parsed options (`--number=-1` must not be
    // taken for a flag). Without ublk on the host the daemon must fail at device creation,
    // naming ublk_drv; with ublk it must create a device, which is then stopped.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = file(dir.path(), "src", 1 << 20, 0x5a);
    let dst = file(dir.path(), "dst", 1 << 20, 0);
    let meta = file(dir.path(), "meta", 1 << 20, 0);
    let o = run(&[
        "create",
        "--source",
        s(&src),
        "--dest",
        s(&dst),
        "--metadata",
        s(&meta),
        "--region-size",
        "4K",
        "--rate",
        "1M",
        "--batch-size",
        "4",
        "--hydration-threshold",
        "8",
        "--no-discard-passdown",
        "--log-writes",
        s(&dir.path().join("run.log")),
        "--log-writes-size",
        "2M",
    ]);
    let text = stderr(&o);
    assert!(
        !text.contains("Usage:"),
        "the daemon got bad arguments: {text}"
    );
    if o.status.success() {
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert!(run(&["stop", &dev]).status.success());
    } else {
        assert!(text.contains("ublk_drv"), "unexpected failure: {text}");
    }
}

/// Issue 9, finding 11: a commit cut between its shadow writes and its superblock leaves
/// newer shadow slots that opening repairs by design. `check` exits 0 and notes them (text
/// and `--json`); a really damaged image still exits 1.
#[test]
fn check_exits_0_with_a_note_after_an_interrupted_commit_and_1_on_damage() {
    use std::sync::Arc;
    use ublk_clone::io::file::{Access, FileDev};
    use ublk_clone::io::BlockDev;
    use ublk_clone::metadata::{Expect, Metadata};

    let dir = tempfile::tempdir().expect("tempdir");
    let src = file(dir.path(), "src", 1 << 20, 0x5a);
    let dst = file(dir.path(), "dst", 1 << 20, 0);
    let meta = file(dir.path(), "meta", 1 << 20, 0);
    let f = run(&[
        "format",
        "--metadata",
        s(&meta),
        "--source",
        s(&src),
        "--dest",
        s(&dst),
        "--region-size",
        "4K",
    ]);
    assert!(f.status.success(), "{}", stderr(&f));
    {
        let dev: Arc<dyn BlockDev> =
            Arc::new(FileDev::open(&meta, Access::ReadWrite, false).expect("open metadata"));
        let (md, _) = Metadata::open(dev, &Expect::default()).expect("open");
        md.set_range_hydrated(0, 10).expect("set");
        let frozen = md.begin_commit().expect("begin_commit");
        let _shadows = frozen.write_shadows().expect("write_shadows");
        // Crash: the commit's superblock is never written.
    }
    let text = run(&["check", s(&meta)]);
    assert_eq!(text.status.code(), Some(0), "{}", stderr(&text));
    let out = String::from_utf8_lossy(&text.stdout);
    assert!(
        out.contains("no problems found") && out.contains("note"),
        "{out}"
    );
    let json = run(&["check", "--json", s(&meta)]);
    assert_eq!(json.status.code(), Some(0), "{}", stderr(&json));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("check --json");
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v}");
    let notes = v["notes"].as_array().cloned().unwrap_or_default();
    // Bitmap block 0, slot B (block 3) holds the interrupted commit's generation.
    assert!(
        notes.len() == 1 && notes[0]["block"] == 3,
        "expected one note for block 3: {v}"
    );

    // Damage: the only valid copy of bitmap block 0 (slot A, block 2) is corrupt.
    let mut bytes = std::fs::read(&meta).expect("meta");
    bytes[4096 * 2 + 100] ^= 0x10;
    std::fs::write(&meta, &bytes).expect("corrupt");
    let damaged = run(&["check", s(&meta)]);
    assert_eq!(damaged.status.code(), Some(1), "{}", stderr(&damaged));
}
