//! Test vectors in `metadata-format/vectors/`: regenerated deterministically here, compared
//! with the committed files, decoded, checked field by field and re-encoded byte for byte.
//!
//! Regenerate with `UBLK_CLONE_WRITE_VECTORS=1 cargo test --lib metadata::vectors`.

use super::bitmap::{self, BitmapBlock};
use super::checksum::BLOCK_SIZE;
use super::superblock::Superblock;
use super::*;
use crate::io::mem::MemDev;
use std::path::PathBuf;

const NR_REGIONS: u64 = 40_000;
const UUID: u128 = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
const HYDRATED: [(u64, u64); 4] = [(0, 1), (100, 64), (32_383, 2), (39_999, 1)];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("metadata-format/vectors")
}

/// The tiny device: format, open, two commits, a mode change, clean close.
fn tiny_device() -> Result<Vec<u8>> {
    let dev = Arc::new(MemDev::new(
        "tiny",
        required_blocks(NR_REGIONS) * BLOCK_SIZE as u64,
    ));
    let params = FormatParams {
        region_size: 4096,
        source_size: NR_REGIONS * 4096,
        dest_size: NR_REGIONS * 4096 + 8192,
        source_fingerprint: std::array::from_fn(|i| i as u8),
        dest_name: "dest".into(),
        uuid: Some(Uuid::from_u128(UUID)),
    };
    Metadata::format(dev.clone(), &params, false)?;
    let (md, _) = Metadata::open(dev.clone(), &Expect::default())?;
    let dest = MemDev::new("dest", 4096);
    md.set_range_hydrated(HYDRATED[0].0, HYDRATED[0].1)?;
    md.set_range_hydrated(HYDRATED[1].0, HYDRATED[1].1)?;
    md.commit(&dest)?;
    md.set_range_hydrated(HYDRATED[2].0, HYDRATED[2].1)?;
    md.set_range_hydrated(HYDRATED[3].0, HYDRATED[3].1)?;
    md.commit(&dest)?;
    md.persist_mode(MetadataMode::ReadOnly, "example reason")?;
    md.close_clean()?;
    Ok(dev.snapshot())
}

fn files() -> Result<Vec<(&'static str, Vec<u8>)>> {
    let img = tiny_device()?;
    // Generation 6 is live (format 1, open 2, commits 3 and 4, mode 5, close 6): slot 0.
    let sb = img[..BLOCK_SIZE].to_vec();
    let bm = bitmap::slot_blocknr(0, 0) as usize * BLOCK_SIZE;
    Ok(vec![
        ("superblock.bin", sb),
        ("bitmap-block.bin", img[bm..bm + BLOCK_SIZE].to_vec()),
        ("tiny-device.bin", img),
    ])
}

#[test]
fn vectors_are_reproducible_and_committed() -> std::result::Result<(), Box<dyn std::error::Error>> {
    for (name, bytes) in files()? {
        let path = dir().join(name);
        if std::env::var_os("UBLK_CLONE_WRITE_VECTORS").is_some() {
            std::fs::create_dir_all(dir())?;
            std::fs::write(&path, &bytes)?;
        }
        let on_disk = std::fs::read(&path)?;
        assert!(
            on_disk == bytes,
            "{name} differs from what the code generates"
        );
    }
    Ok(())
}

#[test]
fn vectors_decode_and_reencode_byte_for_byte() -> std::result::Result<(), Box<dyn std::error::Error>>
{
    let sb_bytes = std::fs::read(dir().join("superblock.bin"))?;
    let sb = superblock::validate(&sb_bytes, 0).map_err(|e| e.to_string())?;
    assert_eq!(sb.pack(), sb_bytes);
    assert_eq!(sb.generation, 6);
    assert_eq!(sb.uuid, Uuid::from_u128(UUID));
    assert_eq!((sb.region_size, sb.nr_regions), (4096, NR_REGIONS));
    assert_eq!(
        (sb.source_size, sb.dest_size),
        (NR_REGIONS * 4096, NR_REGIONS * 4096 + 8192)
    );
    assert_eq!(sb.source_fingerprint, std::array::from_fn(|i| i as u8));
    assert_eq!(
        (sb.nr_bitmap_blocks, sb.metadata_blocks, sb.bitmap_start),
        (2, 6, 2)
    );
    assert_eq!(sb.hydrated, 68);
    assert!(sb.is_clean());
    assert_eq!(sb.mode, MetadataMode::ReadOnly);
    assert_eq!(sb.mode_reason, "example reason");

    let bm_bytes = std::fs::read(dir().join("bitmap-block.bin"))?;
    let h = bitmap::validate(&bm_bytes, 0, 0, &sb.uuid).map_err(|e| e.to_string())?;
    let bm = BitmapBlock::unpack(&bm_bytes);
    assert_eq!(bm.pack(), bm_bytes);
    assert_eq!((h.blocknr, h.index, h.generation), (2, 0, 4));
    assert_eq!(bm.words[0], 1);
    assert_eq!((bm.words[1], bm.words[2]), (!0 << 36, (1 << 36) - 1));
    assert_eq!(bm.words[505], 1 << 63);

    let img = std::fs::read(dir().join("tiny-device.bin"))?;
    for (slot, b) in img[..2 * BLOCK_SIZE].chunks(BLOCK_SIZE).enumerate() {
        let s = superblock::validate(b, slot as u64).map_err(|e| e.to_string())?;
        assert_eq!(s.pack(), b);
    }
    for index in 0..2u64 {
        for slot in 0..2u8 {
            let off = bitmap::slot_blocknr(index, slot) as usize * BLOCK_SIZE;
            let b = &img[off..off + BLOCK_SIZE];
            bitmap::validate(b, index, slot, &sb.uuid).map_err(|e| e.to_string())?;
            assert_eq!(BitmapBlock::unpack(b).pack(), b);
        }
    }
    let dev = Arc::new(MemDev::from_image("tiny", img));
    assert!(check(&*dev).is_healthy());
    let d = dump(dev)?;
    let expect: Vec<[u64; 2]> = vec![[0, 1], [100, 164], [32_383, 32_385], [39_999, 40_000]];
    assert_eq!(d.hydrated_ranges, expect);
    let _: &Superblock = &sb;
    Ok(())
}
