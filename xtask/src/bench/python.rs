//! `cargo xtask bench python`: the Python package (peer_portal) against quic-portal on loopback,
//! round trip and bulk in one run, as ratios. The measuring is done by
//! `python/bench/bench_vs_quic_portal.py`; this task prepares the venv and the builds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::cli::Args;

pub const HELP: &str = "\
Usage: cargo xtask bench python [options]

Builds peer_portal (maturin develop, release) into the venv target/pyvenv (created if missing,
with maturin and quic-portal 0.1.13 from PyPI) and quic-relay, then runs
python/bench/bench_vs_quic_portal.py. Each library's server runs in a child Python process and
its client in the script, alternating libraries in every repetition:

  peer_portal             Portal.create_server/create_client through a local quic-relay
                          (the hole-punched direct path)
  quic-portal             its direct API, Portal.listen / Portal.connect (no STUN): the baseline
  peer_portal relay-only  the relayed path, for information (no target)

  rtt p50/p99   1 KiB message, client send -> server echo -> client recv (--rtt-count of them)
  bulk          --bulk-count messages of 1 MiB one way, until the server acknowledges the last

Ratios are peer_portal / quic-portal: round trip p50 and p99 <= 1.0 and bulk >= 1.0 meet the
targets (PASS/FAIL in the table).

Options:
  --quick           a CI smoke run: debug build, 1 repetition, 200 round trips, 32 MiB bulk
  --reps N          repetitions (default 3; medians are reported)
  --rtt-count N     1 KiB round trips per repetition (default 2000)
  --bulk-count N    1 MiB messages per bulk run (default 512)
  --no-build        use the package and relay already built
  -h, --help        this text

Exits non-zero when something could not be measured (a peer failed, a wrong path), zero when
a target is only missed (the table says FAIL).
";

/// The quic-portal release the reference figures were measured with.
const QUIC_PORTAL: &str = "quic-portal==0.1.13";

/// The venv that `.ci/run`, the NAT-lab test and this benchmark share.
pub fn venv() -> PathBuf {
    crate::target_dir().join("pyvenv")
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Creates the venv if needed and installs `packages` into it with pip when `import_check`
/// fails there.
pub fn ensure_venv(import_check: &str, packages: &[&str]) -> Result<PathBuf> {
    let venv = venv();
    let python = venv.join("bin/python");
    if !python.is_file() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("create the venv (needs python3 with the venv module)")?;
    }
    let ok = Command::new(&python)
        .args(["-c", import_check])
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !venv.join("bin/maturin").is_file() {
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(packages))?;
    }
    Ok(python)
}

/// `maturin <args>` for python/Cargo.toml with the venv active and the workspace's target dir.
pub fn maturin(args: &[&str]) -> Result<()> {
    let venv = venv();
    let path = std::env::join_paths(std::iter::once(venv.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    run(Command::new(venv.join("bin/maturin"))
        .args(args)
        .arg("--manifest-path")
        .arg(crate::project_root().join("python/Cargo.toml"))
        .env("VIRTUAL_ENV", &venv)
        .env("PATH", path)
        .env("CARGO_TARGET_DIR", crate::target_dir()))
}

pub fn run_bench(args: &[String]) -> Result<()> {
    let mut a = Args::new(args);
    let Some(common) = super::Common::parse(&mut a, HELP)? else {
        return Ok(());
    };
    let (quick, no_build) = (common.quick, common.no_build);
    let reps = common.reps(1, 3);
    let rtt: u32 = a
        .parsed("--rtt-count")?
        .unwrap_or(if quick { 200 } else { 2000 });
    let bulk: u32 = a
        .parsed("--bulk-count")?
        .unwrap_or(if quick { 32 } else { 512 });
    a.finish()?;
    let python = ensure_venv(
        "import quic_portal",
        &["maturin>=1.5,<2", QUIC_PORTAL, "pytest"],
    )?;
    let profile = if quick { "debug" } else { "release" };
    if !no_build {
        if quick {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            run(Command::new(cargo)
                .current_dir(crate::project_root())
                .args(["build", "--locked", "-p", "quic-relay"]))?;
            maturin(&["develop"])?;
        } else {
            super::build_release(&["quic-relay"])?;
            maturin(&["develop", "--release"])?;
        }
    }
    let relay = crate::target_dir().join(profile).join("quic-relay");
    if !relay.is_file() {
        bail!(
            "{} not found (build it, or drop --no-build)",
            relay.display()
        );
    }
    println!(
        "bench python: peer_portal ({profile} build) against {QUIC_PORTAL}, {reps} repetition(s)"
    );
    run(Command::new(&python)
        .arg(script())
        .arg("--relay-bin")
        .arg(&relay)
        .args(["--reps", &reps.to_string()])
        .args(["--rtt-count", &rtt.to_string()])
        .args(["--bulk-count", &bulk.to_string()]))?;
    if quick {
        println!(
            "(--quick measures a debug build: it checks that the benchmark runs; its ratios say \
             nothing about the targets)"
        );
    }
    Ok(())
}

fn script() -> PathBuf {
    Path::new(&crate::project_root()).join("python/bench/bench_vs_quic_portal.py")
}
