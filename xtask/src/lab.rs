//! `cargo xtask lab ...`: builds and runs the `netlab` binary (the NAT lab) with the given
//! arguments, so users need not remember the package name or that it needs root.

use anyhow::{bail, Context as _, Result};

use crate::project_root;

pub const HELP: &str = "\
Usage: cargo xtask lab <up|check|cleanup> [args]   (needs root, ip, nft, conntrack)

  lab up --a <nat> --b <nat> [--delay-ms N --loss-pct P --rate-mbit R]
        build a lab (nat: none, full-cone, port-restricted, symmetric, udp-blocked),
        print its topology and NAT self-checks, wait for Ctrl-C, then remove it
  lab check [--nat <nat>]...   verify every (or the named) NAT type behaves as named
  lab cleanup [--all]          remove namespaces left by labs whose process died
";

pub fn run(args: &[String]) -> Result<()> {
    if args.is_empty() || matches!(args[0].as_str(), "-h" | "--help" | "help") {
        print!("{HELP}");
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the NAT lab creates network namespaces and needs root: run as root (e.g. sudo -E cargo xtask lab ...)");
    }
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(project_root())
            .args(["run", "--quiet", "--locked", "-p", "netlab", "--"])
            .args(args)
            .status()
            .context("running cargo run -p netlab")?;
    if !status.success() {
        bail!("netlab exited with {status}");
    }
    Ok(())
}
