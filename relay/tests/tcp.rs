//! The relay's TCP listener on real loopback sockets: a TCP member and a UDP member (and two TCP
//! members) exchange datagrams both ways, caps and timeouts close connections, malformed
//! lengths close the connection and are counted, and a closed connection leaves its session.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use quic_relay::frame::encode_frame;
use quic_relay::proto::{Extended, PeerId, Registration, Reply, Uuid};
use quic_relay::server::{Server, ServerHandle};
use quic_relay::sessions::RelayConfig;
use quic_relay::tcp::TcpConfig;

const WAIT: Duration = Duration::from_secs(5);

fn start(tcp: TcpConfig) -> (ServerHandle, SocketAddr) {
    let h = Server::bind_with_tcp(
        "127.0.0.1:0".parse().expect("addr"),
        RelayConfig::default(),
        1 << 20,
        Some(tcp),
    )
    .expect("bind relay")
    .spawn()
    .expect("spawn relay");
    let a = h.local_addr();
    (h, a)
}

fn reg_bytes(session: Uuid, peer: u64) -> Vec<u8> {
    Registration {
        session,
        extended: Some(Extended {
            cookie: None,
            peer: Some(PeerId(peer)),
            token: None,
            alt_aware: false,
            alt: false,
        }),
    }
    .encode()
}

fn tcp(relay: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(relay).expect("connect TCP");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

fn send_frame(s: &mut TcpStream, datagram: &[u8]) {
    let mut f = Vec::new();
    encode_frame(datagram, &mut f);
    s.write_all(&f).expect("write frame");
}

fn recv_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).expect("frame length");
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body).expect("frame body");
    body
}

/// Registers `s` over UDP in the extended form and echoes the cookie as the SDK does
/// (PROTOCOL.md §12); returns the last ACK (without a cookie).
fn udp_reg(s: &UdpSocket, relay: SocketAddr, session: Uuid, peer: u64) -> Vec<u8> {
    s.send_to(&reg_bytes(session, peer), relay).expect("send");
    let (ack, _) = recv_udp(s);
    let Some(Reply::Ack {
        cookie: Some(c), ..
    }) = Reply::parse(&ack)
    else {
        return ack;
    };
    let echo = Registration {
        session,
        extended: Some(Extended {
            peer: Some(PeerId(peer)),
            token: None,
            cookie: Some(c),
            alt_aware: false,
            alt: false,
        }),
    }
    .encode();
    s.send_to(&echo, relay).expect("send echo");
    recv_udp(s).0
}

fn udp() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s
}

fn recv_udp(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    let (n, from) = s.recv_from(&mut buf).expect("expected a datagram");
    buf.truncate(n);
    (buf, from)
}

/// Waits until the peer closes `s` (EOF or reset), failing after `WAIT`.
fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + WAIT;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => assert!(Instant::now() < deadline, "connection stayed open"),
        }
    }
}

/// Polls `f` until it holds, failing after `WAIT` (metrics are published every 100 ms).
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn tcp_member_and_udp_member_exchange_datagrams_both_ways() {
    let (h, relay) = start(TcpConfig::default());
    let session = Uuid::from_u128(0x1111);
    let mut t = tcp(relay);
    let tcp_local = t.local_addr().expect("local");
    send_frame(&mut t, &reg_bytes(session, 0xa));
    let ack = Reply::parse(&recv_frame(&mut t)).expect("an ACK over TCP");
    assert_eq!(
        ack,
        Reply::Ack {
            cookie: None,
            observed: Some(tcp_local),
            peer: None,
            peer_alt: None
        },
        "the relay reports the TCP connection's address"
    );

    let u = udp();
    let ack = udp_reg(&u, relay, session, 0xb);
    assert_eq!(
        Reply::parse(&ack),
        Some(Reply::Ack {
            cookie: None,
            observed: Some(u.local_addr().expect("local")),
            peer: Some(tcp_local),
            peer_alt: None
        })
    );
    // The TCP member is told about its new peer, over TCP.
    assert_eq!(
        Reply::parse(&recv_frame(&mut t)),
        Some(Reply::Ack {
            cookie: None,
            observed: Some(tcp_local),
            peer: Some(u.local_addr().expect("local")),
            peer_alt: None
        })
    );

    for size in [0usize, 1, 1200, 65_507] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8 | 0x40).collect();
        send_frame(&mut t, &payload);
        let (got, from) = recv_udp(&u);
        assert_eq!(from, relay, "forwarded from the relay's UDP socket");
        assert!(got == payload, "TCP -> UDP altered {size} bytes");
        u.send_to(&payload, relay).expect("send");
        assert!(
            recv_frame(&mut t) == payload,
            "UDP -> TCP altered {size} bytes"
        );
    }
    let m = h.metrics();
    eventually("frame counters", || {
        m.tcp.frames_in.load(Ordering::Relaxed) >= 5
            && m.tcp.frames_out.load(Ordering::Relaxed) >= 6
    });
    assert!(m.render().contains("quic_relay_tcp_connections 1"));

    // Closing the connection removes the TCP member at once: the UDP member's data is dropped
    // as unpaired, and a new peer can take the slot.
    drop(t);
    eventually("the TCP member to leave", || {
        m.snapshot().tcp_left == 1 && m.snapshot().sessions_unpaired == 1
    });
    let mut t2 = tcp(relay);
    send_frame(&mut t2, &reg_bytes(session, 0xc));
    assert!(matches!(
        Reply::parse(&recv_frame(&mut t2)),
        Some(Reply::Ack { peer: Some(_), .. })
    ));
}

#[test]
fn two_tcp_members_exchange_datagrams() {
    let (_h, relay) = start(TcpConfig::default());
    let session = Uuid::from_u128(0x2222);
    let mut a = tcp(relay);
    let mut b = tcp(relay);
    send_frame(&mut a, &reg_bytes(session, 1));
    recv_frame(&mut a);
    send_frame(&mut b, &reg_bytes(session, 2));
    recv_frame(&mut b);
    recv_frame(&mut a); // peer notice
    send_frame(&mut a, b"\x40from a");
    assert_eq!(recv_frame(&mut b), b"\x40from a");
    send_frame(&mut b, b"\x40from b");
    assert_eq!(recv_frame(&mut a), b"\x40from b");
}

#[test]
fn a_udp_datagram_from_the_tcp_members_ip_and_port_number_cannot_act_for_it() {
    let (_h, relay) = start(TcpConfig::default());
    let session = Uuid::from_u128(0x3333);
    // A UDP socket on the very port number of the TCP connection, same IP.
    let mut t;
    let spoof = loop {
        t = tcp(relay);
        let port = t.local_addr().expect("local").port();
        if let Ok(s) = UdpSocket::bind(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            break s;
        }
    };
    send_frame(&mut t, format!("REG:{session}\n").as_bytes());
    assert_eq!(recv_frame(&mut t), b"ACK\n");
    // The UDP member on another IP, so the same-IP rebinding rule between UDP members is
    // not what is under test.
    let u = UdpSocket::bind("127.0.0.2:0").expect("bind");
    u.send_to(format!("REG:{session}\n").as_bytes(), relay)
        .expect("send");
    assert_eq!(recv_udp(&u).0, b"ACK\n");
    // Data from the look-alike UDP address is not the TCP member's: dropped, not forwarded.
    spoof.send_to(b"\x40hijack", relay).expect("send");
    u.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    assert!(
        u.recv_from(&mut buf).is_err(),
        "a UDP look-alike of a TCP member got forwarded"
    );
    // Nor does an original-form REG from it move the TCP member (same IP, no peer id).
    spoof
        .send_to(format!("REG:{session}\n").as_bytes(), relay)
        .expect("send");
    assert!(
        matches!(spoof.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == b"ERR full\n"),
        "a UDP REG took the TCP member's slot"
    );
    send_frame(&mut t, b"\x40still mine");
    u.set_read_timeout(Some(WAIT)).expect("timeout");
    assert_eq!(recv_udp(&u).0, b"\x40still mine");
}

#[test]
fn a_malformed_length_closes_the_connection_and_is_counted() {
    let (h, relay) = start(TcpConfig::default());
    let mut t = tcp(relay);
    send_frame(&mut t, &reg_bytes(Uuid::from_u128(0x4444), 1));
    recv_frame(&mut t);
    t.write_all(&[0xff, 0xff, 1, 2, 3]).expect("write");
    assert_closed(&mut t);
    let m = h.metrics();
    eventually("the malformed counter", || {
        m.tcp.closed_malformed.load(Ordering::Relaxed) == 1
    });
    eventually("the member to leave", || m.snapshot().tcp_left == 1);
}

#[test]
fn connection_caps_refuse_extra_connections() {
    let (h, relay) = start(TcpConfig {
        max_per_ip: 2,
        ..TcpConfig::default()
    });
    let mut keep = vec![tcp(relay), tcp(relay)];
    let m = h.metrics();
    eventually("two accepted", || {
        m.tcp.accepted.load(Ordering::Relaxed) == 2
    });
    let mut third = tcp(relay);
    assert_closed(&mut third);
    assert_eq!(m.tcp.refused_ip_limit.load(Ordering::Relaxed), 1);
    // Closing one frees its place.
    keep.pop();
    eventually("one closed", || m.tcp.open.load(Ordering::Relaxed) == 1);
    let mut again = tcp(relay);
    send_frame(&mut again, &reg_bytes(Uuid::from_u128(0x5555), 1));
    assert!(Reply::parse(&recv_frame(&mut again)).is_some());

    let (h, relay) = start(TcpConfig {
        max_connections: 1,
        ..TcpConfig::default()
    });
    // A member's connection is never closed to make room (a non-member's would be).
    let mut one = tcp(relay);
    send_frame(&mut one, &reg_bytes(Uuid::from_u128(0x5556), 1));
    recv_frame(&mut one);
    let mut two = tcp(relay);
    assert_closed(&mut two);
    assert_eq!(
        h.metrics().tcp.refused_total_limit.load(Ordering::Relaxed),
        1
    );
}

#[test]
fn a_connection_that_never_registers_is_closed_after_the_handshake_timeout() {
    let (h, relay) = start(TcpConfig {
        handshake_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        ..TcpConfig::default()
    });
    let mut silent = tcp(relay);
    // Data before registering does not count as a handshake.
    send_frame(&mut silent, b"\x40not a registration");
    assert_closed(&mut silent);
    let m = h.metrics();
    eventually("the handshake counter", || {
        m.tcp.closed_handshake_timeout.load(Ordering::Relaxed) == 1
    });
    // A registered connection that goes quiet is closed after the idle timeout.
    let mut idle = tcp(relay);
    send_frame(&mut idle, &reg_bytes(Uuid::from_u128(0x6666), 1));
    recv_frame(&mut idle);
    assert_closed(&mut idle);
    eventually("the idle counter", || {
        m.tcp.closed_idle.load(Ordering::Relaxed) == 1
    });
}

#[test]
fn a_tcp_member_that_stops_reading_costs_drops_not_a_stalled_relay() {
    let (h, relay) = start(TcpConfig {
        write_queue: 4,
        ..TcpConfig::default()
    });
    // Session 1: a TCP member that never reads, and a UDP member flooding it.
    let mut stuck = tcp(relay);
    send_frame(&mut stuck, &reg_bytes(Uuid::from_u128(0x7777), 1));
    let flood = udp();
    udp_reg(&flood, relay, Uuid::from_u128(0x7777), 2);
    // Session 2: two UDP members that must keep working meanwhile.
    let (a, b) = (udp(), udp());
    for (s, p) in [(&a, 3), (&b, 4)] {
        udp_reg(s, relay, Uuid::from_u128(0x8888), p);
    }
    recv_udp(&a); // peer notice
    let m = h.metrics();
    let payload = vec![0x40u8; 1200];
    // Far more than the kernel's socket buffers and the queue hold: the relay must drop.
    let mut i = 0u32;
    while m.tcp.dropped_queue_full.load(Ordering::Relaxed) == 0 {
        for _ in 0..1000 {
            let _ = flood.send_to(&payload, relay);
        }
        i += 1;
        assert!(
            i < 200,
            "200,000 datagrams to a stuck TCP member and no drop counted"
        );
        // Session 2 is served between the bursts, without waiting for the stuck connection.
        ping_through(&a, &b, relay);
    }
    ping_through(&a, &b, relay);
    drop(stuck);
}

/// Sends a datagram from `a` until it arrives at `b` through the relay (a flood may overflow
/// the relay's socket buffer, so one may be lost), failing after `WAIT`.
fn ping_through(a: &UdpSocket, b: &UdpSocket, relay: SocketAddr) {
    b.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 64];
    loop {
        a.send_to(b"\x40ping", relay).expect("send");
        if let Ok((n, _)) = b.recv_from(&mut buf) {
            if &buf[..n] == b"\x40ping" {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the relay stopped serving other sessions"
        );
    }
}

#[test]
fn bind_with_tcp_takes_one_port_for_both_and_names_a_taken_fixed_port() {
    // Port 0: UDP and TCP end up on the same number (the kernel picked the UDP one).
    let h = Server::bind_with_tcp(
        "127.0.0.1:0".parse().expect("addr"),
        RelayConfig::default(),
        1 << 20,
        Some(TcpConfig::default()),
    )
    .expect("bind relay")
    .spawn()
    .expect("spawn relay");
    let addr = h.local_addr();
    assert_ne!(addr.port(), 0);
    TcpStream::connect_timeout(&addr, WAIT).expect("TCP on the UDP port's number");

    // A fixed port whose TCP twin is held: no second pick (the user asked for that port), an
    // error that names it and says what to do.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a TCP port");
    let taken = held.local_addr().expect("addr");
    match Server::bind_with_tcp(
        taken,
        RelayConfig::default(),
        1 << 20,
        Some(TcpConfig::default()),
    ) {
        Ok(_) => panic!("bound TCP {taken} while another socket holds it"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains(&taken.to_string()), "{msg}");
            assert!(msg.contains("--no-tcp"), "{msg}");
        }
    }
    // Without TCP the same port is fine for UDP alone.
    Server::bind_with_tcp(taken, RelayConfig::default(), 1 << 20, None).expect("UDP only");
}
