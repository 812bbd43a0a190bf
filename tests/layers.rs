//! The layering rule, checked: each module of the library uses only the modules below it
//! (`io` -> `metadata`, `logwrites` -> `engine` -> `ublk` -> `daemon` -> `cli`), and `anyhow`
//! is used only at the command-line edge. A `crate::X` path or a `use crate::X` anywhere in a
//! module's files (tests included) counts.

use std::path::{Path, PathBuf};

/// Each module with the modules it may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("io", &[]),
    ("metadata", &["io"]),
    ("logwrites", &["io"]),
    ("engine", &["io", "metadata"]),
    ("ublk", &["io", "engine"]),
    ("daemon", &["io", "metadata", "logwrites", "engine", "ublk"]),
    (
        "cli",
        &["io", "metadata", "logwrites", "engine", "ublk", "daemon"],
    ),
];

const MODULES: &[&str] = &[
    "io",
    "metadata",
    "logwrites",
    "engine",
    "ublk",
    "daemon",
    "cli",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The modules of the crate that `text` names through `crate::`.
fn used_modules(text: &str) -> Vec<&'static str> {
    MODULES
        .iter()
        .copied()
        .filter(|m| {
            let needle = format!("crate::{m}");
            text.match_indices(&needle).any(|(i, _)| {
                let after = text[i + needle.len()..].chars().next();
                !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
            })
        })
        .collect()
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (module, allowed) in ALLOWED {
        let mut files = Vec::new();
        rust_files(&src.join(module), &mut files);
        assert!(!files.is_empty(), "no files in src/{module}");
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read source");
            for used in used_modules(&text) {
                if used != *module && !allowed.contains(&used) {
                    violations.push(format!("{} uses crate::{used}", f.display()));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn anyhow_only_at_the_command_line_edge() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let edge = [src.join("cli"), src.join("main.rs"), src.join("bin")];
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !edge.iter().any(|e| f.starts_with(e)))
        .filter(|f| {
            let text = std::fs::read_to_string(f).expect("read source");
            text.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .any(|l| l.contains("anyhow::") || l.contains("use anyhow"))
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(offenders.is_empty(), "anyhow below the CLI: {offenders:?}");
}

#[test]
fn the_checker_sees_a_violation() {
    // The rule's own check: an upward path is found, a longer name is not mistaken for it.
    assert_eq!(used_modules("use crate::engine::Engine;"), vec!["engine"]);
    assert!(used_modules("crate::engines_and_more").is_empty());
}
