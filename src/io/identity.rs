//! [`DeviceIdentity`]: what recognises a device again later, whatever path it is reached by.
//!
//! A regular file is its file system and inode. A block device is the most stable identifier
//! sysfs offers for it: a device-mapper UUID, a loop device's backing file and offset, a WWID
//! or serial number, and only when none exists its major:minor number; a partition adds its
//! number and start. Invariant: computed from `stat`/`fstat` and sysfs only; never opens, let
//! alone writes, the device.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceIdentity {
    /// A regular file: the device of its file system and its inode number.
    File { st_dev: u64, st_ino: u64 },
    /// A block device: `dm-uuid:…`, `loop:FILE@OFFSET`, `wwid:…`, `serial:…` or
    /// `devnum:MAJ:MIN`, with `/partN@START` appended for a partition.
    Block { id: String },
}

impl fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceIdentity::File { st_dev, st_ino } => {
                write!(f, "regular file (inode {st_ino} on device {st_dev:#x})")
            }
            DeviceIdentity::Block { id } => write!(f, "block device {id}"),
        }
    }
}

impl DeviceIdentity {
    /// The identity of what `path` names now (symbolic links followed).
    pub fn of_path(path: &Path) -> io::Result<DeviceIdentity> {
        Self::of_metadata(&std::fs::metadata(path)?, Path::new("/sys"))
    }

    /// The identity of an open file or block device.
    pub fn of_file(file: &File) -> io::Result<DeviceIdentity> {
        Self::of_metadata(&file.metadata()?, Path::new("/sys"))
    }

    fn of_metadata(meta: &std::fs::Metadata, sys: &Path) -> io::Result<DeviceIdentity> {
        if meta.file_type().is_block_device() {
            let rdev = meta.rdev();
            Ok(DeviceIdentity::Block {
                id: block_id(sys, libc::major(rdev), libc::minor(rdev)),
            })
        } else if meta.file_type().is_file() {
            Ok(DeviceIdentity::File {
                st_dev: meta.dev(),
                st_ino: meta.ino(),
            })
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            ))
        }
    }
}

/// A sysfs attribute, trimmed; `None` when absent or empty.
fn attr(dir: &Path, name: &str) -> Option<String> {
    let v = std::fs::read_to_string(dir.join(name)).ok()?;
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// The identifier of block device `major:minor` under the sysfs tree at `sys`.
pub(crate) fn block_id(sys: &Path, major: u32, minor: u32) -> String {
    let devnum = format!("devnum:{major}:{minor}");
    let Ok(dir) = std::fs::canonicalize(sys.join(format!("dev/block/{major}:{minor}"))) else {
        return devnum;
    };
    // A partition's directory sits inside its disk's.
    let (disk, part) = match attr(&dir, "partition") {
        Some(n) => match dir.parent() {
            Some(parent) => (
                parent.to_path_buf(),
                Some(format!(
                    "/part{n}@{}",
                    attr(&dir, "start").unwrap_or_default()
                )),
            ),
            None => return devnum,
        },
        None => (dir, None),
    };
    let id = if let Some(u) = attr(&disk, "dm/uuid") {
        format!("dm-uuid:{u}")
    } else if let Some(f) = attr(&disk, "loop/backing_file") {
        format!(
            "loop:{f}@{}",
            attr(&disk, "loop/offset").unwrap_or_else(|| "0".into())
        )
    } else if let Some(w) = attr(&disk, "device/wwid").or_else(|| attr(&disk, "wwid")) {
        format!("wwid:{w}")
    } else if let Some(s) = attr(&disk, "serial").or_else(|| attr(&disk, "device/serial")) {
        format!("serial:{s}")
    } else if let Some(n) = attr(&disk, "dm/name") {
        format!("dm-name:{n}")
    } else {
        // For a partition, the disk's own number.
        match attr(&disk, "dev") {
            Some(d) if part.is_some() => format!("devnum:{d}"),
            _ => devnum,
        }
    };
    id + part.as_deref().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(root: &Path, rel: &str, value: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, format!("{value}\n")).expect("write attr");
    }

    fn link(root: &Path, devnum: &str, target: &str) {
        let dir = root.join("dev/block");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::create_dir_all(root.join(target)).expect("mkdir target");
        std::os::unix::fs::symlink(root.join(target), dir.join(devnum)).expect("symlink");
    }

    #[test]
    fn block_ids_prefer_stable_identifiers() {
        let t = tempfile::tempdir().expect("tempdir");
        let sys = t.path();
        link(sys, "8:0", "devices/sda");
        mk(sys, "devices/sda/device/wwid", "naa.5000c500a1b2c3d4");
        mk(sys, "devices/sda/dev", "8:0");
        link(sys, "8:2", "devices/sda/sda2");
        mk(sys, "devices/sda/sda2/partition", "2");
        mk(sys, "devices/sda/sda2/start", "2048");
        link(sys, "252:0", "devices/dm-0");
        mk(sys, "devices/dm-0/dm/uuid", "LVM-abc");
        mk(sys, "devices/dm-0/dm/name", "vg-lv");
        link(sys, "252:1", "devices/dm-1");
        mk(sys, "devices/dm-1/dm/uuid", "");
        mk(sys, "devices/dm-1/dm/name", "plain");
        link(sys, "7:3", "devices/loop3");
        mk(sys, "devices/loop3/loop/backing_file", "/srv/img");
        mk(sys, "devices/loop3/loop/offset", "4096");
        link(sys, "253:16", "devices/vdb");
        mk(sys, "devices/vdb/serial", "QM0001");
        link(sys, "9:0", "devices/md0");
        assert_eq!(block_id(sys, 8, 0), "wwid:naa.5000c500a1b2c3d4");
        assert_eq!(block_id(sys, 8, 2), "wwid:naa.5000c500a1b2c3d4/part2@2048");
        assert_eq!(block_id(sys, 252, 0), "dm-uuid:LVM-abc");
        assert_eq!(block_id(sys, 252, 1), "dm-name:plain");
        assert_eq!(block_id(sys, 7, 3), "loop:/srv/img@4096");
        assert_eq!(block_id(sys, 253, 16), "serial:QM0001");
        assert_eq!(block_id(sys, 9, 0), "devnum:9:0");
        assert_eq!(block_id(sys, 1, 99), "devnum:1:99", "unknown to sysfs");
    }

    #[test]
    fn files_are_told_apart_by_inode_not_by_name() -> io::Result<()> {
        let t = tempfile::tempdir()?;
        let a = t.path().join("a");
        let b = t.path().join("b");
        std::fs::write(&a, [0u8; 512])?;
        std::fs::write(&b, [0u8; 512])?;
        let id_a = DeviceIdentity::of_path(&a)?;
        assert_eq!(id_a, DeviceIdentity::of_file(&File::open(&a)?)?);
        assert_ne!(id_a, DeviceIdentity::of_path(&b)?);
        // Same size and contents, moved into a's name: still told apart.
        std::fs::rename(&b, &a)?;
        assert_ne!(id_a, DeviceIdentity::of_path(&a)?);
        // A symbolic link names what it points to.
        let l = t.path().join("l");
        std::os::unix::fs::symlink(&a, &l)?;
        assert_eq!(DeviceIdentity::of_path(&l)?, DeviceIdentity::of_path(&a)?);
        assert!(DeviceIdentity::of_path(t.path()).is_err(), "a directory");
        Ok(())
    }

    #[test]
    fn serde_round_trip() {
        for id in [
            DeviceIdentity::File {
                st_dev: 2049,
                st_ino: 77,
            },
            DeviceIdentity::Block {
                id: "wwid:x".into(),
            },
        ] {
            let json = serde_json::to_string(&id).expect("to json");
            let back: DeviceIdentity = serde_json::from_str(&json).expect("from json");
            assert_eq!(back, id);
        }
    }
}
