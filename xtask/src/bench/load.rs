//! Paced UDP load: sequence-numbered datagrams at a fixed offered rate, an exact count of which
//! arrived, and a one-in-flight ping-pong for latency.
//!
//! Pacing matters on a two-core machine: a greedy sender would take the core the relay needs and
//! measure the scheduler instead. So every [`TICK`] the sender sends what the schedule says is
//! due, in `sendmmsg` batches, and sleeps.

use std::net::{SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::sys::{RecvBatch, SendBatch};

/// Pacing period: bursts of rate/1000 datagrams.
pub const TICK: Duration = Duration::from_millis(1);

/// The most a late tick may catch up, in ticks. A sender starved for longer than this (a noisy
/// host) would otherwise fire one huge burst, i.e. become the greedy sender we avoid; the
/// shortfall is reported instead (`skipped`). Ten ticks at 200k/s is 2,000 datagrams of 1200 B,
/// well within what an 8 MiB receive buffer holds (~3,600 such datagrams).
const MAX_CATCH_UP_TICKS: f64 = 10.0;

/// After sending, the receiver is considered drained once nothing arrived for this long...
const DRAIN_QUIET: Duration = Duration::from_millis(150);
/// ...or, with a trickle still arriving, after this long at most.
const DRAIN_MAX: Duration = Duration::from_secs(2);

/// How long a blocked receive waits before re-checking whether to stop.
const POLL: Duration = Duration::from_millis(20);

/// Marks our datagrams, so stray packets (a late REG reply, a probe) are not counted as data.
const MAGIC: &[u8; 4] = b"QRBL";
const HEADER: usize = 16;

/// Sets the flag when dropped, so a scoped helper thread that loops until told to stop is told
/// even when the code driving it panics (otherwise the scope would wait for it forever).
#[derive(Debug)]
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Schedules `total` sends at `rate` per second in [`TICK`] bursts.
#[derive(Debug)]
pub struct Pacer {
    start: Instant,
    rate: f64,
    total: u64,
    /// Whether sends a starved sender could not make in time are dropped from the schedule
    /// (a fixed offered rate) or only postponed (everything is sent, at most at `rate`).
    skip_late: bool,
    issued: u64,
    skipped: u64,
    ticks: u32,
}

impl Pacer {
    /// A fixed offered rate: what a starved sender misses is skipped and counted.
    pub fn new(rate: u64, total: u64) -> Self {
        Pacer {
            skip_late: true,
            ..Pacer::lenient(rate, total)
        }
    }

    /// At most `rate`, but every one of `total` is sent, however late (registrations, where
    /// completeness matters more than the exact rate).
    pub fn lenient(rate: u64, total: u64) -> Self {
        Pacer {
            skip_late: false,
            start: Instant::now(),
            rate: rate as f64,
            total,
            issued: 0,
            skipped: 0,
            ticks: 0,
        }
    }

    pub fn done(&self) -> bool {
        self.issued + self.skipped >= self.total
    }

    /// Sleeps until the next tick and returns how many datagrams to send in it.
    pub fn next_burst(&mut self) -> u64 {
        self.ticks += 1;
        let due_at = self.start + TICK * self.ticks;
        let now = Instant::now();
        if now < due_at {
            std::thread::sleep(due_at - now);
        } else if now > due_at + TICK {
            // Overslept: resynchronise instead of firing a run of back-to-back ticks.
            self.ticks = ((now - self.start).as_micros() / TICK.as_micros()) as u32;
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        let scheduled = ((self.rate * elapsed) as u64).min(self.total);
        let mut due = scheduled.saturating_sub(self.issued + self.skipped);
        let cap = (self.rate / 1000.0 * MAX_CATCH_UP_TICKS).max(1.0) as u64;
        if due > cap {
            if self.skip_late {
                self.skipped += due - cap;
            }
            due = cap;
        }
        self.issued += due;
        due
    }

    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// One paced run: rate, duration and datagram size.
#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    pub rate: u64,
    pub duration: Duration,
    pub size: usize,
}

/// What a run sent and what arrived.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadReport {
    /// Datagrams handed to the kernel.
    pub sent: u64,
    pub send_errors: u64,
    /// Scheduled but never sent because the sender itself was starved (see [`Pacer`]).
    pub skipped: u64,
    /// Distinct sequence numbers received.
    pub received: u64,
    pub duplicates: u64,
    /// Datagrams that were not this run's data.
    pub foreign: u64,
    pub send_secs: f64,
}

impl LoadReport {
    /// Lost fraction of what was sent (0..=1).
    pub fn loss(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        1.0 - self.received as f64 / self.sent as f64
    }

    pub fn offered_rate(&self) -> f64 {
        self.sent as f64 / self.send_secs.max(1e-9)
    }
}

/// A cheap non-cryptographic random number, to tell runs (and sessions) apart.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// Sends `spec` from `tx` to `to` and counts what arrives at `rx`.
pub fn run(tx: &UdpSocket, to: SocketAddrV4, rx: &UdpSocket, spec: LoadSpec) -> Result<LoadReport> {
    if spec.size < HEADER || spec.size > super::sys::SLOT {
        bail!(
            "datagram size {} outside {HEADER}..={}",
            spec.size,
            super::sys::SLOT
        );
    }
    let total = (spec.rate as f64 * spec.duration.as_secs_f64()) as u64;
    let run_id = random_u64() as u32;
    rx.set_read_timeout(Some(POLL))?;
    let stop = AtomicBool::new(false);
    let epoch = Instant::now();
    let last_rx_us = AtomicU64::new(0);
    std::thread::scope(|s| {
        let receiver = s.spawn(|| receive(rx, run_id, total, &stop, epoch, &last_rx_us));
        let _stop = StopOnDrop(&stop);
        let sent = send(tx, to, run_id, total, spec);
        super::drain(epoch, &last_rx_us, DRAIN_QUIET, DRAIN_MAX, POLL);
        stop.store(true, Ordering::Relaxed);
        let got = receiver.join().expect("receiver thread does not panic")?;
        let (sent, skipped, send_errors, send_secs) = sent;
        Ok(LoadReport {
            sent,
            skipped,
            send_errors,
            send_secs,
            ..got
        })
    })
}

fn send(
    tx: &UdpSocket,
    to: SocketAddrV4,
    run_id: u32,
    total: u64,
    spec: LoadSpec,
) -> (u64, u64, u64, f64) {
    let mut payload = vec![0u8; spec.size];
    payload[..4].copy_from_slice(MAGIC);
    payload[4..8].copy_from_slice(&run_id.to_le_bytes());
    let mut batch = SendBatch::new();
    let mut pacer = Pacer::new(spec.rate, total);
    let (mut seq, mut ok, mut failed) = (0u64, 0u64, 0u64);
    while !pacer.done() {
        for _ in 0..pacer.next_burst() {
            payload[8..16].copy_from_slice(&seq.to_le_bytes());
            seq += 1;
            batch.push(to, None, &payload);
            if batch.is_full() {
                let r = batch.send(tx);
                (ok, failed) = (ok + r.ok, failed + r.failed);
            }
        }
        if batch.len() > 0 {
            let r = batch.send(tx);
            (ok, failed) = (ok + r.ok, failed + r.failed);
        }
    }
    (ok, pacer.skipped(), failed, pacer.elapsed().as_secs_f64())
}

fn receive(
    rx: &UdpSocket,
    run_id: u32,
    total: u64,
    stop: &AtomicBool,
    epoch: Instant,
    last_rx_us: &AtomicU64,
) -> Result<LoadReport> {
    let mut seen = vec![0u64; (total as usize).div_ceil(64)];
    let mut report = LoadReport::default();
    let mut batch = RecvBatch::new();
    while !stop.load(Ordering::Relaxed) {
        let n = batch.recv(rx, libc::MSG_WAITFORONE).context("recvmmsg")?;
        if n == 0 {
            continue;
        }
        last_rx_us.store(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
        for i in 0..n {
            let p = batch.payload(i);
            let seq = match parse_header(p) {
                Some((id, seq)) if id == run_id && seq < total => seq as usize,
                _ => {
                    report.foreign += 1;
                    continue;
                }
            };
            let (word, bit) = (seq / 64, 1u64 << (seq % 64));
            if seen[word] & bit != 0 {
                report.duplicates += 1;
            } else {
                seen[word] |= bit;
                report.received += 1;
            }
        }
    }
    Ok(report)
}

fn parse_header(p: &[u8]) -> Option<(u32, u64)> {
    if p.len() < HEADER || &p[..4] != MAGIC {
        return None;
    }
    let id = u32::from_le_bytes(p[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(p[8..16].try_into().ok()?);
    Some((id, seq))
}

/// Round-trip times of a ping-pong run, sorted.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    pub rtts: Vec<Duration>,
    pub lost: u64,
}

impl Latency {
    /// The `q` quantile (0..=1) of the RTTs, in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.rtts.is_empty() {
            return f64::NAN;
        }
        let i = ((self.rtts.len() - 1) as f64 * q).round() as usize;
        self.rtts[i].as_secs_f64() * 1e6
    }
}

/// This many timeouts in a row means the path is dead (e.g. the relay crashed): give up rather
/// than wait out every remaining round.
const MAX_CONSECUTIVE_LOST: u64 = 25;

/// Rounds sent before measuring: warms caches, the relay's session lookup, and the scheduler.
const WARMUP_ROUNDS: u64 = 200;
/// A round trip slower than this counts as lost; a reply arriving later is recognised by its
/// sequence number and skipped.
const PING_TIMEOUT: Duration = Duration::from_millis(200);

/// Ping-pong with one datagram in flight: `client` sends to `to`, and `echo` (served by a
/// thread) returns every datagram to its source, so the path is symmetric whether `to` is the
/// echo socket itself or a relay in between.
pub fn ping_pong(
    client: &UdpSocket,
    to: SocketAddrV4,
    echo: &UdpSocket,
    rounds: u64,
) -> Result<Latency> {
    let stop = AtomicBool::new(false);
    echo.set_read_timeout(Some(POLL))?;
    client.set_read_timeout(Some(PING_TIMEOUT))?;
    let run_id = random_u64() as u32;
    std::thread::scope(|s| {
        let echoer = s.spawn(|| -> Result<()> {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                match echo.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        echo.send_to(&buf[..n], from).context("echo send")?;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e).context("echo recv"),
                }
            }
            Ok(())
        });
        let _stop = StopOnDrop(&stop);
        let result = ping_loop(client, to, run_id, rounds);
        stop.store(true, Ordering::Relaxed);
        echoer.join().expect("echo thread does not panic")?;
        result
    })
}

fn ping_loop(client: &UdpSocket, to: SocketAddrV4, run_id: u32, rounds: u64) -> Result<Latency> {
    let mut out = Latency {
        rtts: Vec::with_capacity(rounds as usize),
        lost: 0,
    };
    let mut msg = [0u8; 64];
    msg[..4].copy_from_slice(MAGIC);
    msg[4..8].copy_from_slice(&run_id.to_le_bytes());
    let mut buf = [0u8; 2048];
    let mut consecutive_lost = 0;
    for seq in 0..WARMUP_ROUNDS + rounds {
        msg[8..16].copy_from_slice(&seq.to_le_bytes());
        let t0 = Instant::now();
        client.send_to(&msg, to).context("ping send")?;
        let rtt = loop {
            if t0.elapsed() >= PING_TIMEOUT {
                break None;
            }
            match client.recv_from(&mut buf) {
                Ok((n, _)) if parse_header(&buf[..n]) == Some((run_id, seq)) => {
                    break Some(t0.elapsed())
                }
                Ok(_) => {} // a stale reply or a relay control message
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break None
                }
                Err(e) => return Err(e).context("ping recv"),
            }
        };
        consecutive_lost = if rtt.is_some() {
            0
        } else {
            consecutive_lost + 1
        };
        if consecutive_lost >= MAX_CONSECUTIVE_LOST {
            bail!("{consecutive_lost} ping-pongs in a row via {to} got no reply");
        }
        if seq < WARMUP_ROUNDS {
            continue;
        }
        match rtt {
            Some(d) => out.rtts.push(d),
            None => out.lost += 1,
        }
    }
    out.rtts.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::sys::{bind_udp, local_v4};
    use std::net::Ipv4Addr;

    fn lo(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, last), 0)
    }

    #[test]
    fn pacer_spreads_the_total_over_the_duration() {
        let mut p = Pacer::new(20_000, 2_000);
        let mut sent = 0;
        let mut bursts = 0;
        while !p.done() && bursts < 10_000 {
            sent += p.next_burst();
            bursts += 1;
        }
        assert_eq!(sent + p.skipped(), 2_000);
        // 2000 at 20k/s is 100 ms; allow a noisy host some slack either way.
        let ms = p.elapsed().as_millis();
        assert!((90..2_000).contains(&ms), "took {ms} ms");
    }

    #[test]
    fn direct_path_delivers_everything_at_a_low_rate() -> Result<()> {
        let (tx, rx) = (bind_udp(lo(1))?, bind_udp(lo(1))?);
        let spec = LoadSpec {
            rate: 10_000,
            duration: Duration::from_millis(200),
            size: 1200,
        };
        let r = run(&tx, local_v4(&rx)?, &rx, spec)?;
        assert_eq!(r.sent, 2_000 - r.skipped);
        assert_eq!(r.received, r.sent, "{r:?}");
        assert_eq!(r.duplicates, 0);
        Ok(())
    }

    #[test]
    fn ping_pong_direct() -> Result<()> {
        let (client, echo) = (bind_udp(lo(1))?, bind_udp(lo(1))?);
        let lat = ping_pong(&client, local_v4(&echo)?, &echo, 100)?;
        assert_eq!(lat.rtts.len() as u64 + lat.lost, 100);
        assert!(lat.quantile_us(0.5) > 0.0);
        Ok(())
    }
}
