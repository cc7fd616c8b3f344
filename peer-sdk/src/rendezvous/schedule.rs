//! The punch schedule of the [`Rendezvous`] machine: probes to the peer's candidates, our local
//! candidates offered through the relay, the peer's probes answered, and the direct path chosen,
//! kept alive and given up.
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

use std::net::SocketAddr;
use std::time::Instant;

use tracing::{debug, info};

use super::{
    Dest, Rendezvous, DIRECT_DEAD, LAN_OFFERS, LOW_TTL, MAX_CANDIDATES, MAX_NONCES, PROBE_INTERVAL,
    PUNCH_INTERVAL, SYNC_LEAD,
};
use crate::punch::{Kind, PunchPacket};
use crate::socket::Path;

impl Rendezvous {
    pub(super) fn punch_tick(&mut self, now: Instant) {
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

    pub(super) fn new_probe(&mut self) -> [u8; crate::punch::LEN] {
        let nonce = self.new_nonce();
        self.key
            .packet(Kind::Probe, self.cfg.peer_id, nonce)
            .encode()
    }

    /// Sends our local candidates to the peer through the relay (a few times per peer).
    pub(super) fn offer_local(&mut self) {
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
        // The relay forwards to the peer now: send ours again at once rather than at the next
        // round. Our first copy left on the relay's notice, which can come before the peer
        // echoed its cookie (the relay then drops it), and birthday punching and the sweep
        // start when each side has the other's list, so a late list is a late start.
        self.offer_local();
    }

    pub(super) fn low_ttl_probes(&mut self, targets: &[SocketAddr]) {
        let probe = self.new_probe();
        for &dst in targets {
            self.queue(Dest::Peer(dst), probe.to_vec(), Some(LOW_TTL));
        }
    }

    /// The relay pairs us with a peer at a new address: a new peer, or ours after a NAT
    /// rebinding. What we knew of direct paths may be stale (an old peer still answering
    /// probes would otherwise keep our traffic), so start over: relay path, fresh candidates,
    /// no outstanding nonces, and a new punching window on the synchronised schedule.
    pub(super) fn new_peer_address(&mut self, p: SocketAddr, now: Instant) {
        if self.peer_known_at.is_some() {
            debug!(peer = %p, "the relay reports a new peer address; re-punching");
        }
        self.candidates.clear();
        self.lan.clear();
        self.lan_offers = 0;
        self.nonces.clear();
        self.last_direct_reply = None;
        self.reset_birthday();
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

    /// The peer's address in its other IP family, as the relay reports it: one more
    /// candidate, probed at once (low TTL first, as at the start of a round) and in every round
    /// from now on. Its IPv6 is preferred over IPv4 paths ([`Rendezvous::rank`]).
    pub(super) fn peer_alt(&mut self, alt: Option<SocketAddr>, now: Instant) {
        let Some(alt) = alt else { return };
        if self.status.peer_alt == Some(alt) && self.candidates.contains(&alt) {
            return;
        }
        debug!(peer_alt = %alt, "the peer's alternate address");
        self.status.peer_alt = Some(alt);
        if self.tcp || self.status.peer.is_none() {
            return;
        }
        self.add_candidate(alt);
        if self.cfg.punch
            && !matches!(self.status.path, Path::Direct(a) if self.rank(a) >= self.rank(alt))
        {
            self.low_ttl_probes(&[alt]);
            if self.next_probe.is_none_or(|p| p > now + PUNCH_INTERVAL) {
                self.next_probe = Some(now + PUNCH_INTERVAL);
            }
        }
    }

    /// How much a direct path to `a` is preferred: IPv6 (no NAT on the way, no mapping to
    /// expire) over a local IPv4 candidate (the LAN) over a public IPv4 address.
    pub(super) fn rank(&self, a: SocketAddr) -> u8 {
        if a.ip().to_canonical().is_ipv6() {
            2
        } else if self.lan.contains(&a) {
            1
        } else {
            0
        }
    }

    pub(super) fn new_nonce(&mut self) -> u64 {
        let nonce: u64 = rand::random();
        if self.nonces.len() == MAX_NONCES {
            self.nonces.pop_front();
        }
        self.nonces.push_back(nonce);
        nonce
    }

    pub(super) fn add_candidate(&mut self, a: SocketAddr) {
        if !self.candidates.contains(&a) {
            if self.candidates.len() == MAX_CANDIDATES {
                self.candidates.pop();
            }
            self.candidates.insert(0, a);
        }
    }

    /// A punch packet (not yet authenticated) from `from`, received on our one socket
    /// (`via` `None`) or on extra (birthday) socket `via`.
    pub(crate) fn handle_punch(
        &mut self,
        now: Instant,
        from: SocketAddr,
        packet: PunchPacket,
        via: Option<u16>,
    ) {
        if self.tcp || packet.sender == self.cfg.peer_id || !self.key.verify(&packet) {
            return; // our own, reflected; or forged
        }
        // Through an extra socket: answered through the same one (the peer reached the NAT
        // mapping that socket owns, and no other); once one won, the others are void.
        let via = match via {
            Some(i) => match self.birthday.as_ref() {
                Some(b) if b.winner.is_none() && !b.status.finished => Some(i),
                Some(b) if b.winner.is_some_and(|(w, _)| w == i) => Some(i),
                _ => return,
            },
            None => self.via_for(from),
        };
        match packet.kind {
            Kind::Probe => {
                self.add_candidate(from);
                let reply = self
                    .key
                    .packet(Kind::Reply, self.cfg.peer_id, packet.nonce)
                    .encode();
                self.queue_via(Dest::Peer(from), reply.to_vec(), None, via);
                // The peer probes from an address we are not using (its NAT rebound, or it is
                // the symmetric side of a punch): probe back at once, so its reply can move us
                // there without waiting for the next round.
                if self.cfg.punch && self.status.path != Path::Direct(from) {
                    let probe = self.new_probe();
                    self.queue_via(Dest::Peer(from), probe.to_vec(), None, via);
                }
            }
            Kind::Reply => {
                let birthday = self.birthday_nonce(packet.nonce);
                if !self.nonces.contains(&packet.nonce) && !birthday {
                    return; // not an answer to a probe of ours (a replay)
                }
                // A better path stays preferred (IPv6, then the LAN, then public IPv4): a late
                // reply on a worse one does not move us off it (nor prove it alive).
                if let Path::Direct(current) = self.status.path {
                    if self.rank(from) < self.rank(current) {
                        return;
                    }
                    // Birthday probes can hit several of the hard side's ports in one burst,
                    // and the hard side keeps only the socket that answered first: stay on the
                    // first address that answered while it keeps answering, rather than
                    // following each later reply to a socket the hard side has closed.
                    let alive = self
                        .last_direct_reply
                        .is_some_and(|t| now.saturating_duration_since(t) < 2 * PROBE_INTERVAL);
                    if self.birthday.is_some() && from != current && alive {
                        return;
                    }
                }
                if let Some(i) = via {
                    self.birthday_won(now, i, from);
                }
                self.last_direct_reply = Some(now);
                if self.cfg.punch && self.status.path != Path::Direct(from) {
                    info!(peer = %from, lan = self.lan.contains(&from), via, "direct path up");
                    self.set_path(Path::Direct(from));
                    self.next_probe = Some(now + PROBE_INTERVAL);
                    if self.birthday.is_some() && via.is_none() {
                        self.birthday_found(now);
                    }
                }
            }
        }
    }
}
