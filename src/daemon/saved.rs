//! The saved configuration of a clone, `<state dir>/<uuid>.json`, which `start` resumes from.
//!
//! It records the options the daemon was started with ([`DaemonConfig`], flattened into the
//! same object), with the device paths as the user gave them (made absolute but not
//! symlink-resolved, so `/dev/disk/by-id/X` keeps naming the same disk when `/dev/sdc`
//! becomes `/dev/sdd`), and the identity of the source and destination ([`DeviceIdentity`]). Invariant: `start` checks every recorded identity against what the
//! paths name now, and refuses a mismatch before any device is opened.
//!
//! The state directory is [`STATE_DIR`], or `$UBLK_CLONE_STATE_DIR` (tests). Files written
//! before identities were recorded still load; for them only what `create` checks (sizes and
//! the source fingerprint) is checked.

use super::config::DaemonConfig;
use super::error::{refuse, Named, Result};
use crate::io::file::{Access, FileDev};
use crate::io::identity::DeviceIdentity;
use crate::io::BlockDev;
use crate::metadata::Metadata;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const STATE_DIR: &str = "/var/lib/ublk-clone";

/// [`STATE_DIR`], unless `UBLK_CLONE_STATE_DIR` names another directory.
pub fn state_dir() -> PathBuf {
    std::env::var_os("UBLK_CLONE_STATE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(STATE_DIR))
}

/// Where the configuration of the clone with `uuid` is kept.
pub fn config_path(uuid: &uuid::Uuid) -> PathBuf {
    state_dir().join(format!("{uuid}.json"))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SavedConfig {
    #[serde(flatten)]
    pub config: DaemonConfig,
    /// The source when the clone last started (absent in older files).
    #[serde(default)]
    pub source_identity: Option<DeviceIdentity>,
    /// The destination when the clone last started (absent in older files).
    #[serde(default)]
    pub dest_identity: Option<DeviceIdentity>,
}

/// Saves the configuration of a clone that has just opened its devices: `config` without
/// the one-shot options, and the identities of the opened source and destination.
pub fn save(
    config: &DaemonConfig,
    md: &Metadata,
    source: Option<&FileDev>,
    dest: &FileDev,
) -> Result<()> {
    let identity = |d: &FileDev| {
        DeviceIdentity::of_file(d.file()).named(|| format!("{}: cannot stat", d.path().display()))
    };
    let cfg = SavedConfig {
        config: config.to_saved(md.region_size())?,
        // A remote source has no local identity: its size and fingerprint are checked.
        source_identity: source.map(identity).transpose()?,
        dest_identity: Some(identity(dest)?),
    };
    let dir = state_dir();
    std::fs::create_dir_all(&dir).named(|| format!("cannot create {}", dir.display()))?;
    let path = config_path(&md.uuid());
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?)
        .named(|| format!("cannot write the clone configuration {}", path.display()))
}

/// Loads the configuration of clone `uuid`.
pub fn load(uuid: &uuid::Uuid) -> Result<(SavedConfig, PathBuf)> {
    let path = config_path(uuid);
    let text = std::fs::read_to_string(&path).named(|| {
        format!(
            "no saved configuration {} for clone {uuid} (it is written when a device starts); \
             use `ublk-clone create` with the devices",
            path.display()
        )
    })?;
    let cfg = serde_json::from_str(&text).named(|| {
        format!(
            "malformed clone configuration {}; use `ublk-clone create` with the devices",
            path.display()
        )
    })?;
    Ok((cfg, path))
}

/// The configuration `start` resumes the clone whose metadata is at `metadata` with: the saved
/// one, with `metadata` as the user named it, once [`SavedConfig::verify`] found the recorded
/// source and destination where they were. Opens only the metadata, read-only.
pub fn config_for_start(metadata: &Path) -> Result<DaemonConfig> {
    let dev: Arc<dyn BlockDev> =
        Arc::new(FileDev::open(metadata, Access::ReadOnly, false).named(|| "--metadata".into())?);
    let (md, _) = Metadata::read_only_open(dev).named(|| {
        format!(
            "--metadata {}: not the metadata of a ublk-clone clone; `start` resumes a clone \
             made by `ublk-clone create`",
            metadata.display()
        )
    })?;
    let uuid = md.uuid();
    drop(md);
    let (mut saved, path) = load(&uuid)?;
    // The metadata the user named is the one whose uuid chose this configuration.
    saved.config.metadata =
        std::path::absolute(metadata).named(|| format!("--metadata {}", metadata.display()))?;
    saved.verify(&path, &uuid)?;
    Ok(saved.config)
}

impl SavedConfig {
    /// Checks that the recorded paths still name the recorded source and destination. Only
    /// stats the paths. `path` is this configuration's file, `uuid` its clone.
    pub fn verify(&self, path: &Path, uuid: &uuid::Uuid) -> Result<()> {
        let a = &self.config;
        let resume_hint = format!(
            "if the data moved to another device, resume with `ublk-clone create --source \
             SOURCE --dest DEST --metadata {}`, which records the devices anew",
            a.metadata.display()
        );
        let mut roles = vec![("--dest", "destination", &a.dest, &self.dest_identity)];
        if !a.source_is_remote() {
            roles.insert(0, ("--source", "source", &a.source, &self.source_identity));
        }
        for (flag, which, p, saved) in roles {
            let found = match DeviceIdentity::of_path(p) {
                Ok(id) => id,
                Err(e) => refuse!(
                    "{flag} {}: {e}: clone {uuid} was created with this {which} (saved in {}); \
                     reattach it, or {resume_hint}",
                    p.display(),
                    path.display()
                ),
            };
            match saved {
                Some(expected) if *expected != found => refuse!(
                    "{flag} {}: not the {which} clone {uuid} was created with: expected \
                     {expected}, found {found} (saved in {}); reattach the original {which}, \
                     or {resume_hint}",
                    p.display(),
                    path.display()
                ),
                Some(_) => {}
                None => log::warn!(
                    "{}: no identity recorded for {flag} {} (written by an older version); \
                     checking only its size{}",
                    path.display(),
                    p.display(),
                    if flag == "--source" {
                        " and fingerprint"
                    } else {
                        ""
                    }
                ),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_without_identities_still_load() {
        // A file written before identities were recorded (canonical paths, no identity).
        let old = r#"{
            "source": "/dev/sdb", "dest": "/dev/sdc", "metadata": "/dev/sdd",
            "region_size": 65536, "ignore_source_mismatch": false, "no_hydration": false,
            "no_discard_passdown": false, "hydration_threshold": null, "batch_size": null,
            "rate": 0, "queues": null, "depth": 128, "number": -1, "force": false,
            "foreground": false
        }"#;
        let cfg: SavedConfig = serde_json::from_str(old).expect("old file loads");
        assert_eq!(cfg.config.dest, PathBuf::from("/dev/sdc"));
        assert!(cfg.source_identity.is_none() && cfg.dest_identity.is_none());
        assert!(!cfg.config.force_reformat_this_clone);
    }

    /// The keys of a saved configuration, as every version so far wrote them.
    const SAVED_KEYS: [&str; 25] = [
        "source",
        "dest",
        "metadata",
        "region_size",
        "ignore_source_mismatch",
        "no_hydration",
        "no_discard_passdown",
        "hydration_threshold",
        "batch_size",
        "rate",
        "queues",
        "depth",
        "number",
        "force",
        "force_reformat_this_clone",
        "dest_moved",
        "foreground",
        "buffered_io",
        "log_writes",
        "log_writes_size",
        "no_recovery",
        "recover",
        "source_timeout",
        "source_identity",
        "dest_identity",
    ];

    #[test]
    fn the_saved_format_is_unchanged_and_round_trips() -> serde_json::Result<()> {
        let full = r#"{
            "source": "/dev/sdb", "dest": "/dev/sdc", "metadata": "/dev/sdd",
            "region_size": 65536, "ignore_source_mismatch": false, "no_hydration": true,
            "no_discard_passdown": false, "hydration_threshold": 8, "batch_size": 4,
            "rate": 1048576, "queues": 2, "depth": 64, "number": -1, "force": false,
            "force_reformat_this_clone": false, "dest_moved": false, "foreground": false,
            "buffered_io": true, "log_writes": null, "log_writes_size": 1073741824,
            "no_recovery": false, "recover": false, "source_timeout": 30,
            "source_identity": null, "dest_identity": null
        }"#;
        // Written before `source_timeout` existed: loads with the default.
        let older: SavedConfig =
            serde_json::from_str(&full.replace(r#""source_timeout": 30,"#, ""))?;
        assert_eq!(older.config.source_timeout, 30);
        // A policy other than the default is saved, and kept.
        let idle: SavedConfig = serde_json::from_str(&full.replace(
            r#""rate": 1048576,"#,
            r#""rate": 1048576, "hydrate_when": "idle","#,
        ))?;
        assert_eq!(idle.config.hydrate_when, crate::engine::HydrateWhen::Idle);
        assert_eq!(serde_json::to_value(&idle)?["hydrate_when"], "idle");
        let cfg: SavedConfig = serde_json::from_str(full)?;
        assert_eq!(cfg.config.hydration_threshold, Some(8));
        assert_eq!(cfg.config.queues, Some(2));
        assert!(cfg.config.no_hydration && cfg.config.buffered_io);
        let v = serde_json::to_value(&cfg)?;
        let mut keys: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        let mut want = SAVED_KEYS.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(v, serde_json::from_str::<serde_json::Value>(full)?);
        Ok(())
    }

    #[test]
    fn verify_refuses_a_swapped_file() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let t = tempfile::tempdir()?;
        let (src, dst, other) = (t.path().join("s"), t.path().join("d"), t.path().join("o"));
        for p in [&src, &dst, &other] {
            std::fs::write(p, [0u8; 4096])?;
        }
        let text = format!(
            r#"{{"source": {:?}, "dest": {:?}, "metadata": "/m", "rate": 0, "depth": 1,
                "number": -1, "force": false, "foreground": false,
                "ignore_source_mismatch": false, "no_hydration": false,
                "no_discard_passdown": false}}"#,
            src, dst
        );
        let mut cfg: SavedConfig = serde_json::from_str(&text)?;
        cfg.source_identity = Some(DeviceIdentity::of_path(&src)?);
        cfg.dest_identity = Some(DeviceIdentity::of_path(&dst)?);
        let uuid = uuid::Uuid::nil();
        cfg.verify(Path::new("cfg.json"), &uuid)?;
        std::fs::rename(&other, &dst)?;
        let e = cfg
            .verify(Path::new("cfg.json"), &uuid)
            .expect_err("swapped destination");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("--dest {}", dst.display())),
            "{msg}"
        );
        assert!(msg.contains("expected regular file"), "{msg}");
        std::fs::remove_file(&src)?;
        let e = cfg.verify(Path::new("cfg.json"), &uuid).expect_err("gone");
        assert!(e.to_string().starts_with("--source"), "{e}");
        Ok(())
    }
}
