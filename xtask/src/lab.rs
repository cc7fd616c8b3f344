//! `cargo xtask lab ...`: builds and runs the `netlab` binary (the NAT lab) with the given
//! arguments, so users need not remember the package name or that it needs root; `lab matrix`
//! runs peer-sdk's `lab_matrix` example (peer-sdk connections across every pair of NAT types).

use anyhow::{bail, Context as _, Result};

use crate::project_root;

pub const HELP: &str = "\
Usage: cargo xtask lab <up|check|matrix|cleanup> [args]   (needs root, ip, nft, conntrack)

  lab up --a <nat> --b <nat> [--delay-ms N --loss-pct P --rate-mbit R]
        build a lab (nat: none, full-cone, port-restricted, port-restricted-open,
        symmetric, symmetric-sequential, udp-blocked), print its topology and NAT
        self-checks, wait for Ctrl-C, then remove it
  lab check [--nat <nat>]...   verify every (or the named) NAT type behaves as named, IPv4 and IPv6
  lab matrix [--repeat N] [--nat <nat>]...
        connect two peer-sdk peers through a relay for every ordered pair (A dials,
        B listens) of the punchable NAT types (or the named ones), N times each in
        fresh labs (default 1), and print the path at connect, the median and
        slowest connect time and the direct share per pair (debug build)
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
    // The matrix needs the SDK and the relay, which the netlab binary does not link.
    let target: &[&str] = if args[0] == "matrix" {
        &["-p", "peer-sdk", "--example", "lab_matrix", "--"]
    } else {
        &["-p", "netlab", "--"]
    };
    let rest = if args[0] == "matrix" {
        &args[1..]
    } else {
        args
    };
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(project_root())
            .args(["run", "--quiet", "--locked"])
            .args(target)
            .args(rest)
            .status()
            .with_context(|| format!("running cargo run {}", target.join(" ")))?;
    if !status.success() {
        bail!("netlab exited with {status}");
    }
    Ok(())
}
