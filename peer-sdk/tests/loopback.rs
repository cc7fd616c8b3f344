//! peer-sdk on loopback with a real relay: both paths, pinning, path upgrade under a live
//! connection, a relay restart mid-transfer, and what a second socket on the port does.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use peer_sdk::{
    ClientTls, Fingerprint, Identity, Options, Path, Peer, PeerConnection, ServerTls, Strategy,
    Uuid,
};
use quic_relay::server::{Server, ServerHandle};
use quic_relay::sessions::RelayConfig;

const WAIT: Duration = Duration::from_secs(20);

fn relay_on(addr: &str) -> ServerHandle {
    Server::bind(addr.parse().expect("addr"), RelayConfig::default(), 1 << 20)
        .expect("bind relay")
        .spawn()
        .expect("spawn relay")
}

fn session(n: u128) -> Uuid {
    Uuid::from_u128(0xfeed_0000_0000_4000_8000_0000_0000_0000 | n)
}

fn opts(relay: SocketAddr, s: Uuid, strategy: Strategy) -> Options {
    let mut o = Options::new(relay, s);
    o.strategy = strategy;
    o.register_timeout = WAIT;
    o.peer_timeout = WAIT;
    o
}

/// Connects a listener and a dialer; the listener echoes every stream and datagram.
async fn pair(
    relay: SocketAddr,
    s: Uuid,
    listener: Strategy,
    dialer: Options,
) -> (PeerConnection, tokio::task::JoinHandle<()>) {
    pair_with(opts(relay, s, listener), dialer).await
}

async fn echo(conn: PeerConnection) {
    let c = conn.connection().clone();
    let dgrams = tokio::spawn(async move {
        while let Ok(d) = c.read_datagram().await {
            let _ = c.send_datagram(d);
        }
    });
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut recv, &mut send).await;
            let _ = send.finish();
            let _ = send.stopped().await;
        });
    }
    dgrams.abort();
}

/// Sends `n` bytes on a new stream and checks the echo byte for byte.
async fn stream_echo(conn: &PeerConnection, n: usize) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    let data: Vec<u8> = (0..n).map(|i| (i * 131 % 251) as u8).collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        send.write_all(&data).await.expect("write");
        send.finish().expect("finish");
    });
    let got = tokio::time::timeout(WAIT, recv.read_to_end(n + 1))
        .await
        .expect("echo in time")
        .expect("read");
    writer.await.expect("writer");
    assert!(got == expected, "echo of {n} bytes differs");
}

async fn datagram_echo(conn: &PeerConnection, n: u32) {
    for i in 0..n {
        let mut d = vec![0u8; 256];
        d[..4].copy_from_slice(&i.to_be_bytes());
        conn.send_datagram(d.clone().into()).expect("send datagram");
        // One in flight at a time: loss-free on loopback, so every echo must come back.
        let back = tokio::time::timeout(WAIT, conn.read_datagram())
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(back.as_ref(), d.as_slice());
    }
}

#[tokio::test]
async fn direct_path_on_loopback_with_stream_and_datagrams() {
    let relay = relay_on("127.0.0.1:0");
    let addr = relay.local_addr();
    let (conn, server) = pair(
        addr,
        session(1),
        Strategy::Auto,
        opts(addr, session(1), Strategy::Auto),
    )
    .await;
    assert!(
        matches!(conn.path_at_connect(), Path::Direct(_)),
        "{:?}",
        conn.path_at_connect()
    );
    stream_echo(&conn, 2 << 20).await;
    datagram_echo(&conn, 200).await;
    let stats = conn.socket_stats();
    assert!(stats.tx_direct.load(std::sync::atomic::Ordering::Relaxed) > 0);
    conn.close(0, b"bye").await;
    server.await.expect("listener");
}

#[tokio::test]
async fn relay_only_carries_everything_through_the_relay() {
    let relay = relay_on("127.0.0.1:0");
    let addr = relay.local_addr();
    let (conn, server) = pair(
        addr,
        session(2),
        Strategy::RelayOnly,
        opts(addr, session(2), Strategy::RelayOnly),
    )
    .await;
    assert_eq!(conn.path_at_connect(), Path::Relay);
    stream_echo(&conn, 2 << 20).await;
    datagram_echo(&conn, 100).await;
    let s = relay.metrics().snapshot();
    assert!(
        s.forwarded_packets > 1000,
        "the relay carried the traffic: {}",
        s.forwarded_packets
    );
    assert_eq!(
        conn.socket_stats()
            .tx_direct
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    conn.close(0, b"bye").await;
    server.await.expect("listener");
}

#[tokio::test]
async fn a_wrong_pin_fails_the_handshake() {
    let relay = relay_on("127.0.0.1:0");
    let addr = relay.local_addr();
    let id = Identity::generate().expect("identity");
    let lopts = opts(addr, session(3), Strategy::Auto);
    let _server =
        tokio::spawn(async move { peer_sdk::accept(lopts, ServerTls::Identity(id)).await });
    let wrong: Fingerprint = Identity::generate().expect("identity").fingerprint();
    let r = tokio::time::timeout(
        WAIT,
        peer_sdk::connect(
            opts(addr, session(3), Strategy::Auto),
            ClientTls::Pinned(wrong),
        ),
    )
    .await
    .expect("fails in time");
    let err = r.expect_err("a certificate that does not match the pin must be refused");
    assert!(matches!(err, peer_sdk::Error::Connection(_)), "{err}");
}

#[tokio::test]
async fn traffic_moves_to_a_direct_path_found_after_connecting() {
    let relay = relay_on("127.0.0.1:0");
    let addr = relay.local_addr();
    // No punching window: the handshake happens on the relay, punching continues behind it.
    let mut dialer = opts(addr, session(4), Strategy::Auto);
    dialer.direct_timeout = Duration::ZERO;
    let (conn, server) = pair(addr, session(4), Strategy::Auto, dialer).await;
    let mut status = conn.watch_status();
    tokio::time::timeout(WAIT, status.wait_for(|s| matches!(s.path, Path::Direct(_))))
        .await
        .expect("direct path found in time")
        .expect("status");
    let stats = conn.socket_stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (direct, relayed) = (load(&stats.tx_direct), load(&stats.tx_relay));
    stream_echo(&conn, 1 << 20).await;
    // Counted in transmits (a GSO batch is one): a megabyte is dozens of them.
    assert!(
        load(&stats.tx_direct) > direct + 20,
        "the stream went direct"
    );
    assert_eq!(
        load(&stats.tx_relay),
        relayed,
        "nothing went through the relay any more"
    );
    conn.close(0, b"bye").await;
    server.await.expect("listener");
}

#[tokio::test]
async fn the_connection_survives_a_relay_restart() {
    let relay = relay_on("127.0.0.1:0");
    let addr = relay.local_addr();
    let (conn, server) = pair(
        addr,
        session(5),
        Strategy::RelayOnly,
        opts(addr, session(5), Strategy::RelayOnly),
    )
    .await;
    stream_echo(&conn, 256 << 10).await;
    assert!(relay.shutdown(), "relay stopped cleanly");
    // A new relay process on the same port knows nothing of the session.
    let relay = relay_on(&addr.to_string());
    // The SDK re-registers on its own (silence triggers it within seconds).
    stream_echo(&conn, 256 << 10).await;
    datagram_echo(&conn, 20).await;
    let s = relay.metrics().snapshot();
    assert!(
        s.sessions_paired == 1 || s.forwarded_packets > 0,
        "re-registered with the new relay: {s:?}"
    );
    conn.close(0, b"bye").await;
    server.await.expect("listener");
}

#[tokio::test]
async fn a_second_connected_socket_on_the_port_steals_the_relay_traffic() {
    // Documents the hazard the crate docs warn about (SO_REUSEPORT delivery on Linux).
    let relay = relay_on("127.0.0.1:0");
    let addr = relay.local_addr();
    let peer = Peer::bind(opts(addr, session(6), Strategy::RelayOnly))
        .await
        .expect("bind");
    let port = peer.local_addr().expect("addr").port();
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    sock.set_reuse_address(true).expect("reuseaddr");
    sock.set_reuse_port(true).expect("reuseport");
    sock.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
        .expect("share the port");
    sock.connect(&addr.into()).expect("connect to the relay");
    let thief: UdpSocket = sock.into();
    thief.set_read_timeout(Some(WAIT)).expect("timeout");
    // The relay answers the SDK's next registration; the connected socket gets the reply.
    // (Blocking receive on a blocking thread: the SDK's driver must keep running meanwhile.)
    let got = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 256];
        let n = thief
            .recv(&mut buf)
            .expect("the connected socket receives the relay's datagrams");
        buf[..n].to_vec()
    })
    .await
    .expect("receiver");
    assert!(
        got.starts_with(b"ACK"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    drop(peer);
}

#[tokio::test]
async fn a_relay_that_requires_tokens_admits_only_peers_that_carry_one() {
    let secret = b"peer-sdk-test-secret-0123456789".to_vec();
    let cfg = RelayConfig {
        secrets: vec![secret.clone()],
        ..RelayConfig::default()
    };
    let relay = Server::bind("127.0.0.1:0".parse().expect("addr"), cfg, 1 << 20)
        .expect("bind")
        .spawn()
        .expect("spawn");
    let addr = relay.local_addr();
    let s = session(7);
    // Without a token: a clear refusal, not a timeout.
    let err = Peer::bind(opts(addr, s, Strategy::Auto))
        .await
        .expect_err("refused");
    assert!(
        matches!(
            err,
            peer_sdk::Error::Refused {
                reason: Some(peer_sdk::proto::ErrReason::Auth),
                ..
            }
        ),
        "{err}"
    );
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let mut with_token = opts(addr, s, Strategy::Auto);
    with_token.token = Some(peer_sdk::proto::Token::mint(&secret, s, expiry));
    let listener_opts = with_token.clone();
    let id = Identity::generate().expect("identity");
    let pin = id.fingerprint();
    let server = tokio::spawn(async move {
        let conn = peer_sdk::accept(listener_opts, ServerTls::Identity(id))
            .await
            .expect("accept");
        echo(conn).await;
    });
    let conn = peer_sdk::connect(with_token, ClientTls::Pinned(pin))
        .await
        .expect("connect with a token");
    stream_echo(&conn, 64 << 10).await;
    conn.close(0, b"bye").await;
    server.await.expect("listener");
}

fn relay_with_tcp(tcp: quic_relay::tcp::TcpConfig) -> ServerHandle {
    Server::bind_with_tcp(
        "127.0.0.1:0".parse().expect("addr"),
        RelayConfig::default(),
        1 << 20,
        Some(tcp),
    )
    .expect("bind relay")
    .spawn()
    .expect("spawn relay")
}

#[tokio::test]
async fn forced_tcp_dialer_reaches_a_udp_listener_through_the_relay() {
    let relay = relay_with_tcp(Default::default());
    let addr = relay.local_addr();
    let mut dialer = opts(addr, session(40), Strategy::Auto);
    dialer.tcp_fallback = peer_sdk::TcpFallback::Always;
    let (conn, server) = pair(addr, session(40), Strategy::Auto, dialer).await;
    assert_eq!(conn.path_at_connect(), Path::RelayTcp);
    assert_eq!(conn.path().kind(), "relay-tcp");
    stream_echo(&conn, 2 << 20).await;
    datagram_echo(&conn, 50).await;
    let s = conn.socket_stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert!(s.tx_relay_tcp.load(Relaxed) > 100, "QUIC went over TCP");
    assert!(s.rx_relay_tcp.load(Relaxed) > 100, "and came back over TCP");
    assert_eq!(
        s.tx_relay.load(Relaxed),
        0,
        "nothing went to the relay over UDP"
    );
    assert!(relay.metrics().tcp.frames_in.load(Relaxed) > 100);
    conn.close(0, b"done").await;
    server.abort();
}

#[tokio::test]
async fn the_tcp_link_reconnects_after_the_relay_closes_it() {
    let relay = relay_with_tcp(Default::default());
    let addr = relay.local_addr();
    let mut dialer = opts(addr, session(41), Strategy::RelayOnly);
    dialer.tcp_fallback = peer_sdk::TcpFallback::Always;
    let (conn, server) = pair(addr, session(41), Strategy::RelayOnly, dialer).await;
    stream_echo(&conn, 64 << 10).await;
    // A relay restart closes every TCP connection and forgets every session.
    drop(relay);
    let relay = loop {
        let s = Server::bind(addr, RelayConfig::default(), 1 << 20).expect("rebind relay");
        match s.with_tcp(quic_relay::tcp::TcpConfig::default()) {
            Ok(s) => break s.spawn().expect("spawn relay"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    // The SDK reconnects, re-registers first thing, and the same QUIC connection carries on.
    stream_echo(&conn, 64 << 10).await;
    assert_eq!(conn.path(), Path::RelayTcp);
    assert!(
        relay
            .metrics()
            .tcp
            .accepted
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    conn.close(0, b"done").await;
    server.abort();
}

#[tokio::test]
async fn registrations_keep_an_idle_tcp_link_open() {
    // The relay closes TCP connections silent for 2 s; the SDK re-registers every 500 ms and
    // QUIC sends no keepalives of its own here, so only the registrations keep the link open.
    let relay = relay_with_tcp(quic_relay::tcp::TcpConfig {
        idle_timeout: Duration::from_secs(2),
        ..Default::default()
    });
    let addr = relay.local_addr();
    let mut transport = peer_sdk::quinn::TransportConfig::default();
    transport.keep_alive_interval(None);
    transport.max_idle_timeout(Some(
        Duration::from_secs(30).try_into().expect("fits a VarInt"),
    ));
    let mut dialer = opts(addr, session(42), Strategy::RelayOnly);
    dialer.tcp_fallback = peer_sdk::TcpFallback::Always;
    dialer.keepalive = Duration::from_millis(500);
    dialer.transport = Some(std::sync::Arc::new(transport));
    let (conn, server) = pair(addr, session(42), Strategy::RelayOnly, dialer).await;
    stream_echo(&conn, 1000).await;
    // Idle for three times the relay's idle timeout: this wait is the behaviour under test.
    tokio::time::sleep(Duration::from_secs(6)).await;
    use std::sync::atomic::Ordering::Relaxed;
    let tcp = &relay.metrics().tcp;
    assert_eq!(
        tcp.closed_idle.load(Relaxed),
        0,
        "the relay found the link idle"
    );
    assert_eq!(
        tcp.accepted.load(Relaxed),
        1,
        "the link was never re-opened"
    );
    stream_echo(&conn, 1000).await;
    conn.close(0, b"done").await;
    server.abort();
}

/// Connects a listener and a dialer with their own options; the listener echoes.
async fn pair_with(
    lopts: Options,
    dopts: Options,
) -> (PeerConnection, tokio::task::JoinHandle<()>) {
    let id = Identity::generate().expect("identity");
    let pin = id.fingerprint();
    let server = tokio::spawn(async move {
        let conn = peer_sdk::accept(lopts, ServerTls::Identity(id))
            .await
            .expect("accept");
        echo(conn).await;
    });
    let conn = tokio::time::timeout(WAIT, peer_sdk::connect(dopts, ClientTls::Pinned(pin)))
        .await
        .expect("connect in time")
        .expect("connect");
    (conn, server)
}

#[tokio::test]
async fn a_draining_relay_sends_new_sessions_to_the_next_relay_and_finishes_its_own() {
    let relays = [relay_on("127.0.0.1:0"), relay_on("127.0.0.1:0")];
    let addrs: Vec<SocketAddr> = relays.iter().map(|r| r.local_addr()).collect();
    let multi = |s: Uuid| {
        let mut o = opts(addrs[0], s, Strategy::RelayOnly);
        o.relays = addrs.clone();
        o
    };
    let old = session(40);
    let first = multi(old).relay_order()[0];
    let draining = relays
        .iter()
        .find(|r| r.local_addr() == first)
        .expect("relay");
    let (conn, server) = pair_with(multi(old), multi(old)).await;
    assert_eq!(conn.status().relay, Some(first));
    stream_echo(&conn, 1 << 20).await;
    draining.set_draining(true);
    // A new session whose first relay in HRW order is the draining one: both peers are sent
    // on (ERR moved) and meet at the next.
    let new = (41..)
        .map(session)
        .find(|&s| multi(s).relay_order()[0] == first)
        .expect("a session ordered like that");
    let next = multi(new).relay_order()[1];
    let (conn2, server2) = pair_with(multi(new), multi(new)).await;
    assert_eq!(conn2.status().relay, Some(next), "moved on");
    stream_echo(&conn2, 1 << 20).await;
    // The existing session goes on through the draining relay until it ends.
    stream_echo(&conn, 1 << 20).await;
    datagram_echo(&conn, 20).await;
    assert_eq!(conn.status().relay, Some(first));
    assert_eq!(conn.status().relay_moves, 0);
    let moved = draining.metrics().snapshot();
    assert!(moved.forwarded_packets > 100, "{moved:?}");
    for (c, s) in [(conn, server), (conn2, server2)] {
        c.close(0, b"bye").await;
        s.await.expect("listener");
    }
}
