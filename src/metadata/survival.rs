//! The survival copy of the in-core bitmap: region bits that outlive the daemon process.
//!
//! A daemon death is not a power loss. The file system above the clone keeps running and never
//! writes again what it was told is written. The committed bitmap covers power loss: a region
//! becomes hydrated on disk only once a destination flush has made its data durable. But bits
//! set since the last commit live only in the daemon's memory. If the daemon dies and comes back
//! with the committed bitmap alone, a region hydrated since then (by a copy-on-write, a
//! whole-region write, a discard or WRITE_ZEROES, or by background hydration followed by a user
//! write) reads from the source again, and an acknowledged write disappears under a live file
//! system.
//!
//! So every bit is also written to this file before the call that sets it returns. The caller
//! sets a bit before it acknowledges any write that depends on it, so the file holds the bit
//! first. The file lives on a tmpfs (`/run`): it survives the process but not the machine. It
//! records the boot it was written in, so after a power loss or a reboot it is ignored, and the
//! committed bitmap (flushed data only) is the truth again. A daemon that starts merges the
//! bits of a file from the same boot into the bitmap. They are committed the usual way,
//! destination flush first. Their data reached the destination before the bit was set, and the
//! destination's volatile cache outlives a process.
//!
//! Layout: a 512-byte header (magic, version, flags, the clone's UUID, the boot ID, the number
//! of regions, a poison reason, and a CRC32C over it), padded to 4096 bytes, then the bitmap
//! words, little-endian, as the in-core bitmap holds them. Words are written a sector (64
//! words) at a time, under one lock, from the in-core words read under that lock. So the file
//! only gains bits, even when two setters share a sector.
//!
//! Poison: after a destination flush failed, the bits set since the last commit may describe
//! data that the destination lost. The header then records the failure, and a later daemon
//! does not merge the file: it starts read-only with the recorded reason.
//!
//! Degraded: any other switch to a degraded mode (a failed commit or metadata write, repeated
//! destination write failures) is recorded in the header too, before the failure is reported.
//! The bits stay trustworthy (their data reached the destination), so a later daemon merges
//! them, and then starts in the recorded mode with its reason: the metadata write that would
//! have made the mode sticky may have failed too, and a FLUSH that failed must not succeed
//! after a restart (seed 004).

use super::MetadataMode;
use crate::io::BlockDev;
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use uuid::Uuid;

const MAGIC: &[u8; 8] = b"UBCSURV1";
const VERSION: u32 = 1;
const HEADER_SIZE: u64 = 4096;
const SECTOR: usize = 512;
const WORDS_PER_SECTOR: usize = SECTOR / 8;
const FLAG_POISONED: u32 = 1;
const FLAG_READ_ONLY: u32 = 2;
const FLAG_FAIL: u32 = 4;
const OFF_FLAGS: usize = 12;
const OFF_UUID: usize = 16;
const OFF_BOOT: usize = 32;
const OFF_REGIONS: usize = 48;
const OFF_REASON_LEN: usize = 56;
const OFF_REASON: usize = 64;
const MAX_REASON: usize = 400;
const OFF_CRC: usize = SECTOR - 4;

/// What is wrong with a survival file.
#[derive(Debug, thiserror::Error)]
pub enum SurvivalError {
    #[error("{dev}: {context}: {error}")]
    Io {
        dev: String,
        context: &'static str,
        error: io::Error,
    },
    #[error(
        "{dev}: the survival copy of the bitmap is damaged ({why}); it may hold regions \
         hydrated since the last commit. Remove it only if losing writes acknowledged since \
         then is acceptable"
    )]
    Corrupt { dev: String, why: String },
    #[error("{dev}: the survival copy belongs to clone {found}, not to clone {expected}")]
    OtherClone {
        dev: String,
        found: Uuid,
        expected: Uuid,
    },
}

/// What a previous daemon of this clone left in the same boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survived {
    /// Its bitmap words (every bit it had set, committed or not).
    pub words: Vec<u64>,
    /// Why the bits since the last commit cannot be trusted, if a destination flush failed.
    pub poisoned: Option<String>,
    /// The degraded mode the daemon was in, and why (the first reason recorded).
    pub degraded: Option<(MetadataMode, String)>,
}

/// An open survival file, written through by the in-core bitmap.
pub struct SurvivalFile {
    dev: Arc<dyn BlockDev>,
    header: Mutex<Vec<u8>>,
    /// Serialises word writes: each writes the in-core words as they are under the lock.
    write_lock: Mutex<()>,
    /// Words the file holds (the in-core bitmap has more: whole bitmap blocks).
    nr_words: usize,
}

/// The file size for `nr_regions` regions.
pub fn survival_size(nr_regions: u64) -> u64 {
    HEADER_SIZE + (nr_regions.div_ceil(64) * 8).next_multiple_of(SECTOR as u64)
}

impl SurvivalFile {
    /// Reads what a previous daemon left in `dev`. `None`: nothing to merge (an empty or
    /// new file, or one written in another boot, before a reboot or power loss).
    pub fn read(
        dev: &dyn BlockDev,
        uuid: Uuid,
        boot_id: [u8; 16],
        nr_regions: u64,
    ) -> Result<Option<Survived>, SurvivalError> {
        let io_err = |context| {
            let dev = dev.name().to_string();
            move |error| SurvivalError::Io {
                dev,
                context,
                error,
            }
        };
        if dev.size() < HEADER_SIZE {
            return Ok(None);
        }
        let mut h = vec![0u8; SECTOR];
        dev.read_at(&mut h, 0)
            .map_err(io_err("reading the header"))?;
        if h.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        let corrupt = |why: String| SurvivalError::Corrupt {
            dev: dev.name().to_string(),
            why,
        };
        if &h[..8] != MAGIC {
            return Err(corrupt("bad magic".into()));
        }
        if crc(&h) != u32_at(&h, OFF_CRC) {
            return Err(corrupt("header checksum mismatch".into()));
        }
        if u32_at(&h, 8) != VERSION {
            return Err(corrupt(format!("unknown version {}", u32_at(&h, 8))));
        }
        let found = Uuid::from_bytes(h[OFF_UUID..OFF_UUID + 16].try_into().unwrap_or_default());
        if found != uuid {
            return Err(SurvivalError::OtherClone {
                dev: dev.name().to_string(),
                found,
                expected: uuid,
            });
        }
        if h[OFF_BOOT..OFF_BOOT + 16] != boot_id {
            return Ok(None);
        }
        if u64_at(&h, OFF_REGIONS) != nr_regions {
            return Err(corrupt(format!(
                "{} regions recorded, the metadata has {nr_regions}",
                u64_at(&h, OFF_REGIONS)
            )));
        }
        if dev.size() < survival_size(nr_regions) {
            return Err(corrupt(format!("{} bytes, too short", dev.size())));
        }
        let flags = u32_at(&h, OFF_FLAGS);
        let reason = || {
            let len = (u32_at(&h, OFF_REASON_LEN) as usize).min(MAX_REASON);
            String::from_utf8_lossy(&h[OFF_REASON..OFF_REASON + len]).into_owned()
        };
        let poisoned = (flags & FLAG_POISONED != 0).then(reason);
        let degraded = if flags & FLAG_FAIL != 0 {
            Some((MetadataMode::Fail, reason()))
        } else if flags & (FLAG_READ_ONLY | FLAG_POISONED) != 0 {
            Some((MetadataMode::ReadOnly, reason()))
        } else {
            None
        };
        let mut bytes = vec![0u8; (survival_size(nr_regions) - HEADER_SIZE) as usize];
        dev.read_at(&mut bytes, HEADER_SIZE)
            .map_err(io_err("reading the bitmap"))?;
        let words = bytes
            .chunks_exact(8)
            .take(nr_regions.div_ceil(64) as usize)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        Ok(Some(Survived {
            words,
            poisoned,
            degraded,
        }))
    }

    /// Starts a survival copy in `dev` (at least [`survival_size`] bytes) holding `words`,
    /// the in-core bitmap as it is now. The header goes last: until it is written, a reader
    /// finds the previous header (or none) and the words are a superset of its own.
    pub fn create(
        dev: Arc<dyn BlockDev>,
        uuid: Uuid,
        boot_id: [u8; 16],
        nr_regions: u64,
        words: &[u64],
        degraded: Option<(MetadataMode, &str)>,
    ) -> io::Result<SurvivalFile> {
        let mut bytes = vec![0u8; (survival_size(nr_regions) - HEADER_SIZE) as usize];
        for (c, w) in bytes.chunks_exact_mut(8).zip(words) {
            c.copy_from_slice(&w.to_le_bytes());
        }
        dev.write_at(&bytes, HEADER_SIZE)?;
        let mut h = vec![0u8; SECTOR];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[OFF_UUID..OFF_UUID + 16].copy_from_slice(uuid.as_bytes());
        h[OFF_BOOT..OFF_BOOT + 16].copy_from_slice(&boot_id);
        h[OFF_REGIONS..OFF_REGIONS + 8].copy_from_slice(&nr_regions.to_le_bytes());
        // A degraded mode carried over goes in the same header write: a death between two
        // writes must not lose it.
        match degraded {
            Some((MetadataMode::ReadOnly, reason)) => set_flag(&mut h, FLAG_READ_ONLY, reason),
            Some((MetadataMode::Fail, reason)) => set_flag(&mut h, FLAG_FAIL, reason),
            _ => {}
        }
        seal_header(&mut h);
        dev.write_at(&h, 0)?;
        Ok(SurvivalFile {
            dev,
            header: Mutex::new(h),
            write_lock: Mutex::new(()),
            nr_words: nr_regions.div_ceil(64) as usize,
        })
    }

    /// Writes the sectors holding words `first..=last` from the in-core `words`.
    pub(crate) fn write_words(
        &self,
        words: &[AtomicU64],
        first: usize,
        last: usize,
    ) -> io::Result<()> {
        let _g = self.write_lock.lock();
        // Only the words the file holds: the in-core bitmap is whole bitmap blocks.
        let last = last.min(self.nr_words.saturating_sub(1));
        let start = first / WORDS_PER_SECTOR * WORDS_PER_SECTOR;
        let end = ((last / WORDS_PER_SECTOR + 1) * WORDS_PER_SECTOR)
            .min(words.len())
            .min(self.nr_words);
        if start >= end {
            return Ok(());
        }
        let mut buf = vec![0u8; (end - start).next_multiple_of(WORDS_PER_SECTOR) * 8];
        for (c, w) in buf.chunks_exact_mut(8).zip(&words[start..end]) {
            c.copy_from_slice(&w.load(Ordering::SeqCst).to_le_bytes());
        }
        self.dev.write_at(&buf, HEADER_SIZE + start as u64 * 8)
    }

    /// Writes the sectors holding the words of `pending` (word index, mask of bits to set;
    /// consecutive words in order, one entry each) from the in-core `words` with the pending bits added, then, if that succeeded,
    /// `publish`es them in core, all under one lock: the file holds a bit before anyone can
    /// see it in core, and a later writer of the same sector reads it back from the core.
    pub(crate) fn write_words_then(
        &self,
        words: &[AtomicU64],
        pending: &[(usize, u64)],
        publish: impl FnOnce(),
    ) -> io::Result<()> {
        let (Some(first), Some(last)) = (
            pending.iter().map(|p| p.0).min(),
            pending.iter().map(|p| p.0).max(),
        ) else {
            publish();
            return Ok(());
        };
        let _g = self.write_lock.lock();
        let start = first / WORDS_PER_SECTOR * WORDS_PER_SECTOR;
        let end = ((last / WORDS_PER_SECTOR + 1) * WORDS_PER_SECTOR)
            .min(words.len())
            .min(self.nr_words);
        let mut buf = vec![0u8; (end - start).next_multiple_of(WORDS_PER_SECTOR) * 8];
        for (i, c) in buf.chunks_exact_mut(8).enumerate().take(end - start) {
            let w = start + i;
            let add = match pending.get(w.wrapping_sub(first)) {
                Some(&(pw, mask)) if pw == w => mask,
                _ => 0,
            };
            c.copy_from_slice(&(words[w].load(Ordering::SeqCst) | add).to_le_bytes());
        }
        self.dev.write_at(&buf, HEADER_SIZE + start as u64 * 8)?;
        publish();
        Ok(())
    }

    /// Rewrites every word (after the in-core bitmap went back to the committed one).
    pub(crate) fn write_all(&self, words: &[AtomicU64]) -> io::Result<()> {
        match words.len() {
            0 => Ok(()),
            n => self.write_words(words, 0, n - 1),
        }
    }

    /// Records that the bits set since the last commit cannot be trusted (a destination
    /// flush failed): a later daemon will not merge them.
    pub fn poison(&self, reason: &str) -> io::Result<()> {
        self.add_flag(FLAG_POISONED, reason)
    }

    /// Records that the daemon switched to the degraded `mode` (read-only or fail) because of
    /// `reason`: a later daemon merges the bits and starts in that mode.
    pub fn degrade(&self, mode: MetadataMode, reason: &str) -> io::Result<()> {
        match mode {
            MetadataMode::ReadWrite => Ok(()),
            MetadataMode::ReadOnly => self.add_flag(FLAG_READ_ONLY, reason),
            MetadataMode::Fail => self.add_flag(FLAG_FAIL, reason),
        }
    }

    /// Sets `flag` in the header, with `reason` if none was recorded yet (the first failure
    /// is the one to report), and writes the header.
    fn add_flag(&self, flag: u32, reason: &str) -> io::Result<()> {
        let mut h = self.header.lock();
        set_flag(&mut h, flag, reason);
        seal_header(&mut h);
        self.dev.write_at(&h, 0)
    }
}

/// Sets `flag` in header `h`, with `reason` if none was recorded yet (not sealed).
fn set_flag(h: &mut [u8], flag: u32, reason: &str) {
    {
        let flags = u32_at(h, OFF_FLAGS);
        h[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&(flags | flag).to_le_bytes());
        if flags == 0 {
            let mut reason = reason.as_bytes();
            if reason.len() > MAX_REASON {
                let mut end = MAX_REASON;
                while std::str::from_utf8(&reason[..end]).is_err() {
                    end -= 1;
                }
                reason = &reason[..end];
            }
            h[OFF_REASON_LEN..OFF_REASON_LEN + 4]
                .copy_from_slice(&(reason.len() as u32).to_le_bytes());
            h[OFF_REASON..OFF_REASON + MAX_REASON].fill(0);
            h[OFF_REASON..OFF_REASON + reason.len()].copy_from_slice(reason);
        }
    }
}

fn crc(h: &[u8]) -> u32 {
    crc32c::crc32c(&h[..OFF_CRC])
}

fn seal_header(h: &mut [u8]) {
    let c = crc(h);
    h[OFF_CRC..OFF_CRC + 4].copy_from_slice(&c.to_le_bytes());
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemDev;

    const BOOT: [u8; 16] = [7; 16];

    fn words(v: &[u64]) -> Vec<AtomicU64> {
        v.iter().map(|w| AtomicU64::new(*w)).collect()
    }

    #[test]
    fn bits_written_through_are_read_back_in_the_same_boot_only() {
        let uuid = Uuid::new_v4();
        let nr = 10_000;
        let dev = Arc::new(MemDev::new("surv", survival_size(nr)));
        assert_eq!(
            SurvivalFile::read(dev.as_ref(), uuid, BOOT, nr).ok(),
            Some(None)
        );
        let mut init = vec![0u64; (nr as usize).div_ceil(64)];
        init[3] = 0b101;
        let f = SurvivalFile::create(dev.clone(), uuid, BOOT, nr, &init, None).expect("create");
        let mut live = init.clone();
        live[100] = 1 << 9;
        f.write_words(&words(&live), 100, 100).expect("write");
        let got = SurvivalFile::read(dev.as_ref(), uuid, BOOT, nr).expect("read");
        assert_eq!(got.map(|s| (s.words, s.poisoned)), Some((live, None)));
        // Another boot (reboot or power loss): nothing to merge.
        assert_eq!(
            SurvivalFile::read(dev.as_ref(), uuid, [8; 16], nr).ok(),
            Some(None)
        );
        f.poison("destination flush failed: EIO").expect("poison");
        let got = SurvivalFile::read(dev.as_ref(), uuid, BOOT, nr).expect("read");
        assert_eq!(
            got.and_then(|s| s.poisoned).as_deref(),
            Some("destination flush failed: EIO")
        );
    }

    #[test]
    fn a_degraded_mode_is_recorded_with_its_first_reason_and_the_bits_stay_trusted() {
        let uuid = Uuid::new_v4();
        let nr = 100;
        let dev = Arc::new(MemDev::new("surv", survival_size(nr)));
        let f = SurvivalFile::create(dev.clone(), uuid, BOOT, nr, &[5, 0], None).expect("create");
        f.degrade(MetadataMode::ReadWrite, "nothing").expect("rw");
        let got = SurvivalFile::read(dev.as_ref(), uuid, BOOT, nr).expect("read");
        assert_eq!(got.and_then(|s| s.degraded), None);
        f.degrade(MetadataMode::ReadOnly, "commit failed: EIO")
            .expect("ro");
        f.degrade(MetadataMode::Fail, "persisting the mode failed")
            .expect("fail");
        let got = SurvivalFile::read(dev.as_ref(), uuid, BOOT, nr)
            .expect("read")
            .expect("same boot");
        assert_eq!(got.poisoned, None, "a degraded mode is not a poison");
        assert_eq!(got.words, vec![5, 0]);
        assert_eq!(
            got.degraded,
            Some((MetadataMode::Fail, "commit failed: EIO".to_string()))
        );
        // A poison is also read-only; a long reason is cut at a character boundary.
        let dev = Arc::new(MemDev::new("surv2", survival_size(nr)));
        let f = SurvivalFile::create(dev.clone(), uuid, BOOT, nr, &[], None).expect("create");
        f.poison(&"é".repeat(300)).expect("poison");
        let got = SurvivalFile::read(dev.as_ref(), uuid, BOOT, nr)
            .expect("read")
            .expect("same boot");
        let (mode, reason) = got.degraded.expect("degraded");
        assert_eq!(mode, MetadataMode::ReadOnly);
        assert_eq!(reason, "é".repeat(MAX_REASON / 2));
        assert_eq!(got.poisoned, Some(reason));
    }

    #[test]
    fn damaged_or_foreign_files_are_refused() {
        let uuid = Uuid::new_v4();
        let nr = 100;
        let dev = Arc::new(MemDev::new("surv", survival_size(nr)));
        SurvivalFile::create(dev.clone(), uuid, BOOT, nr, &[1, 2], None).expect("create");
        let other = SurvivalFile::read(dev.as_ref(), Uuid::new_v4(), BOOT, nr);
        assert!(
            matches!(other, Err(SurvivalError::OtherClone { .. })),
            "{other:?}"
        );
        let regions = SurvivalFile::read(dev.as_ref(), uuid, BOOT, nr + 1);
        assert!(
            matches!(regions, Err(SurvivalError::Corrupt { .. })),
            "{regions:?}"
        );
        // Flipped, not overwritten: byte 20 is part of the random UUID, and may be 0xff.
        let mut b = [0u8];
        dev.read_at(&mut b, 20).expect("read");
        dev.write_at(&[!b[0]], 20).expect("damage");
        let damaged = SurvivalFile::read(dev.as_ref(), uuid, BOOT, nr);
        match damaged {
            Err(e @ SurvivalError::Corrupt { .. }) => {
                assert!(e.to_string().contains("checksum"), "{e}")
            }
            other => panic!("damaged header accepted: {other:?}"),
        }
    }

    #[test]
    fn concurrent_setters_in_one_sector_never_lose_a_bit() {
        let uuid = Uuid::new_v4();
        let nr = 64 * 64;
        let dev = Arc::new(MemDev::new("surv", survival_size(nr)));
        let f = SurvivalFile::create(dev.clone(), uuid, BOOT, nr, &[], None).expect("create");
        let live = words(&vec![0; 64]);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (f, live) = (&f, &live);
                s.spawn(move || {
                    for i in 0..256u64 {
                        let region = (i * 4 + t) * 4 % nr;
                        let w = (region / 64) as usize;
                        live[w].fetch_or(1 << (region % 64), Ordering::SeqCst);
                        f.write_words(live, w, w).expect("write");
                    }
                });
            }
        });
        let want: Vec<u64> = live.iter().map(|w| w.load(Ordering::SeqCst)).collect();
        let got = SurvivalFile::read(dev.as_ref(), uuid, BOOT, nr).expect("read");
        assert_eq!(got.map(|s| s.words), Some(want));
    }
}
