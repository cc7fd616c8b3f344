//! `cargo xtask bench multipath`: mqproxy over two shaped paths (100 Mbit/s, 25 ms one way
//! each) against a single path, in the namespace lab, all in one run, with each ratio printed.
//! The measurement is the test `bench_multipath` in mqproxy's `netlab_multipath` tests, which
//! exists only with mqproxy's `bench-multipath` feature (it needs the lab library, which xtask
//! does not link); this task builds it in release with that feature and runs it.

use anyhow::{bail, Context as _, Result};

use crate::cli::Args;
use crate::project_root;

pub const HELP: &str = "\
Usage: cargo xtask bench multipath [options]   (needs root, ip, nft: it builds a netns lab)

Builds mqproxy's lab tests in release and runs the multipath benchmark: a client namespace with
two paths to a server namespace, each a user-space shaped link of 100 Mbit/s with 25 ms one-way
delay (1,000-frame queue). In the same run, a single path (the client without --path) and two
paths (--path twice, minrtt) carry:

  1 TCP flow     one SOCKS5 CONNECT download              target: >= 1.8x the single path
  16 TCP flows   sixteen parallel downloads, aggregate     target: >= 1.9x
  UDP            1,200 B packets offered at 250 Mbit/s     target: >= 1.8x
  backup         --scheduler backup: share of the bytes on the primary interface   >= 95 %

First it runs the lab tests that CI also runs: each path cut in turn during a 48 MiB download
and UDP pings every 20 ms (it prints the download time, the longest gap between UDP replies
and how long after its link came back the cut path was re-added, and fails unless the download
is byte exact, the UDP session survived and the gap stayed under 1.5 s), and a relay session
joining a direct path (the download finishes through the relay after the direct path is cut).

Options:
  --quick     one repetition of shorter transfers (48 MiB instead of 96, UDP for 3 s)
  --reps N    repetitions (default 3; medians are reported)
  -h, --help  this text
";

pub fn run(args: &[String]) -> Result<()> {
    let mut a = Args::new(args);
    if a.flag("--help") || a.flag("-h") {
        print!("{HELP}");
        return Ok(());
    }
    let quick = a.flag("--quick");
    let reps: Option<usize> = a.parsed("--reps")?;
    a.finish()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the multipath benchmark builds network namespaces and needs root (sudo -E cargo xtask bench multipath)");
    }
    let reps = reps.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(project_root())
            .args([
                "test",
                "--release",
                "--locked",
                "-p",
                "mqproxy",
                "--features",
                "bench-multipath",
                "--test",
                "netlab_multipath",
                "--",
                // The lab tests (path cut, relay path) and the benchmark.
                "--include-ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("MQPROXY_BENCH_REPS", reps.to_string())
            .env("MQPROXY_BENCH_QUICK", if quick { "1" } else { "0" })
            // A lab test must run, not skip, when asked for explicitly.
            .env("CI", "true")
            .status()
            .context("running cargo test")?;
    if !status.success() {
        bail!("the multipath benchmark failed ({status})");
    }
    Ok(())
}
