//! `up` and `down`: bring the clones of a clone table ([`super::clonetab`]) up and down, and
//! `systemd-generator`, which makes the boot bring them up.
//!
//! `up` resumes a clone's metadata, formats blank metadata and never reformats; a clone whose
//! device is still there without its daemon (a crash) is recovered, file system and all.
//! Every line is tried: one bad line or one failing clone does not keep the others down.

use super::clone::{create, daemon_command_line};
use super::clonetab::{table_path, Entry, Table};
use crate::daemon::{self, control};
use anyhow::{bail, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["names", "all"]))]
pub struct UpArgs {
    /// Clones to bring up, by name (the table's first column).
    pub names: Vec<String>,
    /// Every clone of the table.
    #[arg(long)]
    pub all: bool,
    /// The clone table (default: $UBLK_CLONETAB, else /etc/ublk-clonetab).
    #[arg(long, value_name = "FILE")]
    pub table: Option<PathBuf>,
    /// Run the daemon of the one named clone in the foreground (systemd's ublk-clone@.service).
    #[arg(long, conflicts_with = "all")]
    pub foreground: bool,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["names", "all"]))]
pub struct DownArgs {
    /// Clones to stop, by name.
    pub names: Vec<String>,
    /// Every clone of the table that is up.
    #[arg(long)]
    pub all: bool,
    /// The clone table (default: $UBLK_CLONETAB, else /etc/ublk-clonetab).
    #[arg(long, value_name = "FILE")]
    pub table: Option<PathBuf>,
}

/// The device serving clone `name`, and whether its daemon runs.
fn device_named(name: &str) -> Option<control::Listed> {
    control::list_devices()
        .into_iter()
        .find(|l| l.record.name.as_deref() == Some(name))
}

/// The entries `names` (or all) select from `t`; prints the table's bad lines. Errors for
/// names that have no good line are counted in `failed`.
fn select<'a>(t: &'a Table, names: &[String], all: bool, failed: &mut usize) -> Vec<&'a Entry> {
    for e in &t.errors {
        eprintln!("ublk-clone: {e}");
    }
    if all {
        *failed += t.errors.len();
        return t.entries.iter().collect();
    }
    let mut v = Vec::new();
    for n in names {
        match t.get(n) {
            Some(e) => v.push(e),
            None => {
                *failed += 1;
                // A bad line for it was printed above.
                if !t
                    .errors
                    .iter()
                    .any(|e| e.name.as_deref() == Some(n.as_str()))
                {
                    eprintln!(
                        "ublk-clone: {n}: no line of {} names this clone",
                        t.file.display()
                    );
                }
            }
        }
    }
    v
}

/// `ublk-clone up NAME.../--all`.
pub fn run_up(a: &UpArgs) -> Result<()> {
    let t = Table::load(&table_path(a.table.as_deref()))?;
    let mut failed = 0;
    let entries = select(&t, &a.names, a.all, &mut failed);
    if a.foreground && entries.len() + failed != 1 {
        bail!("--foreground runs one clone: name exactly one");
    }
    for e in &entries {
        if let Err(err) = up_one(&t.file, e, a.foreground) {
            failed += 1;
            eprintln!(
                "ublk-clone: {} ({}:{}): {err:#}",
                e.name,
                t.file.display(),
                e.line
            );
        }
    }
    if failed > 0 {
        bail!("{failed} clone(s) of {} did not come up", t.file.display());
    }
    Ok(())
}

/// Brings up one entry: already up, recovered after a crash, or started (resumed or new).
fn up_one(file: &Path, e: &Entry, foreground: bool) -> Result<()> {
    // A device whose daemon died or is dying comes first: its record still names a process
    // (killed, not yet gone), which must not pass for a running daemon.
    let recoverable = daemon::recover::recoverable_device_of(&e.metadata);
    if let Some(l) = device_named(&e.name).filter(|l| l.daemon_running && recoverable.is_none()) {
        if foreground {
            bail!(
                "already up as {} (pid {}); not starting a second daemon",
                l.record.device,
                l.record.pid
            );
        }
        println!("{}: already up: {}", e.name, l.record.device);
        return Ok(());
    }
    let mut cfg = match recoverable {
        // Its device waits with the file system on it (the daemon died): recover it.
        Some(id) => daemon::recover::config_for_recover(&id.to_string())?,
        None => e.config(),
    };
    if cfg.name.as_deref() != Some(e.name.as_str()) {
        bail!(
            "the device of metadata {} serves the clone named '{}', not '{}' (change {}:{} \
             or stop that device)",
            e.metadata.display(),
            cfg.name.as_deref().unwrap_or("(none)"),
            e.name,
            file.display(),
            e.line
        );
    }
    cfg.foreground = foreground;
    if foreground {
        return create(&cfg);
    }
    let dev = daemon::spawn(&cfg, &daemon_command_line(&cfg))?;
    println!("{}: {dev}", e.name);
    Ok(())
}

/// `ublk-clone down NAME.../--all`.
pub fn run_down(a: &DownArgs) -> Result<()> {
    let mut failed = 0;
    let names: Vec<String> = if a.all {
        let t = Table::load(&table_path(a.table.as_deref()))?;
        select(&t, &[], true, &mut 0)
            .iter()
            .map(|e| e.name.clone())
            .collect()
    } else {
        a.names.clone()
    };
    for n in &names {
        if device_named(n).is_none() {
            println!("{n}: not up");
            continue;
        }
        match daemon::stop::stop(n, false) {
            Ok(()) => println!("{n}: down"),
            Err(e) => {
                failed += 1;
                eprintln!("ublk-clone: {n}: {}", daemon::chain(&e));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} clone(s) did not go down");
    }
    Ok(())
}

/// Where the packaged template unit lives (the generator's links point at it).
pub const UNIT_DIR: &str = "/usr/lib/systemd/system";

#[derive(Args, Debug)]
pub struct GeneratorArgs {
    /// The generator's output directory (systemd passes three: normal, early, late).
    pub dirs: Vec<PathBuf>,
}

/// `ublk-clone systemd-generator DIR...`: one `ublk-clone@NAME.service` wanted by
/// `ublk-clone.target` per good line of the table. A missing table makes no units.
pub fn run_generator(a: &GeneratorArgs) -> Result<()> {
    let Some(dir) = a.dirs.first() else {
        bail!("systemd-generator: no output directory given");
    };
    let path = table_path(None);
    if !path.exists() {
        return Ok(());
    }
    let t = Table::load(&path)?;
    for e in &t.errors {
        eprintln!("ublk-clone-generator: {e}");
    }
    let wants = dir.join("ublk-clone.target.wants");
    std::fs::create_dir_all(&wants)?;
    // The target itself is wanted by local-fs.target (no `systemctl enable` needed).
    let fs_wants = dir.join("local-fs.target.wants");
    std::fs::create_dir_all(&fs_wants)?;
    let target = fs_wants.join("ublk-clone.target");
    let _ = std::fs::remove_file(&target);
    std::os::unix::fs::symlink(Path::new(UNIT_DIR).join("ublk-clone.target"), &target)?;
    for e in &t.entries {
        let unit = format!("ublk-clone@{}.service", e.name);
        let link = wants.join(&unit);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(Path::new(UNIT_DIR).join("ublk-clone@.service"), &link)?;
    }
    Ok(())
}
