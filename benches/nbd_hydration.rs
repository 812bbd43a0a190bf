//! Hydration from an NBD source (issue 12), in one run, rounds interleaved:
//! - against `nbdcopy` (libnbd's copier, the physical limit here) copying the same qemu-nbd
//!   export to the same kind of destination file: target >= 0.9x;
//! - a source with 10% of its space allocated against the same size fully allocated, both
//!   behind qemu-nbd (hole-aware hydration: the zero extents are zeroed, not read): target
//!   hydration time <= 0.15x.
//!
//! Not a timed test: prints each run, the medians and the ratios.
//! `cargo bench --bench nbd_hydration [-- SIZE_MIB [ROUNDS]]` (defaults: 512 MiB, 3 rounds).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_clone::engine::EngineConfig;
use ublk_clone::io::nbd::{NbdDev, NbdOptions};

mod common;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(file: &Path, sock: &Path) -> anyhow::Result<Server> {
    let _ = std::fs::remove_file(sock);
    let child = Command::new("qemu-nbd")
        .args(["-r", "-t", "-e", "16", "-f", "raw", "-x", "img", "-k"])
        .arg(sock)
        .arg(file)
        .spawn()?;
    let s = Server(child);
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(20),
            "qemu-nbd never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(s)
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///img?socket={}", sock.display())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mib: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(512);
    let rounds: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    let full = dir.path().join("full");
    let sparse = dir.path().join("sparse");
    make_source(&full, mib, 1)?;
    make_source(&sparse, mib, 10)?;
    let _ = Command::new("sync").status();
    let (sf, ss) = (dir.path().join("full.sock"), dir.path().join("sparse.sock"));
    let _full_srv = serve(&full, &sf)?;
    let _sparse_srv = serve(&sparse, &ss)?;
    let (mut copy_t, mut full_t, mut sparse_t) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let t = time_nbdcopy(&uri(&sf), &dir.path().join("copy-dest"), mib)?;
        println!(
            "round {round}: nbdcopy (full) {:.2} s ({:.0} MiB/s)",
            t.as_secs_f64(),
            mib as f64 / t.as_secs_f64()
        );
        copy_t.push(t);
        let (t, read) = time_hydration(&uri(&sf), dir.path())?;
        println!(
            "round {round}: ublk-clone hydration (full) {:.2} s ({:.0} MiB/s, {} MiB read from the source)",
            t.as_secs_f64(),
            mib as f64 / t.as_secs_f64(),
            read >> 20
        );
        full_t.push(t);
        let (t, read) = time_hydration(&uri(&ss), dir.path())?;
        println!(
            "round {round}: ublk-clone hydration (10% allocated) {:.2} s ({} MiB read from the source)",
            t.as_secs_f64(),
            read >> 20
        );
        sparse_t.push(t);
    }
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64()
    };
    let (c, f, s) = (med(&mut copy_t), med(&mut full_t), med(&mut sparse_t));
    println!(
        "median: nbdcopy {:.0} MiB/s, hydration from NBD {:.0} MiB/s: ratio hydration/nbdcopy = {:.2}x (target >= 0.9x)",
        mib as f64 / c,
        mib as f64 / f,
        c / f
    );
    println!(
        "median: 10% allocated {s:.2} s, fully allocated {f:.2} s: ratio = {:.3}x (target <= 0.15x)",
        s / f
    );
    Ok(())
}

/// A source of `mib` MiB: random data in every `every`-th MiB, holes elsewhere.
fn make_source(path: &PathBuf, mib: u64, every: u64) -> anyhow::Result<()> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(mib << 20)?;
    let mut rnd = std::fs::File::open("/dev/urandom")?;
    let mut buf = vec![0u8; 1 << 20];
    for m in (0..mib).step_by(every as usize) {
        rnd.read_exact(&mut buf)?;
        f.write_all_at(&buf, m << 20)?;
    }
    f.sync_all()?;
    Ok(())
}

fn time_nbdcopy(src: &str, dst: &Path, mib: u64) -> anyhow::Result<Duration> {
    let _ = std::fs::remove_file(dst);
    std::fs::File::create(dst)?.set_len(mib << 20)?;
    let t0 = Instant::now();
    let status = Command::new("nbdcopy")
        .args(["--flush", src])
        .arg(dst)
        .status()?;
    anyhow::ensure!(status.success(), "nbdcopy failed");
    let t = t0.elapsed();
    std::fs::remove_file(dst)?;
    Ok(t)
}

/// Hydrates a fresh clone of `src` (to its final commit); the time and the bytes read.
fn time_hydration(src: &str, dir: &Path) -> anyhow::Result<(Duration, u64)> {
    let nbd = Arc::new(NbdDev::open(src, NbdOptions::default())?);
    // The daemon's configuration for a remote source.
    let t = common::time_hydration(nbd.clone(), dir, EngineConfig::for_remote_source)?;
    Ok((t, nbd.bytes_read()))
}
