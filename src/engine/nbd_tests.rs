//! The engine over an NBD source served by a real server (qemu-nbd; `tools/setup-host.sh`
//! installs it): hole-aware hydration of a sparse export, and a server killed and restarted
//! while hydration runs and users write.

use super::*;
use crate::io::file::{Access, FileDev};
use crate::io::mem::MemDev;
use crate::io::nbd::tests::{unix_uri, Server};
use crate::io::nbd::{NbdDev, NbdOptions};
use crate::metadata::{Expect, FormatParams};
use futures_lite::future::block_on;
use std::time::{Duration, Instant};

const REGION: u64 = 64 << 10;

/// Formats and opens metadata in memory for `source` -> `dest`.
fn metadata(source: &dyn BlockDev, dest: &dyn BlockDev) -> Arc<Metadata> {
    let meta: Arc<dyn BlockDev> = Arc::new(MemDev::new("meta", 1 << 20));
    let params = FormatParams::from_devices(source, dest, REGION).expect("fingerprint");
    Metadata::format(meta.clone(), &params, false).expect("format");
    let expect = Expect::from_devices(source, dest).expect("expect");
    Arc::new(Metadata::open(meta, &expect).expect("open metadata").0)
}

#[test]
fn a_sparse_nbd_export_hydrates_by_reading_only_its_data() {
    const SIZE: u64 = 64 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let (src_path, dst_path) = (dir.path().join("src"), dir.path().join("dst"));
    let data_regions = super::tests::sparse_source(&src_path, SIZE, REGION, 13);
    // A destination full of old data: zeroed regions must really be zeroed.
    std::fs::write(&dst_path, vec![0xaa; SIZE as usize]).expect("destination");
    let sock = dir.path().join("s");
    let _srv = Server::qemu_nbd(&src_path, &sock);
    let opts = NbdOptions {
        timeout: Duration::from_secs(20),
        connections: 4,
    };
    let source = Arc::new(NbdDev::open(&unix_uri(&sock, "img"), opts).expect("open source"));
    assert!(source.reports_zeroes(), "qemu-nbd offers base:allocation");
    let dest: Arc<dyn BlockDev> =
        Arc::new(FileDev::open(&dst_path, Access::ReadWrite, false).expect("open dest"));
    let md = metadata(source.as_ref(), dest.as_ref());
    // What the fingerprint and the metadata's open read is not hydration.
    let before = source.bytes_read();
    let cfg = EngineConfig::new(SIZE, REGION).for_remote_source();
    let engine = match Engine::start(md, source.clone(), dest.clone(), cfg) {
        Ok(e) => e,
        Err(e) => panic!("engine start: {e}"),
    };
    super::tests::hydrate_fully(&engine, Duration::from_secs(60));
    let status = engine.status();
    assert!(engine.shutdown().is_ok());
    let read = source.bytes_read() - before;
    let data_bytes = data_regions.len() as u64 * REGION;
    eprintln!(
        "sparse NBD hydration: {read} bytes read for {data_bytes} bytes of data regions \
         ({before} by the fingerprint), {} zeroed",
        status.bytes_zeroed
    );
    assert_eq!(read, data_bytes, "only the regions holding data are read");
    assert_eq!(status.bytes_zeroed, SIZE - data_bytes);
    let (s, d) = (
        std::fs::read(&src_path).expect("read source"),
        std::fs::read(&dst_path).expect("read dest"),
    );
    assert!(s == d, "the destination differs from the source");
}

#[test]
fn an_nbd_server_killed_mid_hydration_and_restarted_ends_with_source_plus_writes() {
    const SIZE: u64 = 64 << 20;
    let nr = SIZE / REGION;
    let dir = tempfile::tempdir().expect("tempdir");
    let src_path = dir.path().join("src");
    let mut want = tests::pattern(SIZE, 21);
    std::fs::write(&src_path, &want).expect("source");
    let sock = dir.path().join("s");
    let srv = Server::qemu_nbd(&src_path, &sock);
    let opts = NbdOptions {
        timeout: Duration::from_secs(30),
        connections: 4,
    };
    let source = Arc::new(NbdDev::open(&unix_uri(&sock, "img"), opts).expect("open source"));
    let dest = Arc::new(MemDev::new("dest", SIZE));
    let md = metadata(source.as_ref(), dest.as_ref());
    let mut cfg = EngineConfig::new(SIZE, REGION).for_remote_source();
    // Slow enough to be partway when the server is killed (about 4 s for the whole source).
    cfg.knobs.rate_bytes_per_sec = 16 << 20;
    let engine = match Engine::start(md, source.clone(), dest.clone(), cfg) {
        Ok(e) => e,
        Err(e) => panic!("engine start: {e}"),
    };
    let path = Arc::new(SyncPath {
        source: source.clone(),
        dest: dest.clone(),
    });
    let write = |want: &mut Vec<u8>, off: u64, data: &[u8]| {
        assert_eq!(
            block_on(engine.write(path.as_ref(), off, data, false)),
            Ok(())
        );
        want[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    // Writes while the server is up, at the end (the sweep goes from the start): one inside a
    // region (copy-on-write from the source), one over a whole region.
    write(&mut want, (nr - 10) * REGION + 4096, &[0x11; 8192]);
    write(&mut want, (nr - 9) * REGION, &[0x22; REGION as usize]);
    let t = Instant::now();
    while engine.status().hydrated < nr / 10 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{:?}",
            engine.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    srv.kill();
    let t = Instant::now();
    while engine.status().source_disconnected.is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the killed server was never noticed: {:?}",
            engine.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Hydration pauses: once the batches read before the kill are written, the count holds.
    let mut held = (engine.status().hydrated, Instant::now());
    let t = Instant::now();
    while held.1.elapsed() < Duration::from_millis(500) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "hydration never paused"
        );
        let h = engine.status().hydrated;
        if h != held.0 {
            held = (h, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let paused_at = held.0;
    assert!(paused_at < nr - 2, "hydrated before the kill: {paused_at}");
    // Writes while the server is down: a whole unhydrated region and part of a hydrated one
    // need no source, and complete at once.
    let t = Instant::now();
    write(&mut want, (nr - 8) * REGION, &[0x33; REGION as usize]);
    write(&mut want, 4096, &[0x44; 4096]);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "writes that need no source waited {:?}",
        t.elapsed()
    );
    // A copy-on-write into an unhydrated region waits for the source.
    let (cow_off, cow) = ((nr - 5) * REGION + 512, vec![0x55u8; 1024]);
    let writer = {
        let (engine, path, cow) = (engine.clone(), path.clone(), cow.clone());
        std::thread::spawn(move || block_on(engine.write(path.as_ref(), cow_off, &cow, false)))
    };
    // The count holds for a further window with the server down (the whole region written
    // counts as hydrated, like any region whose data the destination holds).
    let held = paused_at + 1;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        let s = engine.status();
        assert_eq!(s.hydrated, held, "hydrated with the server down");
        assert!(s.source_disconnected.is_some(), "{s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !writer.is_finished(),
        "a copy-on-write completed without its source"
    );
    let _srv = Server::qemu_nbd(&src_path, &sock);
    assert_eq!(writer.join().expect("writer"), Ok(()));
    want[cow_off as usize..cow_off as usize + cow.len()].copy_from_slice(&cow);
    super::tests::hydrate_fully(&engine, Duration::from_secs(60));
    let status = engine.status();
    assert!(engine.shutdown().is_ok());
    eprintln!("hydration paused at {paused_at} of {nr} regions; resumed and completed: {status:?}");
    assert!(status.failed_regions.is_empty(), "{status:?}");
    assert_eq!(status.source_disconnected, None);
    assert!(
        dest.snapshot() == want,
        "the destination is not the source plus the writes"
    );
}
