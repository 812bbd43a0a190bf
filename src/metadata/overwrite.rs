//! Before a metadata device is formatted: what it holds now ([`probe`]), and whether a format
//! may destroy that ([`Contents::may_format`]).
//!
//! Owns the rule every formatting command follows: a format writes over a blank device; with
//! `--force` also over foreign content (a file system, a partition table, unknown data),
//! another clone's metadata or damaged metadata; and over this very clone's own metadata (the
//! same source) only with the explicit `--force-reformat-this-clone`, because reformatting it
//! forgets which regions hold the clone's writes: they become invisible and hydration later
//! overwrites them. Invariant: probing only reads.

use super::checksum::BLOCK_SIZE;
use super::error::io_err;
use super::format::check_geometry;
use super::open::{check_expect, no_superblock_error};
use super::{scan, Expect, MetadataError, Result};
use crate::io::signature::{self, Signature};
use crate::io::BlockDev;
use uuid::Uuid;

/// The most bytes [`probe`] reads to decide that a device is blank.
pub const MAX_BLANK_SCAN: u64 = 64 << 20;

/// What a device about to hold metadata contains.
#[derive(Debug)]
pub enum Contents {
    /// Zero in every byte a format would write (and the first [`signature::HEAD_BYTES`]),
    /// with no known signature.
    Blank,
    /// Clone metadata with a usable superblock.
    Clone {
        uuid: Uuid,
        generation: u64,
        hydrated: u64,
        nr_regions: u64,
        /// `None`: it records the source being used now (size and fingerprint, or only the
        /// size with `ignore_source_mismatch`): this very clone, whatever the destination.
        /// Otherwise how the recorded source differs: another clone.
        other: Option<MetadataError>,
    },
    /// Clone metadata that cannot be opened: both superblocks damaged, inconsistent, or a
    /// format version this build does not read.
    Damaged(MetadataError),
    /// A file system, partition table, RAID/LVM label, LUKS header or swap area.
    Foreign(Signature),
    /// Non-zero bytes that are none of the above.
    Data { offset: u64 },
}

/// How far the operator lets a format go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Overwrite {
    /// Blank devices only (no flag).
    BlankOnly,
    /// Also foreign content, another clone's metadata and damaged metadata (`--force`).
    Force,
    /// Also this very clone's metadata (`--force-reformat-this-clone`).
    ThisClone,
}

impl Overwrite {
    pub fn from_flags(force: bool, force_reformat_this_clone: bool) -> Overwrite {
        if force_reformat_this_clone {
            Overwrite::ThisClone
        } else if force {
            Overwrite::Force
        } else {
            Overwrite::BlankOnly
        }
    }
}

/// Why a format was refused. `what` names the device as the user gave it ("--metadata M");
/// `path` is M alone, for the commands a message suggests.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{what} holds {sig}; refusing to overwrite it (check that this is the device you \
         meant); pass --force to destroy it"
    )]
    Foreign { what: String, sig: Signature },

    #[error(
        "{what} is not blank: byte {offset} is not zero and it holds neither ublk-clone \
         metadata nor a known signature; refusing to overwrite it (check that this is the device \
         you meant); pass --force to destroy its contents"
    )]
    NotBlank { what: String, offset: u64 },

    #[error(
        "{why}\n{what} holds the metadata of another clone ({uuid}, generation {generation}, made \
         for a different source); formatting would destroy it: pass --force to overwrite it"
    )]
    OtherClone {
        what: String,
        uuid: Uuid,
        generation: u64,
        why: MetadataError,
    },

    #[error(
        "{what} holds this clone's own metadata (clone {uuid}, made for this source; {hydrated} \
         of {nr_regions} regions hydrated); `ublk-clone create` resumes it without --force. \
         Reformatting it would forget which regions hold the clone's writes: they would become \
         invisible and later be overwritten by hydration. To start the clone over from the \
         source, discarding every write made to it, pass --force-reformat-this-clone"
    )]
    ThisClone {
        what: String,
        uuid: Uuid,
        hydrated: u64,
        nr_regions: u64,
    },

    #[error(
        "{error}\n{what} holds damaged ublk-clone metadata: see what is wrong with \
         `ublk-clone check {path}` and what it still records with `ublk-clone dump {path}`"
    )]
    Damaged {
        what: String,
        path: String,
        error: MetadataError,
    },
}

/// Classifies what `dev` holds. `this` gives the source now in use (`source_size`,
/// `source_fingerprint`, `ignore_source_mismatch`; `None` fields match anything);
/// `format_bytes` is how much a format would write, all of which must be zero for
/// [`Contents::Blank`] (scanned up to [`MAX_BLANK_SCAN`]).
pub fn probe(dev: &dyn BlockDev, this: &Expect, format_bytes: u64) -> Result<Contents> {
    let name = dev.name();
    if dev.size() >= 2 * BLOCK_SIZE as u64 {
        let slots = scan::read_superblocks(dev)
            .map_err(io_err(name, "reading the superblocks before formatting"))?;
        match scan::pick_superblock(&slots) {
            Some(i) => {
                let Ok(sb) = &slots[i] else {
                    return Ok(Contents::Damaged(no_superblock_error(name, &slots)));
                };
                if let Err(what) = check_geometry(sb, dev.size()) {
                    return Ok(Contents::Damaged(MetadataError::Corrupt {
                        dev: name.to_string(),
                        what: format!("superblock generation {}: {what}", sb.generation),
                    }));
                }
                // The source decides whose clone it is; the region size and destination are
                // checked when it is resumed.
                let source_only = Expect {
                    source_size: this.source_size,
                    source_fingerprint: this.source_fingerprint,
                    ignore_source_mismatch: this.ignore_source_mismatch,
                    ..Expect::default()
                };
                let other =
                    check_expect(name, &mut sb.clone(), &source_only, &mut Vec::new()).err();
                return Ok(Contents::Clone {
                    uuid: sb.uuid,
                    generation: sb.generation,
                    hydrated: sb.hydrated,
                    nr_regions: sb.nr_regions,
                    other,
                });
            }
            None => {
                let e = no_superblock_error(name, &slots);
                if !matches!(e, MetadataError::BadMagic { .. }) {
                    return Ok(Contents::Damaged(e));
                }
            }
        }
    }
    let io = |e| io_err(name, "looking for signatures before formatting")(e);
    if let Some(sig) = signature::detect(dev).map_err(io)? {
        return Ok(Contents::Foreign(sig));
    }
    let span = format_bytes.clamp(signature::HEAD_BYTES, MAX_BLANK_SCAN);
    if let Some(offset) = signature::first_nonzero(dev, span).map_err(io)? {
        return Ok(Contents::Data { offset });
    }
    Ok(Contents::Blank)
}

impl Contents {
    /// Clone metadata recorded for the source in use now.
    pub fn is_this_clone(&self) -> bool {
        matches!(self, Contents::Clone { other: None, .. })
    }

    /// Whether a format may write over these contents, or the refusal to show.
    pub fn may_format(
        self,
        what: &str,
        path: &str,
        overwrite: Overwrite,
    ) -> std::result::Result<(), Refusal> {
        let what = what.to_string();
        match self {
            Contents::Blank => Ok(()),
            Contents::Clone {
                uuid,
                hydrated,
                nr_regions,
                other: None,
                ..
            } if overwrite < Overwrite::ThisClone => Err(Refusal::ThisClone {
                what,
                uuid,
                hydrated,
                nr_regions,
            }),
            _ if overwrite >= Overwrite::Force => Ok(()),
            Contents::Clone { other: None, .. } => Ok(()),
            Contents::Clone {
                uuid,
                generation,
                other: Some(why),
                ..
            } => Err(Refusal::OtherClone {
                what,
                uuid,
                generation,
                why,
            }),
            Contents::Damaged(error) => Err(Refusal::Damaged {
                what,
                path: path.to_string(),
                error,
            }),
            Contents::Foreign(sig) => Err(Refusal::Foreign { what, sig }),
            Contents::Data { offset } => Err(Refusal::NotBlank { what, offset }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::mem::MemDev;
    use crate::metadata::{required_size, FormatParams, Metadata};
    use std::sync::Arc;

    const SIZE: u64 = 1 << 20;

    fn params(fingerprint: u8) -> FormatParams {
        FormatParams {
            region_size: 4096,
            source_size: SIZE,
            dest_size: SIZE,
            source_fingerprint: [fingerprint; 32],
            dest_name: "dest".into(),
            uuid: None,
        }
    }

    fn this(fingerprint: u8) -> Expect {
        Expect {
            source_size: Some(SIZE),
            source_fingerprint: Some([fingerprint; 32]),
            ..Expect::default()
        }
    }

    fn format_bytes() -> u64 {
        required_size(4096, SIZE).expect("size")
    }

    fn probe_of(dev: &MemDev, fingerprint: u8) -> Contents {
        probe(dev, &this(fingerprint), format_bytes()).expect("probe")
    }

    #[test]
    fn blank_is_formatted_without_force() {
        let dev = MemDev::new("meta", SIZE);
        let c = probe_of(&dev, 1);
        assert!(matches!(c, Contents::Blank), "{c:?}");
        assert!(c.may_format("m", "m", Overwrite::BlankOnly).is_ok());
    }

    #[test]
    fn data_past_the_superblocks_is_not_blank() {
        // The old rule looked at the first 8 KiB only.
        let dev = MemDev::new("meta", SIZE);
        dev.write_at(&[1], 12345).expect("poke");
        let c = probe_of(&dev, 1);
        assert!(matches!(c, Contents::Data { offset: 12345 }), "{c:?}");
        let e = c
            .may_format("--metadata m", "m", Overwrite::BlankOnly)
            .expect_err("refused");
        assert!(e.to_string().contains("byte 12345"), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(probe_of(&dev, 1)
            .may_format("m", "m", Overwrite::Force)
            .is_ok());
    }

    #[test]
    fn a_file_system_is_named() {
        let dev = MemDev::new("meta", SIZE);
        dev.write_at(b"XFSB", 0).expect("poke");
        let e = probe_of(&dev, 1)
            .may_format("--metadata m", "m", Overwrite::BlankOnly)
            .expect_err("refused");
        assert!(
            e.to_string()
                .contains("--metadata m holds an xfs file system"),
            "{e}"
        );
    }

    #[test]
    fn this_clone_needs_the_explicit_flag_and_another_clone_needs_force() {
        let dev = Arc::new(MemDev::new("meta", SIZE));
        Metadata::format(dev.clone(), &params(1), false).expect("format");
        // The same source: this clone, even with --force.
        for o in [Overwrite::BlankOnly, Overwrite::Force] {
            let e = probe_of(&dev, 1)
                .may_format("--metadata m", "m", o)
                .expect_err("refused");
            assert!(matches!(e, Refusal::ThisClone { .. }), "{e}");
            assert!(e.to_string().contains("without --force"), "{e}");
        }
        assert!(probe_of(&dev, 1)
            .may_format("m", "m", Overwrite::ThisClone)
            .is_ok());
        // Another source: another clone, which --force may overwrite.
        let e = probe_of(&dev, 2)
            .may_format("m", "m", Overwrite::BlankOnly)
            .expect_err("refused");
        assert!(matches!(e, Refusal::OtherClone { .. }), "{e}");
        assert!(e.to_string().contains("fingerprint differs"), "{e}");
        assert!(probe_of(&dev, 2)
            .may_format("m", "m", Overwrite::Force)
            .is_ok());
        // A fingerprint override makes it this clone again.
        let mut x = this(2);
        x.ignore_source_mismatch = true;
        let c = probe(&*dev, &x, format_bytes()).expect("probe");
        assert!(c.is_this_clone(), "{c:?}");
    }

    #[test]
    fn damaged_metadata_points_at_check_and_dump_not_force() {
        let dev = Arc::new(MemDev::new("meta", SIZE));
        Metadata::format(dev.clone(), &params(1), false).expect("format");
        dev.write_at(b"garbage!", 100).expect("poke");
        dev.write_at(b"garbage!", 4096 + 100).expect("poke");
        let c = probe_of(&dev, 1);
        assert!(matches!(c, Contents::Damaged(_)), "{c:?}");
        let e = c
            .may_format("--metadata m", "m", Overwrite::BlankOnly)
            .expect_err("refused");
        let text = e.to_string();
        assert!(text.contains("ublk-clone check m"), "{text}");
        assert!(text.contains("ublk-clone dump m"), "{text}");
        assert!(!text.contains("--force"), "{text}");
        assert!(probe_of(&dev, 1)
            .may_format("m", "m", Overwrite::Force)
            .is_ok());
    }

    #[test]
    fn truncated_metadata_is_damaged() {
        let full = Arc::new(MemDev::new("meta", SIZE));
        Metadata::format(full.clone(), &params(1), false).expect("format");
        let cut = MemDev::from_image("meta", full.snapshot()[..3 * 4096].to_vec());
        let c = probe_of(&cut, 1);
        assert!(
            matches!(c, Contents::Damaged(MetadataError::Corrupt { .. })),
            "{c:?}"
        );
    }

    #[test]
    fn probing_never_writes() {
        let dev = Arc::new(MemDev::new("meta", SIZE));
        Metadata::format(dev.clone(), &params(1), false).expect("format");
        let writes = dev.write_count();
        let _ = probe_of(&dev, 1);
        let _ = probe_of(&dev, 2);
        assert_eq!(dev.write_count(), writes);
    }
}
