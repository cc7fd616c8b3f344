//! Birthday punching for one hard side, sans IO: the part of the rendezvous machine that
//! gets a peer behind endpoint-dependent mapping ("symmetric" NAT: a new public port for every
//! destination) a direct path to a peer whose NAT filters by address and port.
//!
//! Neither side can learn the hard side's public port for the easy side in advance: it is
//! chosen when the hard side first sends there. So (the method Tailscale describes in "How NAT
//! traversal works"):
//! 1. the **hard side** opens [`SOCKETS`] extra sockets and sends one low-TTL probe from each to
//!    the easy side's public address: each opens a mapping (a public port) on the hard NAT
//!    that lets the easy side's address in, and dies one hop past it (so it leaves no
//!    conntrack entry on the easy side's router that the easy side's own flow could clash
//!    with);
//! 2. the **easy side** probes ports of the hard side's public IP from its one socket (its
//!    mapping is endpoint-independent, so every probe leaves from the port the hard side's
//!    sockets sent to): first the [`PREDICT_WINDOW`] ports after the one the relay observed (a
//!    sequential NAT hands out the next ports, and the hard side's new flows got them), then
//!    distinct random ports. With [`SOCKETS`] of the 64512 ports open, each random probe hits
//!    with probability 256/64512, so [`MAX_PROBES`] (1600) probes find one with probability
//!    1 - (1 - 256/64512)^1600 ≈ 99.8 % (measured in the lab: 1 miss in 80 at 1200);
//! 3. a hit reaches one of the extra sockets, which answers; the normal probe and reply make
//!    that (socket, address) the direct path, and the socket wrapper sends Quinn's traffic
//!    through that socket and closes the rest ([`LOSER_GRACE`] later).
//!
//! **Who is hard.** A NAT that rewrote our port (the relay saw another port than our socket's)
//! is taken for endpoint-dependent; one that kept it for endpoint-independent. The peer's
//! ports come from the relay (public) and the peer's local candidate list (local). Birthday
//! punching runs only when exactly one side looks hard, only over IPv4, once per peer address.
//! It starts as soon as both sides are classified (the peer's candidate list arrived, within a
//! relay round trip of the peer notice on both sides alike) unless a direct path is already
//! up: against address-and-port filtering the ordinary punch cannot reach a side that maps
//! per destination, so waiting for it only adds to the connect time. (A hard side facing a
//! full-cone NAT, which the ordinary punch would reach, opens its sockets needlessly; the
//! first direct path stops the burst.) Both hard is the port prediction sweep's case
//! ([`super::sweep`]): two sequential NATs meet by predicting each other's next ports; a
//! random one is out of reach (each side would have to guess the other's port for every one
//! of its own, 256 × 64512 guesses for an even chance).
//!
//! **Budget** (so that it never looks like more than one short burst, and is bounded in time):
//! the easy side sends at most [`MAX_PROBES`] probes of 44 bytes, [`PROBES_PER_TICK`] every
//! [`TICK`] (1000 per second, about 0.6 Mbit/s with headers, 1.6 s at most), all to one IP
//! address, once per pairing; the hard side opens at most [`SOCKETS`] sockets, sends one opener
//! from each (TTL 2, [`OPENERS_PER_TICK`] per tick: all within 40 ms, before the easy side's
//! [`PROBE_LEAD`] is over), and closes them all [`LIFETIME`] after the start if none won. Opt
//! out with [`crate::Options::birthday`].

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tracing::{debug, info};

use super::{Dest, Event, Rendezvous, LOW_TTL};
use crate::punch::{Kind, LEN};
use crate::socket::Path;

/// Extra sockets the hard side opens (Tailscale's figure; each holds one NAT mapping).
pub const SOCKETS: u16 = 256;
/// Most probes the easy side sends per pairing.
pub const MAX_PROBES: u32 = 1600;
/// The pacing tick of both sides.
pub const TICK: Duration = Duration::from_millis(10);
/// Easy-side probes per [`TICK`]: 1000 per second, so the whole budget goes out within
/// 1.6 s and a hit comes within 3 s of the peer notice, registration and handshake included.
pub const PROBES_PER_TICK: u32 = 10;
/// Hard-side sockets opened, and openers sent, per [`TICK`] (each socket's opener a tick
/// after it opened: all 256 out within 40 ms, well inside [`PROBE_LEAD`]).
pub const OPENERS_PER_TICK: u16 = 64;
/// The easy side's wait after its start before probing, so the hard side's openers (sent
/// from the same moment, give or take the skew between the two sides learning each other's
/// candidates, and after the hard side opened its sockets: 15-50 ms) have opened the mappings.
pub const PROBE_LEAD: Duration = Duration::from_millis(100);
/// How long the hard side keeps its extra sockets without a winner: the easy side's whole
/// burst (1600 probes at 1000/s: 1.6 s) after its lead, plus the skew between the two
/// starts and a round trip.
pub const LIFETIME: Duration = Duration::from_millis(2500);
/// How long the hard side keeps its losing sockets open after a win, their QUIC datagrams
/// still handed to Quinn: one burst can hit several sockets, and the easy side may have
/// settled on another one than ours until that one falls silent (two probe intervals) and
/// our next keepalive round moves it (one more).
pub const LOSER_GRACE: Duration = Duration::from_secs(5);
/// Ports after the relay-observed one the easy side probes first (port prediction for
/// sequential NATs): the hard side's 256 new flows plus as many again for other hosts'
/// flows on the same NAT meanwhile.
pub const PREDICT_WINDOW: u16 = 512;

/// The lowest port a NAT hands out (the privileged ones stay unused); the random probes cover
/// `FIRST_PORT..=65535`.
const FIRST_PORT: u16 = 1024;
/// The ports a NAT hands out (64512), among which the hard side's [`SOCKETS`] mappings fall:
/// each random probe hits one with probability `SOCKETS / PORTS`.
pub const PORTS: u32 = 65536 - FIRST_PORT as u32;

/// This peer's part in birthday punching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BirthdayRole {
    /// Behind endpoint-dependent mapping: opens the extra sockets.
    Hard,
    /// Behind endpoint-independent mapping: probes the hard side's ports.
    Easy,
    /// Both sides look hard: the port prediction sweep for sequential NATs
    /// ([`super::sweep`]), from our one socket.
    Sweep,
}

/// What birthday punching did, for [`crate::Status::birthday`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BirthdayStatus {
    /// This side's part.
    pub role: BirthdayRole,
    /// Extra sockets opened (the hard side).
    pub sockets: u16,
    /// Packets sent: openers (the hard side), probes (the easy side), or both (the sweep).
    pub packets: u32,
    /// A direct path was found through it.
    pub won: bool,
    /// It is over (won, or the budget is spent).
    pub finished: bool,
}

/// The machine's birthday state, one per peer address.
#[derive(Debug)]
pub(crate) struct Birthday {
    pub(crate) status: BirthdayStatus,
    /// The other side's public address: where the openers go, or whose IP is probed.
    pub(super) peer: SocketAddr,
    pub(super) start: Instant,
    pub(super) next: Instant,
    /// The nonce all of this burst's probes carry (one per burst: replies may come back long
    /// after the ordinary nonce ring has moved on).
    pub(crate) nonce: u64,
    ports: PortSequence,
    /// The extra socket that won (the hard side).
    pub(crate) winner: Option<(u16, SocketAddr)>,
    /// When the losing sockets close (the hard side, after a win).
    losers_close_at: Option<Instant>,
    /// The port prediction sweep's progress ([`BirthdayRole::Sweep`]).
    pub(super) sweep: Option<super::sweep::Sweep>,
}

/// The easy side's probe order: the predicted window after `base`, then every other port once
/// in a random order (an affine permutation of the range: no state beyond two numbers).
#[derive(Debug, Clone)]
pub(crate) struct PortSequence {
    base: u16,
    k: u32,
    mul: u32,
    add: u32,
}

impl PortSequence {
    pub(crate) fn new(base: u16, seed: u64) -> Self {
        // A multiplier coprime to 64512 = 2^10 * 3^2 * 7 makes `mul * j + add` a permutation.
        let mut mul = (seed as u32 % PORTS) | 1;
        while mul.is_multiple_of(3) || mul.is_multiple_of(7) {
            mul += 2;
        }
        PortSequence {
            base,
            k: 0,
            mul,
            add: (seed >> 32) as u32 % PORTS,
        }
    }

    /// The offset of `port` after `base` in the ring of ports `FIRST_PORT..=65535`.
    fn after_base(&self, port: u16) -> u32 {
        let idx = |p: u16| u32::from(p.max(FIRST_PORT) - FIRST_PORT);
        (idx(port) + PORTS - idx(self.base)) % PORTS
    }

    /// The next port to probe; `None` once every port was probed.
    pub(crate) fn next_port(&mut self) -> Option<u16> {
        let window = u32::from(PREDICT_WINDOW);
        while self.k < PORTS + window {
            let k = self.k;
            self.k += 1;
            let idx = if k < window {
                (u32::from(self.base.max(FIRST_PORT) - FIRST_PORT) + 1 + k) % PORTS
            } else {
                (u64::from(self.mul) * u64::from(k - window) + u64::from(self.add))
                    .rem_euclid(u64::from(PORTS)) as u32
            };
            let port = FIRST_PORT + idx as u16;
            let off = self.after_base(port);
            // The random part skips what the window covered (and the base itself).
            if k < window || off > window {
                return Some(port);
            }
        }
        None
    }
}

impl Rendezvous {
    /// Our part, if birthday punching applies to this pairing (see the module docs).
    fn birthday_role(&self) -> Option<BirthdayRole> {
        let observed = self.status.observed?;
        let peer = self.status.peer?;
        if !observed.is_ipv4() || !peer.ip().to_canonical().is_ipv4() {
            return None;
        }
        let me_hard = observed.port() != self.cfg.local_port;
        // The peer's local port is in its candidate list; without one, we cannot tell.
        let peer_local = self.lan.iter().find(|a| a.is_ipv4())?;
        if peer_local.ip() == peer.ip().to_canonical() {
            return None; // no NAT in front of the peer: the ordinary punch reaches it
        }
        let peer_hard = peer_local.port() != peer.port();
        match (me_hard, peer_hard) {
            (true, false) => Some(BirthdayRole::Hard),
            (false, true) => Some(BirthdayRole::Easy),
            (true, true) => Some(BirthdayRole::Sweep),
            (false, false) => None,
        }
    }

    /// When the birthday schedule must run next, if it has anything to do. Past its start
    /// without having started (no part for us yet: the peer's candidates may still come),
    /// the ordinary punch rounds' timer checks again.
    pub(super) fn birthday_timeout(&self, now: Instant) -> Option<Instant> {
        if !self.birthday_allowed() {
            return None;
        }
        match &self.birthday {
            Some(b) if !b.status.finished => Some(b.next),
            Some(b) if b.losers_close_at.is_some() => b.losers_close_at,
            Some(_) => None,
            // Due at once when the classification says who plays which part (see
            // `birthday_tick`).
            None => (!matches!(self.status.path, Path::Direct(_))
                && self.birthday_role().is_some())
            .then_some(now),
        }
    }

    fn birthday_allowed(&self) -> bool {
        self.cfg.birthday && self.cfg.punch && !self.tcp && self.status.peer.is_some()
    }

    /// Starts birthday punching when it applies, and runs its schedule.
    pub(super) fn birthday_tick(&mut self, now: Instant) {
        if !self.birthday_allowed() {
            return;
        }
        let direct = matches!(self.status.path, Path::Direct(_));
        if self.birthday.is_none() {
            // No waiting for the ordinary punch: against address-and-port filtering it cannot
            // reach a side that maps per destination, so every millisecond spent waiting adds
            // to the connect time (the peer's candidates, which the classification needs,
            // arrive within a relay round trip of the notice on both sides alike).
            if direct {
                return;
            }
            let Some(role) = self.birthday_role() else {
                return;
            };
            self.start_birthday(role, now);
        }
        let Some(b) = self.birthday.as_mut() else {
            return;
        };
        if b.losers_close_at.is_some_and(|t| now >= t) {
            b.losers_close_at = None;
            self.events.push_back(Event::CloseLosers);
            return;
        }
        if b.status.finished || now < b.next {
            return;
        }
        b.next = now + TICK;
        if direct {
            self.birthday_found(now); // the path is found: no more probes, no more sockets
            return;
        }
        match b.status.role {
            BirthdayRole::Hard => self.hard_tick(now),
            BirthdayRole::Easy => self.easy_tick(now),
            BirthdayRole::Sweep => self.sweep_tick(now),
        }
    }

    fn start_birthday(&mut self, role: BirthdayRole, now: Instant) {
        let (Some(peer), Some(observed)) = (self.status.peer, self.status.observed) else {
            return;
        };
        let nonce = rand::random::<u64>();
        let sweep = (role == BirthdayRole::Sweep).then(|| super::sweep::Sweep::new(observed, peer));
        if sweep.is_some() {
            info!(
                %peer,
                flows = super::sweep::FLOWS,
                "both NATs map per destination: port prediction sweep"
            );
        } else {
            info!(
                ?role,
                %peer,
                sockets = SOCKETS,
                max_probes = MAX_PROBES,
                rate_per_s = PROBES_PER_TICK * 1000 / TICK.as_millis() as u32,
                "one side's NAT maps per destination: birthday punching"
            );
        }
        self.birthday = Some(Birthday {
            status: BirthdayStatus {
                role,
                sockets: 0,
                packets: 0,
                won: false,
                finished: false,
            },
            peer,
            start: now,
            next: now,
            nonce,
            ports: PortSequence::new(peer.port(), rand::random()),
            winner: None,
            losers_close_at: None,
            sweep,
        });
        self.publish_birthday();
    }

    /// The hard side: openers from the next sockets, then wait; close them all at the end.
    fn hard_tick(&mut self, now: Instant) {
        let Some(b) = self.birthday.as_mut() else {
            return;
        };
        if b.winner.is_some() {
            return;
        }
        if now >= b.start + LIFETIME {
            debug!(
                openers = b.status.packets,
                "no probe reached our extra sockets; closing them"
            );
            b.status.finished = true;
            self.events.push_back(Event::CloseSockets);
            self.publish_birthday();
            return;
        }
        // Open the next tick's sockets, and send the openers of those opened a tick ago: the
        // IO side's event loop learns that a new socket is writable only once it has run, and
        // refuses to send from it before (the opener would be lost, its mapping never made).
        let (opened, sent) = (b.status.sockets, b.status.packets as u16);
        let to = (opened + OPENERS_PER_TICK).min(SOCKETS);
        if to > opened {
            self.events
                .push_back(Event::OpenSockets { from: opened, to });
        }
        b.status.sockets = to;
        b.status.packets = u32::from(opened);
        let (from, to) = (sent, opened);
        let (peer, nonce) = (b.peer, b.nonce);
        let probe = self
            .key
            .packet(Kind::Probe, self.cfg.peer_id, nonce)
            .encode();
        for i in from..to {
            self.queue_via(Dest::Peer(peer), probe.to_vec(), Some(LOW_TTL), Some(i));
        }
        self.publish_birthday();
    }

    /// The easy side: the next few ports of the hard side's IP.
    fn easy_tick(&mut self, now: Instant) {
        let Some(b) = self.birthday.as_mut() else {
            return;
        };
        if now < b.start + PROBE_LEAD {
            b.next = b.start + PROBE_LEAD;
            return;
        }
        let ip: IpAddr = b.peer.ip();
        let mut ports = Vec::with_capacity(PROBES_PER_TICK as usize);
        while ports.len() < PROBES_PER_TICK as usize && b.status.packets < MAX_PROBES {
            match b.ports.next_port() {
                Some(p) => ports.push(p),
                None => break,
            }
            b.status.packets += 1;
        }
        if ports.is_empty() {
            debug!(
                probes = b.status.packets,
                "birthday probes spent without a hit"
            );
            b.status.finished = true;
            self.publish_birthday();
            return;
        }
        let nonce = b.nonce;
        let probe: [u8; LEN] = self
            .key
            .packet(Kind::Probe, self.cfg.peer_id, nonce)
            .encode();
        for port in ports {
            self.queue(Dest::Peer(SocketAddr::new(ip, port)), probe.to_vec(), None);
        }
        self.publish_birthday();
    }

    /// A reply to one of our probes arrived through extra socket `via` (the hard side): that
    /// socket carries the direct path from now on, and the others close.
    pub(super) fn birthday_won(&mut self, now: Instant, via: u16, from: SocketAddr) {
        let Some(b) = self.birthday.as_mut() else {
            return;
        };
        if b.winner.is_some() {
            return;
        }
        info!(socket = via, peer = %from, openers = b.status.packets, "birthday punch won");
        b.winner = Some((via, from));
        b.losers_close_at = Some(now + LOSER_GRACE);
        b.status.won = true;
        b.status.finished = true;
        self.events.push_back(Event::KeepSocket(via));
        self.publish_birthday();
    }

    /// A direct path came up on our one socket while birthday punching ran (the easy side's
    /// probe was answered, or the ordinary punch got there): stop, and close any extra
    /// sockets [`LOSER_GRACE`] later (the easy side may have settled on one of them first).
    pub(super) fn birthday_found(&mut self, now: Instant) {
        let Some(b) = self.birthday.as_mut() else {
            return;
        };
        if b.status.finished {
            return;
        }
        info!(role = ?b.status.role, packets = b.status.packets, "direct path up during birthday punching");
        b.status.won = b.status.role != BirthdayRole::Hard;
        b.status.finished = true;
        if b.status.sockets > 0 {
            b.losers_close_at = Some(now + LOSER_GRACE);
        }
        self.publish_birthday();
    }

    /// Whether `nonce` is the current burst's.
    pub(super) fn birthday_nonce(&self, nonce: u64) -> bool {
        self.birthday.as_ref().is_some_and(|b| b.nonce == nonce)
    }

    /// Forgets birthday state (a new peer address), closing any extra sockets.
    pub(super) fn reset_birthday(&mut self) {
        if self.birthday.take().is_some_and(|b| b.status.sockets > 0) {
            self.events.push_back(Event::CloseSockets);
        }
        self.status.birthday = None;
    }

    /// The extra socket `dst` is reached through, if birthday punching won one for it.
    pub(super) fn via_for(&self, dst: SocketAddr) -> Option<u16> {
        match self.birthday.as_ref().and_then(|b| b.winner) {
            Some((i, peer)) if peer == dst => Some(i),
            _ => None,
        }
    }

    pub(super) fn publish_birthday(&mut self) {
        self.status.birthday = self.birthday.as_ref().map(|b| b.status);
    }
}
