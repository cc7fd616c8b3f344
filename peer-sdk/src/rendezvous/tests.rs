//! Unit tests of the rendezvous machine, driven with a fake clock.

use super::*;
use quic_relay::proto::Reply;

use crate::punch::{Kind, PunchPacket};

pub(super) const RELAY_RTT: Duration = Duration::from_millis(40);

pub(super) fn cfg() -> Config {
    Config {
        tcp: TcpFallback::Never,
        tcp_after: Duration::from_millis(2500),
        session: Uuid::from_u128(42),
        token: None,
        peer_id: 7,
        keepalive: Duration::from_secs(10),
        punch: true,
        direct_timeout: Duration::from_secs(1),
        relays: vec![addr("198.18.0.1:4433")],
        local: Vec::new(),
        alt_relay: false,
        local_port: 5000,
        // Birthday punching has its own tests (`birthday_tests.rs`); these keep to the
        // ordinary punch.
        birthday: false,
    }
}

pub(super) fn drain(r: &mut Rendezvous) -> Vec<Transmit> {
    std::iter::from_fn(|| r.poll_transmit()).collect()
}

pub(super) fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

pub(super) fn ack(peer: Option<SocketAddr>) -> Reply {
    Reply::Ack {
        observed: Some(addr("198.18.1.1:5000")),
        peer,
        cookie: None,
        peer_alt: None,
    }
}

/// Registers at `t0` and is answered `RELAY_RTT` later, unpaired.
pub(super) fn registered(t0: Instant) -> Rendezvous {
    let mut r = Rendezvous::new(cfg());
    r.handle_timeout(t0, t0);
    let sent = drain(&mut r);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].dst, Dest::Relay);
    r.handle_relay(t0 + RELAY_RTT, ack(None), false);
    assert!(r.status().registered);
    assert_eq!(r.relay_rtt(), Some(RELAY_RTT));
    r
}

pub(super) fn probes(t: &[Transmit]) -> Vec<(SocketAddr, Option<u32>)> {
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
    r.handle_relay(t, ack(None), false);
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
    r.handle_relay(notice, ack(Some(peer)), false);
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
    r.handle_relay(t0, ack(Some(peer)), false);
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
    r.handle_punch(t, peer, forged, None);
    r.handle_punch(t, peer, key.packet(Kind::Reply, 9, probe.nonce ^ 1), None);
    assert_eq!(r.status().path, Path::Relay);
    r.handle_punch(t, peer, key.packet(Kind::Reply, 9, probe.nonce), None);
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
    r.handle_punch(t0, reflexive, key.packet(Kind::Probe, 9, 1234), None);
    let sent = drain(&mut r);
    assert_eq!(sent.len(), 2, "a reply and a probe back");
    let reply = PunchPacket::decode(&sent[0].bytes).expect("reply");
    assert_eq!((reply.kind, reply.nonce), (Kind::Reply, 1234));
    assert_eq!(sent[1].dst, Dest::Peer(reflexive));
    // Our own probe reflected by a hairpinning NAT is ignored.
    r.handle_punch(t0, reflexive, key.packet(Kind::Probe, 7, 1), None);
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
    r.handle_relay(t0, ack(None), false);
    let public = addr("198.18.1.1:6000");
    r.handle_relay(t0, ack(Some(public)), false);
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
    assert_eq!(
        sent.iter()
            .filter(|t| t.dst == Dest::Relay && crate::candidates::Candidates::looks_like(&t.bytes))
            .count(),
        1,
        "ours again at once, now that the peer hears the relay"
    );
    let nonce = PunchPacket::decode(&sent[0].bytes).expect("probe").nonce;
    r.handle_punch(t0, lan, key.packet(Kind::Reply, 9, nonce), None);
    assert_eq!(r.status().path, Path::Direct(lan));
    // A later reply from the public address does not move us off the LAN.
    let t = t0 + SYNC_LEAD;
    r.handle_timeout(t, t);
    for p in drain(&mut r) {
        if let Some(pk) = PunchPacket::decode(&p.bytes) {
            r.handle_punch(t, public, key.packet(Kind::Reply, 9, pk.nonce), None);
        }
    }
    assert_eq!(r.status().path, Path::Direct(lan));
    // Bounded: a new peer address (back on the relay path) gets the offer again, at most
    // LAN_OFFERS times however long the peer stays unreachable.
    let mut now = t;
    r.handle_relay(now, ack(Some(addr("198.18.1.1:6001"))), false);
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
    r.handle_relay(t, ack(Some(addr("198.18.2.1:6000"))), false);
    let sent = drain(&mut r);
    assert!(probes(&sent).is_empty(), "no punching over TCP: {sent:?}");
}

/// Runs the machine from `from` to `until` with the socket silent since `last_rx`, answering
/// nothing; returns when each registration went out and the events.
fn run_unanswered(
    r: &mut Rendezvous,
    from: Instant,
    until: Instant,
    last_rx: Instant,
) -> (Vec<Duration>, Vec<Event>) {
    let (mut regs, mut events) = (Vec::new(), Vec::new());
    let mut t = from;
    while t < until {
        r.handle_timeout(t, last_rx);
        events.extend(std::iter::from_fn(|| r.poll_event()));
        for x in drain(r) {
            if x.dst == Dest::Relay && !crate::candidates::Candidates::looks_like(&x.bytes) {
                regs.push(t - from);
            }
        }
        t = r.poll_timeout(t, last_rx);
    }
    (regs, events)
}

#[test]
fn a_relay_that_stops_answering_is_left_for_the_next_one_within_seconds() {
    let (r1, r2) = (addr("198.18.0.1:4433"), addr("198.18.0.9:4433"));
    let t0 = Instant::now();
    let mut r = Rendezvous::new(Config {
        relays: vec![r1, r2],
        punch: false,
        ..cfg()
    });
    r.handle_timeout(t0, t0);
    drain(&mut r);
    r.handle_relay(t0, ack(Some(addr("198.18.2.1:6000"))), false);
    assert_eq!(r.status().relay, Some(r1));
    // The relay dies at t0 (the relayed connection falls silent): a silent re-registration at
    // 3 s, two quick retries, and the move 1 s after the first.
    let (regs, events) = run_unanswered(&mut r, t0, t0 + Duration::from_secs(5), t0);
    assert_eq!(
        events,
        [Event::SwitchRelay(r2)],
        "moved once, to the next relay"
    );
    assert_eq!(r.status().relay, Some(r2));
    assert_eq!(r.status().relay_moves, 1);
    let ms: Vec<u128> = regs.iter().map(|d| d.as_millis()).collect();
    assert_eq!(&ms[..4], [3000, 3200, 3600, 4000], "{ms:?}");
    // The new relay answers: it is kept, and keepalives follow.
    let t = t0 + Duration::from_secs(5);
    r.handle_relay(t, ack(Some(addr("198.18.2.1:6000"))), false);
    let (_, events) = run_unanswered(&mut r, t, t + Duration::from_secs(2), t);
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn a_lost_keepalive_is_retried_and_a_single_relay_is_never_left() {
    let t0 = Instant::now();
    let mut r = Rendezvous::new(Config {
        relays: vec![addr("198.18.0.1:4433"), addr("198.18.0.9:4433")],
        ..cfg()
    });
    r.handle_timeout(t0, t0);
    drain(&mut r);
    r.handle_relay(t0, ack(None), false);
    // Traffic flows (last_rx = now), the keepalive at 10 s is lost; the retry 200 ms later is
    // answered: no move.
    let mut t = t0;
    while t < t0 + cfg().keepalive {
        r.handle_timeout(t, t);
        drain(&mut r);
        t = r.poll_timeout(t, t);
    }
    r.handle_timeout(t, t);
    assert_eq!(drain(&mut r).len(), 1, "the keepalive");
    let retry = r.poll_timeout(t, t);
    assert_eq!(retry - t, REG_RETRY_MIN);
    r.handle_timeout(retry, retry);
    drain(&mut r);
    r.handle_relay(retry, ack(None), false);
    assert_eq!(r.poll_event(), None);
    // One relay only: unanswered for long, it is never left (there is nowhere to go).
    let mut one = registered(t0);
    let (_, events) = run_unanswered(&mut one, t0, t0 + Duration::from_secs(30), t0);
    assert!(events.is_empty(), "{events:?}");
}

#[test]
fn a_dual_stack_peer_registers_its_alternate_address_and_probes_the_peers() {
    let t0 = Instant::now();
    let mut r = Rendezvous::new(Config {
        alt_relay: true,
        ..cfg()
    });
    r.handle_timeout(t0, t0);
    let first = drain(&mut r);
    assert_eq!(
        first.len(),
        1,
        "no alternate before the relay knows us: {first:?}"
    );
    let reg = quic_relay::proto::parse_registration(&first[0].bytes).expect("registration");
    assert!(reg.extended.expect("extended").alt_aware, "asks for pa=");
    // Answered: the alternate registration follows at once, to the relay's other address.
    r.handle_relay(t0, ack(None), false);
    let alt = drain(&mut r);
    assert_eq!(alt.len(), 1);
    assert_eq!(alt[0].dst, Dest::RelayAlt);
    let reg = quic_relay::proto::parse_registration(&alt[0].bytes).expect("registration");
    let ext = reg.extended.expect("extended");
    assert!(ext.alt && ext.peer == Some(PeerId(7)), "{ext:?}");
    let mine = addr("[2001:db8:1:1::2]:5000");
    r.handle_relay(
        t0,
        Reply::Ack {
            observed: Some(mine),
            peer: None,
            cookie: None,
            peer_alt: None,
        },
        true,
    );
    assert_eq!(r.status().observed_alt, Some(mine));
    assert_eq!(
        r.status().observed,
        Some(addr("198.18.1.1:5000")),
        "the primary stays"
    );
    // The peer notice names the peer's alternate (IPv6) address: probed at once, low TTL first.
    let (peer, peer6) = (addr("198.18.2.1:6000"), addr("[2001:db8:2:1::2]:6000"));
    r.handle_relay(
        t0,
        Reply::Ack {
            observed: Some(addr("198.18.1.1:5000")),
            peer: Some(peer),
            cookie: None,
            peer_alt: Some(peer6),
        },
        false,
    );
    assert_eq!(r.status().peer_alt, Some(peer6));
    let sent = probes(&drain(&mut r));
    assert!(sent.contains(&(peer6, Some(LOW_TTL))), "{sent:?}");
    // Full probes go to both; a reply over IPv6 wins and is kept against IPv4 replies.
    let t = t0 + SYNC_LEAD;
    r.handle_timeout(t, t);
    let key = PunchKey::new(cfg().session);
    let round = drain(&mut r);
    assert!(probes(&round).contains(&(peer6, None)), "{round:?}");
    for p in &round {
        if let (Dest::Peer(to), Some(pk)) = (p.dst, PunchPacket::decode(&p.bytes)) {
            r.handle_punch(t, to, key.packet(Kind::Reply, 9, pk.nonce), None);
        }
    }
    assert_eq!(r.status().path, Path::Direct(peer6));
    // Keepalives re-register both addresses.
    let k = t0 + cfg().keepalive;
    r.handle_timeout(k, k);
    let dsts: Vec<Dest> = drain(&mut r)
        .iter()
        .filter(|t| !matches!(t.dst, Dest::Peer(_)))
        .map(|t| t.dst)
        .collect();
    assert_eq!(dsts, [Dest::Relay, Dest::RelayAlt]);
}

#[test]
fn a_draining_relay_met_in_a_failover_sends_the_peer_on_to_the_next() {
    let relays = [
        addr("198.18.0.1:4433"),
        addr("198.18.0.9:4433"),
        addr("198.18.0.7:4433"),
    ];
    let t0 = Instant::now();
    let mut r = Rendezvous::new(Config {
        relays: relays.to_vec(),
        ..cfg()
    });
    r.handle_timeout(t0, t0);
    drain(&mut r);
    r.handle_relay(t0, ack(None), false);
    let (_, events) = run_unanswered(&mut r, t0, t0 + Duration::from_secs(5), t0);
    assert_eq!(events, [Event::SwitchRelay(relays[1])]);
    let t = t0 + Duration::from_secs(5);
    r.handle_relay(t, Reply::Err(Some(ErrReason::Moved)), false);
    assert_eq!(r.poll_event(), Some(Event::SwitchRelay(relays[2])));
    assert_eq!(r.status().relay, Some(relays[2]));
    assert_eq!(r.status().refused, None, "moved is no refusal");
}
