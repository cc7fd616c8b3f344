//! `udp-over-tcp` on real loopback sockets: byte-exact interop with each original framing (the
//! test plays the original tool on the other end), round trips in both roles, per-flow sockets,
//! split reads, peer reset and refused connections, ICMP errors, bounded lengths, --psk.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::timeout;
use udp_over_tcp::framing::Framing;
use udp_over_tcp::tunnel::{Metrics, TcpRole, Tunnel, TunnelConfig, UdpBind, UdpSendTo};

const T: Duration = Duration::from_secs(10);

fn lo(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn udp() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind(lo(0)).await.expect("bind");
    let a = s.local_addr().expect("addr");
    (s, a)
}

async fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut b = vec![0u8; 70_000];
    let (n, from) = timeout(T, s.recv_from(&mut b))
        .await
        .expect("datagram within 10 s")
        .expect("recv");
    b.truncate(n);
    (b, from)
}

struct Running {
    udp: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    metrics: std::sync::Arc<Metrics>,
    _task: tokio::task::JoinSet<()>,
}

async fn start(cfg: TunnelConfig) -> Running {
    let t = Tunnel::bind(cfg).await.expect("tunnel binds");
    Running {
        udp: t.udp_local_addr(),
        tcp: t.tcp_local_addr(),
        metrics: t.metrics(),
        _task: {
            // Dropping the set stops the tunnel.
            let mut set = tokio::task::JoinSet::new();
            set.spawn(t.run(std::future::pending()));
            set
        },
    }
}

/// Waits (polling a counter; there is no event to await from outside) until `f` holds.
async fn until(mut f: impl FnMut() -> bool) {
    timeout(T, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("condition within 10 s");
}

/// Golden frames written by hand from each tool's format (not by our encoder).
fn golden(framing: Framing, src: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    match framing {
        Framing::Plain => v.extend_from_slice(&(payload.len() as u32).to_le_bytes()),
        Framing::Mullvad => v.extend_from_slice(&(payload.len() as u16).to_be_bytes()),
        Framing::Flow => {
            // The fork's length counts the 18-byte source address and the payload.
            v.extend_from_slice(&(18 + payload.len() as u32).to_le_bytes());
            v.extend_from_slice(&src.port().to_le_bytes());
            v.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
            let SocketAddr::V4(s4) = src else {
                panic!("IPv4 in this test")
            };
            v.extend_from_slice(&s4.ip().octets());
        }
    }
    v.extend_from_slice(payload);
    v
}

/// Plays the original tool's listening end for our connecting end: checks the exact bytes it
/// receives, feeds it hand-written frames one byte per write (split reads), resets the
/// connection and expects a reconnect.
async fn interop_as_connector(framing: Framing) {
    let l = TcpListener::bind(lo(0)).await.expect("bind");
    let (app, app_addr) = udp().await;
    let mut cfg = TunnelConfig::new(
        TcpRole::Connect(l.local_addr().expect("addr").to_string()),
        UdpBind::Addr(lo(0)),
        UdpSendTo::Addr(app_addr),
    );
    cfg.framing = framing;
    let tun = start(cfg).await;
    let tun_udp = tun.udp.expect("bound");

    for round in 0..2 {
        let (mut peer, _) = timeout(T, l.accept())
            .await
            .expect("(re)connect")
            .expect("accept");
        // Our side -> wire: exact bytes.
        app.send_to(b"hello", tun_udp).await.expect("send");
        let want = golden(framing, app_addr, b"hello");
        let mut got = vec![0u8; want.len()];
        timeout(T, peer.read_exact(&mut got))
            .await
            .expect("frame")
            .expect("read");
        assert_eq!(hex(&got), hex(&want), "{framing} round {round}");
        // Wire -> our side: a zero-length and a normal datagram, split into 1-byte writes.
        peer.set_nodelay(true).expect("nodelay");
        let mut wire = golden(framing, app_addr, b"");
        wire.extend(golden(framing, app_addr, b"abc"));
        for b in &wire {
            peer.write_all(std::slice::from_ref(b))
                .await
                .expect("write");
            peer.flush().await.expect("flush");
        }
        let (d1, from1) = recv(&app).await;
        let (d2, from2) = recv(&app).await;
        assert_eq!(
            (d1.as_slice(), d2.as_slice()),
            (&b""[..], &b"abc"[..]),
            "{framing}"
        );
        // Port-preserving: it comes from the tunnel's bound UDP port.
        assert_eq!((from1, from2), (tun_udp, tun_udp));
        // Reset (RST, not FIN): the tunnel must reconnect, not die.
        socket2::SockRef::from(&peer)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(peer);
    }
    timeout(T, l.accept())
        .await
        .expect("third connect")
        .expect("accept");
    until(|| tun.metrics.connections.load(Ordering::Relaxed) == 3).await;
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn plain_interop_split_reads_and_reset_reconnect() {
    interop_as_connector(Framing::Plain).await;
}

#[tokio::test]
async fn flow_interop_split_reads_and_reset_reconnect() {
    interop_as_connector(Framing::Flow).await;
}

#[tokio::test]
async fn mullvad_interop_split_reads_and_reset_reconnect() {
    interop_as_connector(Framing::Mullvad).await;
}

/// Plays the original's connecting end against our listening end, in plain framing.
#[tokio::test]
async fn plain_interop_as_listener_and_bounded_length() {
    let (app, app_addr) = udp().await;
    let tun = start(TunnelConfig::new(
        TcpRole::Listen(lo(0)),
        UdpBind::Addr(lo(0)),
        UdpSendTo::Addr(app_addr),
    ))
    .await;
    let mut peer = TcpStream::connect(tun.tcp.expect("listening"))
        .await
        .expect("connect");
    peer.write_all(&hex_bytes("0500000068656c6c6f"))
        .await
        .expect("write");
    let (d, from) = recv(&app).await;
    assert_eq!(
        (d.as_slice(), from),
        (&b"hello"[..], tun.udp.expect("bound"))
    );
    app.send_to(b"back", tun.udp.expect("bound"))
        .await
        .expect("send");
    let mut got = [0u8; 8];
    timeout(T, peer.read_exact(&mut got))
        .await
        .expect("frame")
        .expect("read");
    assert_eq!(hex(&got), "040000006261636b");
    // A 4 GiB length is refused and ends that connection (no allocation, no panic)...
    peer.write_all(&[0xff, 0xff, 0xff, 0xff])
        .await
        .expect("write");
    let mut rest = Vec::new();
    let n = timeout(T, peer.read_to_end(&mut rest))
        .await
        .expect("closed");
    assert!(n.is_err() || rest.is_empty());
    assert_eq!(tun.metrics.framing_errors.load(Ordering::Relaxed), 1);
    // ...and the next connection works.
    let mut peer = TcpStream::connect(tun.tcp.expect("listening"))
        .await
        .expect("connect");
    peer.write_all(&hex_bytes("020000006869"))
        .await
        .expect("write");
    assert_eq!(recv(&app).await.0, b"hi");
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Both roles of our own tool, every framing: datagrams of 0, 1200 and 65,507 bytes (the
/// largest IPv4 UDP payload), both directions, from the right ports.
#[tokio::test]
async fn round_trips_both_roles_every_framing() {
    for framing in [Framing::Plain, Framing::Flow, Framing::Mullvad] {
        let (a, a_addr) = udp().await;
        let (b, b_addr) = udp().await;
        let mut lc = TunnelConfig::new(
            TcpRole::Listen(lo(0)),
            UdpBind::Addr(lo(0)),
            UdpSendTo::Addr(b_addr),
        );
        lc.framing = framing;
        let listen = start(lc).await;
        let mut cc = TunnelConfig::new(
            TcpRole::Connect(listen.tcp.expect("listening").to_string()),
            UdpBind::Addr(lo(0)),
            UdpSendTo::Addr(a_addr),
        );
        cc.framing = framing;
        let connect = start(cc).await;
        until(|| listen.metrics.connections.load(Ordering::Relaxed) == 1).await;
        let (x, y) = (connect.udp.expect("bound"), listen.udp.expect("bound"));
        for size in [0usize, 1200, 65_507] {
            let p: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
            a.send_to(&p, x).await.expect("send");
            let (got, from) = recv(&b).await;
            assert_eq!((got.len(), from), (size, y), "{framing} A->B {size}");
            assert_eq!(got, p);
            b.send_to(&p, y).await.expect("send");
            let (got, from) = recv(&a).await;
            assert_eq!((got.len(), from), (size, x), "{framing} B->A {size}");
            assert_eq!(got, p);
        }
    }
}

/// `--udp-bind auto` + `IP:auto`: each client flow gets its own socket on the listen side, and
/// replies go back to the right client at once (no other event needed to wake them).
#[tokio::test]
async fn flow_auto_routes_each_client_back() {
    let (server, server_addr) = udp().await;
    let mut lc = TunnelConfig::new(
        TcpRole::Listen(lo(0)),
        UdpBind::Auto,
        UdpSendTo::Addr(server_addr),
    );
    lc.framing = Framing::Flow;
    let listen = start(lc).await;
    let mut cc = TunnelConfig::new(
        TcpRole::Connect(listen.tcp.expect("listening").to_string()),
        UdpBind::Addr(lo(0)),
        UdpSendTo::AutoPort([127, 0, 0, 1].into()),
    );
    cc.framing = Framing::Flow;
    let connect = start(cc).await;
    let entry = connect.udp.expect("bound");
    let (c1, _) = udp().await;
    let (c2, _) = udp().await;
    c1.send_to(b"one", entry).await.expect("send");
    let (d1, s1) = recv(&server).await;
    c2.send_to(b"two", entry).await.expect("send");
    let (d2, s2) = recv(&server).await;
    assert_eq!((d1.as_slice(), d2.as_slice()), (&b"one"[..], &b"two"[..]));
    assert_ne!(s1, s2, "one socket per flow");
    assert_eq!(listen.metrics.flows_open.load(Ordering::Relaxed), 2);
    // Reply to flow 2 first: it must reach c2 (from the entry port), and c1 must get its own.
    server.send_to(b"to-two", s2).await.expect("send");
    server.send_to(b"to-one", s1).await.expect("send");
    assert_eq!(recv(&c2).await, (b"to-two".to_vec(), entry));
    assert_eq!(recv(&c1).await, (b"to-one".to_vec(), entry));
}

/// An ICMP port unreachable (nobody at --udp-sendto yet) must not tear the tunnel down.
#[tokio::test]
async fn icmp_errors_do_not_break_the_tunnel() {
    let (a, a_addr) = udp().await;
    let absent = {
        let s = std::net::UdpSocket::bind(lo(0)).expect("bind");
        s.local_addr().expect("addr")
    };
    let listen = start(TunnelConfig::new(
        TcpRole::Listen(lo(0)),
        UdpBind::Addr(lo(0)),
        UdpSendTo::Addr(absent),
    ))
    .await;
    let connect = start(TunnelConfig::new(
        TcpRole::Connect(listen.tcp.expect("listening").to_string()),
        UdpBind::Addr(lo(0)),
        UdpSendTo::Addr(a_addr),
    ))
    .await;
    for _ in 0..20 {
        a.send_to(b"into the void", connect.udp.expect("bound"))
            .await
            .expect("send");
    }
    until(|| {
        listen.metrics.udp_out.load(Ordering::Relaxed)
            + listen.metrics.udp_send_errors.load(Ordering::Relaxed)
            >= 20
    })
    .await;
    // The target appears; the same tunnel (no reconnect) delivers to it.
    let b = UdpSocket::bind(absent)
        .await
        .expect("rebind the absent port");
    a.send_to(b"now", connect.udp.expect("bound"))
        .await
        .expect("send");
    assert_eq!(recv(&b).await.0, b"now");
    b.send_to(b"back", listen.udp.expect("bound"))
        .await
        .expect("send");
    assert_eq!(recv(&a).await.0, b"back");
    assert_eq!(listen.metrics.connections.load(Ordering::Relaxed), 1);
    assert_eq!(connect.metrics.connections.load(Ordering::Relaxed), 1);
}

/// A connector that starts before the listener exists retries until it appears.
#[tokio::test]
async fn refused_connect_is_retried() {
    let port = TcpListener::bind(lo(0))
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let (a, a_addr) = udp().await;
    let connect = start(TunnelConfig::new(
        TcpRole::Connect(lo(port).to_string()),
        UdpBind::Addr(lo(0)),
        UdpSendTo::Addr(a_addr),
    ))
    .await;
    until(|| connect.metrics.connect_failures.load(Ordering::Relaxed) >= 2).await;
    let (b, b_addr) = udp().await;
    let listen = start(TunnelConfig::new(
        TcpRole::Listen(lo(port)),
        UdpBind::Addr(lo(0)),
        UdpSendTo::Addr(b_addr),
    ))
    .await;
    until(|| listen.metrics.connections.load(Ordering::Relaxed) == 1).await;
    a.send_to(b"late", connect.udp.expect("bound"))
        .await
        .expect("send");
    assert_eq!(recv(&b).await.0, b"late");
}

/// With --psk, a stranger's connection (no key, or the wrong key) cannot replace the tunnel.
#[tokio::test]
async fn psk_keeps_strangers_out() {
    let (a, a_addr) = udp().await;
    let (b, b_addr) = udp().await;
    let mut lc = TunnelConfig::new(
        TcpRole::Listen(lo(0)),
        UdpBind::Addr(lo(0)),
        UdpSendTo::Addr(b_addr),
    );
    lc.psk = Some(b"correct horse".to_vec());
    let listen = start(lc).await;
    let tcp = listen.tcp.expect("listening");
    let mut cc = TunnelConfig::new(
        TcpRole::Connect(tcp.to_string()),
        UdpBind::Addr(lo(0)),
        UdpSendTo::Addr(a_addr),
    );
    cc.psk = Some(b"correct horse".to_vec());
    let connect = start(cc).await;
    until(|| listen.metrics.connections.load(Ordering::Relaxed) == 1).await;
    // A stranger speaking the original's plain framing, no handshake.
    let mut stranger = TcpStream::connect(tcp).await.expect("connect");
    let _ = stranger.write_all(&hex_bytes("0500000068656c6c6f")).await;
    // A connector with the wrong key.
    let mut wc = TunnelConfig::new(
        TcpRole::Connect(tcp.to_string()),
        UdpBind::Addr(lo(0)),
        UdpSendTo::Addr(a_addr),
    );
    wc.psk = Some(b"wrong".to_vec());
    let wrong = start(wc).await;
    until(|| wrong.metrics.auth_failures.load(Ordering::Relaxed) >= 1).await;
    until(|| listen.metrics.auth_failures.load(Ordering::Relaxed) >= 1).await;
    drop(wrong);
    // The real tunnel still carries traffic both ways, and the stranger's frame never arrived.
    a.send_to(b"real", connect.udp.expect("bound"))
        .await
        .expect("send");
    assert_eq!(recv(&b).await.0, b"real");
    b.send_to(b"reply", listen.udp.expect("bound"))
        .await
        .expect("send");
    assert_eq!(recv(&a).await.0, b"reply");
    assert_eq!(listen.metrics.connections.load(Ordering::Relaxed), 1);
    let mut extra = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(200), b.recv_from(&mut extra))
            .await
            .is_err(),
        "stranger's datagram must not arrive"
    );
}

/// Kills a child process when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary with the original's command line (bare ports take the original's defaults).
#[tokio::test]
async fn binary_round_trip_with_the_original_flags() {
    let exe = env!("CARGO_BIN_EXE_udp-over-tcp");
    let (a, a_addr) = udp().await;
    let (b, b_addr) = udp().await;
    // Every port is 0: each process binds its own and logs it ("udp-over-tcp running").
    let spawn = |args: Vec<String>| {
        let mut child = std::process::Command::new(exe)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn udp-over-tcp");
        let stderr = child.stderr.take().expect("stderr piped");
        let line = common::wait_for_line(stderr, "udp-over-tcp running", T);
        (Child(child), line)
    };
    let (_listen, listening) = spawn(vec![
        "-l".into(),
        "127.0.0.1:0".into(),
        "-u".into(),
        "127.0.0.1:0".into(),
        "-p".into(),
        b_addr.port().to_string(),
    ]);
    let tcp: SocketAddr = common::field(&listening, "tcp")
        .parse()
        .expect("tcp address");
    // The original's bare-port form of --tcp-connect.
    let (_connect, connecting) = spawn(vec![
        "--tcp-connect".into(),
        tcp.port().to_string(),
        "--udp-bind".into(),
        "127.0.0.1:0".into(),
        "--udp-sendto".into(),
        a_addr.port().to_string(),
    ]);
    let x: SocketAddr = common::field(&connecting, "udp")
        .parse()
        .expect("udp address");
    let x = x.port();
    // No event tells us when the processes are up: retry until the first datagram crosses.
    let mut buf = [0u8; 64];
    let first = timeout(T, async {
        loop {
            a.send_to(b"ping", lo(x)).await.expect("send");
            if let Ok(Ok(r)) = timeout(Duration::from_millis(100), b.recv_from(&mut buf)).await {
                return r;
            }
        }
    })
    .await
    .expect("the binaries tunnel a datagram within 10 s");
    // The listening side's UDP socket (-u, port 0 here) is where the datagram comes from.
    let y = first.1;
    assert_eq!((&buf[..first.0], y.ip()), (&b"ping"[..], lo(0).ip()));
    b.send_to(b"pong", y).await.expect("send");
    assert_eq!(recv(&a).await, (b"pong".to_vec(), lo(x)));
    // Bad input gets an error that names it.
    let out = std::process::Command::new(exe)
        .args(["-l", "7878", "-u", "auto", "-p", "9"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--framing flow"));
}

/// Idle flows are closed (bounded state), and a flow that speaks again gets a new socket.
#[tokio::test]
async fn idle_flows_expire() {
    let (server, server_addr) = udp().await;
    let mut lc = TunnelConfig::new(
        TcpRole::Listen(lo(0)),
        UdpBind::Auto,
        UdpSendTo::Addr(server_addr),
    );
    lc.framing = Framing::Flow;
    lc.flow_idle = Duration::from_millis(300);
    let listen = start(lc).await;
    let mut cc = TunnelConfig::new(
        TcpRole::Connect(listen.tcp.expect("listening").to_string()),
        UdpBind::Addr(lo(0)),
        UdpSendTo::AutoPort([127, 0, 0, 1].into()),
    );
    cc.framing = Framing::Flow;
    let connect = start(cc).await;
    let (c, _) = udp().await;
    c.send_to(b"a", connect.udp.expect("bound"))
        .await
        .expect("send");
    let (_, first) = recv(&server).await;
    assert_eq!(listen.metrics.flows_open.load(Ordering::Relaxed), 1);
    until(|| listen.metrics.flows_open.load(Ordering::Relaxed) == 0).await;
    c.send_to(b"b", connect.udp.expect("bound"))
        .await
        .expect("send");
    let (d, second) = recv(&server).await;
    assert_eq!(d, b"b");
    assert_ne!(first, second, "a fresh socket after expiry");
}

/// `run` returns when its shutdown future completes (and the sockets are released).
#[tokio::test]
async fn shutdown_stops_the_tunnel() {
    let t = Tunnel::bind(TunnelConfig::new(
        TcpRole::Listen(lo(0)),
        UdpBind::Addr(lo(0)),
        UdpSendTo::Addr(lo(9)),
    ))
    .await
    .expect("binds");
    let tcp = t.tcp_local_addr().expect("listening");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(t.run(async {
        let _ = stopped.await;
    }));
    TcpStream::connect(tcp)
        .await
        .expect("accepting while running");
    stop.send(()).expect("the tunnel is waiting");
    timeout(T, run).await.expect("returns").expect("no panic");
    assert!(
        TcpListener::bind(tcp).await.is_ok(),
        "the port is free again"
    );
}
