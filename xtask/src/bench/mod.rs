//! `cargo xtask bench ...`: performance measurements, each against a baseline from the same run.

pub mod forwarder;
mod load;
mod metrics;
pub mod mqproxy;
mod multiaddr;
pub mod multipath;
pub mod python;
pub mod relay;
pub mod sdk;
mod sys;
pub mod table;
pub mod uot;

use anyhow::{bail, Result};

pub const HELP: &str = "\
Usage: cargo xtask bench <target> [options]

Targets:
  relay    quic-relay: loss, CPU per datagram, latency, memory per session, registration rate
           (`cargo xtask bench relay --help`)
  mqproxy  mqproxy: UDP and TCP through SOCKS5 against direct, shadowsocks-libev and -rust
           (`cargo xtask bench mqproxy --help`)
  uot      udp-over-tcp: loss at 100,000/s, highest rate, round trip, against direct UDP
           (`cargo xtask bench uot --help`)
  multipath  mqproxy over two shaped 100 Mbit/s paths against one, in the netns lab
           (`cargo xtask bench multipath --help`)
  sdk      peer-sdk: bulk QUIC through the relay against direct, connect times, ratio
           (`cargo xtask bench sdk --help`)
  python   the Python package peer_portal against quic-portal: round trip, bulk, ratios
           (`cargo xtask bench python --help`)
";

pub fn run(args: &[String]) -> Result<()> {
    match args.split_first() {
        Some((t, rest)) if t == "relay" => relay::run(rest),
        Some((t, rest)) if t == "mqproxy" => mqproxy::run(rest),
        Some((t, rest)) if t == "uot" => uot::run(rest),
        Some((t, rest)) if t == "multipath" => multipath::run(rest),
        Some((t, rest)) if t == "sdk" => sdk::run(rest),
        Some((t, rest)) if t == "python" => python::run_bench(rest),
        None => {
            print!("{HELP}");
            Ok(())
        }
        Some((h, _)) if h == "--help" || h == "-h" || h == "help" => {
            print!("{HELP}");
            Ok(())
        }
        Some((other, _)) => bail!("unknown benchmark `{other}`; run `cargo xtask bench --help`"),
    }
}

/// The options every measuring bench takes: `--quick`, `--no-build` and `--reps N`.
#[derive(Debug, Clone, Copy)]
pub struct Common {
    /// `--quick`: shorter runs (CI).
    pub quick: bool,
    /// `--no-build`: use the release binaries as they are.
    pub no_build: bool,
    reps: Option<usize>,
}

impl Common {
    /// Takes the common options from `a`; `None` when `--help`/`-h` asked for `help`, which is
    /// then printed.
    pub fn parse(a: &mut crate::cli::Args, help: &str) -> Result<Option<Self>> {
        if a.flag("--help") || a.flag("-h") {
            print!("{help}");
            return Ok(None);
        }
        Ok(Some(Common {
            quick: a.flag("--quick"),
            no_build: a.flag("--no-build"),
            reps: a.parsed("--reps")?,
        }))
    }

    /// `quick` under `--quick`, else `full`.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// Repetitions: `--reps`, else the default for the mode; at least one.
    pub fn reps(&self, quick: usize, full: usize) -> usize {
        self.reps.unwrap_or(self.pick(quick, full)).max(1)
    }
}

/// In a debug build of xtask, runs the release one instead with the same arguments (plus
/// `--no-build`: the caller has just built it): a debug-built load generator would measure
/// itself, not what it loads. Returns only on failure, or at once in a release build.
pub fn exec_release(bench: &str, args: &[String]) -> Result<()> {
    use anyhow::Context as _;
    use std::os::unix::process::CommandExt as _;
    if !cfg!(debug_assertions) {
        return Ok(());
    }
    let release = crate::target_dir().join("release").join("xtask");
    let err = std::process::Command::new(&release)
        .args(["bench", bench])
        .args(args)
        .arg("--no-build")
        .exec();
    Err(err).with_context(|| format!("exec {}", release.display()))
}

/// Whether `tool` is a file in one of the `PATH` directories.
pub fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// `cargo build --release --locked -p <each package>`, from the project root.
pub fn build_release(packages: &[&str]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(crate::project_root())
        .args(["build", "--release", "--locked"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let status = cmd.status().context("run cargo build")?;
    if !status.success() {
        anyhow::bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// A loopback port free for both TCP and UDP at the time of the call, bound and released at
/// once: for third-party programs that take a port number and bind it with both protocols
/// (shadowsocks with UDP relay). A port the kernel hands out for TCP may be in use for UDP
/// (by one of the benchmark's own ephemeral UDP sockets, say), and shadowsocks-libev then
/// runs on with TCP alone and its UDP relay talking to whatever holds the port.
pub fn free_tcp_udp_port() -> anyhow::Result<u16> {
    for _ in 0..64 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no loopback port free for both TCP and UDP in 64 tries")
}

/// After a sender stops: waits until the receiver has been quiet for `quiet` (it stamps
/// `last_rx_us`, microseconds since `epoch`, at each arrival) or, with a trickle still
/// arriving, for `max` at most, checking every `poll`. What was in flight is then counted.
pub fn drain(
    epoch: std::time::Instant,
    last_rx_us: &std::sync::atomic::AtomicU64,
    quiet: std::time::Duration,
    max: std::time::Duration,
    poll: std::time::Duration,
) {
    let start = std::time::Instant::now();
    while start.elapsed() < max {
        std::thread::sleep(poll);
        let us = last_rx_us.load(std::sync::atomic::Ordering::Relaxed);
        let last = epoch + std::time::Duration::from_micros(us);
        if last.elapsed() >= quiet && start.elapsed() >= quiet {
            break;
        }
    }
}

/// Median of the values (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
