//! Test-only pause points, so that the VM suite can kill the daemon exactly inside a commit,
//! a copy-on-write or a FLUSH (issue 11).
//!
//! `UBLK_CLONE_TEST_PAUSE=POINT:FILE` in the daemon's environment makes the first thread that
//! reaches `POINT` write its process ID to `FILE` and then wait forever, still holding what it
//! holds there (region locks, a commit, a request), until the process is killed. Every later
//! arrival at the point, and every other point, goes on. Without the variable a point costs
//! one load of an initialised cell.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Where a pause can be asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// The commit thread, after the destination flush and the shadow writes, before the
    /// superblock that commits them.
    Commit,
    /// A write into an unhydrated region, after the region's data (source copy and the
    /// write) reached the destination, before its bit is set and the write acknowledged.
    CopyOnWrite,
    /// A FLUSH request, as it arrives.
    Flush,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::Commit => "commit",
            Point::CopyOnWrite => "cow",
            Point::Flush => "flush",
        }
    }
}

const ENV: &str = "UBLK_CLONE_TEST_PAUSE";

/// The requested point and its file, read once.
fn requested() -> Option<&'static (String, String)> {
    static REQ: OnceLock<Option<(String, String)>> = OnceLock::new();
    REQ.get_or_init(|| {
        let v = std::env::var(ENV).ok()?;
        let (point, file) = v.split_once(':')?;
        log::warn!("{ENV}={v}: a test pause point is armed");
        Some((point.to_string(), file.to_string()))
    })
    .as_ref()
}

/// Pauses here forever if this is the requested point and no thread paused yet.
pub fn point(p: Point) {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let Some((want, file)) = requested() else {
        return;
    };
    if want != p.name() || TAKEN.swap(true, Ordering::AcqRel) {
        return;
    }
    log::warn!("test pause point {want} reached; waiting to be killed");
    if let Err(e) = std::fs::write(file, std::process::id().to_string()) {
        log::error!("test pause point {want}: cannot write {file}: {e}");
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
