//! The `latency` part: ping-pong round trips (one in flight) through the relay, direct and
//! through the forwarder, on one CPU and as the scheduler places things.

use anyhow::{Context, Result};

use super::harness::{direct_pair, relay_pair, Forwarder, Relay};
use super::report::{ratio, Row, Verdict};
use super::Ctx;
use crate::bench::load::{self, Latency};
use crate::bench::median;
use crate::bench::sys::local_v4;

/// Target from the issue.
const LATENCY_ADDED_TARGET_US: f64 = 50.0;

pub(super) fn describe_latency(l: &Latency) -> String {
    format!(
        "median {:.1} µs, p99 {:.1} µs ({} lost)",
        l.quantile_us(0.5),
        l.quantile_us(0.99),
        l.lost
    )
}

/// Where the latency part runs the ping-pong's endpoints and the server in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
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
    pub(super) fn label(self, ctx: &Ctx) -> &'static str {
        match (self, ctx.server_cpu) {
            (Placement::OneCpu, _) => "all on one CPU",
            (Placement::Scheduler, Some(_)) => "server pinned apart",
            (Placement::Scheduler, None) => "scheduler-placed",
        }
    }
}

/// Ping-pong medians and p99s (µs) of the direct path, the relay and the forwarder.
pub(super) type LatencyRep = [(f64, f64); 3];

pub(super) fn latency_rep(
    ctx: &Ctx,
    relay: &mut Relay,
    placement: Placement,
) -> Result<LatencyRep> {
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

pub(super) fn part_latency(ctx: &Ctx) -> Result<Vec<Row>> {
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
