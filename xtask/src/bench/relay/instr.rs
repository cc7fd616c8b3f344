//! The `instr` part: user-space instructions per forwarded datagram at a paced 4k/s, one in
//! flight, counted by callgrind, relay against the forwarder. Every wake-up carries one
//! datagram, so batching hides nothing: what the count shows is each datagram's own work.
//! Unlike CPU time it does not wobble with the host's load, so small changes show.
//!
//! Each contender runs twice under `valgrind --tool=callgrind`, once with a short and once with
//! a long flow; the difference of the two totals divided by the difference of the datagrams
//! delivered is the cost per datagram, with start-up, registration and shutdown cancelled out.

use std::net::{SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::harness::{direct_pair, peer_socket, register_pair, wrapped, Forwarder, DATAGRAM};
use super::report::{ratio, Row, Verdict};
use super::{Ctx, PEER_A, PEER_B};
use crate::bench::median;
use crate::process::ChildGuard;

/// Target from the issue: the relay's own work per datagram at most this multiple of the
/// forwarder's.
const INSTR_TARGET_RATIO: f64 = 1.5;
/// Offered rate: paced, so that the length of a run (and with it the work both contenders do
/// by the clock: timers, idle wake-ups) is set by the plan, not by how fast the server
/// answers; well within what a server slowed down ~50x by valgrind can serve.
const INSTR_RATE: u64 = 4_000;
/// How long the receiver waits for a late datagram before it counts the run as over.
const QUIET: Duration = Duration::from_millis(500);
/// How long the sender waits for a datagram to arrive before it sends the next one anyway
/// (and counts it lost unless it turns up by the end). A relayed datagram under valgrind
/// takes well under a millisecond.
const LOST: Duration = Duration::from_millis(100);
/// The last stretch before each send that the sender spins rather than sleeps.
const SPIN: Duration = Duration::from_micros(60);
/// How long a program under valgrind may take to exit after SIGTERM (it writes its profile).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a program under valgrind may take to start: valgrind translates it first.
const VALGRIND_STARTUP: Duration = Duration::from_secs(60);

/// Instructions and datagrams delivered of one run under callgrind.
#[derive(Debug, Clone, Copy)]
struct Counted {
    instructions: u64,
    /// Calls of `recvmmsg` (libc's or a Rust function of that name calling the kernel
    /// directly): the server's wake-ups.
    wakeups: u64,
    delivered: u64,
    sent: u64,
}

pub(super) fn part_instr(ctx: &Ctx) -> Result<Vec<Row>> {
    if !crate::bench::which("valgrind") {
        bail!("valgrind not found: install it (apt-get install valgrind) to count instructions");
    }
    let (short, long) = ctx.plan.instr_durations;
    let (mut via, mut base) = (Vec::new(), Vec::new());
    for rep in 1..=ctx.plan.reps {
        let mut per = [0.0; 2];
        let mut lines = Vec::new();
        for (k, who) in ["relay", "forwarder"].into_iter().enumerate() {
            let runs = [short, long].map(|d| run_one(ctx, who, rep, d));
            let [s, l] = runs;
            let (s, l) = (s?, l?);
            let datagrams = l.delivered.saturating_sub(s.delivered);
            if datagrams == 0 {
                bail!("{who}: the long run delivered no more datagrams than the short one");
            }
            per[k] = l.instructions.saturating_sub(s.instructions) as f64 / datagrams as f64;
            // How far batching could hide per-datagram work: close to 1 is what this part
            // wants; a busy host or a slow server raises it.
            let per_wakeup = datagrams as f64 / l.wakeups.saturating_sub(s.wakeups).max(1) as f64;
            lines.push(format!(
                "{who:<9} {:.0} instructions/datagram, {per_wakeup:.2} datagrams/wake-up ({} - {} \
                 instructions over {} - {} delivered; {}/{} and {}/{} delivered/sent)",
                per[k],
                l.instructions,
                s.instructions,
                l.delivered,
                s.delivered,
                s.delivered,
                s.sent,
                l.delivered,
                l.sent
            ));
        }
        println!("  rep {rep}:");
        for l in lines {
            println!("    {l}");
        }
        via.push(per[0]);
        base.push(per[1]);
    }
    let (r, b) = (median(&via), median(&base));
    Ok(vec![Row {
        metric: format!(
            "user-space instructions per datagram @ {}k/s (callgrind)",
            INSTR_RATE / 1000
        ),
        relay: format!("{r:.0}"),
        baseline: format!("{b:.0} fwd"),
        ratio: ratio(r, b),
        target: format!("<= {INSTR_TARGET_RATIO}x fwd"),
        verdict: Verdict::of(r <= INSTR_TARGET_RATIO * b),
    }])
}

/// The valgrind command line that writes its count to `out`.
fn callgrind(out: &Path) -> Vec<String> {
    vec![
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        format!("--callgrind-out-file={}", out.display()),
    ]
}

/// One run of `duration` at [`INSTR_RATE`] through `who` ("relay" or "forwarder") under callgrind.
fn run_one(ctx: &Ctx, who: &str, rep: usize, duration: Duration) -> Result<Counted> {
    let tag = format!("instr-{who}-{rep}-{}ms", duration.as_millis());
    let out = ctx.log_dir.join(format!("{tag}.callgrind"));
    let _ = std::fs::remove_file(&out);
    let count = (INSTR_RATE as f64 * duration.as_secs_f64()) as u64;
    let load = if who == "relay" {
        let mut cmd = wrapped(&callgrind(&out), &ctx.relay_bin);
        cmd.args(["--bind", "127.0.0.1", "--port", "0"])
            // Nothing per datagram is logged at info; the startup line carries the address.
            .env("RUST_LOG", "warn,quic_relay=info");
        let mut child = ChildGuard::spawn(cmd, "quic-relay under callgrind", &log(ctx, &tag))?;
        let addr: SocketAddrV4 = child
            .wait_logged("relay socket bound", "local_addr", VALGRIND_STARTUP)?
            .parse()
            .context("the relay's logged UDP address")?;
        let (a, b) = (peer_socket(PEER_A)?, peer_socket(PEER_B)?);
        register_pair(addr, &a, &b)?;
        let load = paced(&a, addr, &b, count)?;
        finish(child, &tag)?;
        load
    } else {
        let (a, b) = direct_pair()?;
        let f = Forwarder::start_wrapped(ctx, &a, &b, false, None, &callgrind(&out))?;
        let addr = f.addr;
        let load = paced(&a, addr, &b, count)?;
        finish(f.child, &tag)?;
        load
    };
    let text = std::fs::read_to_string(&out)
        .with_context(|| format!("read the callgrind profile {}", out.display()))?;
    Ok(Counted {
        instructions: parse_total(&text)
            .with_context(|| format!("no totals line in {}", out.display()))?,
        wakeups: calls_to(&text, "recvmmsg"),
        delivered: load,
        sent: count,
    })
}

/// Sends `count` datagrams from `a` to `to`, evenly spaced at [`INSTR_RATE`] and one at a time:
/// each is sent only once the one before it reached `b` (or was given up after [`LOST`]), so
/// every wake-up of the server carries exactly one datagram, whatever the host's load. Pacing
/// alone let a late-scheduled sender or server find two or more queued (1.1-1.6 datagrams per
/// wake-up from run to run on a busy host), which moved both contenders' counts by a fifth
/// and the ratio with them. Returns how many `b` received.
fn paced(a: &UdpSocket, to: SocketAddrV4, b: &UdpSocket, count: u64) -> Result<u64> {
    let period = Duration::from_secs(1) / INSTR_RATE as u32;
    let payload = vec![0x5a; DATAGRAM];
    let mut buf = vec![0u8; 2 * DATAGRAM];
    b.set_read_timeout(Some(LOST))?;
    let mut got = 0u64;
    let start = Instant::now();
    for i in 0..count {
        let due = start + period * i as u32;
        // Sleep through most of the gap, then spin: a sleep alone overshoots by tens of µs.
        let now = Instant::now();
        if due > now + SPIN {
            std::thread::sleep(due - now - SPIN);
        }
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        a.send_to(&payload, to).context("send")?;
        if b.recv(&mut buf).is_ok() {
            got += 1;
        }
    }
    // A datagram given up on may still arrive late; it was sent, so it counts.
    b.set_read_timeout(Some(QUIET))?;
    while got < count && b.recv(&mut buf).is_ok() {
        got += 1;
    }
    Ok(got)
}

fn log(ctx: &Ctx, tag: &str) -> PathBuf {
    ctx.log_dir.join(format!("{tag}.log"))
}

/// Stops a program under valgrind so that it writes its profile.
fn finish(child: ChildGuard, tag: &str) -> Result<()> {
    child
        .terminate(EXIT_TIMEOUT)
        .with_context(|| format!("stop {tag}"))?;
    Ok(())
}

/// The total of a callgrind profile: its `totals:` line (or `summary:`, which older versions
/// write instead).
fn parse_total(text: &str) -> Option<u64> {
    text.lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Whether callgrind's function name `fname` is `name`: the C function itself, or a Rust
/// function of that name in any module (`quic_relay::server::linux::recvmmsg`).
fn names(fname: &str, name: &str) -> bool {
    fname == name
        || fname
            .strip_suffix(name)
            .is_some_and(|path| path.ends_with("::"))
}

/// How many times the profiled program called the function `name`, summed over its callers.
/// Callgrind names a function once (`fn=(id) name` or `cfn=(id) name`) and later by its id
/// alone (`cfn=(id)`); each
/// `calls=N ...` line counts the calls to the `cfn` before it.
fn calls_to(text: &str, name: &str) -> u64 {
    let mut target: Option<&str> = None;
    let mut current = false;
    let mut total = 0;
    for line in text.lines() {
        if let Some((id, fname)) = line.strip_prefix("fn=").and_then(|r| r.split_once(' ')) {
            // A function first named where it is defined keeps that id as a callee too.
            if names(fname, name) {
                target = Some(id);
            }
        } else if let Some(rest) = line.strip_prefix("cfn=") {
            let (id, fname) = match rest.split_once(' ') {
                Some((id, f)) => (id, Some(f)),
                None => (rest, None),
            };
            if fname.is_some_and(|f| names(f, name)) {
                target = Some(id);
            }
            current = target == Some(id);
        } else if let Some(rest) = line.strip_prefix("calls=") {
            if current {
                total += rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::{calls_to, parse_total};

    #[test]
    fn counts_the_calls_to_a_function_named_once() {
        let profile = "fn=(1) main\ncfn=(2) recvmmsg\ncalls=3 0x10\n5 7\ncfn=(3) other\n\
                       calls=9 0x20\n1 1\nfn=(4) loop\ncfn=(2)\ncalls=4 0x30\n2 2\n\
                       fn=(5) sendmmsg\n3 3\nfn=(1)\ncfn=(5)\ncalls=6 0x40\n1 1\n";
        assert_eq!(calls_to(profile, "recvmmsg"), 7);
        assert_eq!(calls_to(profile, "sendmmsg"), 6);
        assert_eq!(calls_to(profile, "other"), 9);
        assert_eq!(calls_to(profile, "absent"), 0);
        let rust = "fn=(1) main\ncfn=(2) app::io::recvmmsg\ncalls=5 0x10\n1 1\n\
                    cfn=(3) app::io::not_recvmmsg\ncalls=9 0x20\n1 1\n";
        assert_eq!(calls_to(rust, "recvmmsg"), 5);
    }

    #[test]
    fn reads_the_total_of_a_callgrind_profile() {
        let profile = "events: Ir\nfn=main\n1 5\nsummary: 3540457\ntotals: 3540611\n";
        assert_eq!(parse_total(profile), Some(3_540_611));
        assert_eq!(parse_total("events: Ir\nsummary: 42\n"), Some(42));
        assert_eq!(parse_total("events: Ir\n"), None);
    }
}
