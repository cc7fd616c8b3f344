//! peer-sdk across real kernel NATs (netlab): every pair of NAT types connects and echoes, on
//! the path NAT theory predicts; NAT rebinding and a relay restart mid-transfer are survived;
//! connect times with 20 ms of delay per link.
//!
//! Needs root and nftables: skipped with a message elsewhere, never under `CI=true`.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netlab::{Lab, LabConfig, LinkShape, NatType, Side};
use peer_sdk::{ClientTls, Fingerprint, Identity, Options, Path, PeerConnection, ServerTls, Uuid};
use quic_relay::server::{Server, ServerHandle};
use quic_relay::sessions::RelayConfig;

const WAIT: Duration = Duration::from_secs(30);
const RELAY_PORT: u16 = 4433;

/// Timing tests measure connect latency: run them one at a time.
static TIMING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn relay_addr(lab: &Lab) -> SocketAddr {
    SocketAddr::from((lab.relay_ip(), RELAY_PORT))
}

fn start_relay(lab: &Lab) -> ServerHandle {
    let addr = relay_addr(lab);
    lab.run_in(&lab.relay_ns(), move || {
        Server::bind(addr, RelayConfig::default(), 4 << 20)
            .expect("bind relay")
            .spawn()
            .expect("spawn relay")
    })
    .expect("relay namespace")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn options(lab: &Lab, session: Uuid) -> Options {
    let mut o = Options::new(relay_addr(lab), session);
    o.register_timeout = WAIT;
    o.peer_timeout = WAIT;
    o
}

/// Starts an echoing listener on `side`; returns its pin once it is registered.
fn listener(lab: &Lab, side: Side, opts: Options) -> (Fingerprint, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let handle = lab
        .spawn_thread(&lab.peer_ns(side), move || {
            runtime().block_on(async move {
                let id = Identity::generate().expect("identity");
                let pin = id.fingerprint();
                let peer = peer_sdk::Peer::bind(opts)
                    .await
                    .expect("listener registers");
                tx.send(pin).expect("send pin");
                let conn = peer.accept(ServerTls::Identity(id)).await.expect("accept");
                echo(conn).await;
            })
        })
        .expect("listener thread");
    let pin = rx.recv_timeout(WAIT).expect("listener registered in time");
    (pin, handle)
}

async fn echo(conn: PeerConnection) {
    let c = conn.connection().clone();
    let dgrams = tokio::spawn(async move {
        while let Ok(d) = c.read_datagram().await {
            let _ = c.send_datagram(d);
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tasks.spawn(async move {
            let _ = tokio::io::copy(&mut recv, &mut send).await;
            let _ = send.finish();
            let _ = send.stopped().await;
        });
    }
    dgrams.abort();
    tasks.shutdown().await;
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Sends `n` bytes on a new stream and checks the echo byte for byte.
async fn stream_echo(conn: &PeerConnection, n: usize) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        let mut buf = vec![0u8; 64 << 10];
        while sent < n {
            let k = (n - sent).min(buf.len());
            for (j, b) in buf[..k].iter_mut().enumerate() {
                *b = pattern(sent + j);
            }
            send.write_all(&buf[..k]).await.expect("write");
            sent += k;
        }
        send.finish().expect("finish");
    });
    let mut got = 0;
    let mut buf = vec![0u8; 64 << 10];
    while let Some(k) = tokio::time::timeout(WAIT, recv.read(&mut buf))
        .await
        .expect("echo stalled")
        .expect("read")
    {
        for (j, b) in buf[..k].iter().enumerate() {
            assert_eq!(*b, pattern(got + j), "echo differs at byte {}", got + j);
        }
        got += k;
    }
    assert_eq!(got, n, "echo length");
    writer.await.expect("writer");
}

/// Echoes `n` numbered datagrams, one in flight at a time, resending after 300 ms (datagrams
/// may be lost; each must come back eventually).
async fn datagram_echo(conn: &PeerConnection, n: u32) {
    for i in 0..n {
        let mut d = vec![0u8; 200];
        d[..4].copy_from_slice(&i.to_be_bytes());
        let mut tries = 0;
        loop {
            conn.send_datagram(d.clone().into()).expect("send datagram");
            match tokio::time::timeout(Duration::from_millis(300), async {
                loop {
                    let back = conn.read_datagram().await.expect("read datagram");
                    if back.as_ref() == d.as_slice() {
                        return;
                    }
                }
            })
            .await
            {
                Ok(()) => break,
                Err(_) => {
                    tries += 1;
                    assert!(tries < 20, "datagram {i} never echoed");
                }
            }
        }
    }
}

/// Runs the dialer on `side`: connects, then `work`; returns the path at connect and the time
/// connect took.
fn dial<F, Fut>(lab: &Lab, side: Side, opts: Options, pin: Fingerprint, work: F) -> (Path, Duration)
where
    F: FnOnce(PeerConnection) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    lab.run_in(&lab.peer_ns(side), move || {
        runtime().block_on(async move {
            let t = Instant::now();
            let conn = tokio::time::timeout(WAIT, peer_sdk::connect(opts, ClientTls::Pinned(pin)))
                .await
                .expect("connect in time")
                .expect("connect");
            let took = t.elapsed();
            let path = conn.path_at_connect();
            work(conn).await;
            (path, took)
        })
    })
    .expect("dialer thread")
}

fn session(a: NatType, b: NatType, salt: u128) -> Uuid {
    let h = format!("{a:?}{b:?}").bytes().fold(0u128, |h, c| {
        h.wrapping_mul(131).wrapping_add(u128::from(c))
    });
    Uuid::from_u128(h ^ salt)
}

/// Direct is possible unless both mappings are endpoint-dependent and one is random: one
/// symmetric side against a port-restricted one goes direct by birthday punching, two
/// sequential ones by the port prediction sweep (netlab's `direct_possible_with`).
fn direct_expected(a: NatType, b: NatType) -> bool {
    a.direct_possible_with(b)
}

fn pair_test(a: NatType, b: NatType) {
    netlab::require_lab!();
    let lab = Lab::new(LabConfig::new(a, b)).expect("lab");
    let relay = start_relay(&lab);
    let s = session(a, b, 1);
    let (pin, server) = listener(&lab, Side::A, options(&lab, s));
    let (path, took) = dial(&lab, Side::B, options(&lab, s), pin, |conn| async move {
        stream_echo(&conn, 10 << 20).await;
        datagram_echo(&conn, 1000).await;
        conn.close(0, b"done").await;
    });
    server.join().expect("listener");
    eprintln!(
        "{a:?} (listener) x {b:?} (dialer): {} path, connect {took:?}",
        path.kind()
    );
    let want = if direct_expected(a, b) {
        "direct"
    } else {
        "relay"
    };
    assert_eq!(path.kind(), want, "{a:?} x {b:?}");
    if want == "relay" {
        assert!(
            relay.metrics().snapshot().forwarded_packets > 1000,
            "the relay carried it"
        );
    }
}

macro_rules! pairs {
    ($($name:ident: $a:ident x $b:ident;)*) => {$(
        #[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
        #[test]
        fn $name() {
            pair_test(NatType::$a, NatType::$b);
        }
    )*};
}

pairs! {
    none_x_none: None x None;
    none_x_full_cone: None x FullCone;
    none_x_port_restricted: None x PortRestricted;
    none_x_symmetric: None x Symmetric;
    full_cone_x_none: FullCone x None;
    full_cone_x_full_cone: FullCone x FullCone;
    full_cone_x_port_restricted: FullCone x PortRestricted;
    full_cone_x_symmetric: FullCone x Symmetric;
    port_restricted_x_none: PortRestricted x None;
    port_restricted_x_full_cone: PortRestricted x FullCone;
    port_restricted_x_port_restricted: PortRestricted x PortRestricted;
    port_restricted_x_symmetric: PortRestricted x Symmetric;
    symmetric_x_none: Symmetric x None;
    symmetric_x_full_cone: Symmetric x FullCone;
    symmetric_x_port_restricted: Symmetric x PortRestricted;
    symmetric_x_symmetric: Symmetric x Symmetric;
    sequential_x_sequential: SymmetricSequential x SymmetricSequential;
    sequential_x_symmetric: SymmetricSequential x Symmetric;
}

/// A NAT rebinding mid-transfer: the transfer completes on the same connection.
fn rebinding_test(a: NatType, b: NatType, rebind: Side) {
    netlab::require_lab!();
    let lab = std::sync::Arc::new(Lab::new(LabConfig::new(a, b)).expect("lab"));
    let _relay = start_relay(&lab);
    let s = session(a, b, 2);
    let (pin, server) = listener(&lab, Side::A, options(&lab, s));
    let lab2 = lab.clone();
    let (path, _) = dial(
        &lab,
        Side::B,
        options(&lab, s),
        pin,
        move |conn| async move {
            stream_echo(&conn, 1 << 20).await;
            let before = conn.status().observed;
            let rebinder = tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_millis(100)); // let the transfer get going
                lab2.rebind(rebind).expect("rebind");
            });
            stream_echo(&conn, 16 << 20).await;
            rebinder.await.expect("rebinder");
            datagram_echo(&conn, 50).await;
            if rebind == Side::B {
                // The relay learnt the new mapping through a registration from it.
                let mut st = conn.watch_status();
                tokio::time::timeout(
                    WAIT,
                    st.wait_for(|s| s.observed.is_some() && s.observed != before),
                )
                .await
                .expect("re-registered from the new port in time")
                .expect("status");
            }
            conn.close(0, b"done").await;
        },
    );
    server.join().expect("listener");
    eprintln!(
        "rebinding {rebind} in {a:?} x {b:?}: started on the {} path",
        path.kind()
    );
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn rebinding_on_the_direct_path_dialer_side() {
    rebinding_test(NatType::PortRestricted, NatType::PortRestricted, Side::B);
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn rebinding_on_the_direct_path_listener_side() {
    rebinding_test(NatType::PortRestricted, NatType::FullCone, Side::A);
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn rebinding_on_the_relay_path() {
    rebinding_test(NatType::Symmetric, NatType::Symmetric, Side::B);
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn relay_restart_mid_connection_on_the_relay_path() {
    netlab::require_lab!();
    let lab = Lab::new(LabConfig::new(NatType::Symmetric, NatType::Symmetric)).expect("lab");
    let relay = std::sync::Arc::new(std::sync::Mutex::new(Some(start_relay(&lab))));
    let s = session(NatType::Symmetric, NatType::Symmetric, 3);
    let (pin, server) = listener(&lab, Side::A, options(&lab, s));
    let addr = relay_addr(&lab);
    let relay_ns = lab.relay_ns();
    let r2 = relay.clone();
    let (path, _) = dial(
        &lab,
        Side::B,
        options(&lab, s),
        pin,
        move |conn| async move {
            assert_eq!(conn.path(), Path::Relay);
            stream_echo(&conn, 1 << 20).await;
            let restart = tokio::task::spawn_blocking(move || {
                let old = r2.lock().expect("lock").take().expect("relay");
                assert!(old.shutdown(), "relay stopped cleanly");
                let new = netlab::run_in_netns(&relay_ns, move || {
                    Server::bind(addr, RelayConfig::default(), 4 << 20)
                        .expect("rebind relay port")
                        .spawn()
                        .expect("spawn")
                })
                .expect("relay namespace");
                *r2.lock().expect("lock") = Some(new);
            });
            // Traffic during and after the restart: QUIC retransmits until both peers re-register.
            stream_echo(&conn, 4 << 20).await;
            restart.await.expect("restart");
            stream_echo(&conn, 1 << 20).await;
            datagram_echo(&conn, 50).await;
            conn.close(0, b"done").await;
        },
    );
    server.join().expect("listener");
    assert_eq!(path, Path::Relay);
    let s = relay
        .lock()
        .expect("lock")
        .as_ref()
        .expect("relay")
        .metrics()
        .snapshot();
    assert!(
        s.forwarded_packets > 100,
        "the new relay carried the rest: {s:?}"
    );
}

/// Connect time with 20 ms one-way delay on each NAT's uplink.
fn timing_test(a: NatType, b: NatType, direct: bool) {
    netlab::require_lab!();
    let _serial = TIMING.lock().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::new(LabConfig::new(a, b).with_shape(LinkShape::delay(20))).expect("lab");
    let _relay = start_relay(&lab);
    let s = session(a, b, 4);
    let (pin, server) = listener(&lab, Side::A, options(&lab, s));
    let opts = options(&lab, s);
    let punch_timeout = opts.direct_timeout;
    let (path, took) = dial(&lab, Side::B, opts, pin, |conn| async move {
        stream_echo(&conn, 64 << 10).await;
        conn.close(0, b"done").await;
    });
    server.join().expect("listener");
    eprintln!(
        "{a:?} x {b:?} with 20 ms per link: {} path, connect {took:?}",
        path.kind()
    );
    if direct {
        assert_eq!(path.kind(), "direct");
        assert!(
            took <= Duration::from_secs(1),
            "direct connect took {took:?}"
        );
    } else {
        assert_eq!(path, Path::Relay);
        let bound = punch_timeout + Duration::from_millis(500);
        assert!(
            took <= bound,
            "relay fallback took {took:?} (bound {bound:?})"
        );
    }
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn direct_connect_within_a_second_with_20ms_links() {
    timing_test(NatType::PortRestricted, NatType::PortRestricted, true);
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn relay_fallback_within_punch_timeout_plus_half_a_second_with_20ms_links() {
    timing_test(NatType::Symmetric, NatType::Symmetric, false);
}

/// Runs `nft` in `ns` (rules the test adds to cut one path).
fn nft(lab: &Lab, ns: &str, script: &str) {
    let mut cmd = std::process::Command::new("nft");
    cmd.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = lab.spawn(ns, cmd).expect("spawn nft");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), script.as_bytes())
        .expect("write rules");
    assert!(child.wait().expect("nft").success(), "nft failed: {script}");
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn traffic_falls_back_to_the_relay_when_the_direct_path_dies_and_returns_when_it_heals() {
    netlab::require_lab!();
    let lab = std::sync::Arc::new(
        Lab::new(LabConfig::new(NatType::FullCone, NatType::PortRestricted)).expect("lab"),
    );
    let relay = start_relay(&lab);
    let s = session(NatType::FullCone, NatType::PortRestricted, 5);
    let (pin, server) = listener(&lab, Side::A, options(&lab, s));
    let router_a = lab.router_ns(Side::A).expect("router A");
    let b_public = lab.public_ip(Side::B);
    let lab2 = lab.clone();
    let (path, _) = dial(
        &lab,
        Side::B,
        options(&lab, s),
        pin,
        move |conn| async move {
            assert!(matches!(conn.path(), Path::Direct(_)));
            stream_echo(&conn, 1 << 20).await;
            // Cut A <-> B (both directions) at router A; the relay path is untouched.
            let cut = format!(
            "table inet cut {{\n chain cut_forward {{\n  type filter hook forward priority -10;\n  ip saddr {b_public} drop\n  ip daddr {b_public} drop\n }}\n}}\n"
        );
            let l = lab2.clone();
            let ra = router_a.clone();
            tokio::task::spawn_blocking(move || nft(&l, &ra, &cut))
                .await
                .expect("cut");
            let mut st = conn.watch_status();
            // Traffic keeps flowing while the SDK notices and moves to the relay.
            let transfer = stream_echo(&conn, 4 << 20);
            let fell_back = async {
                let r = tokio::time::timeout(WAIT, st.wait_for(|s| s.path == Path::Relay)).await;
                matches!(r, Ok(Ok(_)))
            };
            let (_, fell_back) = tokio::join!(transfer, fell_back);
            assert!(fell_back, "fell back to the relay in time");
            stream_echo(&conn, 1 << 20).await;
            datagram_echo(&conn, 50).await;
            // Heal the direct path: background probing finds it again.
            let l = lab2.clone();
            tokio::task::spawn_blocking(move || nft(&l, &router_a, "delete table inet cut"))
                .await
                .expect("heal");
            tokio::time::timeout(WAIT, st.wait_for(|s| matches!(s.path, Path::Direct(_))))
                .await
                .expect("direct path back in time")
                .expect("status");
            stream_echo(&conn, 1 << 20).await;
            conn.close(0, b"done").await;
        },
    );
    server.join().expect("listener");
    assert!(matches!(path, Path::Direct(_)));
    assert!(
        relay.metrics().snapshot().forwarded_packets > 100,
        "the relay carried traffic meanwhile"
    );
}

/// Two peers on one LAN behind one router: they find each other's local candidates through the
/// relay and talk over the LAN, whether or not the router hairpins.
fn shared_lan_test(nat: NatType, hairpin: bool) {
    netlab::require_lab!();
    let lab = Lab::new(LabConfig::shared_lan(nat, hairpin)).expect("lab");
    let relay = start_relay(&lab);
    let s = session(nat, nat, 6 + u128::from(hairpin));
    let (pin, server) = listener(&lab, Side::A, options(&lab, s));
    let listener_lan = SocketAddr::from((lab.peer_ip(Side::A), 0)).ip();
    let (path, took) = dial(
        &lab,
        Side::B,
        options(&lab, s),
        pin,
        move |conn| async move {
            let mut st = conn.watch_status();
            let on_lan =
                |s: &peer_sdk::Status| matches!(s.path, Path::Direct(a) if a.ip() == listener_lan);
            tokio::time::timeout(WAIT, st.wait_for(on_lan))
                .await
                .expect("on the LAN path in time")
                .expect("status");
            stream_echo(&conn, 1 << 20).await;
            datagram_echo(&conn, 50).await;
            assert!(
                on_lan(&conn.status()),
                "still on the LAN: {:?}",
                conn.status()
            );
            conn.close(0, b"done").await;
        },
    );
    server.join().expect("listener");
    eprintln!("one LAN behind {nat:?} (hairpin {hairpin}): {path:?} at connect after {took:?}");
    assert!(
        matches!(path, Path::Direct(_)),
        "direct at connect: {path:?}"
    );
    let relayed = relay.metrics().snapshot().forwarded_packets;
    assert!(
        relayed < 100,
        "the relay carried only the rendezvous, not the transfer: {relayed} packets"
    );
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn two_peers_on_one_lan_without_hairpinning_go_direct_over_the_lan() {
    shared_lan_test(NatType::PortRestricted, false);
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn two_peers_on_one_lan_with_hairpinning_go_direct_over_the_lan() {
    shared_lan_test(NatType::FullCone, true);
}

/// A relay on every address of the relay host, IPv4 and IPv6 (one dual-stack socket).
fn start_dual_stack_relay(lab: &Lab) -> ServerHandle {
    let addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, RELAY_PORT));
    lab.run_in(&lab.relay_ns(), move || {
        Server::bind(addr, RelayConfig::default(), 4 << 20)
            .expect("bind relay")
            .spawn()
            .expect("spawn relay")
    })
    .expect("relay namespace")
}

/// Options naming the relay by both its addresses (each peer uses the one it can reach).
fn dual_stack_options(lab: &Lab, session: Uuid) -> Options {
    let mut o = options(lab, session);
    o.relays = vec![
        relay_addr(lab),
        SocketAddr::from((lab.relay_ip6(), RELAY_PORT)),
    ];
    o
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn dual_stack_peers_go_direct_over_ipv6_although_both_ipv4_nats_are_symmetric() {
    netlab::require_lab!();
    let lab = Lab::new(
        LabConfig::new(NatType::Symmetric, NatType::Symmetric)
            .with_stacks(netlab::Stack::Dual, netlab::Stack::Dual),
    )
    .expect("lab");
    let _relay = start_dual_stack_relay(&lab);
    let s = session(NatType::Symmetric, NatType::Symmetric, 8);
    let (pin, server) = listener(&lab, Side::A, dual_stack_options(&lab, s));
    let a6 = lab.peer_ip6(Side::A).expect("A has IPv6");
    let (path, took) = dial(
        &lab,
        Side::B,
        dual_stack_options(&lab, s),
        pin,
        |conn| async move {
            stream_echo(&conn, 1 << 20).await;
            datagram_echo(&conn, 50).await;
            conn.close(0, b"done").await;
        },
    );
    server.join().expect("listener");
    eprintln!("dual-stack, symmetric IPv4 NATs: {path:?} at connect after {took:?}");
    assert!(
        matches!(path, Path::Direct(a) if a.ip() == std::net::IpAddr::V6(a6)),
        "direct over IPv6 to the listener's global address {a6}: {path:?}"
    );
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn an_ipv4_only_and_an_ipv6_only_peer_meet_through_a_dual_stack_relay() {
    netlab::require_lab!();
    let lab = Lab::new(
        LabConfig::new(NatType::PortRestricted, NatType::PortRestricted)
            .with_stacks(netlab::Stack::V4, netlab::Stack::V6),
    )
    .expect("lab");
    let relay = start_dual_stack_relay(&lab);
    let s = session(NatType::PortRestricted, NatType::PortRestricted, 9);
    let (pin, server) = listener(&lab, Side::A, dual_stack_options(&lab, s));
    let (path, took) = dial(
        &lab,
        Side::B,
        dual_stack_options(&lab, s),
        pin,
        |conn| async move {
            let observed = conn.status().observed.expect("registered");
            assert!(observed.is_ipv6(), "B registered over IPv6: {observed}");
            stream_echo(&conn, 1 << 20).await;
            datagram_echo(&conn, 50).await;
            conn.close(0, b"done").await;
        },
    );
    server.join().expect("listener");
    eprintln!("IPv4-only x IPv6-only: {path:?} at connect after {took:?}");
    assert_eq!(path, Path::Relay, "no common family: the relay carries it");
    assert!(relay.metrics().snapshot().forwarded_packets > 100);
}

/// Set to a relay address, this test binary runs [`relay_process`] as a relay process (one a
/// test can kill -9), in the namespace it was started in.
const RELAY_CHILD: &str = "PEER_SDK_LAB_RELAY_CHILD";

/// Not a test by itself: [`a_relayed_connection_survives_a_kill_9_of_its_relay`] starts this
/// binary with [`RELAY_CHILD`] set to run a relay until it is killed. Without the variable (a
/// plain `--include-ignored` run) it has nothing to do.
#[ignore = "helper process of the relay failover lab test, started by it with PEER_SDK_LAB_RELAY_CHILD"]
#[test]
fn relay_process() {
    let Some(addr) = std::env::var_os(RELAY_CHILD) else {
        return;
    };
    let addr: SocketAddr = addr
        .to_str()
        .and_then(|a| a.parse().ok())
        .expect("a relay address");
    let _relay = Server::bind(addr, RelayConfig::default(), 4 << 20)
        .expect("bind relay")
        .spawn()
        .expect("spawn relay");
    println!("relay ready on {addr}");
    loop {
        std::thread::park(); // until killed
    }
}

/// Starts a relay process on `addr` in the lab's relay namespace (killed with the lab at the
/// latest) and waits until it serves.
fn relay_child(lab: &Lab, addr: SocketAddr) -> std::process::Child {
    use std::io::BufRead as _;
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--exact",
        "relay_process",
        "--include-ignored",
        "--nocapture",
    ])
    .env(RELAY_CHILD, addr.to_string())
    .stdout(std::process::Stdio::piped());
    let mut child = lab.spawn(&lab.relay_ns(), cmd).expect("relay process");
    let out = child.stdout.take().expect("stdout");
    let ready = std::io::BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("relay ready"));
    assert!(ready, "relay process on {addr} did not start");
    child
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn a_relayed_connection_survives_a_kill_9_of_its_relay() {
    netlab::require_lab!();
    let lab = Lab::new(LabConfig::new(NatType::Symmetric, NatType::Symmetric)).expect("lab");
    let relays = [4433, 4434].map(|p| SocketAddr::from((lab.relay_ip(), p)));
    let mut procs: Vec<_> = relays.iter().map(|&a| (a, relay_child(&lab, a))).collect();
    let s = session(NatType::Symmetric, NatType::Symmetric, 10);
    let opts = {
        let mut o = options(&lab, s);
        o.relays = relays.to_vec();
        // Relay-only, so that the relay carries the connection.
        o.strategy = peer_sdk::Strategy::RelayOnly;
        o
    };
    let order = opts.relay_order();
    let (first, next) = (order[0], order[1]);
    let victim = procs.iter().position(|(a, _)| *a == first).expect("relay");
    let (_, mut victim) = procs.remove(victim);
    let (pin, server) = listener(&lab, Side::A, opts.clone());
    let (path, _) = dial(&lab, Side::B, opts, pin, move |conn| async move {
        assert_eq!(
            conn.status().relay,
            Some(first),
            "on the first relay in HRW order"
        );
        let mut status = conn.watch_status();
        let watched = conn.connection().clone();
        let kill = async move {
            // Mid-transfer: once a few MiB came back.
            while watched.stats().udp_rx.bytes < 4 << 20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let killed = Instant::now();
            victim.kill().expect("kill -9 the relay");
            let _ = victim.wait();
            tokio::time::timeout(
                Duration::from_secs(5),
                status.wait_for(|s| s.relay == Some(next)),
            )
            .await
            .expect("moved to the next relay within 5 s")
            .expect("status");
            killed.elapsed()
        };
        // 16 MiB each way, byte for byte, on the same connection.
        let ((), moved) = tokio::join!(stream_echo(&conn, 16 << 20), kill);
        eprintln!("relay killed mid-transfer: moved to {next} after {moved:?}");
        assert_eq!(conn.status().relay_moves, 1);
        datagram_echo(&conn, 20).await;
        conn.close(0, b"done").await;
    });
    server.join().expect("listener");
    assert_eq!(path, Path::Relay);
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn dual_stack_peers_learn_each_others_ipv6_address_from_the_relay() {
    netlab::require_lab!();
    let lab = Lab::new(
        LabConfig::new(NatType::Symmetric, NatType::PortRestrictedOpen)
            .with_stacks(netlab::Stack::Dual, netlab::Stack::Dual),
    )
    .expect("lab");
    let _relay = start_dual_stack_relay(&lab);
    let s = session(NatType::Symmetric, NatType::PortRestrictedOpen, 11);
    // One relay, named by its IPv4 address, with its IPv6 address as the other family's.
    let opts = {
        let mut o = options(&lab, s);
        o.relay_other_family = vec![(
            relay_addr(&lab),
            SocketAddr::from((lab.relay_ip6(), RELAY_PORT)),
        )];
        o
    };
    let (pin, server) = listener(&lab, Side::A, opts.clone());
    let (a6, b6) = (
        lab.peer_ip6(Side::A).expect("A has IPv6"),
        lab.peer_ip6(Side::B).expect("B has IPv6"),
    );
    let (path, _) = dial(&lab, Side::B, opts, pin, move |conn| async move {
        let st = conn.status();
        assert!(
            st.observed.is_some_and(|o| o.is_ipv4()),
            "registered over IPv4: {st:?}"
        );
        assert_eq!(
            st.observed_alt.map(|a| a.ip()),
            Some(std::net::IpAddr::V6(b6)),
            "the relay saw our IPv6 address: {st:?}"
        );
        assert_eq!(
            st.peer_alt.map(|a| a.ip()),
            Some(std::net::IpAddr::V6(a6)),
            "the relay told us the listener's IPv6 address: {st:?}"
        );
        stream_echo(&conn, 1 << 20).await;
        conn.close(0, b"done").await;
    });
    server.join().expect("listener");
    assert!(
        matches!(path, Path::Direct(a) if a.ip() == std::net::IpAddr::V6(a6)),
        "direct over IPv6: {path:?}"
    );
}
