//! `cargo xtask bench uot`: paced 1200-byte datagrams through `udp-over-tcp` (connect side →
//! TCP → listen side) on loopback, against the direct UDP path in the same run: loss at
//! 100,000/s, the highest rate with at most 1 % loss, and the round-trip time, with ratios.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::load::{self, LoadSpec};
use super::median;
use super::sys;
use crate::cli::Args;
use crate::process::ChildGuard;

pub const HELP: &str = "\
Usage: cargo xtask bench uot [options]

Builds udp-over-tcp and xtask in release, then re-runs itself from the
release build. A sender and a receiver on 127.0.0.1 are measured over two paths in the same run:

  direct   sender → receiver (UDP)
  tunnel   sender → udp-over-tcp --tcp-connect → TCP → udp-over-tcp --tcp-listen → receiver

  loss     paced offered load of 1200-byte datagrams at 100,000/s (target: loss <= 0.5 %)
  max      the highest rate of a ladder with loss <= 1 %
  rtt      one-in-flight ping-pong through the path and back (target: median < 200 us)

Options:
  --framing F   plain (default), flow or mullvad; `all` runs each in turn
  --quick       one repetition of short runs (a CI smoke test, ~1 minute)
  --reps N      repetitions (default 3; medians are reported)
  --no-build    do not run cargo build first
  -h, --help    this text

Logs go to target/bench-uot/. Exits 0 when targets are missed (the table says FAIL) and
non-zero when something could not be measured (a tunnel process died or never came up).
";

/// Datagram size of the target.
const DATAGRAM: usize = 1200;
/// The loss target at 100,000/s, and the loss that still counts for the highest rate.
const LOSS_RATE: u64 = 100_000;
const LOSS_TARGET: f64 = 0.005;
const MAX_LOSS: f64 = 0.01;
/// The round-trip target (no Nagle stall).
const RTT_TARGET_US: f64 = 200.0;
/// Rates tried for the highest rate with <= 1 % loss.
const LADDER: [u64; 10] = [
    50_000, 100_000, 125_000, 150_000, 200_000, 250_000, 300_000, 400_000, 500_000, 600_000,
];
const LADDER_QUICK: [u64; 4] = [100_000, 200_000, 300_000, 400_000];
/// A ladder level counts only when the sender offered at least this share of its rate.
const OFFERED_MIN: f64 = 0.9;
/// Ping-pong rounds per repetition.
const PING_ROUNDS: u64 = 2_000;
/// Socket buffers of the sender and receiver.
const BUFFERS: usize = 8 << 20;
/// How long the tunnel may take to come up.
const STARTUP: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy)]
struct Plan {
    reps: usize,
    duration: Duration,
    quick: bool,
}

pub fn run(args: &[String]) -> Result<()> {
    let mut a = Args::new(args);
    let Some(common) = super::Common::parse(&mut a, HELP)? else {
        return Ok(());
    };
    let (quick, no_build) = (common.quick, common.no_build);
    let framing = a.value("--framing")?.unwrap_or_else(|| "plain".into());
    a.finish()?;
    let framings: Vec<&str> = match framing.as_str() {
        "all" => vec!["plain", "flow", "mullvad"],
        f @ ("plain" | "flow" | "mullvad") => vec![f],
        other => bail!("--framing {other}: use plain, flow, mullvad or all"),
    };
    let plan = Plan {
        reps: common.reps(1, 3),
        duration: Duration::from_secs_f64(if quick { 1.0 } else { 2.0 }),
        quick,
    };
    let target = crate::target_dir().join("release");
    if !no_build {
        super::build_release(&["xtask", "udp-over-tcp"])?;
    }
    super::exec_release("uot", args)?;
    let bin = target.join("udp-over-tcp");
    if !bin.is_file() {
        bail!("{} not found (build it first)", bin.display());
    }
    for f in framings {
        bench_framing(&bin, f, plan)?;
    }
    Ok(())
}

fn socket() -> Result<UdpSocket> {
    let s = sys::bind_udp(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    sys::set_buffers(&s, BUFFERS).context("socket buffers")?;
    Ok(s)
}

/// Both ends of a tunnel, killed when dropped. The connect side's UDP entry is `entry`.
struct Tunnel {
    entry: SocketAddrV4,
    children: Vec<ChildGuard>,
}

impl Tunnel {
    /// `sender` sends into the tunnel and gets replies; `receiver` gets what comes out.
    fn start(
        bin: &std::path::Path,
        framing: &str,
        sender: &UdpSocket,
        receiver: &UdpSocket,
    ) -> Result<Tunnel> {
        let log_dir = crate::target_dir().join("bench-uot");
        // Every port 0: each process binds its own and logs the addresses ("udp-over-tcp
        // running udp=.. tcp=.."), which is read back instead of picking ports here.
        let info = "warn,udp_over_tcp=info";
        let mut listen = Command::new(bin);
        listen
            .args([
                "--framing",
                framing,
                "--tcp-listen",
                "127.0.0.1:0",
                "--udp-bind",
                "127.0.0.1:0",
                "--udp-sendto",
                &sys::local_v4(receiver)?.to_string(),
            ])
            .env("RUST_LOG", info);
        let mut listen = ChildGuard::spawn(
            listen,
            "udp-over-tcp (listen)",
            &log_dir.join(format!("listen-{framing}.log")),
        )?;
        let tcp = listen.wait_logged("udp-over-tcp running", "tcp", STARTUP)?;
        let mut connect = Command::new(bin);
        connect
            .args([
                "--framing",
                framing,
                "--tcp-connect",
                &tcp,
                "--udp-bind",
                "127.0.0.1:0",
                "--udp-sendto",
                &sys::local_v4(sender)?.to_string(),
            ])
            .env("RUST_LOG", info);
        let mut connect = ChildGuard::spawn(
            connect,
            "udp-over-tcp (connect)",
            &log_dir.join(format!("connect-{framing}.log")),
        )?;
        let entry: SocketAddrV4 = connect
            .wait_logged("udp-over-tcp running", "udp", STARTUP)?
            .parse()
            .context("the tunnel entry's logged UDP address")?;
        let t = Tunnel {
            entry,
            children: vec![listen, connect],
        };
        t.wait_up(sender, receiver)?;
        Ok(t)
    }

    /// Sends probes until one crosses: both processes are up and connected.
    fn wait_up(&self, sender: &UdpSocket, receiver: &UdpSocket) -> Result<()> {
        receiver.set_read_timeout(Some(Duration::from_millis(50)))?;
        let deadline = Instant::now() + STARTUP;
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            let _ = sender.send_to(b"probe", self.entry);
            if let Ok((n, _)) = receiver.recv_from(&mut buf) {
                if &buf[..n] == b"probe" {
                    // Drain further probes so they do not count as foreign datagrams.
                    while receiver.recv_from(&mut buf).is_ok() {}
                    return Ok(());
                }
            }
        }
        bail!("the tunnel did not carry a datagram within {STARTUP:?}")
    }

    fn check(&mut self) -> Result<()> {
        for c in &mut self.children {
            c.check_alive()?;
        }
        Ok(())
    }
}

fn pct(x: f64) -> String {
    format!("{:.3} %", x * 100.0)
}

fn si(x: f64) -> String {
    if x >= 1e3 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// Runs one framing and prints its table.
fn bench_framing(bin: &std::path::Path, framing: &str, plan: Plan) -> Result<()> {
    println!("== udp-over-tcp --framing {framing}: {DATAGRAM} B datagrams on loopback, {} rep(s) of {:?}", plan.reps, plan.duration);
    let sender = socket()?;
    let receiver = socket()?;
    let mut tunnel = Tunnel::start(bin, framing, &sender, &receiver)?;
    let direct_to = sys::local_v4(&receiver)?;
    let spec = |rate| LoadSpec {
        rate,
        duration: plan.duration,
        size: DATAGRAM,
    };

    // Loss at 100,000/s, paths interleaved so a noisy neighbour hits both.
    let (mut d_loss, mut t_loss, mut t_offered) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=plan.reps {
        let d = load::run(&sender, direct_to, &receiver, spec(LOSS_RATE))?;
        let t = load::run(&sender, tunnel.entry, &receiver, spec(LOSS_RATE))?;
        tunnel.check()?;
        println!(
            "  100k/s rep {rep}: direct loss {} ({} sent); tunnel loss {} ({} sent, {} received, offered {}/s)",
            pct(d.loss()),
            d.sent,
            pct(t.loss()),
            t.sent,
            t.received,
            si(t.offered_rate())
        );
        d_loss.push(d.loss());
        t_loss.push(t.loss());
        t_offered.push(t.offered_rate());
    }

    // Highest rate with <= 1 % loss: climb the ladder until a rate fails (median of reps).
    let ladder: &[u64] = if plan.quick { &LADDER_QUICK } else { &LADDER };
    let mut best = [0u64; 2];
    let mut sender_limit: [Option<f64>; 2] = [None, None];
    let mut climbing = [true; 2];
    for &rate in ladder {
        if !climbing.iter().any(|c| *c) {
            break;
        }
        let (mut losses, mut offered) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        for _ in 0..plan.reps {
            for (i, to) in [direct_to, tunnel.entry].into_iter().enumerate() {
                if climbing[i] {
                    let r = load::run(&sender, to, &receiver, spec(rate))?;
                    losses[i].push(r.loss());
                    offered[i].push(r.offered_rate());
                }
            }
            tunnel.check()?;
        }
        for i in 0..2 {
            if climbing[i] {
                let l = median(&losses[i]);
                // A starved sender offers less than asked: then the level was not fully tested.
                println!(
                    "  {}/s {}: loss {} (offered {}/s)",
                    si(rate as f64),
                    ["direct", "tunnel"][i],
                    pct(l),
                    si(median(&offered[i]))
                );
                let o = median(&offered[i]);
                if o < OFFERED_MIN * rate as f64 {
                    // Our sender could not offer this rate: the path was not tested at it.
                    climbing[i] = false;
                    sender_limit[i] = Some(o);
                } else if l <= MAX_LOSS {
                    best[i] = rate;
                } else {
                    climbing[i] = false;
                }
            }
        }
    }

    // Round trips: sender → tunnel → receiver (echoes) → tunnel → sender.
    let (mut d_rtt, mut t_rtt, mut t_p99) = (Vec::new(), Vec::new(), Vec::new());
    let rounds = if plan.quick {
        PING_ROUNDS / 4
    } else {
        PING_ROUNDS
    };
    for _ in 0..plan.reps {
        let d = load::ping_pong(&sender, direct_to, &receiver, rounds)?;
        let t = load::ping_pong(&sender, tunnel.entry, &receiver, rounds)?;
        tunnel.check()?;
        d_rtt.push(d.quantile_us(0.5));
        t_rtt.push(t.quantile_us(0.5));
        t_p99.push(t.quantile_us(0.99));
    }

    let (dl, tl) = (median(&d_loss), median(&t_loss));
    let (dr, tr) = (median(&d_rtt), median(&t_rtt));
    let loss_ok = tl <= LOSS_TARGET;
    let rtt_ok = tr < RTT_TARGET_US;
    let top = |b: u64, last: u64, limit: Option<f64>| {
        if b == 0 {
            format!("< {}", si(ladder[0] as f64))
        } else if b == last || limit.is_some() {
            // Not reached a lossy level: the ladder (or our sender) ran out first.
            format!(">= {}/s", si(b as f64))
        } else {
            format!("{}/s", si(b as f64))
        }
    };
    let last = *ladder.last().unwrap_or(&0);
    println!();
    println!(
        "  {:<28} {:>14} {:>14} {:>10}  target",
        "metric", "tunnel", "direct", "ratio"
    );
    println!(
        "  {:<28} {:>14} {:>14} {:>10}  <= 0.5 % {}",
        "loss @ 100k/s",
        pct(tl),
        pct(dl),
        "",
        if loss_ok { "PASS" } else { "FAIL" }
    );
    println!(
        "  {:<28} {:>14} {:>14} {:>10}  (at 100k/s the sender offered {}/s)",
        "highest rate, loss <= 1 %",
        top(best[1], last, sender_limit[1]),
        top(best[0], last, sender_limit[0]),
        if best[0] > 0 {
            format!("{:.2}", best[1] as f64 / best[0] as f64)
        } else {
            "-".into()
        },
        si(median(&t_offered))
    );
    for (i, name) in ["direct", "tunnel"].iter().enumerate() {
        if let Some(o) = sender_limit[i] {
            println!(
                "  ({name}: the sender offered only {}/s at the next level, so its highest rate is a lower bound)",
                si(o)
            );
        }
    }
    println!(
        "  {:<28} {:>11.0} us {:>11.0} us {:>10}  < 200 us {}",
        "round trip, median",
        tr,
        dr,
        format!("{:.2}", tr / dr),
        if rtt_ok { "PASS" } else { "FAIL" }
    );
    println!(
        "  {:<28} {:>11.0} us",
        "round trip, p99 (tunnel)",
        median(&t_p99)
    );
    println!();
    Ok(())
}
