//! The relay mode on loopback, in process, with a real quic-relay: SOCKS5 TCP and UDP through
//! a relay session with the path reported by both ends; a client with the wrong certificate
//! pin refused while the server goes on to serve the next, correct client; relay tokens; two
//! relays, the first in both ends' order draining, so the pair meets on the second.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mqproxy::client::RelayDialer;
use mqproxy::client::{Client, ClientConfig};
use mqproxy::peer_sdk::{Fingerprint, Uuid};
use mqproxy::relay_session::{PathMetrics, RelayTarget};
use mqproxy::server::RelayServer;
use mqproxy::tls::ClientVerify;
use mqproxy::{proto::TargetAddr, udpsocks::UdpAssociation, AbortOnDrop};
use quic_relay::proto::ErrReason;
use quic_relay::server::{Server as Relay, ServerHandle};
use quic_relay::sessions::{RegResult, RelayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

fn start_relay() -> ServerHandle {
    start_relay_with(RelayConfig::default())
}

fn start_relay_with(cfg: RelayConfig) -> ServerHandle {
    Relay::bind("127.0.0.1:0".parse().expect("literal"), cfg, 1 << 20)
        .expect("bind relay")
        .spawn()
        .expect("spawn relay")
}

fn target(relay: &ServerHandle, n: u128) -> RelayTarget {
    RelayTarget::new(
        relay.local_addr(),
        Uuid::from_u128(0x6d71_0000_0000_4000_8000_0000_0000_0000 | n),
    )
}

/// A relay-mode server; returns its pin and path metrics.
async fn start_server(
    target: RelayTarget,
) -> (
    Fingerprint,
    Arc<PathMetrics>,
    Arc<mqproxy::server::ServerCounters>,
    AbortOnDrop<()>,
) {
    let dir = temp_dir("relay-srv");
    let mut cfg = server_config(&Opts::default(), &dir);
    cfg.relay = Some(target);
    let server = tokio::time::timeout(WAIT, RelayServer::bind(cfg))
        .await
        .expect("registered in time")
        .expect("server registers");
    let fp = server.fingerprint();
    let paths = server.path_metrics();
    let metrics = server.metrics();
    let task = AbortOnDrop(tokio::spawn(server.run(std::future::pending())));
    (fp, paths, metrics, task)
}

/// A relay-mode client verifying the server with `verify`.
async fn start_client(
    target: RelayTarget,
    verify: ClientVerify,
) -> (SocketAddr, Arc<PathMetrics>, AbortOnDrop<()>) {
    let mut cfg = ClientConfig::new("relay", TOKEN, verify.clone());
    cfg.relay = Some(target.clone());
    cfg.socks5 = "127.0.0.1:0".parse().expect("literal");
    let dialer = RelayDialer::new(target, &verify, cfg.idle_timeout).expect("dialer");
    let paths = dialer.metrics();
    let client = Client::with_dialer(cfg, dialer)
        .await
        .expect("client binds");
    let socks = client.socks_addr();
    let task = AbortOnDrop(tokio::spawn(client.run(std::future::pending())));
    (socks, paths, task)
}

/// SOCKS5 CONNECT to `dest`; returns the reply code and the stream.
async fn socks_connect(proxy: SocketAddr, dest: SocketAddr) -> (u8, TcpStream) {
    let SocketAddr::V4(d) = dest else {
        panic!("IPv4 only")
    };
    let mut s = TcpStream::connect(proxy).await.expect("connect to SOCKS");
    s.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.expect("method");
    assert_eq!(m, [5, 0]);
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&d.ip().octets());
    req.extend_from_slice(&d.port().to_be_bytes());
    s.write_all(&req).await.expect("request");
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.expect("reply");
    (reply[1], s)
}

async fn tcp_echo() -> (SocketAddr, AbortOnDrop<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    let t = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (a, AbortOnDrop(t))
}

/// Echoes 1 MiB through the proxy byte for byte.
async fn echo_through(socks: SocketAddr, echo: SocketAddr) {
    let (code, s) = tokio::time::timeout(WAIT, socks_connect(socks, echo))
        .await
        .expect("CONNECT answered in time");
    assert_eq!(code, 0, "CONNECT succeeded");
    let data: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&d2).await.expect("write");
        w.shutdown().await.expect("shutdown");
    });
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    writer.await.expect("writer");
    assert!(back == data, "echo differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_through_a_relay_session_report_the_path() {
    init_tracing();
    let relay = start_relay();
    let t = target(&relay, 1);
    let (fp, server_paths, server_metrics, _server) = start_server(t.clone()).await;
    let (socks, client_paths, _client) = start_client(t, ClientVerify::Pinned(fp)).await;
    let (echo, _e) = tcp_echo().await;
    echo_through(socks, echo).await;

    let (uecho, _u) = udp_echo().await;
    let assoc = UdpAssociation::open(socks, None).await.expect("associate");
    for i in 0..20u32 {
        let payload = i.to_be_bytes();
        let mut ok = false;
        for _ in 0..10 {
            assoc
                .send_to(&TargetAddr::Ip(uecho), &payload)
                .await
                .expect("send");
            if let Ok(Ok((_, back))) =
                tokio::time::timeout(Duration::from_millis(500), assoc.recv_from()).await
            {
                if back[..] == payload {
                    ok = true;
                    break;
                }
            }
        }
        assert!(ok, "datagram {i} echoed");
    }

    assert_eq!(client_paths.connections.load(Ordering::Relaxed), 1);
    assert_eq!(server_paths.connections.load(Ordering::Relaxed), 1);
    assert_eq!(gauge(&server_metrics.authenticated), 1);
    // Each end reports a live path, and exactly one of its two gauges is set.
    for (who, p) in [("client", &client_paths), ("server", &server_paths)] {
        assert!(p.path().is_some(), "{who} reports a path");
        assert_eq!(
            p.direct.load(Ordering::Relaxed) + p.relayed.load(Ordering::Relaxed),
            1,
            "{who}: one path gauge set"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_is_refused_and_the_server_serves_the_next_client() {
    init_tracing();
    let relay = start_relay();
    let t = target(&relay, 2);
    let (fp, server_paths, server_metrics, _server) = start_server(t.clone()).await;
    let (echo, _e) = tcp_echo().await;

    let wrong = Fingerprint([0x5a; 32]);
    let (socks, client_paths, client) = start_client(t.clone(), ClientVerify::Pinned(wrong)).await;
    // The link never comes up, so the CONNECT fails once the client stops waiting for it.
    let (code, _s) = tokio::time::timeout(WAIT, socks_connect(socks, echo))
        .await
        .expect("CONNECT answered in time");
    assert_eq!(code, 1, "general failure without a verified server");
    assert_eq!(client_paths.connections.load(Ordering::Relaxed), 0);
    assert_eq!(gauge(&server_metrics.authenticated), 0);
    drop(client);

    let (socks, _paths, _client) = start_client(t, ClientVerify::Pinned(fp)).await;
    echo_through(socks, echo).await;
    assert_eq!(gauge(&server_metrics.authenticated), 1);
    assert_eq!(server_paths.connections.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_requires_tokens_admits_the_server_and_client_that_carry_one() {
    init_tracing();
    let secret = b"mqproxy-relay-test-secret".to_vec();
    let relay = start_relay_with(RelayConfig {
        secrets: vec![secret.clone()],
        ..RelayConfig::default()
    });
    let mut t = target(&relay, 3);

    // Without a token the server fails at start with the relay's reason.
    let mut cfg = server_config(&Opts::default(), &temp_dir("relay-tok"));
    cfg.relay = Some(t.clone());
    let err = tokio::time::timeout(WAIT, RelayServer::bind(cfg))
        .await
        .expect("answered in time")
        .expect_err("refused without a token")
        .to_string();
    assert!(err.contains("refused"), "{err}");

    // The minted form, through the same parser as --relay-token.
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let minted = quic_relay::proto::Token::mint(&secret, t.session, expiry);
    let flag = format!("{}:{}", minted.expiry, hex::encode(minted.mac));
    t.token = Some(flag.parse().expect("token parses"));
    let (fp, _paths, server_metrics, _server) = start_server(t.clone()).await;
    let (socks, client_paths, _client) = start_client(t, ClientVerify::Pinned(fp)).await;
    let (echo, _e) = tcp_echo().await;
    echo_through(socks, echo).await;
    assert_eq!(client_paths.connections.load(Ordering::Relaxed), 1);
    assert_eq!(gauge(&server_metrics.authenticated), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_relays_the_pair_meets_on_the_next_when_the_first_drains() {
    init_tracing();
    let relays = [start_relay(), start_relay()];
    let t = target(&relays[0], 4);
    // The relay both ends try first: the session's rendezvous-hash order, as peer-sdk
    // computes it. It drains, so it answers every registration `ERR moved`.
    let mut o = mqproxy::peer_sdk::Options::new(relays[0].local_addr(), t.session);
    o.relays = relays.iter().map(|r| r.local_addr()).collect();
    let order = o.relay_order();
    let (first, next) = if order[0] == relays[0].local_addr() {
        (&relays[0], &relays[1])
    } else {
        (&relays[1], &relays[0])
    };
    first.set_draining(true);
    // The ends list the relays in different orders: only the set matters.
    let server_t = RelayTarget {
        relays: vec![relays[0].local_addr(), relays[1].local_addr()],
        ..t.clone()
    };
    let client_t = RelayTarget {
        relays: vec![relays[1].local_addr(), relays[0].local_addr()],
        ..t
    };
    let (fp, server_paths, server_metrics, _server) = start_server(server_t).await;
    let (socks, client_paths, _client) = start_client(client_t, ClientVerify::Pinned(fp)).await;
    let (echo, _e) = tcp_echo().await;
    echo_through(socks, echo).await;
    assert_eq!(client_paths.connections.load(Ordering::Relaxed), 1);
    assert_eq!(server_paths.connections.load(Ordering::Relaxed), 1);
    assert_eq!(gauge(&server_metrics.authenticated), 1);

    // The relays publish their counters at their next timer tick: wait for the pairing to show.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (drained, used) = loop {
        let (d, u) = (first.metrics().snapshot(), next.metrics().snapshot());
        if u.reg(RegResult::Join) >= 1 && d.reg(RegResult::Refused(ErrReason::Moved)) >= 2 {
            break (d, u);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second relay paired the session and the first refused both ends; \
             drained {d:?}, used {u:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        drained.reg(RegResult::New),
        0,
        "the draining relay took no session"
    );
    assert_eq!(drained.reg(RegResult::Join), 0);
    assert_eq!(used.reg(RegResult::New), 1, "{used:?}");
}
