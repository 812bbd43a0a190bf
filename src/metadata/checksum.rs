//! Block checksums and little-endian field access shared by every on-disk structure.
//!
//! Owns the checksum rule: every 4096-byte metadata block stores at offset 0 the standard
//! crc32c (Castagnoli; init `0xFFFF_FFFF`, final XOR `0xFFFF_FFFF`) of bytes `[4, 4096)`,
//! XORed with a salt that depends on the block type, so that a block of one type can never
//! validate as another. Invariant: `stamp` then `verify` with the same salt always succeeds.

/// Size of every metadata block.
pub const BLOCK_SIZE: usize = 4096;
/// Salt of superblocks: ASCII "SBuc" read as a little-endian u32.
pub const SUPERBLOCK_CSUM_XOR: u32 = u32::from_le_bytes(*b"SBuc");
/// Salt of bitmap blocks: ASCII "BMuc" read as a little-endian u32.
pub const BITMAP_CSUM_XOR: u32 = u32::from_le_bytes(*b"BMuc");

/// The checksum `block` should carry for a block type with `salt`.
pub fn block_checksum(block: &[u8], salt: u32) -> u32 {
    crc32c::crc32c(&block[4..]) ^ salt
}

/// The checksum stored in `block`.
pub fn stored_checksum(block: &[u8]) -> u32 {
    get_u32(block, 0)
}

/// Computes and stores the checksum of `block`.
pub fn stamp(block: &mut [u8], salt: u32) {
    let c = block_checksum(block, salt);
    put_u32(block, 0, c);
}

/// `Ok` when the stored checksum matches; otherwise `(stored, computed)`.
pub fn verify(block: &[u8], salt: u32) -> Result<(), (u32, u32)> {
    let stored = stored_checksum(block);
    let computed = block_checksum(block, salt);
    if stored == computed {
        Ok(())
    } else {
        Err((stored, computed))
    }
}

pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn get_array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}

pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_then_verify_and_salts_differ() {
        let mut b = vec![7u8; BLOCK_SIZE];
        stamp(&mut b, SUPERBLOCK_CSUM_XOR);
        assert!(verify(&b, SUPERBLOCK_CSUM_XOR).is_ok());
        assert!(verify(&b, BITMAP_CSUM_XOR).is_err());
        b[100] ^= 1;
        assert!(verify(&b, SUPERBLOCK_CSUM_XOR).is_err());
    }

    #[test]
    fn crc32c_is_the_standard_castagnoli() {
        // RFC 3720 test vector: 32 bytes of zeroes.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8A91_36AA);
    }
}
