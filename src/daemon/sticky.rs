//! Sticky run-time state that outlives the daemon process: the hydration settings as
//! `ublk-clone set` left them, and the regions whose source could not be read.
//!
//! The file is `<run dir>/<metadata UUID>.state.json`, beside the survival copy (the run
//! directory is on tmpfs), and records the boot it was written in. A daemon that starts in the
//! same boot as the file (after a death, a `restart`, or `systemctl` bringing it back) takes
//! the settings from it instead of from the saved configuration, and its reads of the failed
//! regions fail again, as they did before. The degraded mode lives in the survival copy's
//! header (it must be written before a FLUSH fails, see [`crate::metadata::survival`]).
//!
//! Invariants: a `set` is answered only after the file records it. Failed regions are
//! recorded within a control-loop tick; one that is lost only means its copy is tried again.
//! The file is removed after a clean stop, so a later `start` runs with the saved
//! configuration, as the user last chose it.

use super::control::run_dir;
use super::error::{Named, Result};
use crate::engine::{Engine, Knobs};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct State {
    /// The boot the file was written in (`/proc/sys/kernel/random/boot_id`).
    pub boot: uuid::Uuid,
    pub knobs: Knobs,
    pub failed_regions: Vec<u64>,
}

/// The state file of one clone, as this daemon writes it.
pub(super) struct Sticky {
    path: PathBuf,
    boot: uuid::Uuid,
    /// What the file holds now (`None`: nothing written by this daemon yet).
    written: Mutex<Option<State>>,
}

impl Sticky {
    /// The state file of the clone whose metadata has `uuid`, in boot `boot`.
    pub fn new(uuid: &uuid::Uuid, boot: [u8; 16]) -> Sticky {
        Sticky::at(run_dir().join(format!("{uuid}.state.json")), boot)
    }

    fn at(path: PathBuf, boot: [u8; 16]) -> Sticky {
        Sticky {
            path,
            boot: uuid::Uuid::from_bytes(boot),
            written: Mutex::new(None),
        }
    }

    /// What a dead daemon of this clone left in this boot, if anything. A file that cannot be
    /// read is reported and ignored: the settings then come from the saved configuration.
    pub fn take_over(&self) -> Option<State> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                log::warn!("{}: {e}; ignored", self.path.display());
                return None;
            }
        };
        match serde_json::from_str::<State>(&text) {
            Ok(s) if s.boot == self.boot => {
                log::warn!(
                    "{}: a daemon of this clone died; its settings and {} failed regions \
                     are taken over",
                    self.path.display(),
                    s.failed_regions.len()
                );
                Some(s)
            }
            Ok(_) => None,
            Err(e) => {
                log::warn!("{}: malformed ({e}); ignored", self.path.display());
                None
            }
        }
    }

    /// Records the engine's settings and failed regions, if they changed since the last call.
    pub fn record(&self, engine: &Engine) -> Result<()> {
        self.record_state(engine.knobs(), engine.failed_regions())
    }

    fn record_state(&self, knobs: Knobs, failed_regions: Vec<u64>) -> Result<()> {
        let state = State {
            boot: self.boot,
            knobs,
            failed_regions,
        };
        let mut written = self.written.lock();
        if written.as_ref() == Some(&state) {
            return Ok(());
        }
        write_atomically(&self.path, &serde_json::to_vec_pretty(&state)?)?;
        *written = Some(state);
        Ok(())
    }

    /// After a clean stop.
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// Replaces `path` by a file holding `bytes`: a reader finds the old file or the new one,
/// never a part.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).named(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).named(|| format!("cannot rename {}", tmp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: [u8; 16] = [9; 16];

    fn knobs(rate: u64) -> Knobs {
        let mut k = Knobs::defaults_for(65536);
        k.rate_bytes_per_sec = rate;
        k.hydrate_on_read = false;
        k
    }

    #[test]
    fn a_dead_daemons_settings_and_failed_regions_are_taken_over_in_the_same_boot_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.state.json");
        let old = Sticky::at(path.clone(), BOOT);
        assert_eq!(old.take_over(), None, "nothing left yet");
        old.record_state(knobs(1 << 20), vec![3, 17])
            .expect("record");
        old.record_state(knobs(2 << 20), vec![3, 17, 40])
            .expect("record");
        // The daemon dies; the next one in the same boot takes over.
        let new = Sticky::at(path.clone(), BOOT);
        let got = new.take_over().expect("taken over");
        assert_eq!(got.knobs, knobs(2 << 20));
        assert_eq!(got.failed_regions, vec![3, 17, 40]);
        // After a reboot, the saved configuration applies.
        assert_eq!(Sticky::at(path.clone(), [1; 16]).take_over(), None);
        // A damaged file is ignored, not fatal.
        std::fs::write(&path, b"{ not json").expect("damage");
        assert_eq!(Sticky::at(path.clone(), BOOT).take_over(), None);
        // A clean stop removes it.
        new.record_state(knobs(0), vec![]).expect("record");
        new.remove();
        assert!(!path.exists());
        assert_eq!(Sticky::at(path, BOOT).take_over(), None);
    }
}
