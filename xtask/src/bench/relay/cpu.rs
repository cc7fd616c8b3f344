//! The `cpu` part: CPU time per forwarded datagram at 50k/s, relay against the forwarder, from
//! `/proc/<pid>`.

use std::net::{SocketAddrV4, UdpSocket};

use anyhow::Result;

use super::harness::{describe, direct_pair, relay_pair, Forwarder, PathDrops, Relay, DATAGRAM};
use super::report::{ratio, si, Row, Verdict};
use super::Ctx;
use crate::bench::load::{self, LoadReport, LoadSpec};
use crate::bench::median;
use crate::bench::sys;

/// Target from the issue.
const CPU_TARGET_US: f64 = 3.0;
/// Offered rate of the CPU runs: high enough to amortise fixed costs, low enough that neither
/// the relay nor the baseline is near saturation.
const CPU_RATE: u64 = 50_000;

pub(super) fn part_cpu(ctx: &Ctx) -> Result<Vec<Row>> {
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
pub(super) struct CpuRun {
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
pub(super) fn cpu_run(
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
