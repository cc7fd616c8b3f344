//! `cargo xtask --help` lists every task and every flag the tasks read, `--version` names
//! xtask, and the READMEs list every fuzz target. Flags and targets are collected from the
//! source (`.flag("--x")`, `.value(..)`, `.parsed(..)`; the fuzz manifests' `[[bin]]`s), so one
//! added without documentation fails here.

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
        "bench python",
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
    for bench in ["relay", "mqproxy", "uot", "multipath", "python"] {
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

/// The `name = "..."` of every `[[bin]]` in a fuzz crate's manifest.
fn fuzz_targets(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).expect("read the fuzz manifest");
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin {
            if let Some(v) = line.strip_prefix("name") {
                names.push(
                    v.trim_start()
                        .trim_start_matches('=')
                        .trim()
                        .trim_matches('"')
                        .to_owned(),
                );
            }
        }
    }
    names
}

#[test]
fn the_readmes_list_every_fuzz_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mq_readme =
        std::fs::read_to_string(root.join("mqproxy/README.md")).expect("mqproxy/README.md");
    for (krate, readmes) in [
        ("relay", vec![&readme]),
        ("mqproxy", vec![&readme, &mq_readme]),
    ] {
        let targets = fuzz_targets(&root.join(krate).join("fuzz/Cargo.toml"));
        assert!(!targets.is_empty(), "no fuzz targets found for {krate}");
        for t in &targets {
            for r in &readmes {
                let listed = r.contains(&format!("`{t}`")) || r.contains(&format!("fuzz run {t}`"));
                assert!(listed, "a README does not list {krate}'s fuzz target {t}");
            }
        }
    }
}
