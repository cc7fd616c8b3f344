//! Unit tests of the session rules, driven with a fake clock (no sockets).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::proto::{Cookie, Extended, PeerId, Registration, Reply, Token};

const U1: &str = "0b7e4a3c-5d2f-4e8a-9c1b-2a3d4e5f6071";
const U2: &str = "1c8f5b4d-6e3a-4f9b-8d2c-3b4e5f607182";

fn addr(s: &str) -> PeerAddr {
    s.parse::<SocketAddr>().expect("test address").into()
}

fn uuid(s: &str) -> Uuid {
    Uuid::parse_str(s).expect("test uuid")
}

struct Harness {
    relay: Relay,
    t0: Instant,
    now: Instant,
}

impl Harness {
    fn new() -> Self {
        Self::with(RelayConfig::default())
    }

    fn with(cfg: RelayConfig) -> Self {
        let t0 = Instant::now();
        let mut relay = Relay::new(cfg, t0);
        relay.set_wall_clock(1_700_000_000);
        Harness { relay, t0, now: t0 }
    }

    fn at(&mut self, secs: f64) {
        self.now = self.t0 + Duration::from_secs_f64(secs);
        self.relay.handle_timeout(self.now);
    }

    /// Sends a datagram and returns the outcome and every reply queued, as (dst, bytes).
    fn send(&mut self, from: &str, data: &[u8]) -> (Outcome, Vec<(PeerAddr, Vec<u8>)>) {
        self.send_as(addr(from), data)
    }

    /// Like `send`, from any member key (UDP or TCP).
    fn send_as(&mut self, from: PeerAddr, data: &[u8]) -> (Outcome, Vec<(PeerAddr, Vec<u8>)>) {
        let out = self.relay.handle(self.now, from, data);
        let mut replies = Vec::new();
        while let Some(t) = self.relay.poll_transmit() {
            assert!(
                t.payload.as_bytes().len() <= data.len(),
                "reply longer than request"
            );
            replies.push((t.dst, t.payload.as_bytes().to_vec()));
        }
        self.relay.check_invariants();
        (out, replies)
    }

    /// Registers in the original form and returns the reply sent back to the registrant.
    fn reg(&mut self, from: &str, session: &str) -> Vec<u8> {
        let (out, replies) = self.send(from, format!("REG:{session}\n").as_bytes());
        assert_eq!(out, Outcome::Registration);
        reply_to(&replies, from)
    }

    /// Registers in the extended form as the SDK does: when the ACK carries a cookie, echoes
    /// it at once. Returns the last reply to the registrant (the echo's ACK, which has no
    /// cookie) and every reply, with the registrant's first ACK replaced by that last one.
    fn reg_ext(
        &mut self,
        from: &str,
        session: &str,
        peer: u64,
    ) -> (Vec<u8>, Vec<(PeerAddr, Vec<u8>)>) {
        let replies = self.reg_ext_as(addr(from), session, peer);
        (reply_to(&replies, from), replies)
    }

    /// Sends an extended registration without echoing anything; returns the replies.
    fn reg_ext_raw(
        &mut self,
        from: PeerAddr,
        session: &str,
        peer: u64,
        cookie: Option<Cookie>,
    ) -> Vec<(PeerAddr, Vec<u8>)> {
        let reg = Registration {
            session: uuid(session),
            extended: Some(Extended {
                cookie,
                peer: Some(PeerId(peer)),
                token: None,
                alt_aware: false,
                alt: false,
            }),
        };
        let (out, replies) = self.send_as(from, &reg.encode());
        assert_eq!(out, Outcome::Registration);
        replies
    }

    fn data(&mut self, from: &str) -> Outcome {
        let (out, replies) = self.send(from, b"\x40quic payload");
        assert!(replies.is_empty(), "data must never be answered");
        out
    }
}

fn reply_to(replies: &[(PeerAddr, Vec<u8>)], to: &str) -> Vec<u8> {
    let to = addr(to);
    let mine: Vec<_> = replies.iter().filter(|(d, _)| *d == to).collect();
    assert!(
        mine.len() <= 1,
        "more than one reply to the registrant: {replies:?}"
    );
    mine.first().map(|(_, b)| b.clone()).unwrap_or_default()
}

#[test]
fn pairs_and_forwards_both_ways() {
    let mut h = Harness::new();
    assert_eq!(h.reg("198.18.0.1:1000", U1), b"ACK\n");
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Dropped(DropReason::Unpaired)
    );
    assert_eq!(h.reg("198.18.0.2:2000", U1), b"ACK\n");
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Forward(addr("198.18.0.2:2000"))
    );
    assert_eq!(
        h.data("198.18.0.2:2000"),
        Outcome::Forward(addr("198.18.0.1:1000"))
    );
    let s = h.relay.stats();
    assert_eq!((s.reg(RegResult::New), s.reg(RegResult::Join)), (1, 1));
    assert_eq!((s.forwarded_packets, s.dropped_unpaired), (2, 1));
    assert_eq!((s.sessions_paired, s.sessions_unpaired), (1, 0));
}

#[test]
fn registration_is_never_forwarded_and_keepalive_refreshes() {
    let mut h = Harness::new();
    h.reg("198.18.0.1:1000", U1);
    h.reg("198.18.0.2:2000", U1);
    // A keepalive REG from a paired member is answered, not forwarded.
    assert_eq!(h.reg("198.18.0.1:1000", U1), b"ACK\n");
    assert_eq!(h.relay.stats().reg(RegResult::Refresh), 1);
    assert_eq!(h.relay.stats().forwarded_packets, 0);
}

#[test]
fn third_peer_is_refused_and_receives_nothing() {
    let mut h = Harness::new();
    h.reg("198.18.0.1:1000", U1);
    h.reg("198.18.0.2:2000", U1);
    assert_eq!(h.reg("198.18.0.3:3000", U1), b"ERR full\n");
    assert_eq!(
        h.data("198.18.0.3:3000"),
        Outcome::Dropped(DropReason::UnknownSource)
    );
    // The members still reach only each other.
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Forward(addr("198.18.0.2:2000"))
    );
    assert_eq!(
        h.data("198.18.0.2:2000"),
        Outcome::Forward(addr("198.18.0.1:1000"))
    );
}

#[test]
fn rebinding_through_reg_moves_the_member_both_ways() {
    let mut h = Harness::new();
    h.reg("198.18.0.1:1000", U1);
    h.reg("198.18.0.2:2000", U1);
    // The first member's NAT moved it to port 1001.
    assert_eq!(h.reg("198.18.0.1:1001", U1), b"ACK\n");
    assert_eq!(h.relay.stats().reg(RegResult::Rebind), 1);
    assert_eq!(
        h.data("198.18.0.2:2000"),
        Outcome::Forward(addr("198.18.0.1:1001"))
    );
    assert_eq!(
        h.data("198.18.0.1:1001"),
        Outcome::Forward(addr("198.18.0.2:2000"))
    );
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Dropped(DropReason::UnknownSource)
    );
    // And the second member's.
    h.reg("198.18.0.2:2002", U1);
    assert_eq!(
        h.data("198.18.0.1:1001"),
        Outcome::Forward(addr("198.18.0.2:2002"))
    );
    assert_eq!(
        h.data("198.18.0.2:2002"),
        Outcome::Forward(addr("198.18.0.1:1001"))
    );
}

#[test]
fn data_from_a_new_port_never_rebinds() {
    let mut h = Harness::new();
    h.reg("198.18.0.1:1000", U1);
    h.reg("198.18.0.2:2000", U1);
    // Another host behind the same public IP (or the same peer without a REG) sends data.
    assert_eq!(
        h.data("198.18.0.1:5555"),
        Outcome::Dropped(DropReason::UnknownSource)
    );
    assert_eq!(
        h.data("198.18.0.2:2000"),
        Outcome::Forward(addr("198.18.0.1:1000"))
    );
    assert_eq!(h.relay.stats().reg(RegResult::Rebind), 0);
}

#[test]
fn re_reg_from_a_new_port_never_pairs_a_peer_with_itself() {
    let mut h = Harness::new();
    h.reg("198.18.0.1:1000", U1);
    h.reg("198.18.0.1:1001", U1);
    let s = h.relay.stats();
    assert_eq!((s.reg(RegResult::Rebind), s.reg(RegResult::Join)), (1, 0));
    assert_eq!((s.sessions_paired, s.sessions_unpaired), (0, 1));
    // The real second peer still gets the free slot.
    h.reg("198.18.0.2:2000", U1);
    assert_eq!(
        h.data("198.18.0.2:2000"),
        Outcome::Forward(addr("198.18.0.1:1001"))
    );
}

#[test]
fn two_extended_peers_behind_one_ip_pair_and_rebind_independently() {
    let mut h = Harness::new();
    let (ack, _) = h.reg_ext("198.18.0.1:1000", U1, 0xa);
    assert_eq!(ack, b"ACK 198.18.0.1:1000\n");
    let (ack, replies) = h.reg_ext("198.18.0.1:2000", U1, 0xb);
    assert_eq!(ack, b"ACK 198.18.0.1:2000 198.18.0.1:1000\n");
    // The first member hears of its peer at once (what hole punching needs).
    assert_eq!(
        reply_to(&replies, "198.18.0.1:1000"),
        b"ACK 198.18.0.1:1000 198.18.0.1:2000\n"
    );
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Forward(addr("198.18.0.1:2000"))
    );

    // The second one rebinds; the first is untouched.
    let (ack, replies) = h.reg_ext("198.18.0.1:2001", U1, 0xb);
    assert_eq!(ack, b"ACK 198.18.0.1:2001 198.18.0.1:1000\n");
    assert_eq!(
        reply_to(&replies, "198.18.0.1:1000"),
        b"ACK 198.18.0.1:1000 198.18.0.1:2001\n"
    );
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Forward(addr("198.18.0.1:2001"))
    );
    // Then the first one.
    h.reg_ext("198.18.0.1:1001", U1, 0xa);
    assert_eq!(
        h.data("198.18.0.1:2001"),
        Outcome::Forward(addr("198.18.0.1:1001"))
    );
    assert_eq!(
        h.data("198.18.0.1:1001"),
        Outcome::Forward(addr("198.18.0.1:2001"))
    );
    assert_eq!(h.relay.stats().reg(RegResult::Rebind), 2);
}

#[test]
fn original_form_cannot_take_an_extended_members_slot() {
    let mut h = Harness::new();
    h.reg_ext("198.18.0.1:1000", U1, 7);
    // Same IP, original form: a different peer (an extended one would say p=7), so it joins.
    h.reg("198.18.0.1:3000", U1);
    assert_eq!(h.relay.stats().reg(RegResult::Join), 1);
    assert_eq!(
        h.data("198.18.0.1:3000"),
        Outcome::Forward(addr("198.18.0.1:1000"))
    );
}

#[test]
fn an_address_is_in_one_session_at_a_time() {
    let mut h = Harness::new();
    h.reg("198.18.0.1:1000", U1);
    h.reg("198.18.0.2:2000", U1);
    // The first peer's socket is reused for another session: it leaves the first.
    h.reg("198.18.0.1:1000", U2);
    assert_eq!(
        h.data("198.18.0.2:2000"),
        Outcome::Dropped(DropReason::Unpaired)
    );
    assert_eq!(h.relay.session_count(), 2);
}

#[test]
fn malformed_registrations_are_refused_without_amplification() {
    let mut h = Harness::new();
    // Too short for "ERR malformed\n": no reply at all, but counted.
    let (out, replies) = h.send("198.18.0.1:1000", b"REG:");
    assert_eq!(out, Outcome::Registration);
    assert!(replies.is_empty());
    let (_, replies) = h.send("198.18.0.1:1000", b"REG:not-a-uuid-at-all\n");
    assert_eq!(reply_to(&replies, "198.18.0.1:1000"), b"ERR malformed\n");
    let (_, replies) = h.send(
        "198.18.0.1:1000",
        b"REG:\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5\xf4",
    );
    assert_eq!(reply_to(&replies, "198.18.0.1:1000"), b"ERR malformed\n");
    let s = h.relay.stats();
    assert_eq!(s.reg(RegResult::Refused(ErrReason::Malformed)), 3);
    assert_eq!(s.replies_suppressed, 1);
    // An extended registration too short for its ACK is refused before it changes anything.
    let (_, replies) = h.send("198.18.0.1:1000", format!("REG:{U1} p=1\n").as_bytes());
    assert_eq!(reply_to(&replies, "198.18.0.1:1000"), b"ERR short\n");
    assert_eq!(h.relay.session_count(), 0);
    // Garbage that is not a registration is silently dropped.
    assert_eq!(
        h.send("198.18.0.1:1000", &[0xAA; 65_000]).0,
        Outcome::Dropped(DropReason::UnknownSource)
    );
    assert_eq!(
        h.send("198.18.0.1:1000", b"").0,
        Outcome::Dropped(DropReason::UnknownSource)
    );
}

#[test]
fn a_paired_members_datagram_that_only_looks_like_reg_is_forwarded() {
    let mut h = Harness::new();
    h.reg("198.18.0.1:1000", U1);
    h.reg("198.18.0.2:2000", U1);
    let (out, replies) = h.send("198.18.0.1:1000", b"REG:\x01\x02 quic short header");
    assert_eq!(out, Outcome::Forward(addr("198.18.0.2:2000")));
    assert!(replies.is_empty());
}

#[test]
fn unpaired_sessions_expire_after_their_timeout() {
    let mut h = Harness::new();
    h.reg("198.18.0.1:1000", U1);
    h.at(29.0);
    assert_eq!(h.relay.session_count(), 1);
    h.at(30.0);
    assert_eq!(h.relay.session_count(), 0);
    assert_eq!(h.relay.stats().expired_unpaired, 1);
    // Every trace is gone: the same address starts afresh.
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Dropped(DropReason::UnknownSource)
    );
    h.relay.check_invariants();
}

#[test]
fn paired_sessions_live_while_traffic_flows_and_expire_when_idle() {
    let mut h = Harness::new();
    h.reg("198.18.0.1:1000", U1);
    h.reg("198.18.0.2:2000", U1);
    h.at(200.0);
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Forward(addr("198.18.0.2:2000"))
    );
    h.at(499.0);
    assert_eq!(
        h.relay.session_count(),
        1,
        "traffic at 200 s keeps it until 500 s"
    );
    h.at(500.0);
    assert_eq!(h.relay.session_count(), 0);
    assert_eq!(h.relay.stats().expired_paired, 1);
    assert_eq!(
        h.data("198.18.0.2:2000"),
        Outcome::Dropped(DropReason::UnknownSource)
    );
}

#[test]
fn session_capacity_and_per_ip_limits() {
    let mut h = Harness::with(RelayConfig {
        limits: Limits {
            max_sessions: 3,
            max_sessions_per_ip: 2,
            ..Limits::default()
        },
        ..RelayConfig::default()
    });
    let ids: Vec<String> = (1..6u128)
        .map(|i| Uuid::from_u128(i << 64 | i).to_string())
        .collect();
    assert_eq!(h.reg("198.18.0.1:1", &ids[0]), b"ACK\n");
    assert_eq!(h.reg("198.18.0.1:2", &ids[1]), b"ACK\n");
    assert_eq!(h.reg("198.18.0.1:3", &ids[2]), b"ERR ip-limit\n");
    assert_eq!(h.reg("198.18.0.2:1", &ids[2]), b"ACK\n");
    // Full, with nothing to evict: every session heard a second registration.
    for (from, id) in [
        ("198.18.0.1:1", 0),
        ("198.18.0.1:2", 1),
        ("198.18.0.2:1", 2),
    ] {
        assert_eq!(h.reg(from, &ids[id]), b"ACK\n");
    }
    assert_eq!(h.reg("198.18.0.3:1", &ids[3]), b"ERR capacity\n");
    // Joining an existing session is bounded per IP too.
    assert_eq!(h.reg("198.18.0.1:4", &ids[2]), b"ERR ip-limit\n");
    assert_eq!(h.relay.session_count(), 3);
}

#[test]
fn a_full_table_evicts_the_oldest_unconfirmed_session_never_a_paired_or_waiting_one() {
    let mut h = Harness::with(RelayConfig {
        limits: Limits {
            max_sessions: 4,
            ..Limits::default()
        },
        ..RelayConfig::default()
    });
    let ids: Vec<String> = (1..9u128)
        .map(|i| Uuid::from_u128(i << 64 | i).to_string())
        .collect();
    // A paired session, a waiting peer that re-registered, and two one-shot registrations.
    assert_eq!(h.reg("198.18.0.1:1", &ids[0]), b"ACK\n");
    assert_eq!(h.reg("198.18.0.2:1", &ids[0]), b"ACK\n");
    assert_eq!(h.reg("198.18.0.1:2", &ids[1]), b"ACK\n");
    assert_eq!(h.reg("198.18.0.9:1", &ids[2]), b"ACK\n");
    assert_eq!(h.reg("198.18.0.9:2", &ids[3]), b"ACK\n");
    assert_eq!(h.reg("198.18.0.1:2", &ids[1]), b"ACK\n");
    // Full: newcomers take the places of the one-shot sessions, oldest first.
    assert_eq!(h.reg("198.18.0.3:1", &ids[4]), b"ACK\n");
    assert_eq!(h.relay.stats().evicted_unconfirmed, 1);
    assert_eq!(
        h.data("198.18.0.9:1"),
        Outcome::Dropped(DropReason::UnknownSource),
        "the oldest one-shot session went first"
    );
    assert_eq!(
        h.data("198.18.0.9:2"),
        Outcome::Dropped(DropReason::Unpaired),
        "the younger one is still there"
    );
    assert_eq!(h.reg("198.18.0.3:2", &ids[5]), b"ACK\n");
    assert_eq!(h.reg("198.18.0.3:3", &ids[6]), b"ACK\n");
    assert_eq!(h.relay.stats().evicted_unconfirmed, 3);
    // Now the oldest unconfirmed ones are the newcomers themselves; the pair and the waiting
    // peer are untouched.
    assert_eq!(
        h.data("198.18.0.1:1"),
        Outcome::Forward(addr("198.18.0.2:1"))
    );
    assert_eq!(
        h.reg("198.18.0.4:1", &ids[1]),
        b"ACK\n",
        "the waiting peer pairs"
    );
    assert_eq!(h.relay.session_count(), 4);
    h.relay.check_invariants();
}

#[test]
fn ipv6_sources_count_per_64_for_the_per_ip_limits() {
    let mut h = Harness::with(RelayConfig {
        limits: Limits {
            max_sessions_per_ip: 2,
            ..Limits::default()
        },
        ..RelayConfig::default()
    });
    let ids: Vec<String> = (1..6u128)
        .map(|i| Uuid::from_u128(i << 64 | i).to_string())
        .collect();
    assert_eq!(h.reg("[2001:db8:0:1::1]:1", &ids[0]), b"ACK\n");
    assert_eq!(h.reg("[2001:db8:0:1::2]:1", &ids[1]), b"ACK\n");
    assert_eq!(
        h.reg("[2001:db8:0:1:ffff::3]:1", &ids[2]),
        b"ERR ip-limit\n",
        "another address in the same /64 is the same source"
    );
    assert_eq!(
        h.reg("[2001:db8:0:2::1]:1", &ids[2]),
        b"ACK\n",
        "the next /64 is not"
    );
    assert_eq!(ip_limit_key(addr("[2001:db8:0:1:ab::cd]:1").ip_octets()), {
        let mut k = addr("[2001:db8:0:1::]:1").ip_octets();
        k[8..].fill(0);
        k
    });
    // IPv4 counts per address, as before.
    let v4 = addr("198.18.0.1:1").ip_octets();
    assert_eq!(ip_limit_key(v4), v4);
    h.relay.check_invariants();
}

#[test]
fn an_extended_member_is_forwarded_to_only_after_echoing_its_cookie() {
    let mut h = Harness::new();
    let victim = addr("198.18.0.66:53");
    let attacker = addr("198.18.0.1:1000");
    // A spoofed registration claims the victim's address: it is acknowledged (to the victim,
    // no larger than the request) but never forwarded to.
    let replies = h.reg_ext_raw(victim, U1, 2, None);
    let Some(Reply::Ack {
        cookie: Some(c), ..
    }) = Reply::parse(&reply_to(&replies, "198.18.0.66:53"))
    else {
        panic!("the ACK to an unverified member carries a cookie: {replies:?}");
    };
    h.reg_ext("198.18.0.1:1000", U1, 1);
    assert_eq!(
        h.send_as(attacker, b"\x40flood").0,
        Outcome::Dropped(DropReason::Unverified)
    );
    assert_eq!(h.relay.stats().dropped_unverified, 1);
    // A wrong cookie, or the victim's cookie from another address, does not verify.
    h.reg_ext_raw(victim, U1, 2, Some(Cookie(c.0 ^ 1)));
    h.reg_ext_raw(addr("198.18.0.66:54"), U1, 2, Some(c));
    assert_eq!(h.relay.stats().cookies_rejected, 2);
    assert_eq!(
        h.send_as(attacker, b"\x40flood").0,
        Outcome::Dropped(DropReason::Unverified)
    );
    // The real owner of an address echoes the cookie it received, and is forwarded to.
    let mut h = Harness::new();
    h.reg_ext("198.18.0.1:1000", U1, 1);
    let replies = h.reg_ext_raw(addr("198.18.0.2:2000"), U1, 2, None);
    let Some(Reply::Ack {
        cookie: Some(c), ..
    }) = Reply::parse(&reply_to(&replies, "198.18.0.2:2000"))
    else {
        panic!("no cookie: {replies:?}");
    };
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Dropped(DropReason::Unverified)
    );
    h.reg_ext_raw(addr("198.18.0.2:2000"), U1, 2, Some(c));
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Forward(addr("198.18.0.2:2000"))
    );
    // A keepalive from the same address keeps the proof; a move to a new address needs a new
    // one, and the cookie stays valid for at least one COOKIE_PERIOD.
    h.reg_ext_raw(addr("198.18.0.2:2000"), U1, 2, None);
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Forward(addr("198.18.0.2:2000"))
    );
    h.reg_ext_raw(addr("198.18.0.2:2001"), U1, 2, None);
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Dropped(DropReason::Unverified)
    );
    h.at(crate::defaults::COOKIE_PERIOD.as_secs_f64() * 3.0);
    let replies = h.reg_ext_raw(addr("198.18.0.2:2001"), U1, 2, None);
    let Some(Reply::Ack {
        cookie: Some(c), ..
    }) = Reply::parse(&reply_to(&replies, "198.18.0.2:2001"))
    else {
        panic!("no cookie: {replies:?}");
    };
    h.at(crate::defaults::COOKIE_PERIOD.as_secs_f64() * 4.0);
    h.reg_ext_raw(addr("198.18.0.2:2001"), U1, 2, Some(c));
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Forward(addr("198.18.0.2:2001"))
    );
    // Original-form members are forwarded to at once, as the original relay did.
    assert_eq!(h.reg("198.18.0.5:1", U2), b"ACK\n");
    assert_eq!(h.reg("198.18.0.6:1", U2), b"ACK\n");
    assert_eq!(
        h.data("198.18.0.5:1"),
        Outcome::Forward(addr("198.18.0.6:1"))
    );
    h.relay.check_invariants();
}

#[test]
fn an_older_clients_short_registration_gets_its_addresses_without_a_cookie() {
    let mut h = Harness::new();
    // Padded to MAX_REPLY_LEN only, as clients before cookies did; IPv6 addresses this long
    // leave no room for the cookie in a reply no larger than the request.
    let long = "[2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff]:65535";
    let other = "[2001:db8:aaaa:bbbb:cccc:dddd:eeee:fffe]:65535";
    h.reg_ext(other, U1, 2);
    let mut reg = format!("REG:{U1} p=1 pad=").into_bytes();
    reg.resize(crate::proto::MAX_REPLY_LEN - 1, b'0');
    reg.push(b'\n');
    let (_, replies) = h.send(long, &reg);
    assert_eq!(
        Reply::parse(&reply_to(&replies, long)),
        Some(Reply::Ack {
            observed: Some(long.parse().expect("addr")),
            peer: Some(other.parse().expect("addr")),
            cookie: None,
            peer_alt: None,
        })
    );
}

#[test]
fn registration_rate_is_limited_per_ip_and_recovers() {
    let mut h = Harness::with(RelayConfig {
        limits: Limits {
            reg_rate_per_ip: 10,
            reg_burst_per_ip: 5,
            ..Limits::default()
        },
        ..RelayConfig::default()
    });
    for _ in 0..5 {
        assert_eq!(h.reg("198.18.0.1:1000", U1), b"ACK\n");
    }
    assert_eq!(h.reg("198.18.0.1:1000", U1), b"ERR rate\n");
    // Another IP is unaffected.
    assert_eq!(h.reg("198.18.0.2:1000", U1), b"ACK\n");
    h.at(0.2); // two tokens back at 10/s
    assert_eq!(h.reg("198.18.0.1:1000", U1), b"ACK\n");
    assert_eq!(h.relay.stats().reg(RegResult::Refused(ErrReason::Rate)), 1);
}

#[test]
fn tokens_accept_refuse_and_expire() {
    let secret = b"0123456789abcdef0123".to_vec();
    let mut h = Harness::with(RelayConfig {
        secrets: vec![secret.clone()],
        ..RelayConfig::default()
    });
    let now = 1_700_000_000;
    let reg = |expiry, key: &[u8]| Registration {
        session: uuid(U1),
        extended: Some(Extended {
            cookie: None,
            peer: Some(PeerId(1)),
            token: Some(Token::mint(key, uuid(U1), expiry)),
            alt_aware: false,
            alt: false,
        }),
    };
    // The original form cannot carry a token.
    assert_eq!(h.reg("198.18.0.1:1000", U1), b"ERR auth\n");
    let (_, r) = h.send(
        "198.18.0.1:1000",
        &reg(now + 60, b"wrong secret wrong secret").encode(),
    );
    assert_eq!(reply_to(&r, "198.18.0.1:1000"), b"ERR auth\n");
    let (_, r) = h.send("198.18.0.1:1000", &reg(now - 1, &secret).encode());
    assert_eq!(reply_to(&r, "198.18.0.1:1000"), b"ERR expired\n");
    // A token for another session does not open this one.
    let mut other = reg(now + 60, &secret);
    other.session = uuid(U2);
    other.extended.as_mut().expect("extended").token =
        Some(Token::mint(&secret, uuid(U1), now + 60));
    let (_, r) = h.send("198.18.0.1:1000", &other.encode());
    assert_eq!(reply_to(&r, "198.18.0.1:1000"), b"ERR auth\n");
    assert_eq!(h.relay.session_count(), 0);
    let (_, r) = h.send("198.18.0.1:1000", &reg(now + 60, &secret).encode());
    assert!(
        reply_to(&r, "198.18.0.1:1000").starts_with(b"ACK 198.18.0.1:1000 c="),
        "{r:?}"
    );
    let s = h.relay.stats();
    assert_eq!(s.reg(RegResult::Refused(ErrReason::Auth)), 3);
    assert_eq!(s.reg(RegResult::Refused(ErrReason::Expired)), 1);
}

#[test]
fn a_member_cannot_claim_the_other_members_peer_id() {
    let mut h = Harness::new();
    h.reg_ext("198.18.0.1:1000", U1, 1);
    h.reg_ext("198.18.0.2:2000", U1, 2);
    let (ack, _) = h.reg_ext("198.18.0.2:2000", U1, 1);
    assert_eq!(ack, b"ERR full\n");
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Forward(addr("198.18.0.2:2000"))
    );
}

#[test]
fn ipv6_and_ipv4_members_share_a_session() {
    let mut h = Harness::new();
    h.reg("[2001:db8::1]:1000", U1);
    h.reg("198.18.0.2:2000", U1);
    assert_eq!(
        h.data("[2001:db8::1]:1000"),
        Outcome::Forward(addr("198.18.0.2:2000"))
    );
    // An IPv4-mapped source is the same peer as its IPv4 form.
    assert_eq!(
        h.data("[::ffff:198.18.0.2]:2000"),
        Outcome::Forward(addr("[2001:db8::1]:1000"))
    );
}

#[test]
fn sweeping_a_large_table_in_slices_still_expires_everything_within_a_second() {
    let mut h = Harness::with(RelayConfig {
        limits: Limits {
            max_sessions: 100_000,
            max_sessions_per_ip: 100_000,
            reg_rate_per_ip: 1_000_000,
            reg_burst_per_ip: 1_000_000,
        },
        ..RelayConfig::default()
    });
    for i in 0..20_000u32 {
        // Straight to the state machine: the harness's per-step invariant check is O(n).
        let from = addr(&format!("198.18.{}.{}:1000", i >> 8 & 0xff, i & 0xff));
        let reg = format!("REG:{}\n", Uuid::from_u128(u128::from(i) + 1));
        assert_eq!(
            h.relay.handle(h.now, from, reg.as_bytes()),
            Outcome::Registration
        );
        h.relay.poll_transmit().expect("ACK");
    }
    assert_eq!(h.relay.session_count(), 20_000);
    let mut t = 30.0;
    while h.relay.session_count() > 0 {
        t += 0.1;
        h.at(t);
        assert!(
            t <= 31.05,
            "sessions left after a full sweep period: {}",
            h.relay.session_count()
        );
    }
    h.relay.check_invariants();
}

#[test]
fn a_flood_of_random_registrations_stays_within_every_bound() {
    let mut h = Harness::with(RelayConfig {
        limits: Limits {
            max_sessions: 5_000,
            max_sessions_per_ip: 8,
            ..Limits::default()
        },
        ..RelayConfig::default()
    });
    // xorshift64*: reproducible pseudo-random UUIDs, IPs and ports without a dependency.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    // More distinct IPs than the rate table holds: idle entries are swept to make room.
    let n = 2 * MAX_RATE_ENTRIES + 20_000;
    for i in 0..n {
        let r = next();
        // Half from a few "CGNAT" IPs on random ports, half from random spoofed IPs.
        let ip = if i % 2 == 0 {
            [198, 18, 0, (r & 3) as u8]
        } else {
            (r as u32 | 1).to_be_bytes()
        };
        let src = PeerAddr::new(std::net::Ipv4Addr::from(ip).into(), (r >> 32) as u16);
        let reg = format!("REG:{}\n", Uuid::from_u64_pair(next(), next()));
        assert_eq!(
            h.relay.handle(h.now, src, reg.as_bytes()),
            Outcome::Registration
        );
        while h.relay.poll_transmit().is_some() {}
        if i % 20_000 == 0 {
            h.now += Duration::from_millis(10);
            h.relay.handle_timeout(h.now);
        }
    }
    h.relay.check_invariants();
    let s = h.relay.stats();
    assert_eq!(h.relay.session_count(), 5_000, "the session cap holds");
    assert!(h.relay.per_ip.len() <= 5_000 * 2);
    assert!(h.relay.rate.len() <= MAX_RATE_ENTRIES);
    // A full table makes room by evicting the oldest flood sessions, instead of refusing.
    assert!(s.evicted_unconfirmed > 50_000, "{s:?}");
    assert_eq!(s.reg(RegResult::Refused(ErrReason::Capacity)), 0);
    assert!(h.relay.young.len() <= 10_001);
    assert!(
        s.reg(RegResult::Refused(ErrReason::Rate)) > 0,
        "the CGNAT IPs hit their rate"
    );
    assert!(
        s.reg(RegResult::Refused(ErrReason::IpLimit)) > 0,
        "the CGNAT IPs hit their cap"
    );
    // All of it is unpaired: it is gone within a sweep period after the unpaired timeout.
    for tick in 0..=15 {
        h.at(30.5 + f64::from(tick) / 10.0);
    }
    assert_eq!(h.relay.session_count(), 0);
    assert!(h.relay.per_ip.is_empty() && h.relay.by_addr.is_empty());
    h.relay.check_invariants();
}

#[test]
fn bye_releases_the_slot_only_for_the_member_itself() {
    let mut h = Harness::new();
    h.reg_ext("198.18.0.1:1000", U1, 1);
    h.reg_ext("198.18.0.2:2000", U1, 2);
    let bye = |peer| {
        crate::proto::Bye {
            session: uuid(U1),
            peer: Some(PeerId(peer)),
        }
        .encode()
    };
    // Not from the member's address, wrong peer id, wrong session: ignored, and never answered.
    for (from, data) in [
        ("198.18.0.3:3000", bye(1)),
        ("198.18.0.1:1000", bye(2)),
        (
            "198.18.0.1:1000",
            crate::proto::Bye {
                session: uuid(U2),
                peer: Some(PeerId(1)),
            }
            .encode(),
        ),
    ] {
        let (out, replies) = h.send(from, &data);
        assert_eq!(out, Outcome::Registration);
        assert!(replies.is_empty());
    }
    assert_eq!(h.relay.stats().byes_ignored, 3);
    assert_eq!(h.relay.stats().sessions_paired, 1);
    let (_, replies) = h.send("198.18.0.1:1000", &bye(1));
    assert!(replies.is_empty());
    assert_eq!(h.relay.stats().byes, 1);
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Dropped(DropReason::UnknownSource)
    );
    // The session takes a new peer at once.
    let (ack, _) = h.reg_ext("198.18.0.3:3000", U1, 3);
    assert_eq!(ack, b"ACK 198.18.0.3:3000 198.18.0.2:2000\n");
}

#[test]
fn a_member_silent_for_the_unpaired_timeout_can_be_replaced() {
    let mut h = Harness::new();
    h.reg("198.18.0.1:1000", U1);
    h.reg("198.18.0.2:2000", U1);
    // The second peer keeps the session alive; the first one crashed at t=0.
    for t in [10.0, 20.0, 29.0] {
        h.at(t);
        h.reg("198.18.0.2:2000", U1);
    }
    assert_eq!(
        h.reg("198.18.0.3:3000", U1),
        b"ERR full\n",
        "29 s of silence is not yet stale"
    );
    h.at(30.0);
    assert_eq!(h.reg("198.18.0.3:3000", U1), b"ACK\n");
    assert_eq!(h.relay.stats().stale_replaced, 1);
    assert_eq!(
        h.data("198.18.0.2:2000"),
        Outcome::Forward(addr("198.18.0.3:3000"))
    );
    assert_eq!(
        h.data("198.18.0.1:1000"),
        Outcome::Dropped(DropReason::UnknownSource)
    );
}

// ---- TCP members (PROTOCOL.md §11) ----

fn tcp(s: &str) -> PeerAddr {
    PeerAddr::tcp(s.parse().expect("test address"))
}

impl Harness {
    /// [`Harness::reg_ext`] from any member key.
    fn reg_ext_as(&mut self, from: PeerAddr, session: &str, peer: u64) -> Vec<(PeerAddr, Vec<u8>)> {
        let mut replies = self.reg_ext_raw(from, session, peer, None);
        let cookie = replies.iter().find_map(|(d, b)| match Reply::parse(b) {
            Some(Reply::Ack {
                cookie: Some(c), ..
            }) if *d == from => Some(c),
            _ => None,
        });
        if let Some(c) = cookie {
            let echo = self.reg_ext_raw(from, session, peer, Some(c));
            let last = echo
                .iter()
                .find(|(d, _)| *d == from)
                .expect("the echo is acknowledged")
                .clone();
            assert!(
                matches!(Reply::parse(&last.1), Some(Reply::Ack { cookie: None, .. })),
                "an echoed cookie verifies the member: {echo:?}"
            );
            for r in replies.iter_mut().filter(|(d, _)| *d == from) {
                *r = last.clone();
            }
        }
        replies
    }
}

#[test]
fn a_tcp_member_pairs_with_a_udp_member_and_both_directions_forward() {
    let mut h = Harness::new();
    let t = tcp("198.18.0.1:40000");
    let replies = h.reg_ext_as(t, U1, 1);
    assert_eq!(
        replies,
        vec![(t, b"ACK 198.18.0.1:40000\n".to_vec())],
        "ACK goes to the TCP member"
    );
    let u = addr("198.18.0.2:50000");
    let replies = h.reg_ext_as(u, U1, 2);
    assert!(replies.contains(&(u, b"ACK 198.18.0.2:50000 198.18.0.1:40000\n".to_vec())));
    assert!(
        replies.contains(&(t, b"ACK 198.18.0.1:40000 198.18.0.2:50000\n".to_vec())),
        "the TCP member gets its peer notice: {replies:?}"
    );
    assert_eq!(h.send_as(t, b"\x40up").0, Outcome::Forward(u));
    assert_eq!(h.send_as(u, b"\x40down").0, Outcome::Forward(t));
    assert_eq!(h.relay.stats().forwarded_packets, 2);
}

#[test]
fn a_udp_address_with_a_tcp_members_ip_and_port_is_a_stranger() {
    let mut h = Harness::new();
    let t = tcp("198.18.0.1:40000");
    let twin = addr("198.18.0.1:40000");
    h.send_as(t, format!("REG:{U1}\n").as_bytes());
    h.reg("198.18.0.2:50000", U1);
    // Data from the UDP look-alike is not the TCP member's.
    assert_eq!(
        h.send_as(twin, b"\x40hijack").0,
        Outcome::Dropped(DropReason::UnknownSource)
    );
    // A REG from it without a peer id does not move the TCP member (same IP and port number).
    let (_, replies) = h.send_as(twin, format!("REG:{U1}\n").as_bytes());
    assert_eq!(replies, vec![(twin, b"ERR full\n".to_vec())]);
    // Nor does another TCP connection from the same IP.
    let (_, replies) = h.send_as(tcp("198.18.0.1:40001"), format!("REG:{U1}\n").as_bytes());
    assert_eq!(replies[0].1, b"ERR full\n");
    assert_eq!(
        h.send_as(t, b"\x40mine").0,
        Outcome::Forward(addr("198.18.0.2:50000"))
    );
    // And a TCP REG never takes a UDP original member's slot by IP alone.
    let mut h = Harness::new();
    h.reg("198.18.0.1:40000", U2);
    h.reg("198.18.0.2:50000", U2);
    let (_, replies) = h.send_as(tcp("198.18.0.1:40000"), format!("REG:{U2}\n").as_bytes());
    assert_eq!(replies[0].1, b"ERR full\n");
}

#[test]
fn a_peer_id_moves_a_member_from_udp_to_tcp_and_back() {
    let mut h = Harness::new();
    let udp_a = addr("198.18.0.1:40000");
    let tcp_a = tcp("198.18.0.1:51000");
    let b = addr("198.18.0.2:50000");
    h.reg_ext_as(udp_a, U1, 7);
    h.reg_ext_as(b, U1, 8);
    // The SDK's fallback: same peer id, now over TCP.
    h.reg_ext_as(tcp_a, U1, 7);
    assert_eq!(h.relay.stats().reg(RegResult::Rebind), 1);
    assert_eq!(h.send_as(b, b"\x40x").0, Outcome::Forward(tcp_a));
    assert_eq!(
        h.send_as(udp_a, b"\x40x").0,
        Outcome::Dropped(DropReason::UnknownSource)
    );
    // Back to UDP (from a new port): the TCP connection no longer speaks for the member.
    let udp_a2 = addr("198.18.0.1:40002");
    h.reg_ext_as(udp_a2, U1, 7);
    assert_eq!(h.send_as(b, b"\x40x").0, Outcome::Forward(udp_a2));
    assert_eq!(
        h.send_as(tcp_a, b"\x40x").0,
        Outcome::Dropped(DropReason::UnknownSource)
    );
    // Its connection closing now changes nothing.
    assert!(!h.relay.disconnect(tcp_a));
    h.relay.check_invariants();
}

#[test]
fn a_closed_connection_leaves_its_session_and_the_rest_expires_as_usual() {
    let mut h = Harness::new();
    let t = tcp("198.18.0.1:40000");
    h.reg_ext_as(t, U1, 1);
    h.reg_ext_as(addr("198.18.0.2:50000"), U1, 2);
    assert!(h.relay.disconnect(t));
    h.relay.check_invariants();
    assert_eq!(h.relay.stats().tcp_left, 1);
    assert_eq!(h.relay.stats().sessions_unpaired, 1);
    assert_eq!(
        h.data("198.18.0.2:50000"),
        Outcome::Dropped(DropReason::Unpaired)
    );
    // A new connection from the very same IP and port is a stranger until it registers.
    assert_eq!(
        h.send_as(t, b"\x40x").0,
        Outcome::Dropped(DropReason::UnknownSource)
    );
    // The remaining member's session expires after the unpaired timeout (fake clock).
    h.at(29.0);
    assert_eq!(h.relay.session_count(), 1);
    h.at(32.5);
    assert_eq!(h.relay.session_count(), 0);
    h.relay.check_invariants();
}

/// An extended registration with `ax=1` (reads `pa=`), or `alt=1` (an alternate address).
fn alt_reg(session: &str, peer: u64, alt: bool, cookie: Option<Cookie>) -> Vec<u8> {
    Registration {
        session: uuid(session),
        extended: Some(Extended {
            cookie,
            peer: Some(PeerId(peer)),
            token: None,
            alt_aware: true,
            alt,
        }),
    }
    .encode()
}

/// Registers `from` with `ax=1` and echoes the cookie; returns the last reply to `from`.
fn reg_alt_aware(h: &mut Harness, from: &str, session: &str, peer: u64) -> Vec<u8> {
    let (_, replies) = h.send(from, &alt_reg(session, peer, false, None));
    let first = reply_to(&replies, from);
    match Reply::parse(&first) {
        Some(Reply::Ack {
            cookie: Some(c), ..
        }) => reply_to(
            &h.send(from, &alt_reg(session, peer, false, Some(c))).1,
            from,
        ),
        _ => first,
    }
}

fn ack_of(bytes: &[u8]) -> (Option<SocketAddr>, Option<SocketAddr>, Option<SocketAddr>) {
    match Reply::parse(bytes) {
        Some(Reply::Ack {
            observed,
            peer,
            peer_alt,
            ..
        }) => (observed, peer, peer_alt),
        other => panic!(
            "not an ACK: {other:?} ({:?})",
            String::from_utf8_lossy(bytes)
        ),
    }
}

#[test]
fn an_alternate_registration_is_reported_to_the_peer_and_never_becomes_a_member() {
    let mut h = Harness::new();
    let (a4, a6) = ("198.18.1.1:5000", "[2001:db8:1:1::2]:5000");
    let (b4, b6) = ("198.18.2.1:6000", "[2001:db8:2:1::2]:6000");
    reg_alt_aware(&mut h, a4, U1, 0xa);
    // A's IPv6 address as its alternate: answered with what the relay sees there.
    let (out, replies) = h.send(a6, &alt_reg(U1, 0xa, true, None));
    assert_eq!(out, Outcome::Registration);
    assert_eq!(
        ack_of(&reply_to(&replies, a6)).0,
        Some(addr(a6).to_socket_addr())
    );
    assert_eq!(h.relay.stats().reg(RegResult::Alt), 1);
    assert!(
        !h.relay.is_member(addr(a6)),
        "an alternate address is no member"
    );
    // B joins: its ACK names A's primary and A's alternate; A's notice has no alternate for B.
    let to_b = ack_of(&reg_alt_aware(&mut h, b4, U1, 0xb));
    assert_eq!(to_b.1, Some(addr(a4).to_socket_addr()));
    assert_eq!(to_b.2, Some(addr(a6).to_socket_addr()));
    // B registers its alternate: A is told at once (a peer notice), and B's ACK there names A's.
    let (_, replies) = h.send(b6, &alt_reg(U1, 0xb, true, None));
    assert_eq!(
        ack_of(&reply_to(&replies, b6)).2,
        Some(addr(a6).to_socket_addr())
    );
    let to_a = ack_of(&reply_to(&replies, a4));
    assert_eq!(to_a.1, Some(addr(b4).to_socket_addr()));
    assert_eq!(to_a.2, Some(addr(b6).to_socket_addr()));
    // The same alternate again (a keepalive) notifies nobody.
    let (_, replies) = h.send(b6, &alt_reg(U1, 0xb, true, None));
    assert_eq!(replies.len(), 1, "{replies:?}");
    // Nothing is forwarded from (or to) an alternate address.
    assert_eq!(h.data(a6), Outcome::Dropped(DropReason::UnknownSource));
    assert_eq!(h.data(a4), Outcome::Forward(addr(b4)));
    // A client that did not ask (`ax=1`) never gets `pa=` (older parsers refuse it).
    let (_, replies) = h.reg_ext("198.18.3.1:7000", U2, 0xc);
    assert!(!String::from_utf8_lossy(&replies[0].1).contains("pa="));
}

#[test]
fn an_alternate_registration_needs_a_member_and_leaves_with_it() {
    let mut h = Harness::new();
    let a6 = "[2001:db8:1:1::2]:5000";
    // No session, or no member with that peer id: refused, nothing created.
    let (_, replies) = h.send(a6, &alt_reg(U1, 0xa, true, None));
    assert_eq!(
        Reply::parse(&reply_to(&replies, a6)),
        Some(Reply::Err(Some(ErrReason::NoMember)))
    );
    assert_eq!(h.relay.session_count(), 0);
    reg_alt_aware(&mut h, "198.18.1.1:5000", U1, 0xa);
    let (_, replies) = h.send(a6, &alt_reg(U1, 0xb, true, None));
    assert_eq!(
        Reply::parse(&reply_to(&replies, a6)),
        Some(Reply::Err(Some(ErrReason::NoMember)))
    );
    // Without a peer id it does not parse at all.
    let (_, replies) = h.send(
        a6,
        format!("REG:{U1} alt=1 pad={}\n", "0".repeat(120)).as_bytes(),
    );
    assert_eq!(
        Reply::parse(&reply_to(&replies, a6)),
        Some(Reply::Err(Some(ErrReason::Malformed)))
    );
    // Accepted, then the member leaves: the alternate goes with it (the invariants check that
    // no alternate outlives its member after every datagram).
    h.send(a6, &alt_reg(U1, 0xa, true, None));
    let bye = proto::Bye {
        session: uuid(U1),
        peer: Some(PeerId(0xa)),
    };
    h.send("198.18.1.1:5000", &bye.encode());
    assert_eq!(h.relay.session_count(), 0);
    // A new member in the recycled record starts without one.
    reg_alt_aware(&mut h, "198.18.2.1:6000", U2, 0xb);
    let to_c = ack_of(&reg_alt_aware(&mut h, "198.18.3.1:7000", U2, 0xc));
    assert_eq!(to_c.1, Some(addr("198.18.2.1:6000").to_socket_addr()));
    assert_eq!(to_c.2, None);
}

#[test]
fn the_peers_alternate_address_is_dropped_before_the_cookie_when_the_request_is_short() {
    let mut h = Harness::new();
    // Long IPv6 addresses: the whole ACK would not fit a cookie-sized request.
    let (a4, a6, b4) = (
        "[2001:db8:1:1:ffff:ffff:ffff:ffff]:65001",
        "198.18.1.1:5000",
        "[2001:db8:2:1:ffff:ffff:ffff:ffff]:65000",
    );
    reg_alt_aware(&mut h, a4, U1, 0xa);
    h.send(a6, &alt_reg(U1, 0xa, true, None));
    // B asks for `pa=` but pads only to the cookie length: it gets its cookie, not `pa=`.
    let mut short = alt_reg(U1, 0xb, false, None);
    short.truncate(proto::MAX_COOKIE_REPLY_LEN - 1);
    short.push(b'\n');
    let (_, replies) = h.send(b4, &short);
    let bytes = reply_to(&replies, b4);
    assert!(bytes.len() <= short.len());
    assert!(
        matches!(
            Reply::parse(&bytes),
            Some(Reply::Ack {
                cookie: Some(_),
                peer_alt: None,
                ..
            })
        ),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
}

#[test]
fn a_draining_relay_refuses_new_sessions_and_keeps_existing_ones() {
    let mut h = Harness::new();
    h.reg_ext("198.18.1.1:5000", U1, 0xa);
    h.relay.set_draining(true);
    assert!(h.relay.draining());
    // A new session: moved.
    let (bytes, _) = h.reg_ext("198.18.3.1:7000", U2, 0xc);
    assert_eq!(
        Reply::parse(&bytes),
        Some(Reply::Err(Some(ErrReason::Moved)))
    );
    assert_eq!(h.relay.stats().reg(RegResult::Refused(ErrReason::Moved)), 1);
    // The existing one: its second peer still joins, both refresh, data flows.
    let (bytes, _) = h.reg_ext("198.18.2.1:6000", U1, 0xb);
    assert_eq!(
        ack_of(&bytes).1,
        Some(addr("198.18.1.1:5000").to_socket_addr())
    );
    let (bytes, _) = h.reg_ext("198.18.1.1:5000", U1, 0xa);
    assert!(matches!(Reply::parse(&bytes), Some(Reply::Ack { .. })));
    assert_eq!(
        h.data("198.18.1.1:5000"),
        Outcome::Forward(addr("198.18.2.1:6000"))
    );
    // Drained no longer: new sessions are welcome again.
    h.relay.set_draining(false);
    let (bytes, _) = h.reg_ext("198.18.3.1:7000", U2, 0xc);
    assert!(matches!(Reply::parse(&bytes), Some(Reply::Ack { .. })));
}
