//! Unit tests of birthday punching in the rendezvous machine, driven with a fake clock: who
//! plays which part, the probe order (prediction, then distinct random ports), the budget (count,
//! rate, sockets), the winner's socket carrying the path, and the cleanup.

use std::collections::HashSet;

use super::birthday::*;
use super::tests::{ack, addr, cfg, drain};
use super::*;
use crate::punch::{Kind, PunchPacket};

/// The peer's public address (as the relay reports it) and its local candidate.
const PEER_PUBLIC: &str = "198.18.2.1:40007";

/// A machine registered (the relay sees us at 198.18.1.1:5000) with `local_port`, paired at
/// `t0` with a peer whose local candidate has `peer_local_port`.
fn paired(t0: Instant, local_port: u16, peer_local_port: u16, birthday: bool) -> Rendezvous {
    let mut r = unclassified(t0, local_port, birthday);
    candidates(&mut r, t0, peer_local_port);
    r
}

/// A machine paired at `t0` whose peer's candidates have not arrived yet.
fn unclassified(t0: Instant, local_port: u16, birthday: bool) -> Rendezvous {
    let mut r = Rendezvous::new(Config {
        local_port,
        birthday,
        ..cfg()
    });
    r.handle_timeout(t0, t0);
    r.handle_relay(t0, ack(None), false);
    r.handle_relay(t0, ack(Some(addr(PEER_PUBLIC))), false);
    r
}

/// The peer's candidate list arrives at `t`, its one address with `peer_local_port`.
fn candidates(r: &mut Rendezvous, t: Instant, peer_local_port: u16) {
    let list = crate::candidates::Candidates {
        sender: 9,
        addrs: vec![SocketAddr::new(
            "100.64.2.2".parse().expect("ip"),
            peer_local_port,
        )],
    };
    r.handle_candidates(t, &list.encode(&PunchKey::new(cfg().session)));
    drain(r);
}

/// Runs the machine from `from` to `to` on its own timer, the peer silent; returns every
/// transmit with the time it went out, and every event.
fn run(r: &mut Rendezvous, from: Instant, to: Instant) -> (Vec<(Instant, Transmit)>, Vec<Event>) {
    let (mut sent, mut events) = (Vec::new(), Vec::new());
    let mut t = from;
    while t < to {
        r.handle_timeout(t, t);
        events.extend(std::iter::from_fn(|| r.poll_event()));
        sent.extend(drain(r).into_iter().map(|x| (t, x)));
        t = r.poll_timeout(t, t);
    }
    (sent, events)
}

/// The hard side's socket openings: a tick's worth of openers at a time.
fn opened_in_ticks() -> Vec<Event> {
    (0..SOCKETS)
        .step_by(usize::from(OPENERS_PER_TICK))
        .map(|from| Event::OpenSockets {
            from,
            to: (from + OPENERS_PER_TICK).min(SOCKETS),
        })
        .collect()
}

/// Birthday probes: to the peer's IP at a port other than the one the relay reported.
fn birthday_probes(sent: &[(Instant, Transmit)]) -> Vec<(Instant, SocketAddr)> {
    let public = addr(PEER_PUBLIC);
    sent.iter()
        .filter_map(|(t, x)| match x.dst {
            Dest::Peer(a) if a.ip() == public.ip() && a != public => Some((*t, a)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_port_sequence_predicts_then_covers_every_port_once() {
    let mut s = PortSequence::new(65000, 0x1234_5678_9abc_def1);
    let first: Vec<u16> = (0..4).filter_map(|_| s.next_port()).collect();
    assert_eq!(
        first,
        [65001, 65002, 65003, 65004],
        "the ports after the observed one"
    );
    let mut seen: HashSet<u16> = first.into_iter().collect();
    while let Some(p) = s.next_port() {
        assert!(p >= 1024, "{p}");
        assert!(seen.insert(p), "{p} twice");
    }
    // Every port but the observed one, once (the window wrapped past 65535 to 1024).
    assert_eq!(seen.len(), 64512 - 1);
    assert!(!seen.contains(&65000));
}

#[test]
fn the_easy_side_probes_predicted_then_random_ports_within_the_budget() {
    let t0 = Instant::now();
    // Our port survived our NAT (5000 = 5000); the peer's did not (local 33000, public 40007).
    let mut r = paired(t0, 5000, 33000, true);
    let (sent, events) = run(&mut r, t0, t0 + Duration::from_secs(6));
    assert!(
        events.is_empty(),
        "the easy side opens no sockets: {events:?}"
    );
    let probes = birthday_probes(&sent);
    assert_eq!(
        probes.len(),
        MAX_PROBES as usize,
        "the whole budget, no more"
    );
    let start = probes[0].0;
    // At once on the classification, after the hard side's lead.
    assert_eq!(start, t0 + PROBE_LEAD);
    let ports: Vec<u16> = probes.iter().map(|(_, a)| a.port()).collect();
    assert_eq!(&ports[..3], [40008, 40009, 40010], "prediction first");
    assert_eq!(
        ports.iter().collect::<HashSet<_>>().len(),
        ports.len(),
        "no port twice"
    );
    // The rate: never more than PROBES_PER_TICK per TICK, so 1000 in any second.
    for (i, (t, _)) in probes.iter().enumerate() {
        let in_second = probes[i..]
            .iter()
            .take_while(|(u, _)| *u < *t + Duration::from_secs(1))
            .count();
        assert!(in_second <= 1000, "{in_second} probes in a second");
    }
    let last = probes.last().expect("probes").0;
    assert!(
        last - start < Duration::from_millis(1600),
        "{:?}",
        last - start
    );
    let status = r.status().birthday.expect("status");
    assert_eq!(
        (status.role, status.packets, status.finished, status.won),
        (BirthdayRole::Easy, MAX_PROBES, true, false)
    );
}

#[test]
fn a_reply_to_a_birthday_probe_makes_that_port_the_path_and_stops_the_probes() {
    let t0 = Instant::now();
    let mut r = paired(t0, 5000, 33000, true);
    let (sent, _) = run(&mut r, t0, t0 + Duration::from_millis(700));
    let (_, hit) = *birthday_probes(&sent).last().expect("probes went out");
    let nonce = sent
        .iter()
        .find(|(_, x)| x.dst == Dest::Peer(hit))
        .and_then(|(_, x)| PunchPacket::decode(&x.bytes))
        .expect("a probe")
        .nonce;
    let key = PunchKey::new(cfg().session);
    let t = t0 + Duration::from_millis(700);
    r.handle_punch(t, hit, key.packet(Kind::Reply, 9, nonce), None);
    assert_eq!(r.status().path, Path::Direct(hit));
    assert_eq!(r.direct_via(), None, "the easy side keeps its one socket");
    let (later, _) = run(&mut r, t, t + Duration::from_millis(500));
    assert!(
        birthday_probes(&later).iter().all(|(_, a)| *a == hit),
        "no more random probes"
    );
    let b = r.status().birthday.expect("status");
    assert!(b.won && b.finished);
}

#[test]
fn the_hard_side_opens_paced_low_ttl_sockets_and_the_winner_carries_the_path() {
    let t0 = Instant::now();
    // Our NAT rewrote our port (local 33000, seen as 5000); the peer's kept it.
    let mut r = paired(t0, 33000, 40007, true);
    let (sent, events) = run(&mut r, t0, t0 + Duration::from_millis(700));
    assert_eq!(events, opened_in_ticks());
    let peer = addr(PEER_PUBLIC);
    let openers: Vec<&(Instant, Transmit)> = sent.iter().filter(|(_, x)| x.via.is_some()).collect();
    assert_eq!(openers.len(), usize::from(SOCKETS), "one opener per socket");
    let socks: HashSet<u16> = openers.iter().filter_map(|(_, x)| x.via).collect();
    assert_eq!(socks.len(), usize::from(SOCKETS));
    for (t, x) in &openers {
        assert_eq!((x.dst, x.ttl), (Dest::Peer(peer), Some(LOW_TTL)));
        assert!(*t < t0 + PROBE_LEAD, "all out before the easy side probes");
    }
    let first = openers[0].0;
    // A tick after the first sockets opened (a socket is not writable at once).
    assert_eq!(first, t0 + TICK);
    let per_tick = openers.iter().filter(|(t, _)| *t == first).count();
    assert_eq!(per_tick, usize::from(OPENERS_PER_TICK));
    assert!(
        birthday_probes(&sent).is_empty(),
        "the hard side probes no ports"
    );
    // The easy side's probe reaches socket 17: answered and probed back through it.
    let key = PunchKey::new(cfg().session);
    let t = t0 + Duration::from_millis(800);
    r.handle_punch(t, peer, key.packet(Kind::Probe, 9, 77), Some(17));
    let out = drain(&mut r);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out
        .iter()
        .all(|x| x.via == Some(17) && x.dst == Dest::Peer(peer)));
    let back = PunchPacket::decode(&out[1].bytes).expect("probe back");
    // Its reply wins: socket 17 carries the path, the others close LOSER_GRACE later.
    r.handle_punch(t, peer, key.packet(Kind::Reply, 9, back.nonce), Some(17));
    assert_eq!(r.poll_event(), Some(Event::KeepSocket(17)));
    assert_eq!(r.status().path, Path::Direct(peer));
    assert_eq!(r.direct_via(), Some(17));
    // A late packet through a loser is void; keepalive probes go through the winner.
    r.handle_punch(t, peer, key.packet(Kind::Probe, 9, 78), Some(3));
    assert!(drain(&mut r).is_empty());
    let (later, events) = run(&mut r, t, t + LOSER_GRACE + TICK);
    assert_eq!(events, [Event::CloseLosers]);
    let keepalives: Vec<_> = later
        .iter()
        .filter(|(_, x)| x.dst == Dest::Peer(peer))
        .collect();
    assert!(!keepalives.is_empty());
    assert!(keepalives.iter().all(|(_, x)| x.via == Some(17)));
    let b = r.status().birthday.expect("status");
    assert_eq!(
        (b.role, b.sockets, b.packets, b.won),
        (BirthdayRole::Hard, SOCKETS, u32::from(SOCKETS), true)
    );
    // A new peer address voids it: every extra socket closes, the path is the relay's.
    r.handle_relay(t, ack(Some(addr("198.18.2.1:40100"))), false);
    assert_eq!(r.poll_event(), Some(Event::CloseSockets));
    assert_eq!(r.direct_via(), None);
}

#[test]
fn the_hard_side_closes_its_sockets_when_nothing_reached_them() {
    let t0 = Instant::now();
    let mut r = paired(t0, 33000, 40007, true);
    let (_, events) = run(&mut r, t0, t0 + LIFETIME + TICK);
    let mut want = opened_in_ticks();
    want.push(Event::CloseSockets);
    assert_eq!(events, want);
    let b = r.status().birthday.expect("status");
    assert!(b.finished && !b.won);
    // Once per pairing: nothing more later.
    let t = t0 + LIFETIME + TICK;
    let (_, events) = run(&mut r, t, t + Duration::from_secs(10));
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn no_birthday_when_neither_looks_hard_when_opted_out_or_already_direct() {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(4);
    for (local, peer_local, on) in [
        (5000, 40007, true),   // neither rewrote: the ordinary punch is the tool
        (33000, 33001, false), // both did (the sweep's case), opted out
        (5000, 33000, false),  // opted out
        (33000, 40007, false),
    ] {
        let mut r = paired(t0, local, peer_local, on);
        let (sent, events) = run(&mut r, t0, end);
        assert!(events.is_empty(), "{local} {peer_local} {on}: {events:?}");
        assert!(birthday_probes(&sent).is_empty());
        assert!(sent.iter().all(|(_, x)| x.via.is_none()));
        assert_eq!(r.status().birthday, None);
    }
    // The ordinary punch found the path before the peer's candidates came: no birthday.
    let mut r = unclassified(t0, 5000, true);
    let peer = addr(PEER_PUBLIC);
    let (sent, _) = run(&mut r, t0, t0 + SYNC_LEAD + TICK);
    let nonce = sent
        .iter()
        .rev()
        .find_map(|(_, x)| PunchPacket::decode(&x.bytes))
        .expect("a probe")
        .nonce;
    let key = PunchKey::new(cfg().session);
    let t = t0 + SYNC_LEAD + TICK;
    r.handle_punch(t, peer, key.packet(Kind::Reply, 9, nonce), None);
    candidates(&mut r, t, 33000);
    // (Until the direct path would count as dead without replies.)
    let (sent, _) = run(&mut r, t, t0 + DIRECT_DEAD);
    assert!(birthday_probes(&sent).is_empty());
    assert_eq!(r.status().birthday, None);
}

#[test]
fn the_easy_side_stays_on_the_first_port_that_answered() {
    let t0 = Instant::now();
    let mut r = paired(t0, 5000, 33000, true);
    let (sent, _) = run(&mut r, t0, t0 + Duration::from_millis(700));
    let probes = birthday_probes(&sent);
    let (first, second) = (probes[0].1, probes[1].1);
    let nonce = sent
        .iter()
        .find(|(_, x)| x.dst == Dest::Peer(first))
        .and_then(|(_, x)| PunchPacket::decode(&x.bytes))
        .expect("a probe")
        .nonce;
    let key = PunchKey::new(cfg().session);
    let t = t0 + Duration::from_millis(700);
    // Two hits of one burst answer: the first stays the path.
    r.handle_punch(t, first, key.packet(Kind::Reply, 9, nonce), None);
    r.handle_punch(t, second, key.packet(Kind::Reply, 9, nonce), None);
    assert_eq!(r.status().path, Path::Direct(first));
    // Once the first falls silent (the hard side kept the other socket), the other one wins.
    let later = t + 2 * PROBE_INTERVAL;
    r.handle_punch(later, second, key.packet(Kind::Reply, 9, nonce), None);
    assert_eq!(r.status().path, Path::Direct(second));
}

#[test]
fn a_direct_path_on_the_main_socket_closes_the_extra_sockets_after_the_grace() {
    let t0 = Instant::now();
    let mut r = paired(t0, 33000, 40007, true);
    let t = t0 + Duration::from_millis(700);
    let (sent, _) = run(&mut r, t0, t);
    // A sequential NAT: the easy side's predicted port reached our main socket's mapping.
    let nonce = sent
        .iter()
        .rev()
        .find(|(_, x)| x.via.is_none())
        .and_then(|(_, x)| PunchPacket::decode(&x.bytes))
        .expect("a probe")
        .nonce;
    let peer = addr(PEER_PUBLIC);
    let key = PunchKey::new(cfg().session);
    r.handle_punch(t, peer, key.packet(Kind::Reply, 9, nonce), None);
    assert_eq!(r.status().path, Path::Direct(peer));
    assert_eq!(r.direct_via(), None);
    let (_, events) = run(&mut r, t, t + LOSER_GRACE - TICK);
    assert!(
        events.is_empty(),
        "the extra sockets stay a while: {events:?}"
    );
    let (_, events) = run(&mut r, t + LOSER_GRACE - TICK, t + LOSER_GRACE + TICK);
    assert_eq!(events, [Event::CloseLosers]);
}
