//! `cargo xtask --help` lists every task and every flag the tasks read, and `--version` names
//! xtask: the flags are collected from the source (`.flag("--x")`, `.value(..)`, `.parsed(..)`),
//! so a flag added without help text fails here.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_xtask");

/// Hidden subcommands (spawned by the benchmarks themselves) and the argument reader's own tests.
const INTERNAL: &[&str] = &["forwarder.rs", "table.rs", "cli.rs"];

fn flags_in(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).expect("read xtask/src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            flags_in(&path, out);
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if !name.ends_with(".rs") || INTERNAL.contains(&name) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read source");
        for call in [".flag(\"", ".value(\"", ".parsed(\"", ">(\""] {
            for (i, _) in text.match_indices(call) {
                let rest = &text[i + call.len()..];
                let Some(end) = rest.find('"') else { continue };
                let flag = &rest[..end];
                if flag.starts_with("--") {
                    out.push((name.to_owned(), flag.to_owned()));
                }
            }
        }
    }
}

#[test]
fn help_lists_every_task_and_every_flag() {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run xtask --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for task in [
        "bench relay",
        "bench mqproxy",
        "bench uot",
        "bench multipath",
        "lab",
        "deploy",
        "dist",
    ] {
        assert!(
            help.contains(&format!("=== cargo xtask {task} ===")),
            "no section for {task}"
        );
    }
    // Every benchmark documents --quick in its own section.
    for bench in ["relay", "mqproxy", "uot", "multipath"] {
        let section = help
            .split(&format!("=== cargo xtask bench {bench} ==="))
            .nth(1)
            .and_then(|s| s.split("\n=== ").next())
            .expect("section");
        assert!(
            section.contains("--quick"),
            "bench {bench} does not document --quick"
        );
    }
    let mut flags = Vec::new();
    flags_in(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut flags,
    );
    assert!(
        flags.len() > 20,
        "found only {flags:?}: has the argument reader changed?"
    );
    let missing: Vec<_> = flags
        .iter()
        .filter(|(_, f)| !help.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "flags read but not in `cargo xtask --help`: {missing:?}"
    );
    // No arguments prints the same.
    let bare = Command::new(BIN).output().expect("run xtask");
    assert_eq!(String::from_utf8_lossy(&bare.stdout), help);
}

#[test]
fn version_names_xtask() {
    let out = Command::new(BIN)
        .arg("--version")
        .output()
        .expect("run xtask --version");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("xtask {}", env!("CARGO_PKG_VERSION"))
    );
}
