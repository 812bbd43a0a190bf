//! The NBD client against real servers (qemu-nbd, nbdkit; `tools/setup-host.sh` installs
//! them): a missing server program fails the test, it never skips.

use super::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// A server process, killed when dropped.
pub(crate) struct Server {
    child: Child,
}

impl Server {
    fn spawn(cmd: &mut Command, socket: &Path) -> Server {
        let _ = std::fs::remove_file(socket);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run {cmd:?} (tools/setup-host.sh installs it): {e}")
        });
        let s = Server { child };
        // Ready once it accepts a connection (the socket file exists from bind, before listen).
        let t = Instant::now();
        while UnixStream::connect(socket).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{cmd:?} never listened on {socket:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    /// qemu-nbd serving `file` (raw, read-only, 8 clients, persistent) on `socket`.
    pub(crate) fn qemu_nbd(file: &Path, socket: &Path) -> Server {
        Server::spawn(
            Command::new("qemu-nbd")
                .args(["-r", "-t", "-e", "8", "-f", "raw", "-x", "img", "-k"])
                .arg(socket)
                .arg(file),
            socket,
        )
    }

    /// nbdkit in the foreground on `socket` with `args` (plugin, filters, parameters).
    pub(crate) fn nbdkit(socket: &Path, args: &[&str]) -> Server {
        Server::spawn(
            Command::new("nbdkit")
                .args(["-f", "-r", "--exit-with-parent", "-U"])
                .arg(socket)
                .args(args),
            socket,
        )
    }

    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// A file of `size` bytes with data (a byte pattern) in the given 64 KiB blocks only; the
/// rest is holes.
pub(crate) fn sparse_file(
    dir: &Path,
    name: &str,
    size: u64,
    data_blocks: &[u64],
    seed: u8,
) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create");
    f.set_len(size).expect("size");
    for &b in data_blocks {
        let block: Vec<u8> = (0..65536u32)
            .map(|i| {
                (i as u8)
                    .wrapping_mul(31)
                    .wrapping_add(seed)
                    .wrapping_add(b as u8)
                    | 1
            })
            .collect();
        f.write_all_at(&block, b * 65536).expect("write");
    }
    f.sync_all().expect("sync");
    p
}

fn opts(timeout_ms: u64) -> NbdOptions {
    NbdOptions {
        timeout: Duration::from_millis(timeout_ms),
        connections: 4,
    }
}

fn read_all(dev: &NbdDev) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    for (i, c) in v.chunks_mut(1 << 20).enumerate() {
        dev.read_at(c, (i << 20) as u64).expect("read");
    }
    v
}

#[test]
fn reads_from_qemu_nbd_match_the_file_on_several_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = sparse_file(dir.path(), "img", 8 << 20, &[0, 3, 64, 127], 1);
    let sock = dir.path().join("s");
    let _srv = Server::qemu_nbd(&f, &sock);
    let dev = NbdDev::open(&unix_uri(&sock, "img"), opts(10_000)).expect("open");
    assert_eq!(dev.size(), 8 << 20);
    assert!(dev.multi_conn(), "qemu-nbd -r advertises CAN_MULTI_CONN");
    assert!(dev.reports_zeroes(), "qemu-nbd offers base:allocation");
    assert_eq!(read_all(&dev), std::fs::read(&f).expect("read file"));
    // Unaligned to the chunking, across a data block's edge.
    let mut b = vec![0u8; 70_000];
    dev.read_at(&mut b, 3 * 65536 - 4096).expect("read");
    assert_eq!(
        b[..],
        std::fs::read(&f).expect("file")[3 * 65536 - 4096..][..70_000]
    );
    // Several threads at once: the extra connections come up and carry requests.
    let t = Instant::now();
    while dev.connections() < 4 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "only {} connections",
            dev.connections()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let dev = Arc::new(dev);
    let want = Arc::new(std::fs::read(&f).expect("file"));
    let hs: Vec<_> = (0..8u64)
        .map(|k| {
            let (d, w) = (dev.clone(), want.clone());
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let off = ((k * 64 + i) * 12_288) % ((8 << 20) - 65536);
                    let mut b = vec![0u8; 65536];
                    d.read_at(&mut b, off).expect("read");
                    assert_eq!(b[..], w[off as usize..off as usize + 65536]);
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("reader");
    }
    assert!(
        dev.write_at(&[0; 512], 0).is_err(),
        "the source is read-only"
    );
    assert!(
        dev.read_at(&mut [0; 512], 8 << 20).is_err(),
        "beyond the end"
    );
}

#[test]
fn block_status_reports_the_zero_ranges_of_a_sparse_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = sparse_file(dir.path(), "img", 4 << 20, &[1, 2, 40], 2);
    let sock = dir.path().join("s");
    let _srv = Server::qemu_nbd(&f, &sock);
    let dev = NbdDev::open(&unix_uri(&sock, "img"), opts(10_000)).expect("open");
    let z = dev.zero_ranges(0, 4 << 20).expect("block status");
    let k = 65536;
    assert_eq!(
        z,
        vec![(0, k), (3 * k, 37 * k), (41 * k, (4 << 20) - 41 * k)]
    );
    // A window inside: clipped to it.
    assert_eq!(
        dev.zero_ranges(k + 512, 3 * k).expect("bs"),
        vec![(3 * k, k + 512)]
    );
}

#[test]
fn nbdkit_without_structured_replies_and_with_them_reads_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s");
    // sparse-random: 10% of 16 MiB holds random data, the rest reads as zeroes.
    let args = ["sparse-random", "16M", "percent=10", "seed=7"];
    let srv = Server::nbdkit(&sock, &args);
    let dev = NbdDev::open(&unix_uri(&sock, ""), opts(10_000)).expect("open");
    let with_sr = read_all(&dev);
    let zeroes = dev.zero_ranges(0, 16 << 20).expect("bs");
    let zero_bytes: u64 = zeroes.iter().map(|z| z.1).sum();
    assert!(zero_bytes > 8 << 20, "mostly zero: {zero_bytes}");
    for (off, len) in zeroes {
        assert!(with_sr[off as usize..(off + len) as usize]
            .iter()
            .all(|&b| b == 0));
    }
    drop(dev);
    srv.kill();
    let mut no_sr = vec!["--no-sr"];
    no_sr.extend(args);
    let _srv = Server::nbdkit(&sock, &no_sr);
    let dev = NbdDev::open(&unix_uri(&sock, ""), opts(10_000)).expect("open");
    assert!(
        !dev.reports_zeroes(),
        "no base:allocation without structured replies"
    );
    assert_eq!(dev.zero_ranges(0, 16 << 20).expect("bs"), vec![]);
    assert!(read_all(&dev) == with_sr, "simple replies read other data");
}

#[test]
fn a_server_error_fails_that_read_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s");
    let trigger = dir.path().join("fail-now");
    let file_arg = format!("error-pread-file={}", trigger.display());
    let _srv = Server::nbdkit(
        &sock,
        &[
            "--filter=error",
            "pattern",
            "1M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            &file_arg,
        ],
    );
    let dev = NbdDev::open(&unix_uri(&sock, ""), opts(5_000)).expect("open");
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, 8192).expect("read before errors");
    assert_eq!(
        &b[..8],
        &8192u64.to_be_bytes(),
        "the pattern plugin's content"
    );
    std::fs::write(&trigger, b"").expect("trigger");
    let e = dev
        .read_at(&mut b, 0)
        .expect_err("an error from the server");
    assert!(
        e.raw_os_error() == Some(libc::EIO) || e.to_string().contains("Input/output error"),
        "{e}"
    );
    assert_eq!(dev.link_down(), None, "an error answer is not a lost link");
    std::fs::remove_file(&trigger).expect("untrigger");
    dev.read_at(&mut b, 4096).expect("reads work again");
}

#[test]
fn a_restarted_server_is_reconnected_and_waiting_reads_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = sparse_file(dir.path(), "img", 4 << 20, &[0, 5, 9], 3);
    let sock = dir.path().join("s");
    let srv = Server::qemu_nbd(&f, &sock);
    let dev = Arc::new(NbdDev::open(&unix_uri(&sock, "img"), opts(20_000)).expect("open"));
    let want = std::fs::read(&f).expect("file");
    assert_eq!(read_all(&dev), want);
    srv.kill();
    // A read sent now waits for the server to come back.
    let d = dev.clone();
    let reader = std::thread::spawn(move || {
        let mut b = vec![0u8; 65536];
        d.read_at(&mut b, 5 * 65536).map(|()| b)
    });
    let t = Instant::now();
    while dev.link_down().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the lost server was never noticed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let down = dev.link_down().expect("down");
    assert!(down.since <= SystemTime::now());
    let _srv = Server::qemu_nbd(&f, &sock);
    let got = reader
        .join()
        .expect("reader")
        .expect("the waiting read failed");
    assert_eq!(got[..], want[5 * 65536..6 * 65536]);
    assert_eq!(read_all(&dev), want);
    assert_eq!(dev.link_down(), None);
}

#[test]
fn a_server_that_never_comes_back_fails_reads_after_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = sparse_file(dir.path(), "img", 1 << 20, &[0], 4);
    let sock = dir.path().join("s");
    let srv = Server::qemu_nbd(&f, &sock);
    let dev = NbdDev::open(&unix_uri(&sock, "img"), opts(1_500)).expect("open");
    srv.kill();
    let t = Instant::now();
    let e = dev.read_at(&mut [0u8; 4096], 0).expect_err("no server");
    let took = t.elapsed();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(
        took >= Duration::from_millis(1_400),
        "gave up after {took:?}"
    );
    assert!(took < Duration::from_secs(10), "hung for {took:?}");
    assert!(dev.link_down().is_some());
}

#[test]
fn a_different_image_behind_the_same_uri_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = sparse_file(dir.path(), "a", 2 << 20, &[0, 7], 5);
    let b = sparse_file(dir.path(), "b", 2 << 20, &[0, 7], 6);
    let short = sparse_file(dir.path(), "c", 1 << 20, &[0, 7], 5);
    let sock = dir.path().join("s");
    let srv = Server::qemu_nbd(&a, &sock);
    let dev = NbdDev::open(&unix_uri(&sock, "img"), opts(1_500)).expect("open");
    dev.read_at(&mut [0u8; 4096], 0).expect("read");
    srv.kill();
    for (other, says) in [(&b, "content differs"), (&short, "bytes, not")] {
        let srv2 = Server::qemu_nbd(other, &sock);
        let e = dev
            .read_at(&mut [0u8; 4096], 0)
            .expect_err("served from another image");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // The reconnecting thread's next attempt (its backoff may be longer than a read's
        // timeout) meets this server.
        let t = Instant::now();
        loop {
            let down = dev.link_down().expect("a refused link is down");
            if down.reason.contains(says) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(15), "{}", down.reason);
            std::thread::sleep(Duration::from_millis(20));
        }
        srv2.kill();
    }
    // The right image again: accepted.
    let _srv = Server::qemu_nbd(&a, &sock);
    let mut buf = vec![0u8; 65536];
    let t = Instant::now();
    loop {
        match dev.read_at(&mut buf, 7 * 65536) {
            Ok(()) => break,
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(15),
                "never reconnected: {e}"
            ),
        }
    }
    assert_eq!(buf[..], std::fs::read(&a).expect("a")[7 * 65536..8 * 65536]);
}

#[test]
fn a_silent_server_fails_reads_after_the_timeout_and_is_used_again_once_it_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = sparse_file(dir.path(), "img", 1 << 20, &[0, 3], 8);
    let sock = dir.path().join("s");
    let srv = Server::qemu_nbd(&f, &sock);
    let dev = NbdDev::open(&unix_uri(&sock, "img"), opts(1_500)).expect("open");
    let t = Instant::now();
    while dev.connections() < 4 {
        assert!(t.elapsed() < Duration::from_secs(10), "connections");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = srv.child.id() as i32;
    // SAFETY: signals to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let t = Instant::now();
    let e = dev
        .read_at(&mut [0u8; 4096], 0)
        .expect_err("a stopped server answered");
    let took = t.elapsed();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(took < Duration::from_secs(10), "hung for {took:?}");
    // The connection that stayed silent for the whole timeout is closed; the others, with
    // nothing unanswered, are kept.
    let t = Instant::now();
    while dev.connections() != 3 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{} connections",
            dev.connections()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let want = std::fs::read(&f).expect("file");
    let mut b = vec![0u8; 65536];
    let t = Instant::now();
    loop {
        match dev.read_at(&mut b, 3 * 65536) {
            Ok(()) => break,
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(20),
                "never answered again: {e}"
            ),
        }
    }
    assert_eq!(b[..], want[3 * 65536..4 * 65536]);
    drop(srv);
}

#[test]
fn a_read_whose_deadline_has_passed_fails_without_closing_a_healthy_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = sparse_file(dir.path(), "img", 1 << 20, &[0, 2], 9);
    let sock = dir.path().join("s");
    let _srv = Server::qemu_nbd(&f, &sock);
    let dev = NbdDev::open(&unix_uri(&sock, "img"), opts(10_000)).expect("open");
    let t = Instant::now();
    while dev.connections() < 4 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "only {} connections",
            dev.connections()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A queue read that waited its whole timeout for a reader thread arrives expired.
    let e = dev
        .read_until(&mut [0u8; 4096], 0, Instant::now())
        .expect_err("a read past its deadline");
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    // No connection was closed for it: a closed one would be gone from the count within a
    // moment (nothing here reads, so nothing would replace it).
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(500) {
        assert_eq!(dev.connections(), 4, "a healthy connection was closed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut b = vec![0u8; 65536];
    dev.read_at(&mut b, 2 * 65536).expect("read");
    assert_eq!(
        b[..],
        std::fs::read(&f).expect("file")[2 * 65536..3 * 65536]
    );
    assert_eq!(dev.connections(), 4);
}

#[test]
fn a_server_without_multi_conn_gets_one_connection_shared_by_concurrent_readers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = sparse_file(dir.path(), "img", 8 << 20, &[0, 1, 17, 64, 100, 127], 10);
    let sock = dir.path().join("s");
    let log = dir.path().join("log");
    let file_arg = format!("file={}", f.display());
    let log_arg = format!("logfile={}", log.display());
    // The log filter records each connection the server accepts.
    let _srv = Server::nbdkit(
        &sock,
        &[
            "--filter=multi-conn",
            "--filter=log",
            "file",
            &file_arg,
            "multi-conn-mode=disable",
            &log_arg,
        ],
    );
    let dev = Arc::new(NbdDev::open(&unix_uri(&sock, ""), opts(10_000)).expect("open"));
    assert!(!dev.multi_conn(), "multi-conn-mode=disable advertises it");
    let want = Arc::new(std::fs::read(&f).expect("file"));
    let hs: Vec<_> = (0..8u64)
        .map(|k| {
            let (d, w) = (dev.clone(), want.clone());
            std::thread::spawn(move || {
                let mut most = 0;
                for i in 0..64u64 {
                    let off = ((k * 64 + i) * 12_288 + k * 512) % ((8 << 20) - 200_000);
                    let mut b = vec![0u8; 4096 + (i as usize % 5) * 40_000];
                    d.read_at(&mut b, off).expect("read");
                    assert_eq!(b[..], w[off as usize..off as usize + b.len()]);
                    most = most.max(d.connections());
                }
                most
            })
        })
        .collect();
    for h in hs {
        let most = h.join().expect("reader");
        assert_eq!(most, 1, "connections seen by a reader");
    }
    assert_eq!(dev.connections(), 1);
    drop(dev);
    // Server side: exactly one connection was ever made.
    let text = std::fs::read_to_string(&log).expect("the log filter's file");
    let connects = text.lines().filter(|l| l.contains("Connect")).count();
    assert_eq!(connects, 1, "the server saw:\n{text}");
}

#[test]
fn reads_respect_the_servers_block_size_constraints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = sparse_file(dir.path(), "img", 8 << 20, &[0, 1, 2, 30, 31, 90, 127], 11);
    let want = std::fs::read(&f).expect("file");
    let sock = dir.path().join("s");
    let file_arg = format!("file={}", f.display());
    for max in ["1M", "256K"] {
        let max_arg = format!("blocksize-maximum={max}");
        // A request that breaks the constraints fails with EINVAL instead of being served.
        let srv = Server::nbdkit(
            &sock,
            &[
                "--filter=blocksize-policy",
                "file",
                &file_arg,
                "blocksize-minimum=4096",
                "blocksize-preferred=65536",
                &max_arg,
                "blocksize-error-policy=error",
            ],
        );
        let dev = NbdDev::open(&unix_uri(&sock, ""), opts(10_000)).expect("open");
        assert_eq!(dev.block_sizes().logical, 4096, "the server's minimum");
        // Aligned, larger than the maximum: split.
        assert!(read_all(&dev) == want, "max {max}: aligned reads differ");
        let mut b = vec![0u8; 3 << 20];
        dev.read_at(&mut b, 1 << 20).expect("a 3 MiB read");
        assert!(b[..] == want[1 << 20..4 << 20]);
        // Unaligned offsets and lengths, small and large, and up to the very end.
        for (off, len) in [
            (100u64, 5000usize),
            (4095, 2),
            (65536 - 700, 1400),
            (777, (3 << 20) + 12_345),
            ((8 << 20) - 5000, 5000),
            ((8 << 20) - 1, 1),
        ] {
            let mut b = vec![0u8; len];
            dev.read_at(&mut b, off)
                .unwrap_or_else(|e| panic!("max {max}: read {len} at {off}: {e}"));
            assert!(
                b[..] == want[off as usize..off as usize + len],
                "max {max}: read {len} at {off} differs"
            );
        }
        // Block status at unaligned edges: clipped to the window asked for.
        let k = 65536;
        assert_eq!(
            dev.zero_ranges(2 * k + 1000, 30 * k).expect("block status"),
            vec![(3 * k, 27 * k), (32 * k, 1000)]
        );
        drop(dev);
        srv.kill();
    }
}

#[test]
fn only_a_shutting_down_server_counts_as_away() {
    use super::wire::nbd_error;
    use std::io::ErrorKind;
    // Numbers outside the protocol's (ETIMEDOUT, ENOTCONN) are EINVAL: the data's fault.
    for code in [libc::ETIMEDOUT, libc::ENOTCONN, 9999] {
        let e = nbd_error(code as u32, "");
        assert!(
            !matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::NotConnected),
            "{code}: {e}"
        );
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{code}");
    }
    assert_eq!(
        nbd_error(libc::EIO as u32, "").raw_os_error(),
        Some(libc::EIO)
    );
    assert_eq!(
        nbd_error(libc::ESHUTDOWN as u32, "bye").kind(),
        ErrorKind::NotConnected
    );
}
