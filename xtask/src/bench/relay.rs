//! `cargo xtask bench relay`: measures quic-relay on loopback against baselines from the same
//! run (direct path, a minimal forwarder, a bare hash map) and prints each ratio and target.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::load::{self, Latency, LoadReport, LoadSpec};
use super::metrics::{self, Scrape, PUBLISH_PERIOD};
use super::multiaddr::{reg_datagram, Fleet, RegReport, Replies};
use super::sys::{self, bind_udp, local_v4};
use super::{forwarder, median, table};
use crate::cli::Args;
use crate::process::ChildGuard;

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

/// Targets from the issue.
const LOSS_TARGET_100K: f64 = 0.001;
const LOSS_TARGET_200K: f64 = 0.02;
const CPU_TARGET_US: f64 = 3.0;
const LATENCY_ADDED_TARGET_US: f64 = 50.0;
const MEMORY_TARGET_BYTES: f64 = 300.0;
const REG_TARGET_PER_SEC: f64 = 200_000.0;

/// The datagram size of the loss and CPU runs: a typical QUIC packet.
const DATAGRAM: usize = 1200;
/// Below this fraction of the planned rate, a loss row says what was really offered.
const OFFERED_SHORTFALL: f64 = 0.98;
/// Offered rate of the CPU runs: high enough to amortise fixed costs, low enough that neither
/// the relay nor the baseline is near saturation.
const CPU_RATE: u64 = 50_000;
/// REG rate while building the memory part's sessions; the relay is not being timed there.
const MEMORY_REG_RATE: u64 = 150_000;
/// Offered REG rate of the registration part: above the target, so the relay is the limit.
const REG_OFFERED_RATE: u64 = 250_000;
/// The paired flow that must keep moving while registrations pour in.
const REG_PAIRED_RATE: u64 = 20_000;
/// How many resend passes the memory part may use for REGs whose ACK never came.
const MEMORY_REG_PASSES: u32 = 5;
/// Sockets the registration fleets send from: each carries `sessions / 64` addresses per side.
const FLEET_SOCKETS: usize = 64;

/// Above this share of all CPUs in use before a part starts, something else is loading the host
/// and the figures will be noisy; the benchmark says so.
const BUSY_WARNING: f64 = 0.2;

/// How long a freshly started relay may take to serve its metrics.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for the relay's published session count to reach what we registered.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Local addresses of the two peers of a measured flow: distinct IPs, so the relay's original
/// registration form sees two peers rather than one peer rebinding.
const PEER_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const PEER_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Loss,
    Cpu,
    Latency,
    Memory,
    Reg,
}

impl Part {
    const ALL: [Part; 5] = [
        Part::Loss,
        Part::Cpu,
        Part::Latency,
        Part::Memory,
        Part::Reg,
    ];

    fn name(self) -> &'static str {
        match self {
            Part::Loss => "loss",
            Part::Cpu => "cpu",
            Part::Latency => "latency",
            Part::Memory => "memory",
            Part::Reg => "reg",
        }
    }
}

/// Durations and sizes of one invocation.
#[derive(Debug)]
struct Plan {
    reps: usize,
    loss_duration: Duration,
    cpu_duration: Duration,
    latency_rounds: u64,
    memory_sessions: u64,
    reg_duration: Duration,
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
    if cfg!(debug_assertions) {
        // A debug-built load generator or forwarder would measure itself, not the relay.
        let release = target.join("xtask");
        let err = Command::new(&release)
            .args(["bench", "relay"])
            .args(args)
            .arg("--no-build")
            .exec();
        return Err(err).with_context(|| format!("exec {}", release.display()));
    }
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
            Part::Loss => part_loss(&ctx),
            Part::Cpu => part_cpu(&ctx),
            Part::Latency => part_latency(&ctx),
            Part::Memory => part_memory(&ctx),
            Part::Reg => part_reg(&ctx),
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
                        format!("unknown part `{s}` (expected loss, cpu, latency, memory, reg)")
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

// ---------------------------------------------------------------------------------------------
// The relay under test

/// A relay child process on 127.0.0.1 with a metrics endpoint; killed when dropped.
#[derive(Debug)]
struct Relay {
    child: ChildGuard,
    addr: SocketAddrV4,
    metrics: SocketAddr,
}

impl Relay {
    /// Starts a fresh relay (a fresh session table per part keeps the parts independent),
    /// with limits raised so that only capacity, not policy, is measured.
    fn start(ctx: &Ctx, tag: &str) -> Result<Relay> {
        Self::start_on(ctx, tag, ctx.server_cpu)
    }

    /// [`Relay::start`] on CPU `cpu` (any, if `None`).
    fn start_on(ctx: &Ctx, tag: &str, cpu: Option<usize>) -> Result<Relay> {
        // Port 0 for both: the relay binds free ports itself and logs them (read below).
        let mut cmd = Command::new(&ctx.relay_bin);
        cmd.args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--metrics", "127.0.0.1:0"])
            // Room for the memory part's sessions, or the registration part's three floods.
            .args([
                "--max-sessions",
                &(2 * ctx.plan.memory_sessions).max(2_000_000).to_string(),
            ])
            .args(["--max-sessions-per-ip", "10000000"])
            .args([
                "--reg-rate-per-ip",
                // The flag's ceiling; each fleet address sends one REG at a time anyway.
                "1000000",
                "--reg-burst-per-ip",
                "100000000",
            ]);
        if std::env::var_os("RUST_LOG").is_none() {
            // Per-registration logging (debug) would cost the relay CPU we are measuring; info
            // has the startup lines with the bound addresses and nothing per packet or session.
            cmd.env("RUST_LOG", "warn,quic_relay=info");
        }
        if let Some(cpu) = cpu {
            crate::process::pin_command(&mut cmd, cpu)?;
        }
        let log = ctx.log_dir.join(format!("{tag}.log"));
        let mut child = ChildGuard::spawn(cmd, "quic-relay", &log)?;
        let addr: SocketAddrV4 = child
            .wait_logged("relay socket bound", "local_addr", STARTUP_TIMEOUT)?
            .parse()
            .context("the relay's logged UDP address")?;
        let metrics: SocketAddr = child
            .wait_logged("metrics at", "addr", STARTUP_TIMEOUT)?
            .parse()
            .context("the relay's logged metrics address")?;
        let start = Instant::now();
        loop {
            child.check_alive()?;
            match metrics::scrape(metrics) {
                Ok(_) => break,
                Err(e) if start.elapsed() > STARTUP_TIMEOUT => {
                    return Err(e).context(format!(
                        "relay did not serve metrics; see {}",
                        log.display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        Ok(Relay {
            child,
            addr,
            metrics,
        })
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// A scrape that includes everything up to now (waits one publishing period first).
    fn scrape_current(&mut self) -> Result<Scrape> {
        std::thread::sleep(PUBLISH_PERIOD + PUBLISH_PERIOD / 2);
        self.child.check_alive()?;
        metrics::scrape(self.metrics)
    }
}

fn peer_socket(ip: Ipv4Addr) -> Result<UdpSocket> {
    bind_udp(SocketAddrV4::new(ip, 0))
}

/// Registers `a` and `b` as the two members of a new session (original form, retried: a REG
/// or its ACK may be lost like any datagram).
fn register_pair(relay: SocketAddrV4, a: &UdpSocket, b: &UdpSocket) -> Result<()> {
    let reg = reg_datagram(load::random_u64(), load::random_u64());
    let mut buf = [0u8; 256];
    for sock in [a, b] {
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let acked = (0..30).any(|_| {
            if sock.send_to(&reg, relay).is_err() {
                return false;
            }
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => from == SocketAddr::V4(relay) && buf[..n].starts_with(b"ACK"),
                Err(_) => false,
            }
        });
        if !acked {
            bail!(
                "relay at {relay} did not ACK a registration from {}",
                sock.local_addr()?
            );
        }
    }
    Ok(())
}

/// Two fresh peer sockets registered as one session.
fn relay_pair(relay: &Relay) -> Result<(UdpSocket, UdpSocket)> {
    let (a, b) = (peer_socket(PEER_A)?, peer_socket(PEER_B)?);
    register_pair(relay.addr, &a, &b)?;
    Ok((a, b))
}

fn direct_pair() -> Result<(UdpSocket, UdpSocket)> {
    Ok((peer_socket(PEER_A)?, peer_socket(PEER_B)?))
}

// ---------------------------------------------------------------------------------------------
// The baseline forwarder

/// The minimal forwarder (see [`forwarder`]) as a child process on its own loopback port;
/// killed when dropped.
struct Forwarder {
    child: ChildGuard,
    addr: SocketAddrV4,
}

impl Forwarder {
    /// Starts a forwarder from `a` to `b` (and from `b` back to `a`); with `ack` it also answers
    /// registrations. Returns once a probe from `a` has reached `b` through it.
    fn start(ctx: &Ctx, a: &UdpSocket, b: &UdpSocket, ack: bool) -> Result<Forwarder> {
        Self::start_on(ctx, a, b, ack, ctx.server_cpu)
    }

    /// [`Forwarder::start`] on CPU `cpu` (any, if `None`).
    fn start_on(
        ctx: &Ctx,
        a: &UdpSocket,
        b: &UdpSocket,
        ack: bool,
        cpu: Option<usize>,
    ) -> Result<Forwarder> {
        let mut cmd = Command::new(&ctx.xtask_bin);
        cmd.args([forwarder::SUBCOMMAND, "--listen", "127.0.0.1:0"])
            .args(["--to", &local_v4(b)?.to_string()])
            .args(["--return-to", &local_v4(a)?.to_string()])
            .args(["--max-secs", "300"]);
        if ack {
            cmd.arg("--ack");
        }
        if let Some(cpu) = cpu {
            crate::process::pin_command(&mut cmd, cpu)?;
        }
        let log = ctx.log_dir.join("forwarder.log");
        let mut child = ChildGuard::spawn(cmd, "bench-forwarder", &log)?;
        let addr: SocketAddrV4 = child
            .wait_logged("bench-forwarder listening", "addr", STARTUP_TIMEOUT)?
            .parse()
            .context("the forwarder's logged address")?;
        b.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut buf = [0u8; 64];
        for _ in 0..200 {
            child.check_alive()?;
            a.send_to(b"probe", addr)?;
            if matches!(b.recv_from(&mut buf), Ok((5, _))) {
                return Ok(Forwarder { child, addr });
            }
        }
        bail!("the baseline forwarder on {addr} did not start forwarding")
    }
}

// ---------------------------------------------------------------------------------------------
// The parts

fn part_loss(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut relay = Relay::start(ctx, "loss")?;
    let mut rows = Vec::new();
    for (rate, target) in [(100_000, LOSS_TARGET_100K), (200_000, LOSS_TARGET_200K)] {
        let spec = LoadSpec {
            rate,
            duration: ctx.plan.loss_duration,
            size: DATAGRAM,
        };
        let (mut direct, mut via, mut fwd) = (Vec::new(), Vec::new(), Vec::new());
        let mut offered = Vec::new();
        for rep in 1..=ctx.plan.reps {
            // Interleaving the paths spreads a noisy neighbour over all of them.
            let (a, b) = direct_pair()?;
            let drops = PathDrops::start(&[("receiver", &b)])?;
            let d = load::run(&a, local_v4(&b)?, &b, spec)?;
            let d_drops = drops.report()?;

            let (a, b) = relay_pair(&relay)?;
            let before = relay.scrape_current()?;
            let drops = PathDrops::start(&[("relay", &relay.addr), ("receiver", &b)])?;
            let r = load::run(&a, relay.addr, &b, spec)?;
            let r_drops = drops.report()?;
            let after = relay.scrape_current()?;

            let (a, b) = direct_pair()?;
            let f = Forwarder::start(ctx, &a, &b, false)?;
            let drops = PathDrops::start(&[("forwarder", &f.addr), ("receiver", &b)])?;
            let fr = load::run(&a, f.addr, &b, spec)?;
            let f_drops = drops.report()?;
            drop(f);
            println!("  {}/s rep {rep}:", si(rate as f64));
            println!("    direct    {}; socket drops: {d_drops}", describe(&d));
            println!(
                "    relay     {}; socket drops: {r_drops}; relay counted drops: {}",
                describe(&r),
                dropped(&before, &after)
            );
            println!("    forwarder {}; socket drops: {f_drops}", describe(&fr));
            direct.push(d.loss());
            via.push(r.loss());
            fwd.push(fr.loss());
            offered.push(r.offered_rate());
        }
        let (r, d, f) = (median(&via), median(&direct), median(&fwd));
        let mut metric = format!("loss {DATAGRAM} B @ {}/s", si(rate as f64));
        let offered = median(&offered);
        if offered < OFFERED_SHORTFALL * rate as f64 {
            // Our sender was starved (a busy host): say what the relay was really offered.
            let _ = write!(metric, " (offered only {}/s)", si(offered));
        }
        rows.push(Row {
            metric,
            relay: pct(r),
            baseline: format!("{} direct, {} fwd", pct(d), pct(f)),
            ratio: format!("{} / {}", ratio(r, d), ratio(r, f)),
            target: format!("<= {}", pct(target)),
            verdict: Verdict::of(r <= target),
        });
    }
    Ok(rows)
}

/// The kernel's drop counters of the sockets along a path, read before and after a run, to show
/// where datagrams were lost (a full receive buffer at the relay, or at our receiver).
struct PathDrops(Vec<(&'static str, u16, u64)>);

trait LocalPort {
    fn port(&self) -> Result<u16>;
}

impl LocalPort for UdpSocket {
    fn port(&self) -> Result<u16> {
        Ok(self.local_addr()?.port())
    }
}

impl LocalPort for SocketAddrV4 {
    fn port(&self) -> Result<u16> {
        Ok(SocketAddrV4::port(self))
    }
}

impl PathDrops {
    fn start(sockets: &[(&'static str, &dyn LocalPort)]) -> Result<Self> {
        let mut v = Vec::new();
        for (name, s) in sockets {
            let port = s.port()?;
            v.push((*name, port, sys::udp_drops(&[port])?));
        }
        Ok(PathDrops(v))
    }

    fn report(&self) -> Result<String> {
        let mut parts = Vec::new();
        for (name, port, before) in &self.0 {
            parts.push(format!(
                "{name} {}",
                sys::udp_drops(&[*port])?.saturating_sub(*before)
            ));
        }
        Ok(parts.join(", "))
    }
}

fn describe(r: &LoadReport) -> String {
    let mut s = format!(
        "loss {} ({}/{} at {}/s",
        pct(r.loss()),
        r.received,
        r.sent,
        si(r.offered_rate())
    );
    if r.skipped > 0 {
        let _ = write!(s, ", sender starved: {} not sent", r.skipped);
    }
    if r.send_errors > 0 {
        let _ = write!(s, ", {} send errors", r.send_errors);
    }
    if r.duplicates > 0 {
        let _ = write!(s, ", {} duplicates", r.duplicates);
    }
    s.push(')');
    s
}

fn dropped(before: &Scrape, after: &Scrape) -> String {
    let delta: Vec<String> = after
        .family("quic_relay_dropped_packets_total")
        .into_iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(&k);
            let reason = k.split('"').nth(1).unwrap_or(&k).to_owned();
            (d > 0.0).then(|| format!("{reason}={d}"))
        })
        .collect();
    if delta.is_empty() {
        "0".to_owned()
    } else {
        delta.join(" ")
    }
}

fn part_cpu(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut relay = Relay::start(ctx, "cpu")?;
    let spec = LoadSpec {
        rate: CPU_RATE,
        duration: ctx.plan.cpu_duration,
        size: DATAGRAM,
    };
    let (mut via, mut base) = (Vec::new(), Vec::new());
    for rep in 1..=ctx.plan.reps {
        let (a, b) = relay_pair(&relay)?;
        let drops = PathDrops::start(&[("relay", &relay.addr), ("receiver", &b)])?;
        let r = cpu_run(relay.pid(), &a, relay.addr, &b, spec)?;
        let r_drops = drops.report()?;
        relay.child.check_alive()?;

        let (a, b) = direct_pair()?;
        let mut f = Forwarder::start(ctx, &a, &b, false)?;
        let drops = PathDrops::start(&[("forwarder", &f.addr), ("receiver", &b)])?;
        let fr = cpu_run(f.child.pid(), &a, f.addr, &b, spec)?;
        let f_drops = drops.report()?;
        f.child.check_alive()?;
        drop(f);
        println!("  rep {rep}:");
        println!("    relay     {r}; socket drops: {r_drops}");
        println!("    forwarder {fr}; socket drops: {f_drops}");
        via.push(r.us);
        base.push(fr.us);
    }
    let (r, b) = (median(&via), median(&base));
    Ok(vec![Row {
        metric: format!("CPU per datagram @ {}/s", si(CPU_RATE as f64)),
        relay: format!("{r:.2} µs"),
        baseline: format!("{b:.2} µs fwd"),
        ratio: ratio(r, b),
        target: format!("<= {CPU_TARGET_US} µs"),
        verdict: Verdict::of(r <= CPU_TARGET_US),
    }])
}

/// CPU cost of one run through a forwarding process.
struct CpuRun {
    load: LoadReport,
    /// CPU µs per delivered datagram, from schedstat (ns) and from `/proc/<pid>/stat` ticks.
    us: f64,
    tick_us: f64,
    /// Delivered datagrams per time the process went to sleep: a process that reacts faster
    /// wakes more often for smaller batches, which costs CPU per datagram without doing more
    /// work, so this explains differences between the relay and the forwarder.
    per_wakeup: f64,
}

impl std::fmt::Display for CpuRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.3} µs/datagram ({:.2} by stat ticks, {:.1} datagrams per wake-up); {}",
            self.us,
            self.tick_us,
            self.per_wakeup,
            describe(&self.load)
        )
    }
}

/// Runs `spec` through the process `pid` and measures its CPU time per delivered datagram.
fn cpu_run(
    pid: u32,
    a: &UdpSocket,
    to: SocketAddrV4,
    b: &UdpSocket,
    spec: LoadSpec,
) -> Result<CpuRun> {
    let (t0, k0, w0) = (
        sys::cpu_time(pid)?,
        sys::cpu_time_stat(pid)?,
        sys::sleeps(pid)?,
    );
    let load = load::run(a, to, b, spec)?;
    let (t1, k1, w1) = (
        sys::cpu_time(pid)?,
        sys::cpu_time_stat(pid)?,
        sys::sleeps(pid)?,
    );
    let n = load.received.max(1) as f64;
    Ok(CpuRun {
        load,
        us: (t1 - t0).as_secs_f64() * 1e6 / n,
        tick_us: (k1 - k0).as_secs_f64() * 1e6 / n,
        per_wakeup: n / w1.saturating_sub(w0).max(1) as f64,
    })
}

fn describe_latency(l: &Latency) -> String {
    format!(
        "median {:.1} µs, p99 {:.1} µs ({} lost)",
        l.quantile_us(0.5),
        l.quantile_us(0.99),
        l.lost
    )
}

/// Where the latency part runs the ping-pong's endpoints and the server in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Wherever the scheduler (or `--pin`) puts them. On a VM the direct path's two threads
    /// may share a CPU (a wake-up there costs a few µs) while the relay's hops cross to an
    /// idle CPU (tens of µs to wake it), or the other way round: the difference between the
    /// paths then measures placement luck as much as the server.
    Scheduler,
    /// Endpoints and server all on CPU 0: every hop is a wake-up on the same CPU, so the
    /// difference between the paths is the server's own work and its two extra hops.
    OneCpu,
}

impl Placement {
    fn label(self, ctx: &Ctx) -> &'static str {
        match (self, ctx.server_cpu) {
            (Placement::OneCpu, _) => "all on one CPU",
            (Placement::Scheduler, Some(_)) => "server pinned apart",
            (Placement::Scheduler, None) => "scheduler-placed",
        }
    }
}

/// Ping-pong medians and p99s (µs) of the direct path, the relay and the forwarder.
type LatencyRep = [(f64, f64); 3];

fn latency_rep(ctx: &Ctx, relay: &mut Relay, placement: Placement) -> Result<LatencyRep> {
    let rounds = ctx.plan.latency_rounds;
    let (_pin, server_cpu) = match placement {
        Placement::Scheduler => (None, ctx.server_cpu),
        // The echo thread that ping_pong starts inherits this thread's CPU.
        Placement::OneCpu => (
            Some(crate::process::pin_this_thread_for_now(0).context("pin to CPU 0")?),
            Some(0),
        ),
    };
    let (client, echo) = direct_pair()?;
    let d = load::ping_pong(&client, local_v4(&echo)?, &echo, rounds)?;
    let (client, echo) = relay_pair(relay)?;
    let r = load::ping_pong(&client, relay.addr, &echo, rounds)?;
    relay.child.check_alive()?;
    let (client, echo) = direct_pair()?;
    let f = Forwarder::start_on(ctx, &client, &echo, false, server_cpu)?;
    let fl = load::ping_pong(&client, f.addr, &echo, rounds)?;
    drop(f);
    println!(
        "    {}:\n      direct    {}\n      relay     {}\n      forwarder {}",
        placement.label(ctx),
        describe_latency(&d),
        describe_latency(&r),
        describe_latency(&fl)
    );
    let q = |l: &Latency| (l.quantile_us(0.5), l.quantile_us(0.99));
    Ok([q(&d), q(&r), q(&fl)])
}

fn part_latency(ctx: &Ctx) -> Result<Vec<Row>> {
    let rounds = ctx.plan.latency_rounds;
    let placements = [Placement::OneCpu, Placement::Scheduler];
    let mut relays = [
        Relay::start_on(ctx, "latency-one-cpu", Some(0))?,
        Relay::start(ctx, "latency")?,
    ];
    let mut reps: [Vec<LatencyRep>; 2] = [vec![], vec![]];
    for rep in 1..=ctx.plan.reps {
        println!("  rep {rep}:");
        for (i, &placement) in placements.iter().enumerate() {
            reps[i].push(latency_rep(ctx, &mut relays[i], placement)?);
        }
    }
    let mut rows = vec![];
    for (i, placement) in placements.into_iter().enumerate() {
        // Medians over the repetitions of each path's median and p99.
        let med = |path: usize, p99: bool| {
            median(
                &reps[i]
                    .iter()
                    .map(|r| if p99 { r[path].1 } else { r[path].0 })
                    .collect::<Vec<_>>(),
            )
        };
        let (d50, r50, f50) = (med(0, false), med(1, false), med(2, false));
        let (d99, r99, f99) = (med(0, true), med(1, true), med(2, true));
        let added = r50 - d50;
        // Judged where the comparison is like for like (see Placement); the other placement
        // is shown for what a scheduler does with it.
        let (target, verdict) = match placement {
            Placement::OneCpu => (
                format!("added <= {LATENCY_ADDED_TARGET_US} µs"),
                Verdict::of(added <= LATENCY_ADDED_TARGET_US),
            ),
            Placement::Scheduler => ("-".to_owned(), Verdict::Info),
        };
        rows.push(Row {
            metric: format!("RTT median, {} ({rounds} ping-pongs)", placement.label(ctx)),
            relay: format!("{r50:.1} µs ({added:+.1})"),
            baseline: format!("{d50:.1} µs direct, {f50:.1} µs fwd ({:+.1})", f50 - d50),
            ratio: format!("{} / {}", ratio(r50, d50), ratio(r50, f50)),
            target,
            verdict,
        });
        rows.push(Row {
            metric: format!("RTT p99, {}", placement.label(ctx)),
            relay: format!("{r99:.1} µs"),
            baseline: format!("{d99:.1} µs direct, {f99:.1} µs fwd"),
            ratio: format!("{} / {}", ratio(r99, d99), ratio(r99, f99)),
            target: "-".to_owned(),
            verdict: Verdict::Info,
        });
    }
    Ok(rows)
}

const PAIRED: &str = "quic_relay_sessions{state=\"paired\"}";
const UNPAIRED: &str = "quic_relay_sessions{state=\"unpaired\"}";
/// Registration results that mean "accepted".
const ACCEPTED: [&str; 4] = [
    "quic_relay_registrations_total{result=\"new\"}",
    "quic_relay_registrations_total{result=\"join\"}",
    "quic_relay_registrations_total{result=\"refresh\"}",
    "quic_relay_registrations_total{result=\"rebind\"}",
];

fn part_memory(ctx: &Ctx) -> Result<Vec<Row>> {
    let sessions = ctx.plan.memory_sessions;
    let mut relay = Relay::start(ctx, "memory")?;
    // Bind the fleet before the first RSS reading: its setup is ours, not the relay's.
    let fleet = Fleet::bind(FLEET_SOCKETS, sessions, 1, load::random_u64())?;
    let rss0 = sys::rss_bytes(relay.pid())?;
    let t = Instant::now();
    let reg = fleet.register(
        relay.addr,
        MEMORY_REG_RATE,
        MEMORY_REG_PASSES,
        Replies::During,
    )?;
    println!(
        "  registered in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        describe_reg(&reg)
    );
    relay.child.check_alive()?;
    let s = metrics::wait_for(relay.metrics, SETTLE_TIMEOUT, |s| {
        s.get(PAIRED) >= sessions as f64
    })?;
    let s = if s.get(PAIRED) >= sessions as f64 {
        relay.scrape_current()?
    } else {
        s
    };
    let (paired, unpaired) = (s.get(PAIRED), s.get(UNPAIRED));
    let rss1 = sys::rss_bytes(relay.pid())?;
    println!(
        "  relay: {paired} paired, {unpaired} unpaired; RSS {} -> {} MiB",
        rss0 >> 20,
        rss1 >> 20
    );
    if paired < sessions as f64 {
        eprintln!(
            "  warning: only {paired} of {sessions} sessions paired; the per-session figure \
             divides by {paired}"
        );
    }
    let per_session = rss1.saturating_sub(rss0) as f64 / paired.max(1.0);
    drop(fleet);
    drop(relay);

    let out = Command::new(&ctx.xtask_bin)
        .args([table::SUBCOMMAND, "--sessions", &sessions.to_string()])
        .output()
        .context("run the hash-map baseline")?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            table::SUBCOMMAND,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let base: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("baseline output")?;
    println!(
        "  baseline: std HashMap<SocketAddr, SocketAddr>, 2 entries per session: \
         {base:.0} B/session"
    );
    Ok(vec![Row {
        metric: format!("RSS per idle paired session ({})", si(paired)),
        relay: format!("{per_session:.0} B"),
        baseline: format!("{base:.0} B HashMap"),
        ratio: ratio(per_session, base),
        target: format!("<= {MEMORY_TARGET_BYTES} B"),
        verdict: Verdict::of(paired >= sessions as f64 && per_session <= MEMORY_TARGET_BYTES),
    }])
}

fn describe_reg(r: &RegReport) -> String {
    let mut s = format!(
        "{}/{} ACKed, {} REGs sent in {} pass(es)",
        r.acked, r.members, r.sent, r.passes
    );
    if r.send_errors > 0 {
        let _ = write!(s, ", {} send errors", r.send_errors);
    }
    if !r.refused.is_empty() {
        let _ = write!(s, ", replies other than ACK: {:?}", r.refused);
    }
    if r.reply_drops > 0 {
        let _ = write!(s, ", {} replies dropped at our sockets", r.reply_drops);
    }
    s
}

/// One registration flood with a paired flow through `target` (the relay or the ACK-ing
/// forwarder): the flow runs from `lead` before the flood until `lead` after its planned end.
struct Flood {
    /// REGs ACKed per second, from the first REG to the last ACK: a server that queues REGs
    /// and answers late gets no credit for the queueing.
    accepted_rate: f64,
    offered_rate: f64,
    reg: RegReport,
    flow: LoadReport,
    drops: String,
    /// CPU time of the process under test during the flood, per REG it answered (µs): with
    /// `busy`, tells a server that is the limit from one that waits for REGs. Per REG answered,
    /// not per REG sent: a REG the kernel dropped at a full socket cost the server nothing, so
    /// dividing by REGs sent would flatter a server that falls behind.
    cpu_us_per_reg: f64,
    /// That CPU time as a fraction of the flood's wall time (1.0 = one core saturated).
    busy: f64,
}

fn flood(
    ctx: &Ctx,
    (target, pid): (SocketAddrV4, u32),
    a: &UdpSocket,
    b: &UdpSocket,
    base: u8,
) -> Result<Flood> {
    let sessions = (REG_OFFERED_RATE as f64 * ctx.plan.reg_duration.as_secs_f64() / 2.0) as u64;
    let fleet = Fleet::bind(FLEET_SOCKETS, sessions, base, load::random_u64())?;
    let lead = Duration::from_millis(500);
    let spec = LoadSpec {
        rate: REG_PAIRED_RATE,
        duration: ctx.plan.reg_duration + 2 * lead,
        size: DATAGRAM,
    };
    let drops = PathDrops::start(&[("server", &target), ("receiver", b)])?;
    let (flow, reg, cpu) = std::thread::scope(|s| {
        let flow = s.spawn(|| load::run(a, target, b, spec));
        std::thread::sleep(lead);
        let cpu0 = sys::cpu_time(pid);
        let reg = fleet.register(target, REG_OFFERED_RATE, 1, Replies::After);
        let cpu = sys::cpu_time(pid).and_then(|c1| Ok(c1.saturating_sub(cpu0?)));
        (flow.join().expect("flow thread does not panic"), reg, cpu)
    });
    let (flow, reg, cpu) = (flow?, reg?, cpu?);
    // The CPU was read before the first REG and after the replies went quiet; the flow
    // (20k/s) is a small share of it at these rates.
    let cpu_us_per_reg = cpu.as_secs_f64() * 1e6 / reg.first_acked.max(1) as f64;
    let busy = cpu.as_secs_f64() / reg.first_active_secs.max(1e-9);
    Ok(Flood {
        cpu_us_per_reg,
        busy,
        accepted_rate: reg.first_acked as f64 / reg.first_active_secs,
        offered_rate: reg.first_sent as f64 / reg.first_send_secs,
        drops: drops.report()?,
        reg,
        flow,
    })
}

fn describe_flood(f: &Flood) -> String {
    let mut s = format!(
        "offered {}/s ({} REGs in {:.2} s), ACKed {} in {:.2} s = {}/s; CPU {:.2} us/REG ACKed ({:.0} % busy); flow {}; socket drops: {}",
        si(f.offered_rate),
        f.reg.first_sent,
        f.reg.first_send_secs,
        f.reg.first_acked,
        f.reg.first_active_secs,
        si(f.accepted_rate),
        f.cpu_us_per_reg,
        f.busy * 100.0,
        describe(&f.flow),
        f.drops
    );
    if !f.reg.refused.is_empty() {
        let _ = write!(s, "; replies other than ACK: {:?}", f.reg.refused);
    }
    if f.reg.reply_drops > 0 {
        let _ = write!(s, "; {} replies dropped at our sockets", f.reg.reply_drops);
    }
    s
}

fn part_reg(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut relay = Relay::start(ctx, "reg")?;
    let (mut via, mut fwd, mut offered) = (vec![], vec![], vec![]);
    for rep in 1..=ctx.plan.reps {
        // New addresses each repetition: an address already in a session would only refresh.
        let base = 10 + 2 * rep as u8;
        let (a, b) = relay_pair(&relay)?;
        let before = relay.scrape_current()?;
        let r = flood(ctx, (relay.addr, relay.pid()), &a, &b, base)?;
        let after = relay.scrape_current()?;
        let counted = after.sum(&ACCEPTED) - before.sum(&ACCEPTED);

        let (a, b) = direct_pair()?;
        let f = Forwarder::start(ctx, &a, &b, true)?;
        let fl = flood(ctx, (f.addr, f.child.pid()), &a, &b, base)?;
        drop(f);
        println!(
            "  rep {rep}:\n    relay     {} (relay counted {counted} accepted)\n    forwarder {}",
            describe_flood(&r),
            describe_flood(&fl)
        );
        via.push((r.accepted_rate, r.flow.loss()));
        fwd.push((fl.accepted_rate, fl.flow.loss()));
        offered.push(r.offered_rate);
    }
    let med = |v: &[(f64, f64)], loss: bool| {
        median(
            &v.iter()
                .map(|x| if loss { x.1 } else { x.0 })
                .collect::<Vec<_>>(),
        )
    };
    let (r, f, o) = (med(&via, false), med(&fwd, false), median(&offered));
    let (rl, fl) = (med(&via, true), med(&fwd, true));
    Ok(vec![
        Row {
            metric: format!("REGs accepted/s ({}/s offered)", si(o)),
            relay: format!("{}/s", si(r)),
            baseline: format!("{}/s ACK-only fwd", si(f)),
            ratio: ratio(r, f),
            target: format!(">= {}/s", si(REG_TARGET_PER_SEC)),
            verdict: Verdict::of(r >= REG_TARGET_PER_SEC),
        },
        Row {
            metric: format!("loss of a {}/s pair meanwhile", si(REG_PAIRED_RATE as f64)),
            relay: pct(rl),
            baseline: format!("{} fwd", pct(fl)),
            ratio: ratio(rl, fl),
            target: "-".to_owned(),
            verdict: Verdict::Info,
        },
    ])
}

// ---------------------------------------------------------------------------------------------
// The summary table

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
    Info,
    Error,
}

impl Verdict {
    fn of(pass: bool) -> Self {
        if pass {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }
}

#[derive(Debug)]
struct Row {
    metric: String,
    relay: String,
    baseline: String,
    ratio: String,
    target: String,
    verdict: Verdict,
}

impl Row {
    fn error(part: &str, e: &anyhow::Error) -> Row {
        // The full error was printed when it happened; the table only needs a reminder.
        let msg: String = format!("{e:#}").chars().take(60).collect();
        Row {
            metric: part.to_owned(),
            relay: msg,
            baseline: "-".to_owned(),
            ratio: "-".to_owned(),
            target: "-".to_owned(),
            verdict: Verdict::Error,
        }
    }
}

fn render(rows: &[Row]) -> String {
    let header = ["metric", "relay", "baseline", "ratio", "target", "result"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let verdict = match r.verdict {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
                Verdict::Info => "info",
                Verdict::Error => "ERROR",
            };
            [
                r.metric.clone(),
                r.relay.clone(),
                r.baseline.clone(),
                r.ratio.clone(),
                r.target.clone(),
                verdict.to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let mut s = String::new();
        for (c, w) in cols.iter().zip(widths) {
            let _ = write!(s, "| {c}{} ", " ".repeat(w - c.chars().count()));
        }
        s.push_str("|\n");
        s
    };
    let mut out = line(&header.map(str::to_owned));
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

fn pct(fraction: f64) -> String {
    format!("{:.3} %", fraction * 100.0)
}

/// `relay / baseline`, or "n/a" when the baseline is zero (e.g. no loss on the direct path).
fn ratio(relay: f64, baseline: f64) -> String {
    if baseline > 0.0 && relay.is_finite() {
        format!("{:.2}x", relay / baseline)
    } else {
        "n/a".to_owned()
    }
}

/// Compact counts and rates: 1.23M, 250k, 950.
fn si(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
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

    #[test]
    fn table_aligns_columns() {
        let rows = [Row {
            metric: "m".into(),
            relay: "1 µs".into(),
            baseline: "b".into(),
            ratio: ratio(2.0, 1.0),
            target: "t".into(),
            verdict: Verdict::Pass,
        }];
        let out = render(&rows);
        let widths: Vec<usize> = out.lines().map(|l| l.chars().count()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{out}");
        assert!(out.contains("2.00x") && out.contains("PASS"));
        assert_eq!(si(250_000.0), "250.0k");
        assert_eq!(ratio(1.0, 0.0), "n/a");
    }
}
