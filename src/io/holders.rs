//! Who else has a device or file open: a scan of `/proc/*/fd`, for refusals that name the
//! culprit (a source opened for writing elsewhere, a clone device still open at `stop`).
//!
//! Best effort by nature: processes in other PID namespaces are not seen, and a process can
//! open the file right after the scan. The kernel's exclusive claims (O_EXCL, see
//! `file::FileDev::open`) are the hard guarantee; this only adds what they cannot see.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// What identifies an open file: the device number of a block device, or the inode of a
/// regular file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Identity {
    Block(u64),
    File(u64, u64),
}

fn identity(m: &std::fs::Metadata) -> Option<Identity> {
    if m.file_type().is_block_device() {
        Some(Identity::Block(m.rdev()))
    } else if m.file_type().is_file() {
        Some(Identity::File(m.dev(), m.ino()))
    } else {
        None
    }
}

/// Other processes that have `path` open: "pid N (comm)", and only those that opened it
/// for writing when `writers_only`.
pub fn openers(path: &Path, writers_only: bool) -> Vec<String> {
    let Some(want) = std::fs::metadata(path).ok().as_ref().and_then(identity) else {
        return Vec::new();
    };
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let found = fds.flatten().any(|fd| {
            let same = std::fs::metadata(fd.path())
                .ok()
                .as_ref()
                .and_then(identity)
                == Some(want);
            same && (!writers_only || opened_for_writing(&p.path(), &fd.file_name()))
        });
        if found {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    out
}

/// Whether descriptor `fd` of the process at `proc_dir` was opened for writing
/// (`flags:` in its fdinfo, octal; O_WRONLY = 1, O_RDWR = 2).
fn opened_for_writing(proc_dir: &Path, fd: &std::ffi::OsStr) -> bool {
    let Ok(info) = std::fs::read_to_string(proc_dir.join("fdinfo").join(fd)) else {
        return false;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|f| f & 3 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_in_another_process_is_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("img");
        std::fs::write(&f, [0u8; 4096]).expect("file");
        // A reader first, then a writer (both children: this process is skipped).
        let mut reader = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$0\"; read -r _ <&0")
            .arg(&f)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("reader");
        let seen = |writers_only| {
            (0..500).any(|_| {
                let o = openers(&f, writers_only);
                if o.is_empty() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    false
                } else {
                    true
                }
            })
        };
        assert!(seen(false), "the reader is an opener");
        assert!(openers(&f, true).is_empty(), "the reader is not a writer");
        let mut writer = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec 3<>\"$0\"; read -r _ <&0")
            .arg(&f)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("writer");
        assert!(seen(true), "the writer is seen");
        drop(reader.stdin.take());
        drop(writer.stdin.take());
        let _ = reader.wait();
        let _ = writer.wait();
        assert!(openers(&f, false).is_empty());
    }
}
