//! Abuse tests of the real `quic-relay` binary on loopback (issue 13): each attack is run
//! against the relay process, bounded in time and in datagrams, and the figure it is judged by
//! (memory, whether a legitimate pair is served, bystanders' loss) is printed and asserted.
//!
//! `QUIC_RELAY_ABUSE_BIN` runs them against another build of the relay (for example the one
//! before these fixes, to measure the "before" figures); by default they run the binary of
//! this crate.
//!
//! The flood and reflection tests spoof source addresses with a raw socket and need root
//! (CAP_NET_RAW): elsewhere they skip and say so; under `CI=true` they must run.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use quic_relay::frame::encode_frame;
use quic_relay::proto::{Extended, PeerId, Registration, Reply, Uuid};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const WAIT: Duration = Duration::from_secs(10);

/// The attacks run one at a time: each floods loopback and the CPUs, and its figures (memory,
/// bystanders' loss) are about the relay under that attack, not under another test's.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn relay_bin() -> String {
    std::env::var("QUIC_RELAY_ABUSE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_quic-relay").to_string())
}

/// A running relay process, killed on drop.
struct Relay {
    child: Child,
    addr: SocketAddr,
}

impl Relay {
    /// Starts the relay on `bind` port 0 with `args`; returns once it logged its address.
    fn start(bind: &str, args: &[&str]) -> Relay {
        // Port 0 picks a free UDP port and TCP takes the same number, which another process may
        // hold: the relay then exits, and we try again.
        for _ in 0..20 {
            let mut child = Command::new(relay_bin())
                .args(["--bind", bind, "--port", "0"])
                .args(args)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn quic-relay");
            let stderr = child.stderr.take().expect("stderr piped");
            let (tx, rx) = mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    // Keep draining after the address is known, so the relay never blocks on
                    // a full pipe.
                    let _ = tx.send(line);
                }
            });
            let mut udp = None;
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
                    if child.try_wait().expect("wait").is_some() {
                        break;
                    }
                    continue;
                };
                if line.contains("relay socket bound") {
                    udp = line
                        .split("local_addr=")
                        .nth(1)
                        .and_then(|r| r.split(' ').next())
                        .and_then(|a| a.parse::<SocketAddr>().ok());
                }
                if line.contains("relay TCP listener bound") {
                    if let Some(addr) = udp {
                        return Relay { child, addr };
                    }
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("the relay did not start");
    }

    /// Resident memory of the relay process, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        kb * 1024
    }

    /// The relay's address as seen at `ip` (for a relay bound to 0.0.0.0).
    fn at(&self, ip: Ipv4Addr) -> SocketAddr {
        SocketAddr::new(ip.into(), self.addr.port())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn udp(ip: Ipv4Addr) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).expect("bind UDP");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s
}

fn ext_reg(session: Uuid, peer: u64, cookie: Option<quic_relay::proto::Cookie>) -> Vec<u8> {
    Registration {
        session,
        extended: Some(Extended {
            peer: Some(PeerId(peer)),
            token: None,
            cookie,
            alt_aware: false,
            alt: false,
        }),
    }
    .encode()
}

/// Registers `s` in the extended form as the SDK does (echoing a cookie if the ACK has one);
/// returns the last reply.
fn udp_reg(s: &UdpSocket, relay: SocketAddr, session: Uuid, peer: u64) -> Vec<u8> {
    s.send_to(&ext_reg(session, peer, None), relay)
        .expect("send REG");
    let reply = recv(s).expect("a reply to REG");
    match Reply::parse(&reply) {
        Some(Reply::Ack {
            cookie: Some(c), ..
        }) => {
            s.send_to(&ext_reg(session, peer, Some(c)), relay)
                .expect("send echo");
            recv(s).expect("a reply to the echo")
        }
        _ => reply,
    }
}

/// Registers `s` in the original form; returns the reply.
fn orig_reg(s: &UdpSocket, relay: SocketAddr, session: Uuid) -> Vec<u8> {
    s.send_to(format!("REG:{session}\n").as_bytes(), relay)
        .expect("send REG");
    recv(s).expect("a reply to REG")
}

fn recv(s: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65_536];
    let n = s.recv(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn send_frame(s: &mut TcpStream, datagram: &[u8]) {
    let mut f = Vec::new();
    encode_frame(datagram, &mut f);
    s.write_all(&f).expect("write frame");
}

fn recv_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// A TCP connection to `relay` from `from` (port 0: any), with a small receive buffer so that
/// a peer that does not read is felt at once.
fn tcp_from(from: SocketAddr, relay: SocketAddr, rcvbuf: Option<usize>, reuse: bool) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    if let Some(b) = rcvbuf {
        s.set_recv_buffer_size(b).expect("SO_RCVBUF");
    }
    if reuse {
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        s.set_reuse_port(true).expect("SO_REUSEPORT");
    }
    s.bind(&from.into()).expect("bind TCP");
    s.connect_timeout(&relay.into(), WAIT).expect("connect");
    let t: TcpStream = s.into();
    t.set_nodelay(true).expect("nodelay");
    t.set_read_timeout(Some(WAIT)).expect("timeout");
    t
}

/// Waits up to `within` for the relay to close `s` (EOF or reset); returns how long it took.
fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    while start.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

/// A pseudo-random UUID sequence (xorshift64*), reproducible and without a dependency.
struct Uuids(u64);

impl Uuids {
    fn next(&mut self) -> Uuid {
        let mut n = || {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        Uuid::from_u64_pair(n(), n())
    }
}

/// Sends a datagram from `a` and waits up to `timeout` for it at `b`; whether it arrived.
fn ping(a: &UdpSocket, b: &UdpSocket, relay: SocketAddr, n: u32, timeout: Duration) -> bool {
    let payload = format!("\x40ping {n}");
    a.send_to(payload.as_bytes(), relay).expect("send ping");
    b.set_read_timeout(Some(timeout)).expect("timeout");
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        match b.recv(&mut buf) {
            Ok(k) if &buf[..k] == payload.as_bytes() => return true,
            Ok(_) => {} // a late earlier ping
            Err(_) => return false,
        }
    }
    false
}

const MIB: u64 = 1 << 20;

/// A raw IPv4 socket for sending datagrams with forged source addresses, or `None` (with a
/// note) when this process may not open one outside CI.
fn raw_socket(test: &str) -> Option<Socket> {
    match Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    ) {
        Ok(s) => Some(s),
        // #[ignore]d with this as the reason: under CI or --ignored it must run, not pass unrun.
        Err(e)
            if std::env::var("CI").as_deref() != Ok("true")
                && !std::env::args().any(|a| a == "--ignored" || a == "--include-ignored") =>
        {
            eprintln!("SKIP {test}: spoofing source addresses needs a raw socket (root): {e}");
            None
        }
        Err(e) => panic!("CI=true or --ignored: {test} must run, as root: {e}"),
    }
}

/// Issue 13 item 1: 64 TCP members that never read, fed maximum-size datagrams by their UDP
/// peers, keep the relay within 64 MiB over idle, a well-behaved pair keeps forwarding, and the
/// memory goes back when the connections close.
#[test]
fn non_reading_tcp_members_fed_maximum_datagrams_cannot_balloon_the_relay() {
    let _serial = serial();
    const MEMBERS: usize = 64;
    /// Maximum-size datagrams sent to each non-reading member (~6.5 MB each, 420 MB in all).
    const PER_MEMBER: usize = 100;
    let relay = Relay::start("127.0.0.1", &[]);
    let lo = Ipv4Addr::LOCALHOST;
    let mut ids = Uuids(0x5eed_0001);

    // The well-behaved pair, original form (two IPs: one IP would be a rebinding).
    let (a, b) = (
        udp(Ipv4Addr::new(127, 0, 0, 2)),
        udp(Ipv4Addr::new(127, 0, 0, 3)),
    );
    let pair = ids.next();
    assert_eq!(orig_reg(&a, relay.addr, pair), b"ACK\n");
    assert_eq!(orig_reg(&b, relay.addr, pair), b"ACK\n");
    assert!(ping(&a, &b, relay.addr, 0, WAIT), "the pair forwards");

    let idle = relay.rss();
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let session = ids.next();
        let mut t = tcp_from(SocketAddr::new(lo.into(), 0), relay.addr, Some(4096), false);
        send_frame(&mut t, &ext_reg(session, 1, None));
        let ack = recv_frame(&mut t).expect("ACK over TCP");
        assert!(ack.starts_with(b"ACK"), "member {i}: {ack:?}");
        let u = udp(lo);
        let r = udp_reg(&u, relay.addr, session, 2);
        assert!(r.starts_with(b"ACK"), "UDP peer {i}: {r:?}");
        // The TCP member reads its peer notice, then never reads again.
        recv_frame(&mut t).expect("peer notice");
        members.push((t, u));
    }

    let big = vec![0x40u8; 65_507];
    let mut peak = relay.rss();
    let (mut pings, mut answered) = (0u32, 0u32);
    for round in 0..PER_MEMBER {
        for (_, u) in &members {
            u.send_to(&big, relay.addr).expect("send");
        }
        // One round is 4 MiB: let the relay's socket buffer drain before the next, and check
        // the bystanders meanwhile.
        pings += 1;
        if ping(
            &a,
            &b,
            relay.addr,
            round as u32 + 1,
            Duration::from_millis(500),
        ) {
            answered += 1;
        }
        peak = peak.max(relay.rss());
    }
    let growth = peak.saturating_sub(idle);
    drop(members);
    // Closing connections is asynchronous in the relay: give it until memory is back or WAIT.
    let deadline = Instant::now() + WAIT;
    let mut after = relay.rss();
    while after.saturating_sub(idle) > 16 * MIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = relay.rss();
    }
    let kept = after.saturating_sub(idle);
    eprintln!(
        "ABUSE tcp-queue: idle {} MiB, peak growth {} MiB, kept after close {} MiB, pair {answered}/{pings} pings",
        idle / MIB,
        growth / MIB,
        kept / MIB
    );
    assert!(
        growth <= 64 * MIB,
        "relay grew by {} MiB over idle (bound: 64 MiB)",
        growth / MIB
    );
    assert!(
        kept <= 16 * MIB,
        "relay kept {} MiB after the connections closed",
        kept / MIB
    );
    assert!(
        answered * 10 >= pings * 9,
        "the well-behaved pair got {answered} of {pings} pings through"
    );
    assert!(
        ping(&a, &b, relay.addr, 9999, WAIT),
        "the pair still forwards"
    );
}

/// Issue 13 item 2: during a flood of 20,000 registrations per second for random sessions from
/// spoofed source addresses (4,096 IPs, random ports), which fills the table, a legitimate pair
/// registering within 2 s is paired and forwards, and an existing pair loses nothing.
#[ignore = "needs root: a raw socket forges the flood's source addresses; run as root with `cargo test -- --include-ignored` (CI does)"]
#[test]
fn a_registration_flood_does_not_lock_out_new_pairs_or_disturb_existing_ones() {
    let _serial = serial();
    let Some(raw) = raw_socket("the registration flood") else {
        return;
    };
    /// Small enough that the flood fills it in 2 s; the rule is the same at 250,000.
    const MAX_SESSIONS: u32 = 40_000;
    const RATE: u64 = 20_000;
    const FLOOD: Duration = Duration::from_secs(6);
    let relay = Relay::start("127.0.0.1", &["--max-sessions", &MAX_SESSIONS.to_string()]);
    let mut ids = Uuids(0x5eed_0002);

    // An existing pair, exchanging pings throughout.
    let (p, q) = (
        udp(Ipv4Addr::new(127, 0, 0, 2)),
        udp(Ipv4Addr::new(127, 0, 0, 3)),
    );
    let existing = ids.next();
    assert_eq!(orig_reg(&p, relay.addr, existing), b"ACK\n");
    assert_eq!(orig_reg(&q, relay.addr, existing), b"ACK\n");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let SocketAddr::V4(target) = relay.addr else {
            panic!("IPv4 relay")
        };
        std::thread::spawn(move || {
            // Every registration from its own address (an address is a member of one session
            // at a time): 4,096 IPs in 127.1.0.0/20, a fresh port each time. ~5 REG/s per IP,
            // under every per-IP limit.
            let mut ids = Uuids(0x5eed_f100d);
            let start = Instant::now();
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) && start.elapsed() < FLOOD + WAIT {
                let due = start.elapsed().as_micros() as u64 * RATE / 1_000_000;
                while n < due {
                    let ip = Ipv4Addr::new(127, 1, ((n >> 8) & 0x0f) as u8, n as u8);
                    let port = 1024 + ((n >> 12) % 60_000) as u16;
                    let reg = format!("REG:{}\n", ids.next());
                    let pkt = spoofed(SocketAddrV4::new(ip, port), target, reg.as_bytes());
                    let _ = raw.send_to(&pkt, &SockAddr::from(SocketAddr::V4(target)));
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            sent.store(n, Ordering::Relaxed);
        })
    };

    let started = Instant::now();
    let (mut pings, mut lost) = (0u32, 0u32);
    let mut legit: Option<(Vec<u8>, Vec<u8>, bool)> = None;
    while started.elapsed() < FLOOD {
        pings += 1;
        if !ping(&p, &q, relay.addr, pings, Duration::from_secs(1)) {
            lost += 1;
        }
        // Once the table is full (2 s at 20k/s), a new pair registers, B 1 s after A.
        if legit.is_none() && started.elapsed() >= Duration::from_secs(3) {
            let (a, b) = (
                udp(Ipv4Addr::new(127, 0, 0, 4)),
                udp(Ipv4Addr::new(127, 0, 0, 5)),
            );
            let session = ids.next();
            let ra = orig_reg(&a, relay.addr, session);
            std::thread::sleep(Duration::from_secs(1)); // the second peer comes a second later
            let rb = orig_reg(&b, relay.addr, session);
            let forwards = ping(&a, &b, relay.addr, 0, Duration::from_secs(1));
            legit = Some((ra, rb, forwards));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().expect("flood thread");
    let (ra, rb, forwards) = legit.expect("the legitimate pair registered");
    let n = sent.load(Ordering::Relaxed);
    eprintln!(
        "ABUSE reg-flood: {n} REGs in {:.1} s; new pair: A {:?}, B {:?}, forwards: {forwards}; existing pair lost {lost}/{pings}",
        FLOOD.as_secs_f64(),
        String::from_utf8_lossy(&ra),
        String::from_utf8_lossy(&rb)
    );
    assert!(
        n >= MAX_SESSIONS as u64 * 2,
        "the flood sent only {n} registrations: too few to fill the table"
    );
    assert_eq!(ra, b"ACK\n", "the first peer was refused");
    assert_eq!(rb, b"ACK\n", "the second peer was refused");
    assert!(forwards, "the new pair does not forward");
    assert_eq!(lost, 0, "the existing pair lost {lost} of {pings} pings");
}

/// Builds an IPv4/UDP packet from `src` to `dst` (checksum 0: none, allowed for IPv4).
fn spoofed(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0,
        0,
        64,
        17,
        0,
        0,
    ]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    let ulen = 8 + payload.len();
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&[(ulen >> 8) as u8, ulen as u8, 0, 0]);
    p.extend_from_slice(payload);
    p
}

/// Issue 13 item 3: one spoofed extended registration naming a victim's address does not make
/// the relay send the attacker's traffic there: an extended member is forwarded to only after
/// it echoed the cookie that only its real address received.
#[ignore = "needs root: a raw socket forges the flood's source addresses; run as root with `cargo test -- --include-ignored` (CI does)"]
#[test]
fn a_spoofed_registration_does_not_turn_the_relay_into_a_reflector() {
    let _serial = serial();
    let Some(raw) = raw_socket("the reflection test") else {
        return;
    };
    let relay = Relay::start("127.0.0.1", &[]);
    let SocketAddr::V4(relay_v4) = relay.addr else {
        panic!("IPv4 relay")
    };
    let victim = udp(Ipv4Addr::new(127, 0, 0, 9));
    let SocketAddr::V4(victim_addr) = victim.local_addr().expect("addr") else {
        panic!("IPv4 victim")
    };
    let attacker = udp(Ipv4Addr::new(127, 0, 0, 8));
    let session = Uuids(0x5eed_0003).next();
    let r = udp_reg(&attacker, relay.addr, session, 1);
    assert!(r.starts_with(b"ACK"), "{r:?}");
    // The spoofed registration: from the victim's address, which never sent anything.
    raw.send_to(
        &spoofed(victim_addr, relay_v4, &ext_reg(session, 2, None)),
        &SockAddr::from(relay.addr),
    )
    .expect("send spoofed REG");
    // The relay's reply to it reaches the victim (no larger than the spoofed request): that is
    // also the sign the spoofed datagram was processed.
    victim.set_read_timeout(Some(WAIT)).expect("timeout");
    let notice = recv(&victim).expect("the relay answered the spoofed REG");
    assert!(notice.starts_with(b"ACK"), "{notice:?}");
    const N: usize = 200;
    let payload = vec![0x40u8; 1200];
    for _ in 0..N {
        attacker.send_to(&payload, relay.addr).expect("send");
    }
    victim
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut reflected = 0;
    let mut bytes = 0;
    while let Some(d) = recv(&victim) {
        if Reply::parse(&d).is_none() {
            reflected += 1;
            bytes += d.len();
        }
    }
    eprintln!("ABUSE reflection: {reflected} of {N} attacker datagrams ({bytes} bytes) reached the spoofed address");
    assert_eq!(
        reflected, 0,
        "the relay reflected traffic to a spoofed address"
    );
}

/// Issue 13 item 4: a connection that left its session (BYE) and sends empty frames is closed
/// after the handshake timeout; at the connection cap, idle non-members make room for a new
/// client; and a second connection from the same IP and port to another relay address does
/// not take over the first one's membership.
#[test]
fn tcp_connections_cannot_hoard_the_listener_or_steal_a_membership() {
    let _serial = serial();
    let relay = Relay::start(
        "0.0.0.0",
        &[
            "--tcp-handshake-timeout-secs",
            "1",
            "--tcp-max-connections",
            "16",
            "--tcp-max-per-ip",
            "4",
        ],
    );
    let lo = Ipv4Addr::LOCALHOST;
    let target = relay.at(lo);
    let mut ids = Uuids(0x5eed_0004);

    // (a) Register, leave, then keep the connection busy with empty frames.
    let session = ids.next();
    let mut lingering = tcp_from(SocketAddr::new(lo.into(), 0), target, None, false);
    send_frame(&mut lingering, format!("REG:{session}\n").as_bytes());
    assert_eq!(recv_frame(&mut lingering).expect("ACK"), b"ACK\n");
    send_frame(&mut lingering, format!("BYE:{session}\n").as_bytes());
    let keepalive = {
        let mut w = lingering.try_clone().expect("clone");
        std::thread::spawn(move || {
            // Empty frames every 100 ms until the relay closes the connection.
            while w.write_all(&[0, 0]).is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let closed_after = closed_within(&mut lingering, Duration::from_secs(5));
    // Ends the writer too, if the relay did not close the connection.
    let _ = lingering.shutdown(std::net::Shutdown::Both);
    drop(lingering);
    let _ = keepalive.join();

    // (b) 4 IPs x 4 idle connections fill the cap of 16, each answered once (a malformed
    // registration long enough for its ERR), so we know the relay holds them all.
    let mut hoard = Vec::new();
    for ip in 2..6u8 {
        for _ in 0..4 {
            let mut t = tcp_from(
                SocketAddr::new(Ipv4Addr::new(127, 0, 0, ip).into(), 0),
                target,
                None,
                false,
            );
            send_frame(
                &mut t,
                b"REG:this is not a session id, but long enough to answer\n",
            );
            assert_eq!(recv_frame(&mut t).expect("ERR"), b"ERR malformed\n");
            hoard.push(t);
        }
    }
    let mut newcomer = tcp_from(
        SocketAddr::new(Ipv4Addr::new(127, 0, 0, 6).into(), 0),
        target,
        None,
        false,
    );
    let s2 = ids.next();
    send_frame(&mut newcomer, format!("REG:{s2}\n").as_bytes());
    let newcomer_reply = recv_frame(&mut newcomer).ok();
    drop(hoard);
    drop(newcomer);

    // (c) One source IP and port, two relay addresses.
    let from = SocketAddr::new(Ipv4Addr::new(127, 0, 0, 7).into(), 0);
    let mut first = tcp_from(from, relay.at(lo), None, true);
    let from = first.local_addr().expect("local");
    let s3 = ids.next();
    send_frame(&mut first, format!("REG:{s3}\n").as_bytes());
    assert_eq!(recv_frame(&mut first).expect("ACK"), b"ACK\n");
    let u = udp(lo);
    assert_eq!(orig_reg(&u, target, s3), b"ACK\n");
    let mut second = tcp_from(from, relay.at(Ipv4Addr::new(127, 0, 0, 2)), None, true);
    send_frame(
        &mut second,
        b"REG:this is not a session id, but long enough to answer\n",
    );
    assert_eq!(recv_frame(&mut second).expect("ERR"), b"ERR malformed\n");
    u.send_to(b"\x40for the first connection", target)
        .expect("send");
    first
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let first_got = recv_frame(&mut first).ok();

    eprintln!(
        "ABUSE tcp-fairness: left member closed after {closed_after:?} (handshake timeout 1 s); \
         newcomer at the cap got {:?}; first connection got its data after a same-address \
         connection elsewhere: {}",
        newcomer_reply.as_deref().map(String::from_utf8_lossy),
        first_got.is_some()
    );
    let closed_after = closed_after.expect("a non-member sending empty frames was never closed");
    assert!(
        closed_after <= Duration::from_millis(2500),
        "closed only after {closed_after:?}"
    );
    assert_eq!(
        newcomer_reply.as_deref(),
        Some(&b"ACK\n"[..]),
        "the newcomer was not served at the connection cap"
    );
    assert_eq!(
        first_got.as_deref(),
        Some(&b"\x40for the first connection"[..]),
        "the first connection lost its membership to a second one from the same address"
    );
}
