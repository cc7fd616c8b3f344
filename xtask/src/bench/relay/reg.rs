//! The `reg` part: REGs accepted per second under a flood from many addresses while a paired
//! flow keeps moving, relay against an ACK-only forwarder.

use std::fmt::Write as _;
use std::net::{SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::Result;

use super::harness::{
    describe, direct_pair, relay_pair, Forwarder, PathDrops, Relay, DATAGRAM, FLEET_SOCKETS,
};
use super::memory::ACCEPTED;
use super::report::{pct, ratio, si, Row, Verdict};
use super::Ctx;
use crate::bench::load::{self, LoadReport, LoadSpec};
use crate::bench::median;
use crate::bench::multiaddr::{Fleet, RegReport, Replies};
use crate::bench::sys;

/// Target from the issue.
const REG_TARGET_PER_SEC: f64 = 200_000.0;
/// Offered REG rate of the registration part: above the target, so the relay is the limit.
const REG_OFFERED_RATE: u64 = 250_000;
/// The paired flow that must keep moving while registrations pour in.
const REG_PAIRED_RATE: u64 = 20_000;

pub(super) fn describe_reg(r: &RegReport) -> String {
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
pub(super) struct Flood {
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

pub(super) fn flood(
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

pub(super) fn describe_flood(f: &Flood) -> String {
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

pub(super) fn part_reg(ctx: &Ctx) -> Result<Vec<Row>> {
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
