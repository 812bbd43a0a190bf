//! Time to open the metadata of a 1 TiB clone at 4 KiB regions (2^28 regions, ~65 MiB of
//! metadata) from a sparse file. Not a timed test: prints min and median of several runs.
//!
//! Run: `cargo bench --bench metadata_open`.

use std::sync::Arc;
use std::time::{Duration, Instant};
use ublk_clone::io::file::{Access, FileDev};
use ublk_clone::io::BlockDev;
use ublk_clone::metadata::{required_size, Expect, FormatParams, Metadata};

fn main() -> anyhow::Result<()> {
    const TIB: u64 = 1 << 40;
    const REGION: u64 = 4096;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("meta.img");
    let size = required_size(REGION, TIB)?;
    std::fs::File::create(&path)?.set_len(size)?;
    let dev: Arc<dyn BlockDev> = Arc::new(FileDev::open(&path, Access::ReadWrite, false)?);
    let params = FormatParams {
        region_size: REGION,
        source_size: TIB,
        dest_size: TIB,
        source_fingerprint: [0; 32],
        dest_name: "dest".into(),
        uuid: None,
    };
    let t = Instant::now();
    Metadata::format(dev.clone(), &params, false)?;
    println!(
        "format: {} MiB of metadata in {:?}",
        size >> 20,
        t.elapsed()
    );
    let mut times: Vec<Duration> = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let (md, _report) = Metadata::open(dev.clone(), &Expect::default())?;
        times.push(t.elapsed());
        assert_eq!(md.nr_regions(), TIB / REGION);
    }
    let mut ro: Vec<Duration> = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let _ = Metadata::read_only_open(dev.clone())?;
        ro.push(t.elapsed());
    }
    times.sort();
    ro.sort();
    println!(
        "Metadata::open (1 TiB, 4 KiB regions, 2^28 regions): min {:?}, median {:?} over {} runs",
        times[0],
        times[times.len() / 2],
        times.len()
    );
    println!(
        "Metadata::read_only_open: min {:?}, median {:?} over {} runs",
        ro[0],
        ro[ro.len() / 2],
        ro.len()
    );
    Ok(())
}
