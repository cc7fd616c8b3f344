//! A shaped link in user space: two TAP interfaces joined by threads that copy Ethernet frames
//! between them with a delay, random loss and a rate limit, like `tc qdisc ... netem`.
//!
//! Why not netem: the kernels this project's machines and CI run are built without `sch_netem`
//! (`tc qdisc add ... netem` answers "Specified qdisc kind is unknown"), and no other qdisc they
//! have can delay packets. TAP devices are always there. Only shaped links use this; unshaped
//! links stay plain veth pairs.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TrySendError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tracing::{debug, warn};

use crate::workers::{readable_unless_stopped, Workers, STOP_POLL};

/// Delay, loss and rate of one link, applied the same in both directions.
///
/// A round trip over one shaped link therefore takes at least `2 * delay_ms`, plus the
/// serialisation time of both packets when `rate_mbit` is set.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkShape {
    /// One-way delay added to every frame, in milliseconds.
    pub delay_ms: u32,
    /// Probability of dropping each frame, in percent (0 to 100), drawn independently per frame
    /// and direction. ARP frames are exempt (see `is_arp`).
    pub loss_pct: f64,
    /// Bandwidth in megabits per second (10^6 bit/s); `None` means unlimited. Frames beyond what
    /// the rate allows queue (up to [`QUEUE_LIMIT_FRAMES`]) and then drop, like a router buffer.
    pub rate_mbit: Option<f64>,
}

impl LinkShape {
    /// A link that only adds `delay_ms` of one-way delay.
    pub fn delay(delay_ms: u32) -> Self {
        LinkShape {
            delay_ms,
            ..LinkShape::default()
        }
    }

    /// Whether any frame may be dropped on purpose (probes then retry more).
    pub fn is_lossy(&self) -> bool {
        self.loss_pct > 0.0
    }
}

/// Frames queued per direction before new ones are dropped; netem's default `limit` is also 1000.
pub const QUEUE_LIMIT_FRAMES: usize = 1000;

/// Largest frame a TAP read can return (no offloads are enabled, so in practice MTU + 14 bytes).
const MAX_FRAME: usize = 65536;

/// The forwarding threads of one shaped link; dropping it stops them and closes both TAPs,
/// which removes the interfaces.
#[derive(Debug)]
pub(crate) struct Wire {
    /// Stopped and joined on drop.
    _workers: Workers,
}

impl Wire {
    /// Starts forwarding between two TAP queues (see [`crate::sys::open_tap`]) with `shape` applied to
    /// both directions. `name` labels the threads and logs.
    pub(crate) fn start(a: File, b: File, shape: LinkShape, name: &str) -> Result<Wire> {
        anyhow::ensure!(
            (0.0..=100.0).contains(&shape.loss_pct),
            "loss_pct must be within 0..=100, got {}",
            shape.loss_pct
        );
        if let Some(rate) = shape.rate_mbit {
            anyhow::ensure!(rate > 0.0, "rate_mbit must be positive, got {rate}");
        }
        let mut workers = Workers::new("link forwarding thread");
        let a2 = a.try_clone().context("dup TAP descriptor")?;
        let b2 = b.try_clone().context("dup TAP descriptor")?;
        for (dir, src, dst) in [("fwd", a, b2), ("rev", b, a2)] {
            let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(QUEUE_LIMIT_FRAMES);
            let thread_name = format!("{name}-{dir}");
            let seed = seed_for(&thread_name);
            workers.spawn(format!("{thread_name}-rx"), move |stop| {
                read_loop(src, tx, shape, stop, seed)
            })?;
            workers.spawn(format!("{thread_name}-tx"), move |stop| {
                write_loop(dst, rx, stop)
            })?;
        }
        debug!(link = name, ?shape, "shaped link up");
        Ok(Wire { _workers: workers })
    }
}

/// Reads frames, drops the unlucky ones, stamps the rest with their delivery time.
fn read_loop(
    mut src: File,
    tx: mpsc::SyncSender<(Instant, Vec<u8>)>,
    shape: LinkShape,
    stop: &AtomicBool,
    seed: u64,
) {
    let mut rng = XorShift(seed | 1);
    let mut buf = vec![0u8; MAX_FRAME];
    let delay = Duration::from_millis(u64::from(shape.delay_ms));
    // When the (rate-limited) link finishes sending what is already queued.
    let mut link_free = Instant::now();
    while readable_unless_stopped(src.as_fd(), stop, "TAP reader") {
        let n = match src.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                continue
            }
            Err(e) => {
                warn!(error = %e, "read from TAP failed; link stops");
                return;
            }
        };
        if shape.loss_pct > 0.0 && !is_arp(&buf[..n]) && rng.next_f64() * 100.0 < shape.loss_pct {
            continue;
        }
        let now = Instant::now();
        let sent = match shape.rate_mbit {
            None => now,
            Some(rate) => {
                let bits = (n as f64) * 8.0;
                link_free.max(now) + Duration::from_secs_f64(bits / (rate * 1e6))
            }
        };
        match tx.try_send((sent + delay, buf[..n].to_vec())) {
            Ok(()) => link_free = sent,
            // Queue full: tail drop, and the link's schedule does not advance.
            Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

/// Delivers frames at their stamped time, in order (stamps never decrease).
fn write_loop(mut dst: File, rx: mpsc::Receiver<(Instant, Vec<u8>)>, stop: &AtomicBool) {
    loop {
        match rx.recv_timeout(STOP_POLL) {
            Ok((due, frame)) => {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                // A write fails while the other end is administratively down: the frame is lost,
                // as on a cable pulled out.
                let _ = dst.write(&frame);
            }
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// ARP is never dropped on purpose: a lost ARP exchange stalls a flow for a whole second of
/// neighbour-discovery retries, which would make loss tests measure ARP timers instead of loss.
fn is_arp(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&[0x08, 0x06])
}

/// A different loss sequence per link and run, without a dependency on `rand`.
fn seed_for(name: &str) -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(name.as_bytes());
    h.finish()
}

/// xorshift64*: plenty for deciding which frames to drop.
struct XorShift(u64);

impl XorShift {
    fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // The top 53 bits as a fraction in [0, 1).
        (r >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_is_roughly_uniform() {
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        let n = 100_000;
        let below: usize = (0..n).filter(|_| rng.next_f64() < 0.25).count();
        let frac = below as f64 / n as f64;
        assert!((0.24..0.26).contains(&frac), "{frac}");
    }

    #[test]
    fn arp_is_recognised_by_ethertype() {
        let mut frame = [0u8; 42];
        frame[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(is_arp(&frame));
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(!is_arp(&frame));
        assert!(!is_arp(&frame[..10]));
    }

    #[test]
    fn delay_constructor_sets_only_delay() {
        let s = LinkShape::delay(20);
        assert_eq!(s.delay_ms, 20);
        assert_eq!(s.loss_pct, 0.0);
        assert_eq!(s.rate_mbit, None);
        assert!(!s.is_lossy());
    }
}
