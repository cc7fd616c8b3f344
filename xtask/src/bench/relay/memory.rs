//! The `memory` part: RSS growth per idle paired session against a bare std `HashMap`.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::harness::{Relay, FLEET_SOCKETS};
use super::reg::describe_reg;
use super::report::{ratio, si, Row, Verdict};
use super::{Ctx, SETTLE_TIMEOUT};
use crate::bench::multiaddr::{Fleet, Replies};
use crate::bench::{load, metrics, sys, table};

/// Target from the issue.
const MEMORY_TARGET_BYTES: f64 = 300.0;
/// REG rate while building the memory part's sessions; the relay is not being timed there.
const MEMORY_REG_RATE: u64 = 150_000;
/// How many resend passes the memory part may use for REGs whose ACK never came.
const MEMORY_REG_PASSES: u32 = 5;

pub(super) const PAIRED: &str = "quic_relay_sessions{state=\"paired\"}";
pub(super) const UNPAIRED: &str = "quic_relay_sessions{state=\"unpaired\"}";
/// Registration results that mean "accepted".
pub(super) const ACCEPTED: [&str; 4] = [
    "quic_relay_registrations_total{result=\"new\"}",
    "quic_relay_registrations_total{result=\"join\"}",
    "quic_relay_registrations_total{result=\"refresh\"}",
    "quic_relay_registrations_total{result=\"rebind\"}",
];

pub(super) fn part_memory(ctx: &Ctx) -> Result<Vec<Row>> {
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
