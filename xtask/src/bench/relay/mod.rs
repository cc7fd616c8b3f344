//! `cargo xtask bench relay`: measures quic-relay on loopback against baselines from the same
//! run (direct path, a minimal forwarder, a bare hash map) and prints each ratio and target.

mod cpu;
mod harness;
mod instr;
mod latency;
mod loss;
mod memory;
mod reg;
mod report;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{forwarder, sys};
use crate::cli::Args;
use report::{render, Row};

pub const HELP: &str = "\
Usage: cargo xtask bench relay [options]

Builds quic-relay and xtask in release (then re-runs itself from the release build, so the load
generator and the baselines are optimised), starts a fresh relay on 127.0.0.1 for each part,
and measures it against baselines from the same run. `fwd` is a minimal forwarder (one thread,
recvmmsg/sendmmsg, fixed destination, no table): the floor any userspace relay sits on.

  loss     1200 B datagrams at 100k/s and 200k/s: relay vs direct path vs fwd
  cpu      CPU time per forwarded datagram at 50k/s: relay vs fwd (from /proc/<pid>)
  latency  ping-pong round trips (one in flight): relay vs direct vs fwd; added median. Run
           twice: all on one CPU (judged: every hop is a same-CPU wake-up, so the difference
           is the relay's own cost) and as the scheduler places things (shown: on a VM, waking
           an idle CPU costs tens of µs, so that difference is partly placement luck)
  memory   RSS growth per idle paired session at 1,000,000 sessions vs a bare std HashMap
  reg      REGs accepted per second (offered 250k/s from many 127/8 addresses) while a paired
           flow carries 20k/s: relay vs fwd answering every REG with ACK
  instr    user-space instructions per forwarded datagram at a paced 4k/s, counted by callgrind
           (needs valgrind): relay vs fwd. Each runs a short and a long flow; the difference
           of the totals over the difference of the datagrams delivered is the cost per
           datagram, start-up and shutdown cancelled out. Does not wobble with the host's load

Options:
  --quick            short runs, 100,000 sessions, one repetition (a ~30 s smoke test)
  --only LIST        comma-separated parts to run, e.g. --only loss,cpu
  --reps N           repetitions per measurement (default 3; medians are reported)
  --sessions N       sessions for the memory part (default 1,000,000; 100,000 with --quick)
  --relay-bin PATH   measure this relay binary instead of target/release/quic-relay
  --no-build         do not run cargo build first
  --pin              run the relay and the forwarder on the last CPU and the load generator on
                     the first: both contenders get a core of their own and the same placement,
                     which steadies loss at high rates; but every hop then wakes another
                     (possibly idle) CPU, which inflates latency on VMs, and the load
                     generator gets one core only. Default: the scheduler places everything
  --wait-quiet SECS  before each part, wait up to SECS for other processes to stop loading the
                     host (default 0: start at once, with a warning when it is busy)
  -h, --help         this text

Relay logs go to target/bench-relay/. Exits 0 when targets are missed (the table says so) and
non-zero when a part could not be measured.
";

/// Above this share of all CPUs in use before a part starts, something else is loading the host
/// and the figures will be noisy; the benchmark says so.
const BUSY_WARNING: f64 = 0.2;

/// How long a freshly started relay may take to serve its metrics.
pub(super) const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for the relay's published session count to reach what we registered.
pub(super) const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Local addresses of the two peers of a measured flow: distinct IPs, so the relay's original
/// registration form sees two peers rather than one peer rebinding.
pub(super) const PEER_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
pub(super) const PEER_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Loss,
    Cpu,
    Latency,
    Memory,
    Reg,
    Instr,
}

impl Part {
    const ALL: [Part; 6] = [
        Part::Loss,
        Part::Cpu,
        Part::Latency,
        Part::Memory,
        Part::Reg,
        Part::Instr,
    ];

    fn name(self) -> &'static str {
        match self {
            Part::Loss => "loss",
            Part::Cpu => "cpu",
            Part::Latency => "latency",
            Part::Memory => "memory",
            Part::Reg => "reg",
            Part::Instr => "instr",
        }
    }
}

/// Durations and sizes of one invocation.
#[derive(Debug)]
pub(super) struct Plan {
    reps: usize,
    loss_duration: Duration,
    cpu_duration: Duration,
    latency_rounds: u64,
    memory_sessions: u64,
    reg_duration: Duration,
    /// The short and the long flow of the instruction count.
    instr_durations: (Duration, Duration),
}

impl Plan {
    fn new(quick: bool, reps: Option<usize>, sessions: Option<u64>) -> Self {
        let secs =
            |full: f64, short: f64| Duration::from_secs_f64(if quick { short } else { full });
        Plan {
            reps: reps.unwrap_or(if quick { 1 } else { 3 }).max(1),
            loss_duration: secs(3.0, 0.5),
            cpu_duration: secs(3.0, 1.0),
            latency_rounds: if quick { 2_000 } else { 20_000 },
            memory_sessions: sessions.unwrap_or(if quick { 100_000 } else { 1_000_000 }),
            reg_duration: secs(2.0, 0.5),
            instr_durations: (secs(1.0, 0.5), secs(4.0, 1.5)),
        }
    }
}

#[derive(Debug)]
struct Options {
    parts: Vec<Part>,
    plan: Plan,
    relay_bin: Option<PathBuf>,
    no_build: bool,
    /// How long to wait, before each part, for other processes to stop loading the host.
    wait_quiet: Duration,
    pin: bool,
}

/// What the benchmark needs while running.
#[derive(Debug)]
struct Ctx {
    relay_bin: PathBuf,
    /// The release-built xtask, which runs the hidden baseline tasks.
    xtask_bin: PathBuf,
    log_dir: PathBuf,
    plan: Plan,
    /// With `--pin`: the CPU the relay and the forwarder run on (the benchmark's own threads run
    /// on the others).
    server_cpu: Option<usize>,
}

pub fn run(args: &[String]) -> Result<()> {
    let Some(opts) = parse(args)? else {
        print!("{HELP}");
        return Ok(());
    };
    let target = crate::target_dir().join("release");
    if !opts.no_build {
        build(opts.relay_bin.is_none())?;
    }
    super::exec_release("relay", args)?;
    let mut ctx = Ctx {
        relay_bin: opts.relay_bin.unwrap_or_else(|| target.join("quic-relay")),
        xtask_bin: std::env::current_exe().context("path of this xtask binary")?,
        log_dir: crate::target_dir().join("bench-relay"),
        plan: opts.plan,
        server_cpu: None,
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if opts.pin && cpus >= 2 {
        // The server under test gets the last CPU to itself and the load generator the first,
        // so both contenders (relay and forwarder) see the same placement rather than whatever
        // the scheduler picked for a fresh or an old process.
        crate::process::pin_this_thread(0).context("pin the benchmark to CPU 0")?;
        ctx.server_cpu = Some(cpus - 1);
        println!(
            "pinned: relay and forwarder on CPU {}, load generator on CPU 0",
            cpus - 1
        );
    }
    if !ctx.relay_bin.is_file() {
        bail!(
            "relay binary {} not found (build it, or pass --relay-bin)",
            ctx.relay_bin.display()
        );
    }
    println!(
        "bench relay: {} on {} CPUs; parts {}; {} repetition(s); logs in {}",
        ctx.relay_bin.display(),
        cpus,
        opts.parts
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(","),
        ctx.plan.reps,
        ctx.log_dir.display()
    );
    let mut rows = Vec::new();
    let mut broken = Vec::new();
    for part in opts.parts {
        println!("\n== {} ==", part.name());
        let busy = wait_until_quiet(opts.wait_quiet)?;
        if busy > BUSY_WARNING {
            println!(
                "  warning: {:.0} % of the CPUs were busy before this part started (other \
                 processes); its figures will be noisy",
                busy * 100.0
            );
        }
        let started = Instant::now();
        let result = match part {
            Part::Loss => loss::part_loss(&ctx),
            Part::Cpu => cpu::part_cpu(&ctx),
            Part::Latency => latency::part_latency(&ctx),
            Part::Memory => memory::part_memory(&ctx),
            Part::Reg => reg::part_reg(&ctx),
            Part::Instr => instr::part_instr(&ctx),
        };
        println!(
            "  ({} took {:.1} s)",
            part.name(),
            started.elapsed().as_secs_f64()
        );
        match result {
            Ok(r) => rows.extend(r),
            Err(e) => {
                // Keep measuring the other parts; the failure shows in the table and exit code.
                eprintln!("{} failed: {e:#}", part.name());
                rows.push(Row::error(part.name(), &e));
                broken.push(part.name());
            }
        }
    }
    println!("\n{}", render(&rows));
    println!(
        "ratio = relay / baseline (one per baseline where two are listed); fwd = the minimal \
         forwarder (`xtask {}`).\nMedians of {} repetition(s).",
        forwarder::SUBCOMMAND,
        ctx.plan.reps
    );
    if !broken.is_empty() {
        bail!("could not measure: {}", broken.join(", "));
    }
    Ok(())
}

fn parse(args: &[String]) -> Result<Option<Options>> {
    let mut a = Args::new(args);
    if a.flag("--help") || a.flag("-h") {
        return Ok(None);
    }
    let quick = a.flag("--quick");
    let no_build = a.flag("--no-build");
    let wait_quiet = Duration::from_secs(a.parsed("--wait-quiet")?.unwrap_or(0));
    let pin = a.flag("--pin");
    let reps = a.parsed("--reps")?;
    let sessions = a.parsed("--sessions")?;
    let relay_bin = a.value("--relay-bin")?.map(PathBuf::from);
    let parts = match a.value("--only")? {
        None => Part::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| {
                Part::ALL
                    .into_iter()
                    .find(|p| p.name() == s.trim())
                    .with_context(|| {
                        format!(
                            "unknown part `{s}` (expected loss, cpu, latency, memory, reg, instr)"
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?,
    };
    a.finish()?;
    Ok(Some(Options {
        parts,
        plan: Plan::new(quick, reps, sessions),
        relay_bin,
        no_build,
        wait_quiet,
        pin,
    }))
}

/// Samples how busy the host is until it is below [`BUSY_WARNING`] or `patience` has passed;
/// returns the last sample.
fn wait_until_quiet(patience: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut announced = false;
    loop {
        let busy = sys::host_busy(Duration::from_millis(300))?;
        if busy <= BUSY_WARNING || start.elapsed() >= patience {
            return Ok(busy);
        }
        if !announced {
            println!(
                "  waiting up to {} s for the host to quieten ({:.0} % busy)",
                patience.as_secs(),
                busy * 100.0
            );
            announced = true;
        }
    }
}

/// Builds what the benchmark runs, in release, with the committed lock file.
fn build(relay: bool) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::project_root())
        .args(["build", "--release", "--locked", "-p", "xtask"]);
    if relay {
        cmd.args(["-p", "quic-relay"]);
    }
    let status = cmd.status().context("run cargo build")?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parts_and_rejects_unknown_ones() -> Result<()> {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = parse(&args(&["--quick", "--only", "cpu,loss"]))?.context("options")?;
        assert_eq!(o.parts, vec![Part::Cpu, Part::Loss]);
        assert_eq!(o.plan.reps, 1);
        assert_eq!(o.plan.memory_sessions, 100_000);
        assert!(parse(&args(&["--only", "cpu,bogus"])).is_err());
        assert!(parse(&args(&["--help"]))?.is_none());
        Ok(())
    }
}
