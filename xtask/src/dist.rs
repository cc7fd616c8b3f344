//! `cargo xtask dist`: release archives (`<name>-<version>-<target>.tar.gz`) with the binary,
//! README, licenses and `deploy/`, plus SHA-256 sums, made with the system `tar`, `gzip` and
//! `sha256sum` (xtask shells out anyway, and those tools are what users verify with).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::cli::Args;
use crate::{project_root, target_dir};

pub const HELP: &str = "\
Usage: cargo xtask dist [--bin NAME]... [--wheel] [--out DIR]

Builds the release binaries (cargo build --release --locked) and packs one archive per
archive: <out>/<name>-<version>-<target>.tar.gz, holding <name>-<version>-<target>/ with the
binaries (quic-relay; mqproxy with udp-over-tcp and udpsocks), completions/ (bash, zsh, fish)
and man/ (one page per command and subcommand), both written by each binary from its own clap
definition, README.md, LICENSE-MIT, LICENSE-APACHE, deploy/ (units, environment files,
cloud-init, the guide) and SHA256SUMS of those files (check with `sha256sum -c SHA256SUMS`
inside the unpacked directory). <out>/SHA256SUMS lists the archives made by this run.
Archives are reproducible: sorted, owner 0, mtime from SOURCE_DATE_EPOCH or the last commit.

With --wheel it also builds the Python package (python/, peer_portal) as an abi3 wheel for
CPython >= 3.9 on this platform (`maturin build --release --locked`, maturin from the venv
target/pyvenv, created if missing): <out>/peer_portal-<version>-cp39-abi3-<platform>.whl, listed
in <out>/SHA256SUMS too.

Options:
  --bin NAME   quic-relay or mqproxy; repeatable (default: both)
  --wheel      also build the peer_portal wheel
  --out DIR    where the archives go (default: target/dist)
";

/// An archive that can be packed, the package directory its version comes from, and the
/// binaries it holds (the first is the archive's name).
const BINARIES: &[(&str, &str, &[&str])] = &[
    ("quic-relay", "relay", &["quic-relay"]),
    (
        "mqproxy",
        "mqproxy",
        &["mqproxy", "udp-over-tcp", "udpsocks"],
    ),
];

/// Binaries shipped in an archive whose package is not theirs, and their package: the
/// udp-over-tcp tool ships with mqproxy, as it did before it became a crate of its own.
const FOREIGN_BINARIES: &[(&str, &str)] = &[("udp-over-tcp", "udp-over-tcp")];

/// How the binaries are asked for their completions and man pages (relay/src/cli_assets.rs).
const CLI_ASSETS_ENV: &str = "CLI_ASSETS_DIR";

/// Files from the workspace root that every archive carries.
const ROOT_FILES: &[&str] = &["README.md", "LICENSE-MIT", "LICENSE-APACHE"];

pub fn run(args: &[String]) -> Result<()> {
    if matches!(
        args.first().map(String::as_str),
        Some("-h" | "--help" | "help")
    ) {
        print!("{HELP}");
        return Ok(());
    }
    let mut a = Args::new(args);
    let mut bins = Vec::new();
    while let Some(b) = a.value("--bin")? {
        let Some(&archive) = BINARIES.iter().find(|(n, _, _)| *n == b) else {
            bail!("--bin {b}: expected quic-relay or mqproxy");
        };
        bins.push(archive);
    }
    if bins.is_empty() {
        bins = BINARIES.to_vec();
    }
    let wheel = a.flag("--wheel");
    let out = a
        .value("--out")?
        .map_or_else(|| target_dir().join("dist"), |d| project_root().join(d));
    a.finish()?;

    build(&bins)?;
    let target = host_target()?;
    let epoch = source_date_epoch();
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let mut archives = Vec::new();
    for &(name, dir, binaries) in &bins {
        let version = package_version(&project_root().join(dir).join("Cargo.toml"))?;
        let stem = format!("{name}-{version}-{target}");
        let archive = pack(&out, &stem, binaries, &epoch)?;
        println!("{}", archive.display());
        archives.push(format!("{stem}.tar.gz"));
    }
    if wheel {
        archives.push(build_wheel(&out)?);
    }
    let sums = sha256sum(&out, &archives)?;
    std::fs::write(out.join("SHA256SUMS"), sums)
        .with_context(|| format!("write {}", out.join("SHA256SUMS").display()))?;
    println!("{}", out.join("SHA256SUMS").display());
    Ok(())
}

/// Builds the peer_portal wheel into `out`; returns its file name.
fn build_wheel(out: &Path) -> Result<String> {
    crate::bench::python::ensure_venv("import sys", &["maturin>=1.5,<2"])?;
    let before: Vec<_> = wheels_in(out)?;
    let out_arg = out.to_string_lossy().into_owned();
    crate::bench::python::maturin(&["build", "--release", "--locked", "--out", &out_arg])?;
    let made: Vec<_> = wheels_in(out)?
        .into_iter()
        .filter(|w| !before.contains(w))
        .collect();
    // A rebuild of the same version overwrites the old wheel: then it is the only one.
    let wheel = match made.as_slice() {
        [w] => w.clone(),
        [] => wheels_in(out)?
            .into_iter()
            .find(|w| w.starts_with("peer_portal-"))
            .context("maturin build wrote no wheel")?,
        more => bail!("maturin build wrote several wheels: {more:?}"),
    };
    println!("{}", out.join(&wheel).display());
    Ok(wheel)
}

fn wheels_in(dir: &Path) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let name = e.context("list a dist entry")?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".whl") {
            v.push(name.into_owned());
        }
    }
    Ok(v)
}

fn build(bins: &[(&str, &str, &[&str])]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(project_root())
        .args(["build", "--release", "--locked"]);
    for (name, _, binaries) in bins {
        cmd.args(["-p", name]);
        for b in *binaries {
            if let Some((_, package)) = FOREIGN_BINARIES.iter().find(|(bin, _)| bin == b) {
                cmd.args(["-p", package]);
            }
            cmd.args(["--bin", b]);
        }
    }
    let status = cmd.status().with_context(|| format!("run {cargo}"))?;
    if !status.success() {
        bail!("cargo build --release --locked failed ({status})");
    }
    Ok(())
}

/// Stages `<out>/<stem>/`, writes its SHA256SUMS, packs it and removes the staging directory.
fn pack(out: &Path, stem: &str, binaries: &[&str], epoch: &str) -> Result<PathBuf> {
    let root = project_root();
    let stage = out.join(stem);
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("remove {}", stage.display()))?;
    }
    std::fs::create_dir_all(stage.join("deploy"))
        .with_context(|| format!("create {}", stage.display()))?;
    let mut files = Vec::new();
    for name in binaries {
        let bin = target_dir().join("release").join(name);
        copy(&bin, &stage.join(name))?;
        files.push((*name).to_owned());
        files.extend(cli_assets(&bin, &stage)?);
    }
    for f in ROOT_FILES {
        copy(&root.join(f), &stage.join(f))?;
        files.push((*f).to_owned());
    }
    let mut deploy: Vec<_> = std::fs::read_dir(root.join("deploy"))
        .context("list deploy/")?
        .collect::<Result<_, _>>()
        .context("list deploy/")?;
    deploy.sort_by_key(|e| e.file_name());
    for e in deploy {
        if e.file_type().context("stat a deploy/ entry")?.is_file() {
            let rel = format!("deploy/{}", e.file_name().to_string_lossy());
            copy(&e.path(), &stage.join(&rel))?;
            files.push(rel);
        }
    }
    let sums = sha256sum(&stage, &files)?;
    std::fs::write(stage.join("SHA256SUMS"), sums).context("write SHA256SUMS")?;

    let archive = out.join(format!("{stem}.tar.gz"));
    let status = Command::new("tar")
        .current_dir(out)
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            &format!("--mtime=@{epoch}"),
            // gzip -n: no name or timestamp in the gzip header, so equal inputs give equal bytes.
            "--use-compress-program=gzip -n",
            "-cf",
        ])
        .arg(&archive)
        .arg(stem)
        .status()
        .context("run tar")?;
    if !status.success() {
        bail!("tar of {} failed ({status})", stage.display());
    }
    std::fs::remove_dir_all(&stage).with_context(|| format!("remove {}", stage.display()))?;
    Ok(archive)
}

/// Runs `bin` with [`CLI_ASSETS_ENV`] and sorts what it writes into `<stage>/completions/`
/// and `<stage>/man/`; returns their paths relative to the stage, sorted.
fn cli_assets(bin: &Path, stage: &Path) -> Result<Vec<String>> {
    let tmp = stage.join(".cli-assets");
    let out = Command::new(bin)
        .env(CLI_ASSETS_ENV, &tmp)
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} could not write its completions and man pages: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut entries: Vec<_> = std::fs::read_dir(&tmp)
        .with_context(|| format!("{} wrote nothing to {}", bin.display(), tmp.display()))?
        .collect::<Result<_, _>>()
        .context("list completions and man pages")?;
    entries.sort_by_key(|e| e.file_name());
    let mut files = Vec::new();
    for e in entries {
        let file = e.file_name().to_string_lossy().into_owned();
        let sub = if file.ends_with(".1") {
            "man"
        } else {
            "completions"
        };
        std::fs::create_dir_all(stage.join(sub)).context("create completions/ or man/")?;
        let rel = format!("{sub}/{file}");
        std::fs::rename(e.path(), stage.join(&rel)).with_context(|| format!("move {rel}"))?;
        files.push(rel);
    }
    std::fs::remove_dir_all(&tmp).with_context(|| format!("remove {}", tmp.display()))?;
    if !files.iter().any(|f| f.starts_with("man/")) || files.len() < 4 {
        bail!("{} wrote only {files:?}", bin.display());
    }
    Ok(files)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copy {} to {}", from.display(), to.display()))
}

/// `sha256sum` output for `files` (relative to `dir`), in the format `sha256sum -c` reads.
fn sha256sum(dir: &Path, files: &[String]) -> Result<String> {
    let out = Command::new("sha256sum")
        .current_dir(dir)
        .arg("--")
        .args(files)
        .output()
        .context("run sha256sum (coreutils)")?;
    if !out.status.success() {
        bail!(
            "sha256sum in {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).context("sha256sum printed non-UTF-8")
}

/// The host target triple, as `rustc -vV` reports it.
fn host_target() -> Result<String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .arg("-vV")
        .output()
        .with_context(|| format!("run {rustc} -vV"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .with_context(|| format!("{rustc} -vV printed no host line"))
}

/// `version = "..."` of the `[package]` section.
fn package_version(manifest: &Path) -> Result<String> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("read {}", manifest.display()))?;
    parse_version(&text).with_context(|| format!("{}: no [package] version", manifest.display()))
}

fn parse_version(manifest: &str) -> Option<String> {
    let mut in_package = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package {
            if let Some(v) = line.strip_prefix("version") {
                let v = v.trim_start().strip_prefix('=')?.trim().trim_matches('"');
                return Some(v.to_owned());
            }
        }
    }
    None
}

/// Archive timestamps: SOURCE_DATE_EPOCH (the reproducible-builds convention), else the last
/// commit's time, else 0.
fn source_date_epoch() -> String {
    if let Ok(e) = std::env::var("SOURCE_DATE_EPOCH") {
        if e.parse::<u64>().is_ok() {
            return e;
        }
    }
    Command::new("git")
        .current_dir(project_root())
        .args(["log", "-1", "--format=%ct"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| s.parse::<u64>().is_ok())
        .unwrap_or_else(|| "0".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_comes_from_the_package_section() {
        let m = "[package]\nname = \"x\"\nversion = \"1.2.3\"\n[dependencies]\nversion = \"9\"\n";
        assert_eq!(parse_version(m).as_deref(), Some("1.2.3"));
        assert_eq!(parse_version("[dependencies]\nversion = \"9\"\n"), None);
        assert_eq!(
            parse_version("[package]\nversion.workspace = true\n"),
            None,
            "a workspace-inherited version is not silently misread"
        );
    }
}
