//! The `loss` part: 1200 B datagrams at 100k/s and 200k/s through the relay, the direct path and
//! the minimal forwarder.

use std::fmt::Write as _;

use anyhow::Result;

use super::harness::{
    describe, direct_pair, dropped, relay_pair, Forwarder, PathDrops, Relay, DATAGRAM,
};
use super::report::{pct, ratio, si, Row, Verdict};
use super::Ctx;
use crate::bench::load::{self, LoadSpec};
use crate::bench::median;
use crate::bench::sys::local_v4;

/// Targets from the issue.
const LOSS_TARGET_100K: f64 = 0.001;
const LOSS_TARGET_200K: f64 = 0.02;
/// Below this fraction of the planned rate, a loss row says what was really offered.
const OFFERED_SHORTFALL: f64 = 0.98;

pub(super) fn part_loss(ctx: &Ctx) -> Result<Vec<Row>> {
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
