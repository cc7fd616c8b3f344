//! Port prediction between two sequential NATs, sans IO: the part of the rendezvous machine
//! that gets two peers direct when both NATs map per destination but hand out public ports
//! in turn (each new flow, a new destination, takes the next port).
//!
//! With A's relay-observed port `a0` and B's `b0`, the **leader** (A, the side whose public
//! address sorts first: both learn both addresses from the relay, so both agree) opens its
//! f-th new flow (f = 1..=[`FLOWS`]) to B's port `b0 + 2f - 1`, the **follower** (B) its g-th
//! to A's port `a0 + g`. A's f-th flow gets `a0 + dA + f` and B's g-th `b0 + dB + g`, where
//! `dA`, `dB` ≥ 0 count the flows each NAT allocated between the relay's and the sweep's
//! (the punch's own flows to the peer's candidates, other hosts' flows) that neither side
//! knows. A's flow f and B's flow g are each other's reverse, so each NAT admits the other's
//! packets, when `b0 + dB + g = b0 + 2f - 1` and `a0 + g = a0 + dA + f`: at
//! `f = dA + dB + 1`, `g = 2 dA + dB + 1`. [`FLOWS`] flows on each side thus cover
//! `2 dA + dB < 64`, in linear packets.
//!
//! As in the ordinary punch, each flow is opened first by a probe with a low TTL (it maps the
//! flow on our NAT and dies before the other side's router, so it leaves no conntrack entry
//! there for the other side's own flow to clash with), [`FLOWS_PER_TICK`] every
//! [`super::birthday::TICK`], in order and from our one socket, with nothing else opening a
//! flow in between (the sweep starts when the peer's candidates arrive, right after the
//! punch's probes to them opened theirs; later punch rounds reuse those flows). Full probes to
//! the same targets follow [`SWEEP_LEAD`] after the start, in [`ROUNDS`] rounds
//! [`ROUND_INTERVAL`] apart; the pair that matches is answered as any probe, and the reply
//! makes it the direct path.
//!
//! **When.** Both sides look hard (the relay saw other ports than both sockets': see
//! [`super::birthday`]), over IPv4, once per peer address, at once. Against a random
//! endpoint-dependent NAT on either side it fails (each of that side's mappings admits one
//! port of the other, chosen at random), and the peers stay on the relay.
//!
//! **Budget:** per side [`FLOWS`] (64) new flows on its NAT and `FLOWS × (1 + ROUNDS)` (256)
//! probes of 44 bytes, all to the peer's IP, within 0.4 s, once per pairing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::debug;

use super::birthday::Birthday;
use super::{Dest, Rendezvous, LOW_TTL};
use crate::punch::Kind;

/// New flows (predicted ports) per side.
pub const FLOWS: u16 = 64;
/// Openers or probes per [`super::birthday::TICK`] (the 64 openers go out within 20 ms).
pub const FLOWS_PER_TICK: u16 = 32;
/// From the start to the first full probe: the other side's openers must be out first (the
/// two sides start within a relay round trip's skew of each other).
pub const SWEEP_LEAD: Duration = Duration::from_millis(100);
/// Rounds of full probes to every predicted port (against loss).
pub const ROUNDS: u16 = 3;
/// Between two rounds.
pub const ROUND_INTERVAL: Duration = Duration::from_millis(100);

/// The lowest port a NAT hands out; predictions past 65535 wrap to it.
const FIRST_PORT: u32 = 1024;

/// The i-th (1-based) predicted port of the peer: `base + 2i - 1` for the leader, `base + i`
/// for the follower (see the module docs), in the ring `1024..=65535`.
pub(crate) fn target(base: u16, leader: bool, i: u16) -> u16 {
    let off = if leader {
        2 * u32::from(i) - 1
    } else {
        u32::from(i)
    };
    let span = 65536 - FIRST_PORT;
    let idx = (u32::from(base).max(FIRST_PORT) - FIRST_PORT + off) % span;
    (FIRST_PORT + idx) as u16
}

/// The sweep's progress.
#[derive(Debug, Clone)]
pub(crate) struct Sweep {
    /// The peer's relay-observed port, which the predictions count from.
    base: u16,
    leader: bool,
    /// Flows opened (openers sent), in order.
    opened: u16,
    /// Full-probe rounds done, and probes sent in the current one.
    rounds: u16,
    in_round: u16,
}

impl Sweep {
    /// The sweep of a peer at `peer`, seen by us at `observed`.
    pub(crate) fn new(observed: SocketAddr, peer: SocketAddr) -> Self {
        Sweep {
            base: peer.port(),
            leader: observed < peer,
            opened: 0,
            rounds: 0,
            in_round: 0,
        }
    }
}

impl Rendezvous {
    /// The sweep's next step: openers first, then the rounds of full probes.
    pub(super) fn sweep_tick(&mut self, now: Instant) {
        let Some(Birthday {
            sweep: Some(s),
            status,
            start,
            next,
            nonce,
            peer,
            ..
        }) = self.birthday.as_mut()
        else {
            return;
        };
        let (ttl, from, to) = if s.opened < FLOWS {
            let from = s.opened;
            s.opened = (from + FLOWS_PER_TICK).min(FLOWS);
            (Some(LOW_TTL), from, s.opened)
        } else if now < *start + SWEEP_LEAD {
            *next = *start + SWEEP_LEAD;
            return;
        } else if s.rounds < ROUNDS {
            let from = s.in_round;
            s.in_round = (from + FLOWS_PER_TICK).min(FLOWS);
            if s.in_round == FLOWS {
                s.in_round = 0;
                s.rounds += 1;
                *next = now + ROUND_INTERVAL;
            }
            (None, from, (from + FLOWS_PER_TICK).min(FLOWS))
        } else {
            debug!(
                packets = status.packets,
                "the port prediction sweep found no path"
            );
            status.finished = true;
            self.publish_birthday();
            return;
        };
        status.packets += u32::from(to - from);
        let (ip, base, leader, nonce) = (peer.ip(), s.base, s.leader, *nonce);
        let probe = self
            .key
            .packet(Kind::Probe, self.cfg.peer_id, nonce)
            .encode();
        for i in from..to {
            let dst = SocketAddr::new(ip, target(base, leader, i + 1));
            self.queue_via(Dest::Peer(dst), probe.to_vec(), ttl, None);
        }
        self.publish_birthday();
    }
}
