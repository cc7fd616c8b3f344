//! Millions of distinct peers from one process, for the session-table benchmarks.
//!
//! Every address in 127.0.0.0/8 is local, so a few sockets bound to `0.0.0.0:<port>` can send
//! from any `127.a.b.c` by naming it in an `IP_PKTINFO` control message, and the relay's replies
//! to `127.a.b.c:<port>` land on the same socket, which reports the address they were sent to.
//! Member `m` of the fleet is session `m / 2`, side `m % 2`; the two sides use different IPs so
//! the relay sees two peers, not one peer rebinding.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use quic_relay::proto::{Registration, Reply, Uuid};

use super::load::{Pacer, StopOnDrop};
use super::sys::{self, RecvBatch, SendBatch, BATCH};

/// Hosts used per third octet: .1 to .250 (avoiding .0 and .255, which look like network and
/// broadcast addresses to anyone reading a capture).
const HOSTS: u64 = 250;

/// Sessions in a row that one socket sends before the next socket's turn: consecutive REGs from
/// one socket share a `sendmmsg` call (two members each), without parking all of one socket's
/// sessions at the end of the run.
const RUN_PER_SOCKET: u64 = 16;

/// Buffers of the fleet's sockets: room for ~20,000 queued replies each (a small datagram
/// costs ~830 bytes of buffer), so that [`Replies::After`] loses none.
const FLEET_SOCKET_BUFFER: usize = 8 << 20;

/// After a pass, replies are considered all in once none arrived for this long...
const ACK_QUIET: Duration = Duration::from_millis(300);
/// ...or after this long, if some keep trickling in.
const ACK_WAIT_MAX: Duration = Duration::from_secs(5);

/// How long the reply reader blocks in poll(2) before re-checking whether to stop.
const POLL_MS: libc::c_int = 20;

/// A set of sockets that together act as `2 × sessions` distinct peers.
#[derive(Debug)]
pub struct Fleet {
    socks: Vec<UdpSocket>,
    sessions: u64,
    /// Second octet of side A; side B uses the next one.
    base: u8,
    /// Makes this fleet's session UUIDs unique across runs against one relay.
    nonce: u64,
}

/// What a registration run did.
#[derive(Debug, Clone, Default)]
pub struct RegReport {
    pub members: u64,
    /// REGs handed to the kernel, over all passes.
    pub sent: u64,
    pub send_errors: u64,
    /// Members whose REG was answered with an ACK (each counted once).
    pub acked: u64,
    /// `ERR <reason>` replies by reason, and anything unrecognised as `other`.
    pub refused: BTreeMap<String, u64>,
    pub passes: u32,
    /// First pass only: REGs sent, REGs skipped by a starved sender, how long sending took, ACKs
    /// received, and the time from the first send to the last ACK.
    pub first_sent: u64,
    pub first_skipped: u64,
    pub first_send_secs: f64,
    pub first_acked: u64,
    pub first_active_secs: f64,
    /// Replies the kernel dropped because our sockets' buffers were full.
    pub reply_drops: u64,
}

impl Fleet {
    /// Binds `sockets` sockets for `sessions` sessions whose members use 127.`base`.x.y and
    /// 127.`base+1`.x.y.
    pub fn bind(sockets: usize, sessions: u64, base: u8, nonce: u64) -> Result<Self> {
        let per_side_ips = sessions.div_ceil(sockets as u64);
        if sockets == 0 || per_side_ips > 256 * HOSTS || base == 0 || base >= 254 {
            bail!("{sessions} sessions do not fit {sockets} sockets at 127.{base}/16");
        }
        let socks = (0..sockets)
            .map(|_| {
                let s = sys::bind_udp(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
                sys::set_buffers(&s, FLEET_SOCKET_BUFFER).context("socket buffers")?;
                sys::enable_pktinfo(&s).context("IP_PKTINFO")?;
                sys::enable_timestamps(&s).context("SO_TIMESTAMPNS")?;
                Ok(s)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Fleet {
            socks,
            sessions,
            base,
            nonce,
        })
    }

    pub fn members(&self) -> u64 {
        2 * self.sessions
    }

    /// Socket index and source IP of member `m`.
    fn member_addr(&self, m: u64) -> (usize, Ipv4Addr) {
        let (k, side) = (m / 2, (m % 2) as u8);
        let s = self.socks.len() as u64;
        let i = k / s;
        let ip = Ipv4Addr::new(
            127,
            self.base + side,
            (i / HOSTS) as u8,
            (i % HOSTS + 1) as u8,
        );
        ((k % s) as usize, ip)
    }

    /// The member a reply reached, from its socket and destination IP.
    fn member_at(&self, sock: usize, ip: Ipv4Addr) -> Option<u64> {
        let [a, b, c, d] = ip.octets();
        let side = b.checked_sub(self.base)?;
        if a != 127 || side > 1 || d == 0 || u64::from(d) > HOSTS {
            return None;
        }
        let i = u64::from(c) * HOSTS + u64::from(d) - 1;
        let k = i * self.socks.len() as u64 + sock as u64;
        (k < self.sessions).then_some(2 * k + u64::from(side))
    }

    /// Every member, ordered so that runs of consecutive REGs share a socket.
    pub fn send_order(&self) -> Vec<u32> {
        let s = self.socks.len() as u64;
        let per_sock = self.sessions.div_ceil(s);
        let mut order = Vec::with_capacity(self.members() as usize);
        for chunk in (0..per_sock).step_by(RUN_PER_SOCKET as usize) {
            for j in 0..s {
                for i in chunk..(chunk + RUN_PER_SOCKET).min(per_sock) {
                    let k = i * s + j;
                    if k < self.sessions {
                        order.extend([(2 * k) as u32, (2 * k + 1) as u32]);
                    }
                }
            }
        }
        order
    }

    /// Registers every member at `rate` REGs/s, then re-sends to members without an ACK, for at
    /// most `passes` passes (1 = offer each REG once, as a throughput test must).
    ///
    /// With [`Replies::After`] nothing reads replies while REGs are being sent, so the sender
    /// has our core to itself; the replies wait in the socket buffers, and their kernel
    /// timestamps still tell when they arrived. It suits one pass whose replies fit the buffers
    /// (`sessions × 2 / sockets` below ~20,000 per socket).
    pub fn register(
        &self,
        relay: SocketAddrV4,
        rate: u64,
        passes: u32,
        replies: Replies,
    ) -> Result<RegReport> {
        let progress = Progress {
            acked: (0..self.members().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            n_acked: AtomicU64::new(0),
            last_seen_us: AtomicU64::new(0),
            last_ack_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
        };
        let ports = self
            .socks
            .iter()
            .map(|s| Ok(sys::local_v4(s)?.port()))
            .collect::<Result<Vec<u16>>>()?;
        let drops_before = sys::udp_drops(&ports)?;
        let mut report = RegReport {
            members: self.members(),
            ..RegReport::default()
        };
        std::thread::scope(|scope| {
            let _stop = StopOnDrop(&progress.stop);
            let mut reader = None;
            if replies == Replies::During {
                reader = Some(scope.spawn(|| self.read_replies(&progress)));
            }
            let mut todo = self.send_order();
            for pass in 1..=passes.max(1) {
                let (pass_start, pass_start_ns) = (Instant::now(), sys::unix_ns());
                let (sent, errors, skipped, secs) = self.send_pass(relay, rate, &todo);
                report.sent += sent;
                report.send_errors += errors;
                report.passes = pass;
                if reader.is_none() {
                    reader = Some(scope.spawn(|| self.read_replies(&progress)));
                }
                progress.wait_quiet(pass_start + Duration::from_secs_f64(secs));
                if pass == 1 {
                    report.first_sent = sent;
                    report.first_skipped = skipped;
                    report.first_send_secs = secs;
                    report.first_acked = progress.n_acked.load(Ordering::Relaxed);
                    let last_ns = progress.last_ack_ns.load(Ordering::Relaxed);
                    report.first_active_secs =
                        (last_ns.saturating_sub(pass_start_ns) as f64 / 1e9).max(secs);
                }
                todo.retain(|&m| !progress.is_acked(u64::from(m)));
                if todo.is_empty() {
                    break;
                }
            }
            progress.stop.store(true, Ordering::Relaxed);
            if let Some(reader) = reader {
                report.refused = reader.join().expect("reply reader does not panic")?;
            }
            report.acked = progress.n_acked.load(Ordering::Relaxed);
            anyhow::Ok(())
        })?;
        report.reply_drops = sys::udp_drops(&ports)?.saturating_sub(drops_before);
        Ok(report)
    }

    /// Sends the REGs of `members`, paced; returns (sent, failed, skipped, seconds).
    fn send_pass(&self, relay: SocketAddrV4, rate: u64, members: &[u32]) -> (u64, u64, u64, f64) {
        let mut pacer = Pacer::lenient(rate, members.len() as u64);
        let mut batch = SendBatch::new();
        let (mut next, mut sock, mut sent, mut failed) = (0usize, 0usize, 0u64, 0u64);
        let mut flush = |batch: &mut SendBatch, sock: usize| {
            if batch.len() > 0 {
                let r = batch.send(&self.socks[sock]);
                sent += r.ok;
                failed += r.failed;
            }
        };
        while !pacer.done() {
            for _ in 0..pacer.next_burst() {
                let Some(&m) = members.get(next) else { break };
                next += 1;
                let (j, ip) = self.member_addr(u64::from(m));
                if j != sock || batch.is_full() {
                    flush(&mut batch, sock);
                    sock = j;
                }
                batch.push(relay, Some(ip), &reg_datagram(self.nonce, u64::from(m) / 2));
            }
            flush(&mut batch, sock);
        }
        (sent, failed, pacer.skipped(), pacer.elapsed().as_secs_f64())
    }

    /// Reads replies on every socket until told to stop: marks ACKed members, counts refusals.
    fn read_replies(&self, progress: &Progress) -> Result<BTreeMap<String, u64>> {
        let mut refused = BTreeMap::new();
        let mut fds: Vec<libc::pollfd> = self
            .socks
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut batch = RecvBatch::with_cmsgs();
        while !progress.stop.load(Ordering::Relaxed) {
            // SAFETY: `fds` is a live array of fds.len() pollfds whose fds stay open (owned by
            // self.socks) for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_MS) };
            if rc <= 0 {
                continue; // timeout or EINTR
            }
            for (j, pfd) in fds.iter().enumerate() {
                if pfd.revents & libc::POLLIN == 0 {
                    continue;
                }
                loop {
                    let n = batch
                        .recv(&self.socks[j], libc::MSG_DONTWAIT)
                        .context("recvmmsg")?;
                    if n > 0 {
                        let now_us = progress.epoch.elapsed().as_micros() as u64;
                        progress.last_seen_us.store(now_us, Ordering::Relaxed);
                    }
                    for i in 0..n {
                        let p = batch.payload(i);
                        match Reply::parse(p) {
                            Some(Reply::Ack { .. }) => {}
                            other => {
                                let word = match other {
                                    Some(Reply::Err(Some(reason))) => reason.as_str(),
                                    Some(Reply::Err(None)) => "unknown ERR",
                                    _ => "other",
                                };
                                *refused.entry(word.to_owned()).or_insert(0) += 1;
                                continue;
                            }
                        }
                        let Some(m) = batch.local_ip(i).and_then(|ip| self.member_at(j, ip)) else {
                            *refused
                                .entry("ack-for-unknown-address".to_owned())
                                .or_insert(0) += 1;
                            continue;
                        };
                        progress.mark(m);
                        let at = batch.received_ns(i).unwrap_or_else(sys::unix_ns);
                        progress.last_ack_ns.fetch_max(at, Ordering::Relaxed);
                    }
                    if n < BATCH {
                        break;
                    }
                }
            }
        }
        Ok(refused)
    }
}

/// When replies are read during a registration run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replies {
    /// By a thread running alongside the sender (needed when re-sending unanswered REGs).
    During,
    /// Only once the sender is done (see [`Fleet::register`]).
    After,
}

/// What the reply reader has seen, shared with the sender.
struct Progress {
    /// One bit per member: ACKed.
    acked: Vec<AtomicU64>,
    n_acked: AtomicU64,
    /// When the reader last received anything (µs since `epoch`): to tell that all are in.
    last_seen_us: AtomicU64,
    /// The latest kernel receive time of an ACK (Unix ns): when the last reply really
    /// arrived, even when the reader ran late.
    last_ack_ns: AtomicU64,
    epoch: Instant,
    stop: AtomicBool,
}

impl Progress {
    fn mark(&self, m: u64) {
        let bit = 1u64 << (m % 64);
        if self.acked[m as usize / 64].fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            self.n_acked.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn is_acked(&self, m: u64) -> bool {
        self.acked[m as usize / 64].load(Ordering::Relaxed) & (1 << (m % 64)) != 0
    }

    /// Waits until nothing arrived for [`ACK_QUIET`] after `since` (at most [`ACK_WAIT_MAX`]).
    fn wait_quiet(&self, since: Instant) {
        let deadline = since + ACK_WAIT_MAX;
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let seen =
                self.epoch + Duration::from_micros(self.last_seen_us.load(Ordering::Relaxed));
            if seen.max(since).elapsed() >= ACK_QUIET || Instant::now() >= deadline {
                return;
            }
        }
    }
}

/// `REG:<uuid>\n` (the original form) for session `k` of a fleet; the UUID is `nonce` and `k`,
/// so sessions of different fleets never collide. Encoded by the relay's own `proto`.
pub fn reg_datagram(nonce: u64, k: u64) -> Vec<u8> {
    Registration::original(Uuid::from_u64_pair(nonce, k)).encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reg_datagram_is_an_original_form_registration() {
        let d = reg_datagram(0x0123_4567_89ab_cdef, 42);
        assert_eq!(&d[..], b"REG:01234567-89ab-cdef-0000-00000000002a\n");
    }

    #[test]
    fn member_addresses_are_distinct_and_map_back() -> Result<()> {
        let fleet = Fleet::bind(3, 1000, 40, 7)?;
        let mut seen = std::collections::HashSet::new();
        let order = fleet.send_order();
        assert_eq!(order.len(), 2000);
        for &m in &order {
            let (j, ip) = fleet.member_addr(u64::from(m));
            assert!(seen.insert((j, ip)), "member {m} reuses {ip} on socket {j}");
            assert_eq!(fleet.member_at(j, ip), Some(u64::from(m)));
        }
        assert_eq!(fleet.member_at(0, Ipv4Addr::new(127, 0, 0, 1)), None);
        Ok(())
    }

    /// A stand-in relay on one socket: ACKs every REG to the address it came from. Checks the
    /// whole send/reply path, including source selection and reply attribution.
    #[test]
    fn registers_every_member_against_an_echoing_acker() -> Result<()> {
        for replies in [Replies::During, Replies::After] {
            acker_run(replies)?;
        }
        Ok(())
    }

    fn acker_run(replies: Replies) -> Result<()> {
        let acker = sys::bind_udp(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
        acker.set_read_timeout(Some(Duration::from_millis(50)))?;
        let relay = sys::local_v4(&acker)?;
        let fleet = Fleet::bind(4, 500, 60, 9)?;
        let stop = AtomicBool::new(false);
        let report = std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = acker.recv_from(&mut buf) {
                        if quic_relay::proto::is_registration(&buf[..n]) {
                            let _ = acker.send_to(b"ACK\n", from);
                        }
                    }
                }
            });
            let r = fleet.register(relay, 50_000, 3, replies);
            stop.store(true, Ordering::Relaxed);
            r
        })?;
        assert_eq!(report.acked, 1000, "{report:?}");
        assert!(report.refused.is_empty(), "{report:?}");
        assert_eq!(report.reply_drops, 0);
        assert!(report.first_active_secs >= report.first_send_secs);
        Ok(())
    }
}
