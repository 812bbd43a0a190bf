//! The source fingerprint: a cheap, stable identity of a source device, recorded at format
//! time and compared on every open so a different or rewritten source attached by mistake
//! is refused. Invariant: the fingerprint depends only on the device's size and contents.

use crate::io::BlockDev;
use std::io;

/// Blocks sampled by [`source_fingerprint`].
pub const FINGERPRINT_SAMPLES: u64 = 64;
/// Size of each fingerprint sample.
pub const FINGERPRINT_SAMPLE_SIZE: u64 = 4096;

/// A cheap, stable identity of a source device: 8 little-endian crc32c lanes over the
/// device size and 64 samples of 4 KiB spread evenly over the device (sample `k` feeds
/// lane `k % 8`, each sample prefixed by its offset). It detects a different or rewritten
/// source attached by mistake; it is not a cryptographic hash.
pub fn source_fingerprint(dev: &dyn BlockDev) -> io::Result<[u8; 32]> {
    let size = dev.size();
    let mut lanes = [0u32; 8];
    for lane in lanes.iter_mut() {
        *lane = crc32c::crc32c(&size.to_le_bytes());
    }
    let sample = FINGERPRINT_SAMPLE_SIZE.min(size);
    let mut buf = vec![0u8; sample as usize];
    let span = size - sample;
    for k in 0..FINGERPRINT_SAMPLES {
        let offset = if FINGERPRINT_SAMPLES > 1 {
            ((span as u128 * k as u128 / (FINGERPRINT_SAMPLES - 1) as u128) as u64)
                / FINGERPRINT_SAMPLE_SIZE
                * FINGERPRINT_SAMPLE_SIZE
        } else {
            0
        };
        dev.read_at(&mut buf, offset)?;
        let lane = &mut lanes[(k % 8) as usize];
        *lane = crc32c::crc32c_append(*lane, &offset.to_le_bytes());
        *lane = crc32c::crc32c_append(*lane, &buf);
    }
    let mut out = [0u8; 32];
    for (i, l) in lanes.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&l.to_le_bytes());
    }
    Ok(out)
}

/// Lower-case hex of a fingerprint, for messages and JSON.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
