//! The rendezvous state machine, sans IO: registration with the relay (retries, keepalives,
//! the cookie echo, the switch to TCP), and the punch schedule that opens, validates, monitors
//! and falls back from the direct path. It never touches a socket or a clock: the caller feeds it
//! datagrams (`Rendezvous::handle_relay`, `Rendezvous::handle_punch`) and the time
//! (`Rendezvous::handle_timeout`), and takes out what to send (`Rendezvous::poll_transmit`),
//! when to wake it (`Rendezvous::poll_timeout`) and what changed (`Rendezvous::poll_event`,
//! `Rendezvous::status`). `driver.rs` is the thin tokio task around it; the unit tests
//! below drive it with a fake clock.
//!
//! **Punch schedule.** When the relay pairs us with a peer (its ACK or peer notice names the
//! peer's address), both peers hear of it within half a relay round trip of each other. Each
//! then:
//! 1. at once sends a probe with a low TTL (`LOW_TTL` (2)) to every candidate: it crosses the
//!    peer's own NAT, which maps it, and dies in the network before it reaches the other
//!    side's router. A full probe that reached a router before its owner had sent anything
//!    would leave a conntrack entry there (on routers that accept inbound to themselves) that
//!    the owner's own flow then clashes with, moving it to another public port;
//! 2. starts full probes `SYNC_LEAD` (100 ms) after the relay sent the notice (half our measured relay
//!    round trip ago), so both sides' low-TTL probes go out before either side's full probes
//!    arrive; full probes repeat every `PUNCH_INTERVAL` (100 ms) for `Config::direct_timeout`;
//! 3. answers every authenticated probe (and probes back, so a peer-reflexive address the other
//!    side's NAT chose is validated too); a reply to one of our nonces makes that address the
//!    direct path;
//! 4. keeps a working direct path alive with a probe every `PROBE_INTERVAL` (1 s), falls back to
//!    the relay after `DIRECT_DEAD` (3.5 s) without a reply, and keeps trying in the background at
//!    `PROBE_INTERVAL` (1 s), each round opening with a low-TTL probe.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quic_relay::proto::{Cookie, ErrReason, Extended, PeerId, Registration, Reply, Token};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::punch::{Kind, PunchKey, PunchPacket};
use crate::socket::Path;
use crate::TcpFallback;

/// First registration retry; doubles up to [`REG_RETRY_MAX`] (UDP loses datagrams).
pub(crate) const REG_RETRY_MIN: Duration = Duration::from_millis(200);
pub(crate) const REG_RETRY_MAX: Duration = Duration::from_secs(2);
/// No datagram from the peer (or the relay) for this long: register again now rather than at
/// the next keepalive, so a NAT rebinding or a relay restart heals within seconds.
pub(crate) const SILENCE_REREGISTER: Duration = Duration::from_secs(3);
/// At most one such extra registration per this interval.
pub(crate) const MIN_REREGISTER_GAP: Duration = Duration::from_secs(1);
/// Probe interval while trying to open a direct path.
pub(crate) const PUNCH_INTERVAL: Duration = Duration::from_millis(100);
/// Probe interval on a working direct path (keeps both NAT mappings open), and for background
/// attempts after the first window failed.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// No probe reply on the direct path for this long: it is dead; fall back to the relay.
pub(crate) const DIRECT_DEAD: Duration = Duration::from_millis(3500);
/// Candidate peer addresses remembered (the relay's view plus sources of valid probes).
pub(crate) const MAX_CANDIDATES: usize = 8;
/// Probe nonces remembered to match replies against.
pub(crate) const MAX_NONCES: usize = 32;
/// TTL of the first probe of each round: 2 crosses the host's own router (the NAT, for a home
/// router, a Docker host, a cloud NAT instance) and dies at the next hop, which is never the
/// other peer's router (there is at least one router between two sites). Behind two NATs
/// (carrier-grade NAT) it opens only the inner one; the full probes then race as before.
pub(crate) const LOW_TTL: u32 = 2;
/// When full probes start, counted from the moment the relay sent the peer notice: long enough
/// for both peers' low-TTL probes to leave (the notices reach them within half a relay round
/// trip of each other, and the peer's full probes need a further one-way trip), short against
/// the 1 s direct-connect goal.
pub(crate) const SYNC_LEAD: Duration = Duration::from_millis(100);
/// How many times our local candidates are sent to a peer: enough for a lossy relay path and
/// for the peer's cookie echo to complete, few enough to cost the relay nothing.
pub(crate) const LAN_OFFERS: u32 = 5;
/// Transmits the machine queues before the caller drains them: one punch round to every
/// candidate, plus registrations; anything beyond is dropped (the next round resends).
const MAX_QUEUED: usize = 64;

/// What the driver knows; watch it through [`crate::Peer::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The relay acknowledged a registration.
    pub registered: bool,
    /// This peer's public address as the relay sees it.
    pub observed: Option<SocketAddr>,
    /// The other peer's public address as the relay sees it (once paired).
    pub peer: Option<SocketAddr>,
    /// The path datagrams to the peer take now.
    pub path: Path,
    /// The relay refused the last registration, and why.
    pub refused: Option<ErrReason>,
    /// Registrations sent so far (the first, retries and keepalives).
    pub registrations_sent: u64,
}

/// What the machine needs to know.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub tcp: TcpFallback,
    pub tcp_after: Duration,
    pub session: Uuid,
    pub token: Option<Token>,
    pub peer_id: u64,
    pub keepalive: Duration,
    pub punch: bool,
    pub direct_timeout: Duration,
    /// This host's local candidates ([`crate::candidates::gather`]), offered to the peer.
    pub local: Vec<SocketAddr>,
}

/// Where a transmit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dest {
    /// The relay over UDP.
    Relay,
    /// The relay over the TCP connection.
    RelayTcp,
    /// A peer candidate address.
    Peer(SocketAddr),
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transmit {
    pub dst: Dest,
    pub bytes: Vec<u8>,
    /// A TTL (hop limit) for this datagram only; `None`: the socket's default.
    pub ttl: Option<u32>,
}

/// Something the IO side must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Open the TCP connection to the relay (for good), registering with these bytes.
    StartTcp {
        registration: Vec<u8>,
        reason: &'static str,
    },
}

/// The sans-IO rendezvous machine (see the module docs).
#[derive(Debug)]
pub(crate) struct Rendezvous {
    cfg: Config,
    key: PunchKey,
    reg_bytes: Vec<u8>,
    status: Status,
    acked: bool,
    last_reg: Option<Instant>,
    reg_retry: Duration,
    /// When the first UDP registration went out (for [`TcpFallback::Auto`]).
    first_reg: Option<Instant>,
    /// The registration whose ACK we wait for, to measure the relay round trip.
    rtt_probe: Option<Instant>,
    relay_rtt: Option<Duration>,
    tcp: bool,
    candidates: Vec<SocketAddr>,
    /// The peer's local candidates (from its authenticated list), preferred over public ones.
    lan: Vec<SocketAddr>,
    /// How often our list went out to the current peer (it may be lost, or arrive before the
    /// peer proved its address to the relay, so it is repeated a few times).
    lan_offers: u32,
    nonces: VecDeque<u64>,
    peer_known_at: Option<Instant>,
    last_direct_reply: Option<Instant>,
    next_probe: Option<Instant>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl Rendezvous {
    pub(crate) fn new(cfg: Config) -> Self {
        let reg = Registration {
            session: cfg.session,
            extended: Some(Extended {
                peer: Some(PeerId(cfg.peer_id)),
                token: cfg.token,
                cookie: None,
            }),
        };
        let mut r = Rendezvous {
            key: PunchKey::new(cfg.session),
            reg_bytes: reg.encode(),
            status: Status {
                registered: false,
                observed: None,
                peer: None,
                path: Path::Relay,
                refused: None,
                registrations_sent: 0,
            },
            acked: false,
            last_reg: None,
            reg_retry: REG_RETRY_MIN,
            first_reg: None,
            rtt_probe: None,
            relay_rtt: None,
            tcp: false,
            candidates: Vec::new(),
            lan: Vec::new(),
            lan_offers: 0,
            nonces: VecDeque::new(),
            peer_known_at: None,
            last_direct_reply: None,
            next_probe: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            cfg,
        };
        if r.cfg.tcp == TcpFallback::Always {
            r.start_tcp("forced by Options::tcp_fallback");
        }
        r
    }

    /// What the machine knows now.
    pub(crate) fn status(&self) -> &Status {
        &self.status
    }

    /// The relay round trip measured from the last answered registration.
    #[cfg(test)]
    pub(crate) fn relay_rtt(&self) -> Option<Duration> {
        self.relay_rtt
    }

    /// The next datagram to send.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event for the IO side.
    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Rendezvous::handle_timeout`] must run next, given when the socket last received
    /// a datagram from the peer or the relay.
    pub(crate) fn poll_timeout(&self, now: Instant, last_rx: Instant) -> Instant {
        let mut wake = now + PROBE_INTERVAL;
        let reg_due = match self.last_reg {
            None => now,
            Some(t) if !self.acked => t + self.reg_retry,
            Some(t) => (t + self.cfg.keepalive)
                .min((t + MIN_REREGISTER_GAP).max(last_rx + SILENCE_REREGISTER)),
        };
        wake = wake.min(reg_due);
        if let (false, false, TcpFallback::Auto, Some(t)) =
            (self.tcp, self.acked, self.cfg.tcp, self.first_reg)
        {
            wake = wake.min(t + self.cfg.tcp_after);
        }
        if let Some(p) = self.next_probe {
            wake = wake.min(p);
        }
        if let (Path::Direct(_), Some(last)) = (self.status.path, self.last_direct_reply) {
            wake = wake.min(last + DIRECT_DEAD);
        }
        wake.max(now)
    }

    fn queue(&mut self, dst: Dest, bytes: Vec<u8>, ttl: Option<u32>) {
        if self.transmits.len() < MAX_QUEUED {
            self.transmits.push_back(Transmit { dst, bytes, ttl });
        }
    }

    fn relay_dest(&self) -> Dest {
        if self.tcp {
            Dest::RelayTcp
        } else {
            Dest::Relay
        }
    }

    /// The relay path this machine uses: UDP, or TCP once it switched.
    fn relay_path(&self) -> Path {
        if self.tcp {
            Path::RelayTcp
        } else {
            Path::Relay
        }
    }

    fn set_path(&mut self, path: Path) {
        self.status.path = path;
    }

    /// Switches to the relay's TCP port for good: registration, keepalives and QUIC go over one
    /// TCP connection from now on, and no direct path is punched (UDP is not getting through).
    fn start_tcp(&mut self, reason: &'static str) {
        if self.tcp {
            return;
        }
        self.tcp = true;
        self.events.push_back(Event::StartTcp {
            registration: self.reg_bytes.clone(),
            reason,
        });
        self.reg_retry = REG_RETRY_MIN;
        self.candidates.clear();
        self.next_probe = None;
        self.set_path(Path::RelayTcp);
    }

    fn register(&mut self, now: Instant) {
        let bytes = self.reg_bytes.clone();
        self.queue(self.relay_dest(), bytes, None);
        if !self.tcp {
            self.first_reg.get_or_insert(now);
        }
        self.last_reg = Some(now);
        self.rtt_probe.get_or_insert(now);
        self.status.registrations_sent += 1;
    }

    /// Timers: registration retries and keepalives, the switch to TCP, the punch rounds and
    /// the direct path's liveness. `last_rx`: when the socket last received a datagram from the
    /// peer (any path) or the relay.
    pub(crate) fn handle_timeout(&mut self, now: Instant, last_rx: Instant) {
        if !self.tcp
            && !self.acked
            && self.cfg.tcp == TcpFallback::Auto
            && self
                .first_reg
                .is_some_and(|t| now >= t + self.cfg.tcp_after)
        {
            self.start_tcp("no answer to UDP registrations");
            self.register(now);
        }
        match self.last_reg {
            None => self.register(now),
            Some(t) if !self.acked => {
                if now >= t + self.reg_retry {
                    self.reg_retry = (self.reg_retry * 2).min(REG_RETRY_MAX);
                    // A retry's ACK could answer either registration: no RTT sample.
                    self.rtt_probe = None;
                    self.register(now);
                    self.rtt_probe = None;
                }
            }
            Some(t) => {
                let silent = now.saturating_duration_since(last_rx) >= SILENCE_REREGISTER;
                if now >= t + self.cfg.keepalive || (silent && now >= t + MIN_REREGISTER_GAP) {
                    if silent {
                        debug!("no datagram from the peer for a while: registering again");
                    }
                    self.register(now);
                }
            }
        }
        self.punch_tick(now);
    }

    fn punch_tick(&mut self, now: Instant) {
        if !self.cfg.punch || self.candidates.is_empty() || self.tcp {
            self.next_probe = None;
            return;
        }
        if let Path::Direct(addr) = self.status.path {
            let last = self.last_direct_reply.unwrap_or(now);
            if now.saturating_duration_since(last) >= DIRECT_DEAD {
                info!(%addr, "direct path lost; falling back to the relay");
                self.set_path(self.relay_path());
            }
        }
        if self.next_probe.is_some_and(|p| now < p) {
            return;
        }
        let in_window = self
            .peer_known_at
            .is_some_and(|t| now < t + self.cfg.direct_timeout);
        let direct = matches!(self.status.path, Path::Direct(_));
        let interval = if in_window && !direct {
            PUNCH_INTERVAL
        } else {
            PROBE_INTERVAL
        };
        self.next_probe = Some(now + interval);
        let targets: Vec<SocketAddr> = match self.status.path {
            // On a working direct path, keep just that one alive.
            Path::Direct(a) => vec![a],
            Path::Relay | Path::RelayTcp => {
                let mut t = self.lan.clone();
                t.extend(self.candidates.iter().filter(|c| !self.lan.contains(c)));
                t
            }
        };
        if !direct {
            self.offer_local();
        }
        if !direct && !in_window {
            // A background round: open our own mapping first, as at the start.
            self.low_ttl_probes(&targets);
        }
        let probe = self.new_probe();
        for dst in targets {
            self.queue(Dest::Peer(dst), probe.to_vec(), None);
        }
    }

    fn new_probe(&mut self) -> [u8; crate::punch::LEN] {
        let nonce = self.new_nonce();
        self.key
            .packet(Kind::Probe, self.cfg.peer_id, nonce)
            .encode()
    }

    /// Sends our local candidates to the peer through the relay (a few times per peer).
    fn offer_local(&mut self) {
        if self.cfg.local.is_empty() || self.lan_offers >= LAN_OFFERS || self.tcp {
            return;
        }
        self.lan_offers += 1;
        let msg = crate::candidates::Candidates {
            sender: self.cfg.peer_id,
            addrs: self.cfg.local.clone(),
        }
        .encode(&self.key);
        self.queue(Dest::Relay, msg, None);
    }

    /// The peer's local candidates, as forwarded by the relay: authenticated, then probed at
    /// once and in every round from now on.
    pub(crate) fn handle_candidates(&mut self, _now: Instant, bytes: &[u8]) {
        if self.tcp || !self.cfg.punch {
            return;
        }
        let Some(c) = crate::candidates::Candidates::decode(bytes, &self.key) else {
            debug!("dropping a malformed or unauthenticated candidate list");
            return;
        };
        if c.sender == self.cfg.peer_id {
            return;
        }
        let lan: Vec<SocketAddr> = c
            .addrs
            .into_iter()
            .filter(|a| crate::candidates::usable(a.ip()) && a.port() != 0)
            .take(crate::candidates::MAX_LOCAL_CANDIDATES)
            .collect();
        if lan == self.lan {
            return;
        }
        debug!(?lan, "the peer's local candidates");
        self.lan = lan;
        let best = self.lan.iter().map(|&a| self.rank(a)).max().unwrap_or(0);
        if !matches!(self.status.path, Path::Direct(a) if self.rank(a) >= best) {
            let probe = self.new_probe();
            for dst in self.lan.clone() {
                self.queue(Dest::Peer(dst), probe.to_vec(), None);
            }
        }
    }

    fn low_ttl_probes(&mut self, targets: &[SocketAddr]) {
        let probe = self.new_probe();
        for &dst in targets {
            self.queue(Dest::Peer(dst), probe.to_vec(), Some(LOW_TTL));
        }
    }

    /// The relay pairs us with a peer at a new address: a new peer, or ours after a NAT
    /// rebinding. What we knew of direct paths may be stale (an old peer still answering
    /// probes would otherwise keep our traffic), so start over: relay path, fresh candidates,
    /// no outstanding nonces, and a new punching window on the synchronised schedule.
    fn new_peer_address(&mut self, p: SocketAddr, now: Instant) {
        if self.peer_known_at.is_some() {
            debug!(peer = %p, "the relay reports a new peer address; re-punching");
        }
        self.candidates.clear();
        self.lan.clear();
        self.lan_offers = 0;
        self.nonces.clear();
        self.last_direct_reply = None;
        self.set_path(self.relay_path());
        self.peer_known_at = Some(now);
        if self.tcp {
            return;
        }
        self.add_candidate(p);
        if self.cfg.punch {
            self.offer_local();
            let targets = self.candidates.clone();
            self.low_ttl_probes(&targets);
            // The relay sent the notice about half a round trip ago; the peer's copy left at
            // the same moment, so both sides count the lead from there.
            let half_rtt = self.relay_rtt.unwrap_or_default() / 2;
            self.next_probe = Some(now + SYNC_LEAD.saturating_sub(half_rtt));
        }
    }

    /// How much a direct path to `a` is preferred: IPv6 (no NAT on the way, no mapping to
    /// expire) over a local IPv4 candidate (the LAN) over a public IPv4 address.
    fn rank(&self, a: SocketAddr) -> u8 {
        if a.ip().to_canonical().is_ipv6() {
            2
        } else if self.lan.contains(&a) {
            1
        } else {
            0
        }
    }

    fn new_nonce(&mut self) -> u64 {
        let nonce: u64 = rand::random();
        if self.nonces.len() == MAX_NONCES {
            self.nonces.pop_front();
        }
        self.nonces.push_back(nonce);
        nonce
    }

    fn add_candidate(&mut self, a: SocketAddr) {
        if !self.candidates.contains(&a) {
            if self.candidates.len() == MAX_CANDIDATES {
                self.candidates.pop();
            }
            self.candidates.insert(0, a);
        }
    }

    fn echo_cookie(&mut self, cookie: Cookie) {
        let echo = Registration {
            session: self.cfg.session,
            extended: Some(Extended {
                peer: Some(PeerId(self.cfg.peer_id)),
                token: self.cfg.token,
                cookie: Some(cookie),
            }),
        }
        .encode();
        self.queue(self.relay_dest(), echo, None);
    }

    /// A reply from the relay (over UDP or TCP).
    pub(crate) fn handle_relay(&mut self, now: Instant, reply: Reply) {
        match reply {
            Reply::Ack {
                observed,
                peer,
                cookie,
            } => {
                if let Some(c) = cookie {
                    // The relay forwards nothing to us before we prove our address by echoing
                    // its cookie (relay PROTOCOL.md §12): at once, before anything else.
                    self.echo_cookie(c);
                }
                if let Some(sent) = self.rtt_probe.take() {
                    self.relay_rtt = Some(now.saturating_duration_since(sent));
                }
                if !self.acked {
                    debug!(?observed, rtt = ?self.relay_rtt, "registered with the relay");
                }
                self.acked = true;
                self.reg_retry = REG_RETRY_MIN;
                if let Some(p) = peer {
                    if self.status.peer != Some(p) {
                        self.new_peer_address(p, now);
                    }
                }
                self.status.registered = true;
                self.status.refused = None;
                self.status.observed = observed;
                if peer.is_some() {
                    self.status.peer = peer;
                }
            }
            Reply::Err(reason) => {
                warn!(
                    reason = reason.map_or("unknown", ErrReason::as_str),
                    "the relay refused the registration"
                );
                if reason == Some(ErrReason::Rate) {
                    self.reg_retry = REG_RETRY_MAX;
                }
                self.status.refused = Some(reason.unwrap_or(ErrReason::Malformed));
            }
        }
    }

    /// A punch packet (not yet authenticated) from `from`.
    pub(crate) fn handle_punch(&mut self, now: Instant, from: SocketAddr, packet: PunchPacket) {
        if self.tcp || packet.sender == self.cfg.peer_id || !self.key.verify(&packet) {
            return; // our own, reflected; or forged
        }
        match packet.kind {
            Kind::Probe => {
                self.add_candidate(from);
                let reply = self
                    .key
                    .packet(Kind::Reply, self.cfg.peer_id, packet.nonce)
                    .encode();
                self.queue(Dest::Peer(from), reply.to_vec(), None);
                // The peer probes from an address we are not using (its NAT rebound, or it is
                // the symmetric side of a punch): probe back at once, so its reply can move us
                // there without waiting for the next round.
                if self.cfg.punch && self.status.path != Path::Direct(from) {
                    let probe = self.new_probe();
                    self.queue(Dest::Peer(from), probe.to_vec(), None);
                }
            }
            Kind::Reply => {
                if !self.nonces.contains(&packet.nonce) {
                    return; // not an answer to a probe of ours (a replay)
                }
                // A better path stays preferred (IPv6, then the LAN, then public IPv4): a late
                // reply on a worse one does not move us off it (nor prove it alive).
                if let Path::Direct(current) = self.status.path {
                    if self.rank(from) < self.rank(current) {
                        return;
                    }
                }
                self.last_direct_reply = Some(now);
                if self.cfg.punch && self.status.path != Path::Direct(from) {
                    info!(peer = %from, lan = self.lan.contains(&from), "direct path up");
                    self.set_path(Path::Direct(from));
                    self.next_probe = Some(now + PROBE_INTERVAL);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quic_relay::proto::Reply;

    const RELAY_RTT: Duration = Duration::from_millis(40);

    fn cfg() -> Config {
        Config {
            tcp: TcpFallback::Never,
            tcp_after: Duration::from_millis(2500),
            session: Uuid::from_u128(42),
            token: None,
            peer_id: 7,
            keepalive: Duration::from_secs(10),
            punch: true,
            direct_timeout: Duration::from_secs(1),
            local: Vec::new(),
        }
    }

    fn drain(r: &mut Rendezvous) -> Vec<Transmit> {
        std::iter::from_fn(|| r.poll_transmit()).collect()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn ack(peer: Option<SocketAddr>) -> Reply {
        Reply::Ack {
            observed: Some(addr("198.18.1.1:5000")),
            peer,
            cookie: None,
        }
    }

    /// Registers at `t0` and is answered `RELAY_RTT` later, unpaired.
    fn registered(t0: Instant) -> Rendezvous {
        let mut r = Rendezvous::new(cfg());
        r.handle_timeout(t0, t0);
        let sent = drain(&mut r);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].dst, Dest::Relay);
        r.handle_relay(t0 + RELAY_RTT, ack(None));
        assert!(r.status().registered);
        assert_eq!(r.relay_rtt(), Some(RELAY_RTT));
        r
    }

    fn probes(t: &[Transmit]) -> Vec<(SocketAddr, Option<u32>)> {
        t.iter()
            .filter_map(|t| match t.dst {
                Dest::Peer(a) => Some((a, t.ttl)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn registration_retries_back_off_then_keepalive_follows_the_ack() {
        let t0 = Instant::now();
        let mut r = Rendezvous::new(cfg());
        assert_eq!(r.poll_timeout(t0, t0), t0, "registers at once");
        let mut t = t0;
        let mut sent_at = Vec::new();
        while t < t0 + Duration::from_millis(5500) {
            r.handle_timeout(t, t0);
            for _ in drain(&mut r) {
                sent_at.push((t - t0).as_millis());
            }
            t = r.poll_timeout(t, t0);
        }
        assert_eq!(
            sent_at,
            [0, 200, 600, 1400, 3000, 5000],
            "200 ms doubling up to REG_RETRY_MAX"
        );
        r.handle_relay(t, ack(None));
        assert!(r.status().registered);
        assert_eq!(
            r.relay_rtt(),
            None,
            "a retried registration gives no RTT sample"
        );
        // Answered: the next registration is the keepalive (or earlier if the peer is silent).
        r.handle_timeout(t, t);
        assert!(drain(&mut r).is_empty());
        let next = r.poll_timeout(t, t);
        assert!(next >= t + MIN_REREGISTER_GAP, "{:?}", next - t);
    }

    #[test]
    fn a_peer_notice_sends_low_ttl_probes_at_once_and_full_probes_after_the_synchronised_lead() {
        let t0 = Instant::now();
        let mut r = registered(t0);
        let peer = addr("198.18.2.1:6000");
        let notice = t0 + Duration::from_secs(2);
        r.handle_relay(notice, ack(Some(peer)));
        assert_eq!(probes(&drain(&mut r)), [(peer, Some(LOW_TTL))]);
        // Full probes start SYNC_LEAD after the relay sent the notice, half an RTT before we
        // got it.
        let start = notice + SYNC_LEAD - RELAY_RTT / 2;
        assert_eq!(r.poll_timeout(notice, notice), start);
        r.handle_timeout(start - Duration::from_millis(1), notice);
        assert!(
            probes(&drain(&mut r)).is_empty(),
            "nothing before the start"
        );
        r.handle_timeout(start, notice);
        assert_eq!(probes(&drain(&mut r)), [(peer, None)]);
        // Then every PUNCH_INTERVAL within the window.
        let mut t = start;
        let mut rounds = 1;
        loop {
            t = r.poll_timeout(t, t);
            if t >= notice + cfg().direct_timeout {
                break;
            }
            r.handle_timeout(t, t);
            let p = probes(&drain(&mut r));
            if !p.is_empty() {
                assert_eq!(p, [(peer, None)], "at {:?}", t - notice);
                rounds += 1;
            }
        }
        assert!(
            (8..=10).contains(&rounds),
            "{rounds} full rounds in the window"
        );
    }

    #[test]
    fn a_reply_to_our_nonce_makes_the_path_direct_and_silence_falls_back() {
        let t0 = Instant::now();
        let mut r = registered(t0);
        let peer = addr("198.18.2.1:6000");
        r.handle_relay(t0, ack(Some(peer)));
        let t = t0 + SYNC_LEAD;
        r.handle_timeout(t, t);
        let sent = drain(&mut r);
        let probe = sent
            .iter()
            .rev()
            .find(|t| t.ttl.is_none() && matches!(t.dst, Dest::Peer(_)))
            .expect("a full probe");
        let probe = PunchPacket::decode(&probe.bytes).expect("a punch packet");
        let key = PunchKey::new(cfg().session);
        // A forged reply (wrong session) and a reply to a nonce we never sent change nothing.
        let forged = PunchKey::new(Uuid::from_u128(1)).packet(Kind::Reply, 9, probe.nonce);
        r.handle_punch(t, peer, forged);
        r.handle_punch(t, peer, key.packet(Kind::Reply, 9, probe.nonce ^ 1));
        assert_eq!(r.status().path, Path::Relay);
        r.handle_punch(t, peer, key.packet(Kind::Reply, 9, probe.nonce));
        assert_eq!(r.status().path, Path::Direct(peer));
        // No reply for DIRECT_DEAD: back to the relay, probing on in the background with a
        // low-TTL probe opening each round.
        let mut now = t;
        while r.status().path != Path::Relay {
            now = r.poll_timeout(now, now);
            r.handle_timeout(now, now);
            drain(&mut r);
            assert!(now < t + DIRECT_DEAD + PROBE_INTERVAL, "fell back in time");
        }
        assert!(now >= t + DIRECT_DEAD);
        let next = r.poll_timeout(now, now);
        r.handle_timeout(next, next);
        let round = probes(&drain(&mut r));
        assert_eq!(round.first(), Some(&(peer, Some(LOW_TTL))), "{round:?}");
        assert_eq!(round.last(), Some(&(peer, None)), "{round:?}");
    }

    #[test]
    fn a_probe_is_answered_and_probed_back_and_its_source_becomes_a_candidate() {
        let t0 = Instant::now();
        let mut r = registered(t0);
        let reflexive = addr("198.18.2.1:40001");
        let key = PunchKey::new(cfg().session);
        r.handle_punch(t0, reflexive, key.packet(Kind::Probe, 9, 1234));
        let sent = drain(&mut r);
        assert_eq!(sent.len(), 2, "a reply and a probe back");
        let reply = PunchPacket::decode(&sent[0].bytes).expect("reply");
        assert_eq!((reply.kind, reply.nonce), (Kind::Reply, 1234));
        assert_eq!(sent[1].dst, Dest::Peer(reflexive));
        // Our own probe reflected by a hairpinning NAT is ignored.
        r.handle_punch(t0, reflexive, key.packet(Kind::Probe, 7, 1));
        assert!(drain(&mut r).is_empty());
    }

    #[test]
    fn local_candidates_are_offered_through_the_relay_probed_and_preferred() {
        let t0 = Instant::now();
        let ours: SocketAddr = addr("100.64.1.2:5000");
        let mut r = Rendezvous::new(Config {
            local: vec![ours],
            ..cfg()
        });
        r.handle_timeout(t0, t0);
        drain(&mut r);
        r.handle_relay(t0, ack(None));
        let public = addr("198.18.1.1:6000");
        r.handle_relay(t0, ack(Some(public)));
        let key = PunchKey::new(cfg().session);
        let offered: Vec<_> = drain(&mut r)
            .into_iter()
            .filter(|t| t.dst == Dest::Relay)
            .collect();
        assert_eq!(offered.len(), 1, "our list goes to the relay once paired");
        let list = crate::candidates::Candidates::decode(&offered[0].bytes, &key).expect("ours");
        assert_eq!((list.sender, list.addrs), (7, vec![ours]));
        // The peer's list: a forged one is ignored, loopback is never probed, the rest is.
        let lan = addr("100.64.1.3:7000");
        let theirs = crate::candidates::Candidates {
            sender: 9,
            addrs: vec![addr("127.0.0.1:7000"), lan],
        };
        r.handle_candidates(t0, &theirs.encode(&PunchKey::new(Uuid::nil())));
        assert!(drain(&mut r).is_empty());
        r.handle_candidates(t0, &theirs.encode(&key));
        let sent = drain(&mut r);
        assert_eq!(probes(&sent), [(lan, None)]);
        let nonce = PunchPacket::decode(&sent[0].bytes).expect("probe").nonce;
        r.handle_punch(t0, lan, key.packet(Kind::Reply, 9, nonce));
        assert_eq!(r.status().path, Path::Direct(lan));
        // A later reply from the public address does not move us off the LAN.
        let t = t0 + SYNC_LEAD;
        r.handle_timeout(t, t);
        for p in drain(&mut r) {
            if let Some(pk) = PunchPacket::decode(&p.bytes) {
                r.handle_punch(t, public, key.packet(Kind::Reply, 9, pk.nonce));
            }
        }
        assert_eq!(r.status().path, Path::Direct(lan));
        // Bounded: a new peer address (back on the relay path) gets the offer again, at most
        // LAN_OFFERS times however long the peer stays unreachable.
        let mut now = t;
        r.handle_relay(now, ack(Some(addr("198.18.1.1:6001"))));
        let mut offers = 0;
        for _ in 0..50 {
            offers += drain(&mut r)
                .iter()
                .filter(|t| crate::candidates::Candidates::looks_like(&t.bytes))
                .count();
            now = r.poll_timeout(now, now);
            r.handle_timeout(now, now);
        }
        assert_eq!(offers, LAN_OFFERS as usize);
    }

    #[test]
    fn without_udp_answers_it_switches_to_tcp_once_and_stops_punching() {
        let t0 = Instant::now();
        let mut r = Rendezvous::new(Config {
            tcp: TcpFallback::Auto,
            ..cfg()
        });
        let mut t = t0;
        loop {
            assert!(t <= t0 + cfg().tcp_after, "switched by tcp_after");
            r.handle_timeout(t, t0);
            drain(&mut r);
            if r.status().path == Path::RelayTcp {
                break;
            }
            t = r.poll_timeout(t, t0);
        }
        assert!(matches!(r.poll_event(), Some(Event::StartTcp { .. })));
        assert_eq!(r.poll_event(), None, "only once");
        r.handle_relay(t, ack(Some(addr("198.18.2.1:6000"))));
        let sent = drain(&mut r);
        assert!(probes(&sent).is_empty(), "no punching over TCP: {sent:?}");
    }
}
