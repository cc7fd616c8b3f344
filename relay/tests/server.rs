//! The relay on real loopback sockets: pairing, forwarding, rebinding, refusals, expiry, IPv6.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use quic_relay::proto::{Extended, PeerId, Registration, Reply, Token, Uuid};
use quic_relay::server::{Server, ServerHandle};
use quic_relay::sessions::{Limits, RegResult, RelayConfig, Stats};

const WAIT: Duration = Duration::from_secs(5);

fn start(cfg: RelayConfig, bind: &str) -> ServerHandle {
    let server =
        Server::bind(bind.parse().expect("bind address"), cfg, 1 << 20).expect("bind relay");
    server.spawn().expect("spawn relay")
}

fn relay_v4() -> (ServerHandle, SocketAddr) {
    let h = start(RelayConfig::default(), "127.0.0.1:0");
    let a = h.local_addr();
    (h, a)
}

/// A peer socket with a receive timeout, so a missing datagram fails the test instead of hanging.
fn peer(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).expect("bind peer");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s
}

fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    let (n, from) = s.recv_from(&mut buf).expect("expected a datagram");
    buf.truncate(n);
    (buf, from)
}

/// Returns whatever is already queued on `s` without waiting.
fn queued(s: &UdpSocket) -> Option<Vec<u8>> {
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = vec![0u8; 65_536];
    let r = s.recv(&mut buf).ok().map(|n| buf[..n].to_vec());
    s.set_nonblocking(false).expect("blocking");
    r
}

fn reg(s: &UdpSocket, relay: SocketAddr, session: Uuid) -> Vec<u8> {
    s.send_to(format!("REG:{session}\n").as_bytes(), relay)
        .expect("send REG");
    recv(s).0
}

fn reg_ext(
    s: &UdpSocket,
    relay: SocketAddr,
    session: Uuid,
    peer: u64,
    token: Option<Token>,
) -> Vec<u8> {
    let mut r = Registration {
        session,
        extended: Some(Extended {
            cookie: None,
            peer: Some(PeerId(peer)),
            token,
            alt_aware: false,
            alt: false,
        }),
    };
    s.send_to(&r.encode(), relay).expect("send REG");
    let reply = recv(s).0;
    // As the SDK does: echo the cookie at once to be forwarded to (PROTOCOL.md §12).
    let Some(Reply::Ack {
        cookie: Some(c), ..
    }) = Reply::parse(&reply)
    else {
        return reply;
    };
    r.extended.as_mut().expect("extended").cookie = Some(c);
    s.send_to(&r.encode(), relay).expect("send echo");
    let reply = recv(s).0;
    assert!(
        matches!(Reply::parse(&reply), Some(Reply::Ack { cookie: None, .. })),
        "the echo verifies: {}",
        String::from_utf8_lossy(&reply)
    );
    reply
}

/// Sends `payload` from `from` and checks it arrives byte-exact at `to`, from the relay.
fn roundtrip(from: &UdpSocket, to: &UdpSocket, relay: SocketAddr, payload: &[u8]) {
    from.send_to(payload, relay).expect("send");
    let (got, src) = recv(to);
    assert_eq!(src, relay, "forwarded datagrams come from the relay");
    assert!(
        got == payload,
        "payload of {} bytes altered in transit",
        payload.len()
    );
}

/// Polls the published metrics until `cond` holds; metrics are published every 100 ms.
fn wait_stats(h: &ServerHandle, what: &str, cond: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = h.metrics().snapshot();
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0000 | n)
}

#[test]
fn pairs_and_forwards_byte_exact_both_ways() {
    let (_h, relay) = relay_v4();
    let (a, b) = (peer("127.0.0.2"), peer("127.0.0.3"));
    assert_eq!(reg(&a, relay, id(1)), b"ACK\n");
    assert_eq!(reg(&b, relay, id(1)), b"ACK\n");
    for size in [1, 1200, 1452, 9000, 65_507] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        roundtrip(&a, &b, relay, &payload);
        roundtrip(&b, &a, relay, &payload);
    }
    // An empty datagram is a datagram too.
    roundtrip(&a, &b, relay, b"");
}

#[test]
fn third_peer_is_refused_and_receives_nothing() {
    let (h, relay) = relay_v4();
    let (a, b, c) = (peer("127.0.0.2"), peer("127.0.0.3"), peer("127.0.0.4"));
    reg(&a, relay, id(2));
    reg(&b, relay, id(2));
    assert_eq!(reg(&c, relay, id(2)), b"ERR full\n");
    c.send_to(b"let me in", relay).expect("send");
    roundtrip(&a, &b, relay, b"for b only");
    roundtrip(&b, &a, relay, b"for a only");
    assert_eq!(queued(&c), None, "the third peer must receive nothing");
    wait_stats(&h, "the third peer's data to be dropped", |s| {
        s.dropped_unknown_source >= 1
    });
}

#[test]
fn rebinding_via_reg_works_in_both_directions() {
    let (_h, relay) = relay_v4();
    let (a, b) = (peer("127.0.0.2"), peer("127.0.0.3"));
    reg(&a, relay, id(3));
    reg(&b, relay, id(3));
    roundtrip(&a, &b, relay, b"before");
    // a's NAT gave it a new port: same IP, new socket, REG again.
    let a2 = peer("127.0.0.2");
    assert_eq!(reg(&a2, relay, id(3)), b"ACK\n");
    roundtrip(&b, &a2, relay, b"to a's new port");
    roundtrip(&a2, &b, relay, b"from a's new port");
    let b2 = peer("127.0.0.3");
    assert_eq!(reg(&b2, relay, id(3)), b"ACK\n");
    roundtrip(&a2, &b2, relay, b"to b's new port");
    roundtrip(&b2, &a2, relay, b"from b's new port");
    assert_eq!(
        queued(&a),
        None,
        "the old port gets nothing after rebinding"
    );
    assert_eq!(
        queued(&b),
        None,
        "the old port gets nothing after rebinding"
    );
}

#[test]
fn an_unregistered_sender_on_a_members_ip_can_neither_receive_nor_take_over() {
    let (h, relay) = relay_v4();
    let (a, b) = (peer("127.0.0.2"), peer("127.0.0.3"));
    reg(&a, relay, id(4));
    reg(&b, relay, id(4));
    let intruder = peer("127.0.0.2");
    intruder.send_to(b"hijack attempt", relay).expect("send");
    wait_stats(&h, "the intruder's datagram to be dropped", |s| {
        s.dropped_unknown_source >= 1
    });
    roundtrip(&b, &a, relay, b"still for a");
    roundtrip(&a, &b, relay, b"still for b");
    assert_eq!(queued(&intruder), None);
    assert_eq!(queued(&b), None, "the intruder's datagram must not reach b");
}

#[test]
fn two_extended_members_behind_one_ip_and_their_rebinding() {
    let (_h, relay) = relay_v4();
    let (a, b) = (peer("127.0.0.2"), peer("127.0.0.2"));
    let a_addr = a.local_addr().expect("addr");
    let b_addr = b.local_addr().expect("addr");
    assert_eq!(
        reg_ext(&a, relay, id(5), 1, None),
        format!("ACK {a_addr}\n").into_bytes()
    );
    assert_eq!(
        reg_ext(&b, relay, id(5), 2, None),
        format!("ACK {b_addr} {a_addr}\n").into_bytes()
    );
    // a is told its peer's address as soon as the session pairs.
    assert_eq!(recv(&a).0, format!("ACK {a_addr} {b_addr}\n").into_bytes());
    roundtrip(&a, &b, relay, b"same ip, a to b");
    roundtrip(&b, &a, relay, b"same ip, b to a");
    let b2 = peer("127.0.0.2");
    let b2_addr = b2.local_addr().expect("addr");
    assert_eq!(
        reg_ext(&b2, relay, id(5), 2, None),
        format!("ACK {b2_addr} {a_addr}\n").into_bytes()
    );
    assert_eq!(recv(&a).0, format!("ACK {a_addr} {b2_addr}\n").into_bytes());
    roundtrip(&a, &b2, relay, b"to b's new port");
    let a2 = peer("127.0.0.2");
    reg_ext(&a2, relay, id(5), 1, None);
    assert_eq!(
        recv(&b2).0,
        format!("ACK {b2_addr} {}\n", a2.local_addr().expect("addr")).into_bytes()
    );
    roundtrip(&b2, &a2, relay, b"to a's new port");
    roundtrip(&a2, &b2, relay, b"from a's new port");
}

#[test]
fn no_self_pairing_on_re_reg_from_a_new_port() {
    let (h, relay) = relay_v4();
    let a = peer("127.0.0.2");
    reg(&a, relay, id(6));
    let a2 = peer("127.0.0.2");
    reg(&a2, relay, id(6));
    let s = wait_stats(&h, "the rebind", |s| s.reg(RegResult::Rebind) == 1);
    assert_eq!((s.sessions_paired, s.sessions_unpaired), (0, 1));
    a2.send_to(b"nobody to talk to", relay).expect("send");
    wait_stats(&h, "the unpaired drop", |s| s.dropped_unpaired == 1);
    assert_eq!(queued(&a), None);
    assert_eq!(queued(&a2), None);
}

#[test]
fn malformed_input_of_every_kind_is_answered_as_specified_and_service_continues() {
    let (h, relay) = relay_v4();
    let (a, b) = (peer("127.0.0.2"), peer("127.0.0.3"));
    reg(&a, relay, id(7));
    reg(&b, relay, id(7));
    let junk = peer("127.0.0.4");
    let cases: Vec<(Vec<u8>, Option<&[u8]>)> = vec![
        (b"".to_vec(), None),
        (b"REG:".to_vec(), None), // shorter than any reply: silence, no amplification
        (
            b"REG:definitely-not-a-uuid\n".to_vec(),
            Some(b"ERR malformed\n"),
        ),
        (
            b"REG:\xc3\x28\xa0\xa1\xe2\x28\xa1\xe2\x82\x28\xf0\x28\x8c\xbc".to_vec(),
            Some(b"ERR malformed\n"),
        ),
        (
            format!("REG:{} p=1\n", id(7)).into_bytes(),
            Some(b"ERR short\n"),
        ),
        (
            [b"REG:".as_slice(), &[b'a'; 600]].concat(),
            Some(b"ERR malformed\n"),
        ),
        (vec![0x5a; 65_000], None),
        ((0..65_507u32).map(|i| (i * 31 % 251) as u8).collect(), None),
    ];
    for (input, expected) in &cases {
        junk.send_to(input, relay).expect("send junk");
        if let Some(reply) = expected {
            assert_eq!(
                &recv(&junk).0,
                reply,
                "reply to {:?}",
                String::from_utf8_lossy(&input[..input.len().min(40)])
            );
        }
    }
    // Service continues, and nothing the junk sender sent reached a member.
    roundtrip(&a, &b, relay, b"still serving");
    assert_eq!(queued(&junk), None);
    assert_eq!(queued(&a), None);
    let s = wait_stats(&h, "junk accounted", |s| s.dropped_unknown_source >= 3);
    assert_eq!(
        s.reg(RegResult::Refused(quic_relay::proto::ErrReason::Malformed)),
        4
    );
    assert_eq!(
        s.reg(RegResult::Refused(quic_relay::proto::ErrReason::Short)),
        1
    );
}

#[test]
fn tokens_accepted_refused_and_expired() {
    let secret = b"a-test-secret-of-enough-length".to_vec();
    let h = start(
        RelayConfig {
            secrets: vec![secret.clone()],
            ..RelayConfig::default()
        },
        "127.0.0.1:0",
    );
    let relay = h.local_addr();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let a = peer("127.0.0.2");
    assert_eq!(reg(&a, relay, id(8)), b"ERR auth\n");
    let forged = Token::mint(b"not-the-relay-secret-at-all", id(8), now + 60);
    assert_eq!(reg_ext(&a, relay, id(8), 1, Some(forged)), b"ERR auth\n");
    let stale = Token::mint(&secret, id(8), now - 10);
    assert_eq!(reg_ext(&a, relay, id(8), 1, Some(stale)), b"ERR expired\n");
    let good = Token::mint(&secret, id(8), now + 60);
    let a_addr = a.local_addr().expect("addr");
    assert_eq!(
        reg_ext(&a, relay, id(8), 1, Some(good)),
        format!("ACK {a_addr}\n").into_bytes()
    );
}

#[test]
fn limits_are_enforced_on_the_wire() {
    let h = start(
        RelayConfig {
            limits: Limits {
                max_sessions: 2,
                max_sessions_per_ip: 1,
                reg_rate_per_ip: 1,
                reg_burst_per_ip: 3,
            },
            ..RelayConfig::default()
        },
        "127.0.0.1:0",
    );
    let relay = h.local_addr();
    let a = peer("127.0.0.2");
    assert_eq!(reg(&a, relay, id(9)), b"ACK\n");
    assert_eq!(reg(&peer("127.0.0.2"), relay, id(10)), b"ERR ip-limit\n");
    let c = peer("127.0.0.3");
    assert_eq!(reg(&c, relay, id(10)), b"ACK\n");
    // 127.0.0.2 has used its burst of 3 (two above and this one); the fourth is refused.
    assert_eq!(reg(&a, relay, id(9)), b"ACK\n");
    assert_eq!(reg(&a, relay, id(9)), b"ERR rate\n");
    // Full: a session that never heard a second registration makes room; once every session
    // has, the table refuses.
    let d = peer("127.0.0.4");
    assert_eq!(reg(&d, relay, id(11)), b"ACK\n");
    assert_eq!(reg(&d, relay, id(11)), b"ACK\n");
    assert_eq!(
        reg(&c, relay, id(10)),
        b"ERR capacity\n",
        "127.0.0.3's one-shot session was evicted (else this would refresh it)"
    );
}

#[test]
fn sessions_expire_on_time_and_leave_no_trace() {
    let cfg = RelayConfig {
        session_timeout: Duration::from_secs(2),
        unpaired_timeout: Duration::from_secs(1),
        ..RelayConfig::default()
    };
    let h = start(cfg, "127.0.0.1:0");
    let relay = h.local_addr();
    let (a, b, c) = (peer("127.0.0.2"), peer("127.0.0.3"), peer("127.0.0.4"));
    let t0 = Instant::now();
    reg(&c, relay, id(12));
    reg(&a, relay, id(13));
    reg(&b, relay, id(13));
    let s = wait_stats(&h, "the unpaired session to expire", |s| {
        s.expired_unpaired == 1
    });
    let unpaired_after = t0.elapsed();
    assert_eq!(s.sessions_paired, 1);
    let s = wait_stats(&h, "the paired session to expire", |s| {
        s.expired_paired == 1
    });
    let paired_after = t0.elapsed();
    assert_eq!((s.sessions_paired, s.sessions_unpaired), (0, 0));
    // Whole seconds, swept every second: at most ~2 s late; never early.
    assert!(
        unpaired_after >= Duration::from_secs(1) && unpaired_after < Duration::from_secs(4),
        "{unpaired_after:?}"
    );
    assert!(
        paired_after >= Duration::from_secs(2) && paired_after < Duration::from_secs(5),
        "{paired_after:?}"
    );
    // No trace: the old members' data is from unknown sources now.
    a.send_to(b"anyone?", relay).expect("send");
    wait_stats(&h, "the drop", |s| s.dropped_unknown_source == 1);
    assert_eq!(queued(&b), None);
}

#[test]
fn ipv6_only_and_dual_stack() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipping: this host has no IPv6 loopback");
        return;
    }
    let h6 = start(RelayConfig::default(), "[::1]:0");
    let relay = h6.local_addr();
    let (a, b) = (peer("::1"), peer("::1"));
    reg_ext(&a, relay, id(14), 1, None);
    reg_ext(&b, relay, id(14), 2, None);
    recv(&a); // the pairing notice
    roundtrip(&a, &b, relay, b"over IPv6");
    roundtrip(&b, &a, relay, b"back over IPv6");

    // Dual-stack: an IPv4 and an IPv6 member in one session.
    let hd = start(RelayConfig::default(), "[::]:0");
    let port = hd.local_addr().port();
    let v4 = peer("127.0.0.2");
    let v6 = peer("::1");
    let relay4: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let relay6: SocketAddr = format!("[::1]:{port}").parse().expect("addr");
    assert_eq!(reg(&v4, relay4, id(15)), b"ACK\n");
    assert_eq!(reg(&v6, relay6, id(15)), b"ACK\n");
    // Each member sees the relay at the address family it uses itself.
    v4.send_to(b"4 to 6", relay4).expect("send");
    let (got, from) = recv(&v6);
    assert_eq!((got.as_slice(), from), (b"4 to 6".as_slice(), relay6));
    v6.send_to(b"6 to 4", relay6).expect("send");
    let (got, from) = recv(&v4);
    assert_eq!((got.as_slice(), from), (b"6 to 4".as_slice(), relay4));
}

#[test]
fn shutdown_is_prompt_and_clean() {
    let (h, relay) = relay_v4();
    let a = peer("127.0.0.2");
    reg(&a, relay, id(16));
    let t = Instant::now();
    assert!(h.shutdown(), "relay thread must exit cleanly");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        t.elapsed()
    );
    // The port is released.
    UdpSocket::bind(relay).expect("port free after shutdown");
}

#[test]
fn bursts_are_forwarded_whole_and_in_order() {
    // Same-size bursts go out as GSO batches; mixed sizes and an odd tail must survive that.
    let (h, relay) = relay_v4();
    let (a, b) = (peer("127.0.0.2"), peer("127.0.0.3"));
    socket2::SockRef::from(&b)
        .set_recv_buffer_size(4 << 20)
        .expect("rcvbuf");
    reg(&a, relay, id(17));
    reg(&b, relay, id(17));
    let sizes: Vec<usize> = (0..300)
        .map(|i| {
            if i % 50 == 49 {
                700
            } else if i % 97 == 0 {
                1
            } else {
                1200
            }
        })
        .collect();
    for (i, &size) in sizes.iter().enumerate() {
        let mut d = vec![(i % 251) as u8; size];
        d[0] = (i >> 8) as u8;
        if size > 1 {
            d[1] = i as u8;
        }
        a.send_to(&d, relay).expect("send");
    }
    for (i, &size) in sizes.iter().enumerate() {
        let (got, _) = recv(&b);
        assert_eq!(got.len(), size, "datagram {i}: size");
        assert_eq!(got[0], (i >> 8) as u8, "datagram {i}: order");
        if size > 1 {
            assert_eq!(got[1], i as u8, "datagram {i}: order");
            assert!(
                got[2..].iter().all(|&x| x == (i % 251) as u8),
                "datagram {i}: payload"
            );
        }
    }
    let s = wait_stats(&h, "all forwarded", |s| s.forwarded_packets == 300);
    let io = &h.metrics().io;
    assert_eq!(
        io.send_errors.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "{s:?}"
    );
    // The burst really went out in GSO batches (every Linux since 4.18 supports them).
    assert!(
        io.gso_batches.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no GSO batch was sent"
    );
}

#[test]
fn a_gso_burst_crosses_the_relay_segment_by_segment_intact() {
    // The sender cuts one send into 1200-byte segments (UDP_SEGMENT), as Quinn does: the relay
    // takes it in as one GRO buffer and must forward every segment, the short tail included,
    // each counted as a datagram of its own.
    const UDP_SEGMENT: libc::c_int = 103;
    let (h, relay) = relay_v4();
    let (a, b) = (peer("127.0.0.2"), peer("127.0.0.3"));
    reg(&a, relay, id(18));
    reg(&b, relay, id(18));
    let seg: libc::c_int = 1200;
    // SAFETY: a valid fd and a pointer to a c_int of the stated size.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&a),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&seg as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        eprintln!("SKIP: this kernel has no UDP GSO");
        return;
    }
    let sizes = [1200, 1200, 1200, 1200, 1200, 700];
    let mut burst = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        burst.extend(std::iter::repeat_n(i as u8 + 1, n));
    }
    a.send_to(&burst, relay).expect("send the GSO burst");
    for (i, &n) in sizes.iter().enumerate() {
        let (got, from) = recv(&b);
        assert_eq!(from, relay);
        assert_eq!(got.len(), n, "segment {i}: size");
        assert!(
            got.iter().all(|&x| x == i as u8 + 1),
            "segment {i}: payload"
        );
    }
    assert_eq!(queued(&b), None, "nothing beyond the six segments");
    wait_stats(&h, "six forwarded", |s| s.forwarded_packets == 6);
}
