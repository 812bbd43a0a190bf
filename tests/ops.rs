//! Operations on the host (no ublk needed): clone names, the clone table (`up`/`down` and
//! the systemd generator), man pages and completions. What needs a kernel (a table brought
//! up, mounted by name, brought down) is in the VM suite (`clonetab_up_and_down`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ublk-clone")
}

/// Runs the binary with its state, runtime and link directories inside `root`.
fn run_in(root: &Path, args: &[&str], table: Option<&Path>) -> Output {
    let mut c = Command::new(bin());
    c.args(args)
        .env("UBLK_CLONE_STATE_DIR", root.join("state"))
        .env("UBLK_CLONE_RUN_DIR", root.join("run"))
        .env("UBLK_CLONE_DEV_DIR", root.join("dev"));
    match table {
        Some(t) => c.env("UBLK_CLONETAB", t),
        None => c.env_remove("UBLK_CLONETAB"),
    };
    match c.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run {}: {e}", bin()),
    }
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout)
}

fn file(dir: &Path, name: &str, size: u64, fill: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![fill; size as usize]).expect("write test file");
    p
}

#[test]
fn names_that_are_not_names_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = file(dir.path(), "src", 1 << 20, 0x5a);
    let dst = file(dir.path(), "dst", 1 << 20, 0);
    let meta = file(dir.path(), "meta", 1 << 20, 0);
    for (name, says) in [
        ("12", "device number"),
        ("ublkb3", "device number"),
        ("a/b", "letters, digits"),
        ("-x", "starting with a letter"),
    ] {
        let o = run_in(
            dir.path(),
            &[
                "create",
                "--source",
                src.to_str().expect("utf-8"),
                "--dest",
                dst.to_str().expect("utf-8"),
                "--metadata",
                meta.to_str().expect("utf-8"),
                &format!("--name={name}"),
            ],
            None,
        );
        assert!(!o.status.success(), "--name {name} accepted");
        assert!(text(&o).contains(says), "--name {name}: {}", text(&o));
        // Nothing written: the metadata is still blank.
        assert!(std::fs::read(&meta).expect("meta").iter().all(|b| *b == 0));
    }
    let o = run_in(dir.path(), &["status", "nosuchclone"], None);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no clone is named 'nosuchclone'"),
        "{}",
        text(&o)
    );
}

/// A table with bad lines: each is named (file, line, field), the good line is still tried,
/// and the exit is non-zero. Without ublk on the host the good clone fails at the device
/// (naming ublk_drv); with ublk it comes up and is brought down again.
#[test]
fn up_reports_bad_lines_and_still_tries_the_good_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = file(d, "src", 1 << 20, 0x5a);
    let dst = file(d, "dst", 1 << 20, 0);
    let meta = file(d, "meta", 1 << 20, 0);
    let bad_meta = file(d, "bad-meta", 1 << 20, 0);
    let tab = d.join("clonetab");
    std::fs::write(
        &tab,
        format!(
            "# test table\n\
             good {src} {dst} {meta} region-size=4K\n\
             \n\
             bad  {src} {dst} {bad} frobnicate\n\
             12   {src} {dst} {bad}\n",
            src = src.display(),
            dst = dst.display(),
            meta = meta.display(),
            bad = bad_meta.display()
        ),
    )
    .expect("table");
    let o = run_in(
        d,
        &["up", "--all", "--table", tab.to_str().expect("utf-8")],
        None,
    );
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    let tab_s = tab.display().to_string();
    assert!(
        t.contains(&format!("{tab_s}:4: options: unknown option 'frobnicate'")),
        "{t}"
    );
    assert!(t.contains(&format!("{tab_s}:5: name: ")), "{t}");
    if t.contains("good: /dev/ublkb") {
        assert!(run_in(d, &["down", "good"], Some(&tab)).status.success());
    } else {
        assert!(
            t.contains(&format!("good ({tab_s}:2):")) && t.contains("ublk_drv"),
            "the good line was not tried: {t}"
        );
    }
    // The bad lines' metadata is untouched.
    assert!(std::fs::read(&bad_meta)
        .expect("meta")
        .iter()
        .all(|b| *b == 0));
    // A name the table does not have; the table from the environment.
    let o = run_in(d, &["up", "nosuch"], Some(&tab));
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&format!("nosuch: no line of {tab_s} names this clone")),
        "{}",
        text(&o)
    );
    // A bad line's own name: its error is the one printed.
    let o = run_in(d, &["up", "bad"], Some(&tab));
    assert!(!o.status.success());
    assert!(text(&o).contains(":4: options:"), "{}", text(&o));
    // Neither names nor --all; a missing table.
    assert!(!run_in(d, &["up"], Some(&tab)).status.success());
    let o = run_in(d, &["up", "--all"], Some(&d.join("missing")));
    assert!(!o.status.success());
    assert!(
        text(&o).contains("cannot read the clone table"),
        "{}",
        text(&o)
    );
    // Nothing is up: down says so and succeeds.
    let o = run_in(d, &["down", "good"], Some(&tab));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("good: not up"), "{}", text(&o));
}

#[test]
fn the_generator_wants_one_unit_per_good_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let tab = d.join("clonetab");
    std::fs::write(
        &tab,
        "db /s /d /m\nweb nbd://h/e /d2 /m2 rate=1M\nbad /s /d /m3 nope\n",
    )
    .expect("table");
    let out = d.join("gen");
    let o = run_in(
        d,
        &[
            "systemd-generator",
            out.to_str().expect("utf-8"),
            "/x",
            "/y",
        ],
        Some(&tab),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(":3: options: unknown option 'nope'"));
    let wants = out.join("ublk-clone.target.wants");
    let mut units: Vec<String> = std::fs::read_dir(&wants)
        .expect("wants")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    units.sort();
    assert_eq!(units, ["ublk-clone@db.service", "ublk-clone@web.service"]);
    assert_eq!(
        std::fs::read_link(wants.join("ublk-clone@db.service")).expect("link"),
        Path::new("/usr/lib/systemd/system/ublk-clone@.service")
    );
    // The target is pulled in by local-fs.target: no `systemctl enable` needed.
    assert_eq!(
        std::fs::read_link(out.join("local-fs.target.wants/ublk-clone.target")).expect("link"),
        Path::new("/usr/lib/systemd/system/ublk-clone.target")
    );
    // No table: no units, no error (a host without clones).
    let o = run_in(
        d,
        &["systemd-generator", out.join("2").to_str().expect("utf-8")],
        Some(&d.join("none")),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out.join("2").exists());
}

#[test]
fn man_pages_and_completions_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let o = run_in(d, &["gen-docs", d.to_str().expect("utf-8")], None);
    assert!(o.status.success(), "{}", text(&o));
    for page in [
        "ublk-clone.1",
        "ublk-clone-create.1",
        "ublk-clone-up.1",
        "ublk-clone-down.1",
    ] {
        let p = d.join("man").join(page);
        let t = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(t.contains(".TH"), "{page} is not a man page");
    }
    let create = std::fs::read_to_string(d.join("man/ublk-clone-create.1")).expect("page");
    assert!(create.contains("metadata") && create.contains("name"));
    let bash = std::fs::read_to_string(d.join("completions/ublk-clone.bash")).expect("bash");
    assert!(bash.contains("--table") && bash.contains("up"));
    assert!(d.join("completions/_ublk-clone").exists());
    assert!(d.join("completions/ublk-clone.fish").exists());
    // Hidden plumbing stays out of the pages people read.
    let top = std::fs::read_to_string(d.join("man/ublk-clone.1")).expect("page");
    assert!(!top.contains("systemd\\-generator") && !top.contains("gen\\-docs"));
}

/// The units load cleanly in systemd (no ordering cycle with local-fs-pre.target, no unknown
/// setting): `systemd-analyze verify` on copies that run this build's binary.
#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    for (from, to) in [
        ("ublk-clone@.service", "ublk-clone@db.service"),
        ("ublk-clone.target", "ublk-clone.target"),
    ] {
        let text = std::fs::read_to_string(dist.join(from)).expect("unit");
        // This build's binary; no man pages installed here.
        let text: String = text
            .replace("/usr/bin/ublk-clone", bin())
            .lines()
            .filter(|l| !l.starts_with("Documentation="))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(d.join(to), text).expect("write unit");
    }
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(d.join("ublk-clone@db.service"))
        .arg(d.join("ublk-clone.target"))
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze (package systemd)");
    let t = text(&o);
    assert!(o.status.success() && t.trim().is_empty(), "{t}");
}

/// The Debian package's asset list (Cargo.toml, `[package.metadata.deb]`) names files that
/// exist (the generated ones aside) and leaves out none of `dist/`: a new unit or rule that
/// is not packaged fails here, not on a user's host.
#[test]
fn the_debian_package_lists_every_dist_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let deb = manifest
        .split("[package.metadata.deb]")
        .nth(1)
        .expect("no [package.metadata.deb] in Cargo.toml");
    let sources: Vec<&str> = deb
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("[\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert!(sources.len() >= 10, "assets: {sources:?}");
    for s in &sources {
        if s.starts_with("target/") {
            continue; // the binary and what gen-docs makes: built by tools/build-deb.sh
        }
        assert!(root.join(s).is_file(), "asset {s} does not exist");
    }
    for sub in ["dist/systemd", "dist/udev"] {
        for e in std::fs::read_dir(root.join(sub)).expect("dist dir") {
            let name = format!("{sub}/{}", e.expect("entry").file_name().to_string_lossy());
            assert!(
                sources.contains(&name.as_str()),
                "{name} is not in the package"
            );
        }
    }
    assert!(sources.contains(&"dist/ublk-clonetab.example"));
    for s in ["postinst", "prerm", "postrm"] {
        let p = root.join("dist/debian").join(s);
        let o = Command::new("sh").arg("-n").arg(&p).output().expect("sh");
        assert!(o.status.success(), "{s}: {}", text(&o));
    }
}
