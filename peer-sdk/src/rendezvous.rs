//! The rendezvous state machine, sans IO: registration with the relay (retries, keepalives,
//! the cookie echo, the switch to TCP), and the punch schedule that opens, validates, monitors
//! and falls back from the direct path. It never touches a socket or a clock: the caller feeds it
//! datagrams (`Rendezvous::handle_relay`, `Rendezvous::handle_punch`) and the time
//! (`Rendezvous::handle_timeout`), and takes out what to send (`Rendezvous::poll_transmit`),
//! when to wake it (`Rendezvous::poll_timeout`) and what changed (`Rendezvous::poll_event`,
//! `Rendezvous::status`). `driver.rs` is the thin tokio task around it.
//!
//! The punch schedule itself (probes, candidates, the direct path's liveness) is in
//! `rendezvous/schedule.rs`, birthday punching against one endpoint-dependent NAT in
//! [`birthday`]; the unit tests are in `rendezvous/tests.rs` and `rendezvous/birthday_tests.rs`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quic_relay::proto::{Cookie, ErrReason, Extended, PeerId, Registration, Reply, Token};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::punch::PunchKey;
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
/// A relay that answered before and now leaves registrations unanswered for this long (three
/// of them: sent 0, 200 and 600 ms in) is taken for dead, and the peer moves to the next relay
/// in [`Config::relays`]. The other peer, whose relay died too, moves to the same one. With the
/// [`SILENCE_REREGISTER`] that notices a relayed connection's silence first, a connection
/// moves about 4 s after its relay died.
pub(crate) const RELAY_FAILOVER: Duration = Duration::from_secs(1);
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
/// candidate, or one tick of birthday openers (64), plus registrations; anything beyond is
/// dropped (the next round resends).
const MAX_QUEUED: usize = 128;

/// What the driver knows; watch it through [`crate::Peer::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The relay acknowledged a registration.
    pub registered: bool,
    /// This peer's public address as the relay sees it.
    pub observed: Option<SocketAddr>,
    /// The other peer's public address as the relay sees it (once paired).
    pub peer: Option<SocketAddr>,
    /// This peer's address in the other IP family, as the relay sees its alternate
    /// registration (a dual-stack peer with [`crate::Options::relay_other_family`]).
    pub observed_alt: Option<SocketAddr>,
    /// The other peer's address in its other IP family, when it registered one (relay
    /// PROTOCOL.md §3.3): a further direct candidate.
    pub peer_alt: Option<SocketAddr>,
    /// The path datagrams to the peer take now.
    pub path: Path,
    /// The relay refused the last registration, and why.
    pub refused: Option<ErrReason>,
    /// Registrations sent so far (the first, retries and keepalives).
    pub registrations_sent: u64,
    /// The relay in use: the first of [`crate::Options::relay_order`] that answered, or the one
    /// a failover moved to.
    pub relay: Option<SocketAddr>,
    /// How often this peer moved to another relay because its relay stopped answering.
    pub relay_moves: u64,
    /// Birthday punching with this peer, when it ran ([`crate::Options::birthday`]).
    pub birthday: Option<birthday::BirthdayStatus>,
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
    /// The relays to fail over between, the one in use first, then the rest in the order both
    /// peers share ([`crate::Options::relay_order`], wrapping around).
    pub relays: Vec<SocketAddr>,
    /// This host's local candidates ([`crate::candidates::gather`]), offered to the peer.
    pub local: Vec<SocketAddr>,
    /// Also register at the relay's address of the other IP family ([`Dest::RelayAlt`]), as
    /// this peer's alternate address.
    pub alt_relay: bool,
    /// The port of our socket (compared with the port the relay observes: a NAT that changed
    /// it is taken for endpoint-dependent, see [`birthday`]).
    pub local_port: u16,
    /// Birthday punching allowed ([`crate::Options::birthday`]).
    pub birthday: bool,
}

/// Where a transmit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dest {
    /// The relay over UDP.
    Relay,
    /// The relay's address in the other IP family (our alternate registration).
    RelayAlt,
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
    /// Send it from this extra (birthday) socket rather than the peer's one socket.
    pub via: Option<u16>,
}

/// Something the IO side must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Send what goes to the relay ([`Dest::Relay`], and Quinn's relayed datagrams) to this
    /// address from now on: the relay in use stopped answering.
    SwitchRelay(SocketAddr),
    /// Open the TCP connection to the relay (for good), registering with these bytes.
    StartTcp {
        registration: Vec<u8>,
        reason: &'static str,
    },
    /// Open extra sockets `from..to` for birthday punching (numbered from 0; `from` 0 closes
    /// any left first). A tick's worth at a time, so the first openers leave before all 256
    /// sockets are open and the driver never stalls on opening them all at once.
    OpenSockets { from: u16, to: u16 },
    /// Extra socket `n` won: Quinn's traffic to the direct address goes through it from now
    /// on.
    KeepSocket(u16),
    /// Close every extra socket but the winner.
    CloseLosers,
    /// Close every extra socket (the winner too): birthday punching is over or void.
    CloseSockets,
}

/// The sans-IO rendezvous machine (see the module docs).
#[derive(Debug)]
pub(crate) struct Rendezvous {
    cfg: Config,
    key: PunchKey,
    reg_bytes: Vec<u8>,
    /// Our alternate registration (relay PROTOCOL.md §3.3), sent beside every registration
    /// once the relay knows us, when [`Config::alt_relay`].
    alt_reg_bytes: Vec<u8>,
    status: Status,
    acked: bool,
    last_reg: Option<Instant>,
    reg_retry: Duration,
    /// When the oldest registration the relay has not answered yet went out.
    unanswered: Option<Instant>,
    /// The relay answered at least once (a failover needs a relay that stopped answering).
    ever_acked: bool,
    /// Which of [`Config::relays`] is in use.
    relay_index: usize,
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
    /// Birthday punching with the current peer address (see [`birthday`]).
    birthday: Option<birthday::Birthday>,
}

impl Rendezvous {
    pub(crate) fn new(cfg: Config) -> Self {
        let mut r = Rendezvous {
            key: PunchKey::new(cfg.session),
            reg_bytes: registration(&cfg, None, false).encode(),
            alt_reg_bytes: registration(&cfg, None, true).encode(),
            status: Status {
                registered: false,
                observed: None,
                peer: None,
                observed_alt: None,
                peer_alt: None,
                path: Path::Relay,
                refused: None,
                registrations_sent: 0,
                relay: cfg.relays.first().copied(),
                relay_moves: 0,
                birthday: None,
            },
            acked: false,
            last_reg: None,
            reg_retry: REG_RETRY_MIN,
            unanswered: None,
            ever_acked: false,
            relay_index: 0,
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
            birthday: None,
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
            Some(t) if !self.acked || self.unanswered.is_some() => t + self.reg_retry,
            Some(t) => (t + self.cfg.keepalive)
                .min((t + MIN_REREGISTER_GAP).max(last_rx + SILENCE_REREGISTER)),
        };
        wake = wake.min(reg_due);
        if let Some(t) = self.failover_due() {
            wake = wake.min(t);
        }
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
        if let Some(t) = self.birthday_timeout(now) {
            wake = wake.min(t);
        }
        wake.max(now)
    }

    /// Queues a datagram; one to the peer's direct address goes through the extra socket
    /// that birthday punching won for it, if any.
    fn queue(&mut self, dst: Dest, bytes: Vec<u8>, ttl: Option<u32>) {
        let via = match dst {
            Dest::Peer(a) => self.via_for(a),
            _ => None,
        };
        self.queue_via(dst, bytes, ttl, via);
    }

    fn queue_via(&mut self, dst: Dest, bytes: Vec<u8>, ttl: Option<u32>, via: Option<u16>) {
        if self.transmits.len() < MAX_QUEUED {
            self.transmits.push_back(Transmit {
                dst,
                bytes,
                ttl,
                via,
            });
        }
    }

    /// The extra socket the direct path runs through (birthday punching's winner), if any.
    pub(crate) fn direct_via(&self) -> Option<u16> {
        match self.status.path {
            Path::Direct(a) => self.via_for(a),
            _ => None,
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
        self.reset_birthday();
        self.set_path(Path::RelayTcp);
    }

    fn register(&mut self, now: Instant) {
        let bytes = self.reg_bytes.clone();
        self.queue(self.relay_dest(), bytes, None);
        self.register_alt();
        if !self.tcp {
            self.first_reg.get_or_insert(now);
        }
        self.last_reg = Some(now);
        self.unanswered.get_or_insert(now);
        self.rtt_probe.get_or_insert(now);
        self.status.registrations_sent += 1;
    }

    /// When the relay in use counts as dead, if it does not answer before: only with another
    /// relay to go to, over UDP, and for a relay that answered before.
    fn failover_due(&self) -> Option<Instant> {
        if self.cfg.relays.len() < 2 || self.tcp || !self.ever_acked {
            return None;
        }
        self.unanswered.map(|t| t + RELAY_FAILOVER)
    }

    /// Moves to the next relay: the registration (and with it the relayed traffic) goes
    /// there, as a new registration; the peer, whose relay died too, comes to the same one.
    fn fail_over(&mut self, now: Instant) {
        self.relay_index = (self.relay_index + 1) % self.cfg.relays.len();
        let relay = self.cfg.relays[self.relay_index];
        warn!(%relay, "the relay stopped answering; moving to the next relay");
        self.events.push_back(Event::SwitchRelay(relay));
        self.status.relay = Some(relay);
        self.status.relay_moves += 1;
        self.acked = false;
        self.unanswered = None;
        self.first_reg = None;
        self.rtt_probe = None;
        self.reg_retry = REG_RETRY_MIN;
        self.register(now);
    }

    /// Timers: registration retries and keepalives, the switch to TCP, the punch rounds and
    /// the direct path's liveness. `last_rx`: when the socket last received a datagram from the
    /// peer (any path) or the relay.
    pub(crate) fn handle_timeout(&mut self, now: Instant, last_rx: Instant) {
        if self.failover_due().is_some_and(|t| now >= t) {
            self.fail_over(now);
        }
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
            // Unanswered (before the first ACK, or since the last one): retry with backoff.
            Some(t) if !self.acked || self.unanswered.is_some() => {
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
        self.birthday_tick(now);
    }

    /// Our alternate registration, once the relay knows our primary one (it names the member
    /// whose alternate address this is by peer id, and is refused before that member exists).
    fn register_alt(&mut self) {
        // Only at the relay we started with: the alternate address names that relay's other
        // address, not a relay we failed over to.
        if self.cfg.alt_relay && self.acked && !self.tcp && self.relay_index == 0 {
            let bytes = self.alt_reg_bytes.clone();
            self.queue(Dest::RelayAlt, bytes, None);
        }
    }

    fn echo_cookie(&mut self, cookie: Cookie) {
        let echo = registration(&self.cfg, Some(cookie), false).encode();
        self.queue(self.relay_dest(), echo, None);
    }

    /// A reply from the relay (over UDP or TCP); `alt`: to our alternate registration.
    pub(crate) fn handle_relay(&mut self, now: Instant, reply: Reply, alt: bool) {
        if alt {
            self.handle_alt_reply(now, reply);
            return;
        }
        // Any answer shows the relay alive.
        self.unanswered = None;
        match reply {
            Reply::Ack {
                observed,
                peer,
                cookie,
                peer_alt,
            } => {
                if let Some(c) = cookie {
                    // The relay forwards nothing to us before we prove our address by echoing
                    // its cookie (relay PROTOCOL.md §12): at once, before anything else.
                    self.echo_cookie(c);
                }
                if let Some(sent) = self.rtt_probe.take() {
                    self.relay_rtt = Some(now.saturating_duration_since(sent));
                }
                let first = !self.acked;
                if first {
                    debug!(?observed, rtt = ?self.relay_rtt, "registered with the relay");
                }
                self.acked = true;
                self.ever_acked = true;
                if first {
                    self.register_alt();
                }
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
                self.peer_alt(peer_alt, now);
            }
            Reply::Err(Some(ErrReason::Moved)) if self.ever_acked && self.cfg.relays.len() > 1 => {
                // A relay we failed over to is draining: on to the next one.
                self.fail_over(now);
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

    /// A reply to our alternate registration: what the relay sees of it, and the peer's
    /// addresses. A refusal changes nothing (the primary registration carries the session).
    fn handle_alt_reply(&mut self, now: Instant, reply: Reply) {
        match reply {
            Reply::Ack {
                observed, peer_alt, ..
            } => {
                if self.status.observed_alt != observed {
                    debug!(?observed, "the relay knows our alternate address");
                }
                self.status.observed_alt = observed;
                self.peer_alt(peer_alt, now);
            }
            Reply::Err(reason) => debug!(
                reason = reason.map_or("unknown", ErrReason::as_str),
                "the relay refused our alternate registration"
            ),
        }
    }
}

/// Our extended registration: with a cookie to echo, or as our alternate address.
fn registration(cfg: &Config, cookie: Option<Cookie>, alt: bool) -> Registration {
    Registration {
        session: cfg.session,
        extended: Some(Extended {
            peer: Some(PeerId(cfg.peer_id)),
            token: cfg.token,
            cookie,
            // We read the peer's alternate address in ACKs (`pa=`).
            alt_aware: true,
            alt,
        }),
    }
}

pub mod birthday;
mod schedule;
pub mod sweep;

#[cfg(test)]
mod birthday_tests;
#[cfg(test)]
mod sweep_tests;
#[cfg(test)]
mod tests;
