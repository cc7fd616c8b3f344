//! `cargo xtask bench sdk`: bulk QUIC between two peer-sdk peers on loopback, through the relay
//! against direct (hole-punched) in the same run, with connect times per path and the ratio.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::metrics::{self, Scrape, PUBLISH_PERIOD};
use super::{median, sys};
use crate::cli::Args;
use crate::process::{log_tail, ChildGuard};

pub const HELP: &str = "\
Usage: cargo xtask bench sdk [options]

Builds quic-relay and peer-sdk's `peer` example in release. A relay on 127.0.0.1 and two `peer
listen` echo listeners (one relay-only, one allowed to punch) serve `peer connect` dialers,
alternating between the paths so both see the same machine:

  relay    dialer → relay → listener, QUIC carried through the relay's socket loop
  direct   dialer → listener, QUIC over the hole-punched loopback path (the baseline)

Each dial sends --bytes on one stream and checks the echo byte for byte; goodput is bytes x 8 /
the transfer's seconds. The connect time runs from the dialer's start to the finished handshake
(registration, waiting for the peer, punching on the direct path, the QUIC handshake).

  ratio    median relayed goodput / median direct goodput (target: >= 0.95)

CPU per MiB echoed, per path: the dialer's and its listener's (from the kernel's accounting of
the reaped dialer and of the listener's threads) and the relay's. Goodput on shared cores follows
the host's load; CPU per byte barely does, so it shows what the relay hop costs the machine.
Also per path: the listener's wake-ups per MiB (fewer: larger receive batches); for the relay,
from its metrics and /proc/net/udp, how many datagrams its GSO sends carried (Quinn's carry at
most 10; fewer would mean batches split) and how many its receive buffer dropped.

Options:
  --quick       2 repetitions of 16 MiB (a CI smoke test)
  --reps N      repetitions per path (default 5; medians are reported)
  --bytes N     bytes per transfer (default 256 MiB)
  --no-build    do not run cargo build first
  -h, --help    this text

Logs go to target/bench-sdk/. Exits 0 when the target is missed (the table says FAIL) and
non-zero when something could not be measured (a process died, a dial failed, or a dial took
the wrong path).
";

/// The relayed path may cost at most this share of direct goodput (the target).
const RATIO_TARGET: f64 = 0.95;
/// Most datagrams Quinn puts in one GSO send (`MAX_TRANSMIT_SEGMENTS` in quinn 0.11).
const QUINN_GSO_SEGMENTS: usize = 10;
/// How long the relay and the listeners may take to come up.
const STARTUP: Duration = Duration::from_secs(15);

struct Dial {
    path: String,
    connect_ms: f64,
    mbps: f64,
    /// The transfer's seconds (after the handshake).
    secs: f64,
    /// CPU the relay process used during the whole dial.
    relay_cpu: Duration,
    /// CPU the two peers (the dialer and its listener) used during the whole dial.
    peers_cpu: Duration,
    /// Times the listener's threads went to sleep during the dial: one wake-up per receive
    /// batch (and per timer), so fewer means larger batches.
    listener_sleeps: u64,
    /// What the relay did for this dial (relayed dials only).
    relay: Option<RelayWork>,
}

/// The relay's counters over one relayed dial.
#[derive(Default)]
struct RelayWork {
    /// Datagrams forwarded.
    forwarded: f64,
    /// Of those, datagrams sent inside GSO messages, and the GSO messages.
    gso_datagrams: f64,
    gso_messages: f64,
    /// Datagrams the kernel dropped at the relay's full receive buffer.
    drops: u64,
}

impl RelayWork {
    fn between(before: &Scrape, after: &Scrape, drops: u64) -> Self {
        let d = |series: &str| after.get(series) - before.get(series);
        RelayWork {
            forwarded: d("quic_relay_forwarded_packets_total"),
            gso_datagrams: d("quic_relay_gso_batches_total{unit=\"datagrams\"}"),
            gso_messages: d("quic_relay_gso_batches_total{unit=\"batches\"}"),
            drops,
        }
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let mut a = Args::new(args);
    let Some(common) = super::Common::parse(&mut a, HELP)? else {
        return Ok(());
    };
    let (quick, no_build) = (common.quick, common.no_build);
    let reps = common.reps(2, 5);
    let bytes: u64 = a
        .parsed("--bytes")?
        .unwrap_or(if quick { 16 << 20 } else { 256 << 20 });
    a.finish()?;
    let target = crate::target_dir().join("release");
    if !no_build {
        super::build_release(&["quic-relay"])?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(crate::project_root())
            .args(["build", "--release", "--locked", "-p", "peer-sdk"])
            .args(["--example", "peer"])
            .status()
            .context("run cargo build")?;
        if !status.success() {
            bail!("cargo build --release -p peer-sdk --example peer failed ({status})");
        }
    }
    let relay_bin = target.join("quic-relay");
    let peer_bin = target.join("examples/peer");
    for b in [&relay_bin, &peer_bin] {
        if !b.is_file() {
            bail!("{} not found (build it first)", b.display());
        }
    }
    let log_dir = crate::target_dir().join("bench-sdk");

    let mut relay_cmd = Command::new(&relay_bin);
    relay_cmd
        .args(["--bind", "127.0.0.1", "--port", "0"])
        // Its counters say whether GSO batches cross whole and whether it dropped anything.
        .args(["--metrics", "127.0.0.1:0"])
        .env("RUST_LOG", "info");
    let relay_log = log_dir.join("relay.log");
    let mut relay = ChildGuard::spawn(relay_cmd, "quic-relay", &relay_log)?;
    let relay_addr = wait_for(&mut relay, &relay_log, |text| {
        let line = text.lines().find(|l| l.contains("relay socket bound"))?;
        let addr = line.split("local_addr=").nth(1)?.split(' ').next()?;
        Some(addr.to_owned())
    })?;
    let relay_metrics: std::net::SocketAddr = relay
        .wait_logged("metrics at", "addr", STARTUP)?
        .parse()
        .context("the relay's logged metrics address")?;
    let relay_port: u16 = relay_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the relay's logged port")?;

    let session = |n: u32| format!("5d1c0000-0000-4000-8000-{n:012x}");
    let mut listeners = Vec::new();
    let mut pins = Vec::new();
    for (k, relay_only) in [(1, true), (2, false)] {
        let mut cmd = Command::new(&peer_bin);
        cmd.args(["listen", "--relay", &relay_addr, "--session", &session(k)]);
        if relay_only {
            cmd.arg("--relay-only");
        }
        let log = log_dir.join(format!(
            "listen-{}.log",
            if relay_only { "relay" } else { "direct" }
        ));
        let mut child = ChildGuard::spawn(cmd, "peer listen", &log)?;
        let pin = wait_for(&mut child, &log, |text| {
            let rest = text.split("\"fingerprint\":\"").nth(1)?;
            Some(rest.split('"').next()?.to_owned())
        })?;
        listeners.push(child);
        pins.push(pin);
    }

    println!(
        "bench sdk: {reps} x {} MiB echoed per path, alternating relay and direct (load average {})",
        bytes >> 20,
        sys::load_average()
    );
    let mut relayed = Vec::new();
    let mut direct = Vec::new();
    for rep in 0..reps {
        for (k, want) in [(0usize, "relay"), (1, "direct")] {
            let cpu_before = sys::cpu_time(relay.pid())?;
            let listener_before = sys::cpu_time(listeners[k].pid())?;
            let dialers_before = children_cpu();
            let sleeps_before = sys::sleeps(listeners[k].pid())?;
            let scrape_before = metrics::scrape(relay_metrics)?;
            let drops_before = sys::udp_drops(&[relay_port])?;
            let mut d = dial(
                &peer_bin,
                &relay_addr,
                &session(k as u32 + 1),
                &pins[k],
                bytes,
                want == "relay",
                &log_dir.join(format!("dial-{want}-{rep}.log")),
            )?;
            d.relay_cpu = sys::cpu_time(relay.pid())?.saturating_sub(cpu_before);
            d.peers_cpu = sys::cpu_time(listeners[k].pid())?.saturating_sub(listener_before)
                + children_cpu().saturating_sub(dialers_before);
            d.listener_sleeps = sys::sleeps(listeners[k].pid())?.saturating_sub(sleeps_before);
            if want == "relay" {
                // One publishing period, so that the scrape includes the whole dial.
                std::thread::sleep(PUBLISH_PERIOD + PUBLISH_PERIOD / 2);
                let drops = sys::udp_drops(&[relay_port])?.saturating_sub(drops_before);
                d.relay = Some(RelayWork::between(
                    &scrape_before,
                    &metrics::scrape(relay_metrics)?,
                    drops,
                ));
            }
            for l in &mut listeners {
                l.check_alive()?;
            }
            relay.check_alive()?;
            if d.path != want {
                bail!(
                    "the {want} dial took the {} path; see {}",
                    d.path,
                    log_dir.display()
                );
            }
            // Per dial, so that a slow dial can be told apart: the peers' CPU per MiB, and
            // on the relay path how many datagrams each of the relay's GSO sends carried.
            let gso = d.relay.as_ref().map_or(String::new(), |w| {
                format!(
                    ", relay GSO {:.1}/send",
                    w.gso_datagrams / w.gso_messages.max(1.0)
                )
            });
            println!(
                "  rep {rep}: {want:<6} {:>8.0} Mbit/s, connect {:>7.1} ms, peers {:>5.2} ms/MiB{gso}",
                d.mbps,
                d.connect_ms,
                d.peers_cpu.as_secs_f64() * 1e3 * 1_048_576.0 / bytes as f64
            );
            if want == "relay" {
                relayed.push(d);
            } else {
                direct.push(d);
            }
        }
    }

    let stat = |v: &[Dial], f: fn(&Dial) -> f64| {
        let xs: Vec<f64> = v.iter().map(f).collect();
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median(&xs), lo, hi)
    };
    println!();
    println!(
        "{:<8} {:>14} {:>20} {:>18}",
        "path", "goodput Mbit/s", "min-max", "connect ms (med)"
    );
    for (name, v) in [("direct", &direct), ("relay", &relayed)] {
        let (m, lo, hi) = stat(v, |d| d.mbps);
        let (c, _, _) = stat(v, |d| d.connect_ms);
        println!(
            "{name:<8} {m:>14.0} {:>20} {c:>18.1}",
            format!("{lo:.0}-{hi:.0}")
        );
    }
    // CPU per byte moved: on two shared cores goodput follows whatever else the host runs,
    // while the CPU each path spends per byte does not, so it says what the relay hop costs.
    println!();
    println!(
        "{:<8} {:>22} {:>22} {:>16}",
        "path", "peers CPU ms/MiB", "relay CPU ms/MiB", "total ms/MiB"
    );
    // Milliseconds per MiB from seconds per transfer of `bytes`.
    let ms_per_mib = 1e3 * 1_048_576.0 / bytes as f64;
    let mut totals = [0.0; 2];
    for (i, (name, v)) in [("direct", &direct), ("relay", &relayed)]
        .iter()
        .enumerate()
    {
        let scaled =
            |(m, lo, hi): (f64, f64, f64)| (m * ms_per_mib, lo * ms_per_mib, hi * ms_per_mib);
        let (p, plo, phi) = scaled(stat(v, |d| d.peers_cpu.as_secs_f64()));
        let (r, _, _) = scaled(stat(v, |d| d.relay_cpu.as_secs_f64()));
        let (t, tlo, thi) = scaled(stat(v, |d| (d.peers_cpu + d.relay_cpu).as_secs_f64()));
        totals[i] = t;
        println!(
            "{name:<8} {:>22} {r:>22.2} {:>16}",
            format!("{p:.2} ({plo:.2}-{phi:.2})"),
            format!("{t:.2} ({tlo:.2}-{thi:.2})")
        );
    }
    println!(
        "CPU per byte relay/direct (medians, peers and relay together): {:.2}",
        totals[1] / totals[0]
    );
    // Wake-ups of the receiving side per MiB: the batches it is handed, which is where the
    // relay's regrouping of Quinn's sends shows.
    let mib = bytes as f64 / 1_048_576.0;
    let wakes = |v: &[Dial]| {
        median(
            &v.iter()
                .map(|d| d.listener_sleeps as f64 / mib)
                .collect::<Vec<_>>(),
        )
    };
    println!(
        "listener wake-ups per MiB (medians): direct {:.0}, relay {:.0}",
        wakes(&direct),
        wakes(&relayed)
    );
    let work =
        relayed
            .iter()
            .filter_map(|d| d.relay.as_ref())
            .fold(RelayWork::default(), |a, w| RelayWork {
                forwarded: a.forwarded + w.forwarded,
                gso_datagrams: a.gso_datagrams + w.gso_datagrams,
                gso_messages: a.gso_messages + w.gso_messages,
                drops: a.drops + w.drops,
            });
    println!(
        "relay: {:.0}% of {:.0} forwarded datagrams left in GSO sends of {:.1} datagrams on \
         average (Quinn's GSO batches hold at most {QUINN_GSO_SEGMENTS}); {} dropped at its \
         receive buffer",
        100.0 * work.gso_datagrams / work.forwarded.max(1.0),
        work.forwarded,
        work.gso_datagrams / work.gso_messages.max(1.0),
        work.drops
    );
    let ratio = stat(&relayed, |d| d.mbps).0 / stat(&direct, |d| d.mbps).0;
    let verdict = if ratio >= RATIO_TARGET { "ok" } else { "FAIL" };
    println!(
        "ratio relay/direct (median goodput): {ratio:.2} (target >= {RATIO_TARGET}): {verdict} \
         (load average now {})",
        sys::load_average()
    );
    // What the relay costs: its CPU over the relayed transfers' time, in cores.
    let relay_cpu: f64 = relayed.iter().map(|d| d.relay_cpu.as_secs_f64()).sum();
    let relay_secs: f64 = relayed.iter().map(|d| d.secs).sum();
    println!(
        "relay process CPU during relayed dials: {:.2} cores (of {} on this machine)",
        relay_cpu / relay_secs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "What the relay hop costs and saves: each relayed GSO batch crosses one more user-space \
         process, received whole with UDP GRO and sent on with UDP GSO (two more socket \
         passes per batch, not per datagram; the relay's CPU above is mostly the kernel \
         copying into and out of its buffers). The relay also joins the GSO batches that \
         queue up at its socket into larger sends, so the receiving peer is handed larger GRO \
         batches (fewer wake-ups per MiB above) and spends less CPU per byte than on the \
         direct path. The bulk transfer fills both cores, so the goodput ratio follows the \
         CPU-per-byte ratio."
    );
    Ok(())
}

/// Polls `log` (the child's output) until `find` extracts something from it.
fn wait_for(
    child: &mut ChildGuard,
    log: &Path,
    find: impl Fn(&str) -> Option<String>,
) -> Result<String> {
    let deadline = Instant::now() + STARTUP;
    loop {
        child.check_alive()?;
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(v) = find(&text) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!(
                "nothing expected in {} within {STARTUP:?}:\n{}",
                log.display(),
                log_tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dial(
    peer_bin: &PathBuf,
    relay: &str,
    session: &str,
    pin: &str,
    bytes: u64,
    relay_only: bool,
    log: &Path,
) -> Result<Dial> {
    let mut cmd = Command::new(peer_bin);
    cmd.args([
        "connect",
        "--relay",
        relay,
        "--session",
        session,
        "--pin",
        pin,
    ])
    .args(["--bytes", &bytes.to_string()]);
    if relay_only {
        cmd.arg("--relay-only");
    }
    let out = cmd.output().context("run peer connect")?;
    std::fs::write(log, [&out.stdout[..], &out.stderr[..]].concat())
        .with_context(|| format!("write {}", log.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "peer connect failed ({}); see {}:\n{}",
            out.status,
            log.display(),
            log_tail(log, 20)
        );
    }
    let field = |name: &str| -> Option<&str> {
        let rest = text.split(&format!("\"{name}\":")).nth(1)?;
        Some(rest.split([',', '}']).next()?.trim().trim_matches('"'))
    };
    let num = |name: &str| -> Result<f64> {
        field(name)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in the dialer's output: {text}"))
    };
    Ok(Dial {
        path: field("path")
            .with_context(|| format!("no path in the dialer's output: {text}"))?
            .to_owned(),
        connect_ms: num("connect_ms")?,
        mbps: num("mbps")?,
        secs: num("secs")?,
        relay_cpu: Duration::ZERO,
        peers_cpu: Duration::ZERO,
        listener_sleeps: 0,
        relay: None,
    })
}

/// CPU time of this process's ended and reaped children (the dialers; the relay and the
/// listeners run until the end).
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes one rusage, which all-zero initialises validly.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid `who` and a pointer to a writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
