//! Unit tests of the port prediction sweep, driven with a fake clock: the predicted ports, and
//! two machines behind modelled sequential NATs (each new destination takes the NAT's next
//! public port, an unsolicited packet passes only a flow's reverse) that meet when the flows
//! the NATs allocated in between are within reach, and stay relayed when they are not.

use std::collections::{BTreeMap, HashMap};

use super::birthday::BirthdayRole;
use super::sweep::*;
use super::tests::{addr, cfg, drain};
use super::*;
use crate::punch::{PunchKey, PunchPacket};

#[test]
fn the_leader_targets_every_other_port_and_the_follower_every_port() {
    assert_eq!(
        (1..=4).map(|i| target(40000, true, i)).collect::<Vec<_>>(),
        [40001, 40003, 40005, 40007]
    );
    assert_eq!(
        (1..=4).map(|i| target(40000, false, i)).collect::<Vec<_>>(),
        [40001, 40002, 40003, 40004]
    );
    // Past 65535 the ring goes on at 1024.
    assert_eq!(target(65534, false, 1), 65535);
    assert_eq!(target(65534, false, 2), 1024);
    assert_eq!(target(65535, true, 1), 1024);
}

/// A sequential NAT: the next public port for each new destination.
struct SeqNat {
    ip: std::net::IpAddr,
    next: u16,
    flows: HashMap<SocketAddr, u16>,
}

impl SeqNat {
    /// The NAT's relay flow took `first`; `between` more flows (other hosts') follow before
    /// the peer's.
    fn new(ip: &str, first: u16, between: u16) -> Self {
        SeqNat {
            ip: ip.parse().expect("ip"),
            next: first + 1 + between,
            flows: HashMap::new(),
        }
    }

    /// The public port of the flow to `dst`, opening it if new.
    fn out(&mut self, dst: SocketAddr) -> u16 {
        let next = &mut self.next;
        *self.flows.entry(dst).or_insert_with(|| {
            *next += 1;
            *next - 1
        })
    }

    /// Whether a packet from `from` to our public `port` is a reply to one of our flows.
    fn admits(&self, from: SocketAddr, port: u16) -> bool {
        self.flows.get(&from) == Some(&port)
    }
}

/// A machine with socket port 33000 (rewritten by its NAT), seen at `me`, paired with `peer`
/// (whose socket port, 34000, was rewritten too) at `t`.
fn paired(t: Instant, me: &str, peer: &str, peer_id: u64) -> Rendezvous {
    let mut r = Rendezvous::new(Config {
        local_port: 33000,
        peer_id,
        birthday: true,
        ..cfg()
    });
    let ack = |p: Option<SocketAddr>| Reply::Ack {
        observed: Some(addr(me)),
        peer: p,
        cookie: None,
        peer_alt: None,
    };
    r.handle_timeout(t, t);
    r.handle_relay(t, ack(None), false);
    r.handle_relay(t, ack(Some(addr(peer))), false);
    let list = crate::candidates::Candidates {
        sender: peer_id ^ 1,
        addrs: vec![SocketAddr::new("100.64.9.9".parse().expect("ip"), 34000)],
    };
    r.handle_candidates(t, &list.encode(&PunchKey::new(cfg().session)));
    r
}

/// A datagram on the wire: receiver, source, the public port it was sent to, bytes.
type InFlight = (usize, SocketAddr, u16, Vec<u8>);

/// Two peers behind sequential NATs whose relay flows got port 40000 and which allocated
/// `between_a` and `between_b` flows for other hosts before the punch; B learns of A `skew`
/// after A learns of B. Runs both on a fake clock with a 5 ms one-way delay until 2 s; returns
/// both machines and every sweep packet A and B sent.
fn meet(between_a: u16, between_b: u16, skew: Duration) -> (Rendezvous, Rendezvous, u32, u32) {
    const A: &str = "198.18.1.1:40000";
    const B: &str = "198.18.2.1:40000";
    let t0 = Instant::now();
    let mut nats = [
        SeqNat::new("198.18.1.1", 40000, between_a),
        SeqNat::new("198.18.2.1", 40000, between_b),
    ];
    let mut peers = [paired(t0, A, B, 8), paired(t0 + skew, B, A, 10)];
    let starts = [t0, t0 + skew];
    let mut wire: BTreeMap<(Instant, u64), InFlight> = BTreeMap::new();
    let mut seq = 0u64;
    let mut t = t0;
    while t < t0 + Duration::from_secs(2) {
        while let Some(entry) = wire.first_entry() {
            if entry.key().0 > t {
                break;
            }
            let (to, from, port, bytes) = entry.remove();
            if nats[to].admits(from, port) {
                let p = PunchPacket::decode(&bytes).expect("punch packet");
                peers[to].handle_punch(t, from, p, None);
            }
        }
        for i in 0..2 {
            if t < starts[i] {
                continue;
            }
            peers[i].handle_timeout(t, t);
            for x in drain(&mut peers[i]) {
                let Dest::Peer(dst) = x.dst else { continue };
                let port = nats[i].out(dst);
                let other = 1 - i;
                if x.ttl.is_none() && dst.ip() == nats[other].ip {
                    let from = SocketAddr::new(nats[i].ip, port);
                    let at = t + Duration::from_millis(5);
                    wire.insert((at, seq), (other, from, dst.port(), x.bytes));
                    seq += 1;
                }
            }
        }
        t += Duration::from_millis(1);
    }
    let [a, b] = peers;
    let sent = |r: &Rendezvous| r.status().birthday.expect("sweep ran").packets;
    let (pa, pb) = (sent(&a), sent(&b));
    (a, b, pa, pb)
}

#[test]
fn two_sequential_nats_meet_whatever_the_flows_allocated_in_between() {
    for (between_a, between_b, skew) in [(0, 0, 0), (3, 7, 40), (20, 10, 90), (0, 50, 10)] {
        let (a, b, pa, pb) = meet(between_a, between_b, Duration::from_millis(skew));
        let case = format!("between {between_a}, {between_b}, skew {skew} ms");
        for r in [&a, &b] {
            assert!(matches!(r.status().path, Path::Direct(_)), "{case}");
            let s = r.status().birthday.expect("status");
            assert_eq!(s.role, BirthdayRole::Sweep, "{case}");
            assert!(s.won && s.finished && s.sockets == 0, "{case}: {s:?}");
        }
        let budget = u32::from(FLOWS) * (1 + u32::from(ROUNDS));
        assert!(pa <= budget && pb <= budget, "{case}: {pa} {pb}");
        assert_eq!(
            a.direct_via(),
            None,
            "the sweep runs from the one socket: {case}"
        );
    }
}

#[test]
fn out_of_reach_the_sweep_spends_its_budget_once_and_leaves_the_relay() {
    // 2 dA + dB beyond the 64 flows: no pair of flows meets.
    let (a, b, pa, pb) = meet(40, 10, Duration::ZERO);
    let budget = u32::from(FLOWS) * (1 + u32::from(ROUNDS));
    for (r, p) in [(&a, pa), (&b, pb)] {
        assert_eq!(r.status().path, Path::Relay);
        let s = r.status().birthday.expect("status");
        assert!(s.finished && !s.won, "{s:?}");
        assert_eq!(p, budget, "the whole budget once, no more");
    }
}

#[test]
fn the_sweep_opens_its_flows_in_order_with_a_low_ttl_before_any_full_probe() {
    let t0 = Instant::now();
    let mut r = paired(t0, "198.18.2.1:40000", "198.18.1.1:40000", 8);
    drain(&mut r);
    let mut sent: Vec<(Instant, Transmit)> = Vec::new();
    let mut t = t0;
    while t < t0 + Duration::from_secs(1) {
        r.handle_timeout(t, t);
        sent.extend(drain(&mut r).into_iter().map(|x| (t, x)));
        t = r.poll_timeout(t, t);
    }
    let peer = addr("198.18.1.1:40000");
    let sweep: Vec<&(Instant, Transmit)> = sent
        .iter()
        .filter(|(_, x)| matches!(x.dst, Dest::Peer(a) if a.ip() == peer.ip() && a != peer))
        .collect();
    // We sort after the peer: the follower, targeting 40001, 40002, ...
    let openers: Vec<u16> = sweep
        .iter()
        .take(usize::from(FLOWS))
        .map(|(_, x)| match x.dst {
            Dest::Peer(a) if x.ttl == Some(LOW_TTL) => a.port(),
            _ => panic!("an opener first: {x:?}"),
        })
        .collect();
    assert_eq!(openers, (40001..=40000 + FLOWS).collect::<Vec<_>>());
    let full = &sweep[usize::from(FLOWS)..];
    assert_eq!(full.len(), usize::from(FLOWS) * usize::from(ROUNDS));
    assert!(full
        .iter()
        .all(|(u, x)| x.ttl.is_none() && *u >= t0 + SWEEP_LEAD));
    assert!(
        sent.iter().all(|(_, x)| x.via.is_none()),
        "no extra sockets"
    );
    let nonce = |x: &Transmit| PunchPacket::decode(&x.bytes).expect("probe").nonce;
    assert!(sweep.iter().all(|(_, x)| nonce(x) == nonce(&sweep[0].1)));
}
