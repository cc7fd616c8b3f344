//! End-to-end UDP ASSOCIATE tests on loopback: echo at 64 B, 3,000 B (fragmented) and
//! 60,000 B; 100 concurrent sessions and their teardown on control-connection EOF; idle
//! timeout then re-open; `--no-udp`; PySocks as a third-party client; a DNS query; `udpsocks`.

mod common;

use std::time::Duration;

use common::*;
use mqproxy::proto::TargetAddr;
use mqproxy::udpsocks::{UdpAssociation, UdpSocksError};
use tokio::task::JoinSet;

async fn echo_once(a: &UdpAssociation, target: &TargetAddr, payload: &[u8]) -> Vec<u8> {
    // UDP is lossy: allow a retry or two, as any UDP client would.
    for _ in 0..3 {
        a.send_to(target, payload).await.expect("send");
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(2), a.recv_from()).await {
            let (from, data) = r.expect("recv");
            assert_eq!(&from, target, "reply names the destination");
            return data.to_vec();
        }
    }
    panic!("no echo for a {}-byte packet", payload.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_small_fragmented_and_large() {
    let h = start(Opts::default()).await;
    let (echo, _e) = udp_echo().await;
    let a = UdpAssociation::open(h.socks, None)
        .await
        .expect("associate");
    assert_eq!(
        a.relay_addr().ip(),
        h.socks.ip(),
        "BND.ADDR is where we reached the proxy"
    );
    let target = TargetAddr::Ip(echo);
    for len in [64usize, 3000, 60_000] {
        let p: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        assert_eq!(echo_once(&a, &target, &p).await, p, "{len}-byte echo");
    }
    // One session for the one destination, whatever the sizes.
    assert_eq!(gauge(&h.server.udp_sessions_total), 1);
    // A domain destination is resolved by the server; the reply names it as sent.
    let by_name = TargetAddr::Domain("localhost".into(), echo.port());
    assert_eq!(echo_once(&a, &by_name, b"by name").await, b"by name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_sessions_and_teardown_on_control_eof() {
    let h = start(Opts::default()).await;
    let mut echoes = Vec::new();
    for _ in 0..10 {
        echoes.push(udp_echo().await);
    }
    let targets: Vec<TargetAddr> = echoes.iter().map(|(a, _)| TargetAddr::Ip(*a)).collect();
    // 10 associations x 10 destinations = 100 sessions, all live at once.
    let mut set = JoinSet::new();
    let (tx, rx) = tokio::sync::watch::channel(false);
    for i in 0..10u8 {
        let targets = targets.clone();
        let socks = h.socks;
        let mut rx = rx.clone();
        set.spawn(async move {
            let a = UdpAssociation::open(socks, None).await.expect("associate");
            for (j, t) in targets.iter().enumerate() {
                let p = vec![i, j as u8, 0xab];
                assert_eq!(echo_once(&a, t, &p).await, p);
            }
            // Hold the association until every session has been counted.
            let _ = rx.wait_for(|v| *v).await;
        });
    }
    assert!(
        eventually(Duration::from_secs(30), || gauge(
            &h.server.udp_sessions_open
        ) == 100)
        .await,
        "100 sessions open on the server (got {})",
        gauge(&h.server.udp_sessions_open)
    );
    assert_eq!(gauge(&h.client.associations_open), 10);
    tx.send_replace(true);
    while let Some(r) = set.join_next().await {
        r.expect("association task");
    }
    // Closing the SOCKS control connections tears every session down on both sides.
    assert!(
        eventually(Duration::from_secs(10), || gauge(
            &h.server.udp_sessions_open
        ) == 0
            && gauge(&h.client.udp_sessions_open) == 0)
        .await,
        "sessions torn down (server {}, client {})",
        gauge(&h.server.udp_sessions_open),
        gauge(&h.client.udp_sessions_open)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_then_reopen() {
    let h = start(Opts {
        udp_idle_timeout: Duration::from_secs(1),
        ..Opts::default()
    })
    .await;
    let (echo, _e) = udp_echo().await;
    let t = TargetAddr::Ip(echo);
    let a = UdpAssociation::open(h.socks, None)
        .await
        .expect("associate");
    assert_eq!(echo_once(&a, &t, b"first").await, b"first");
    assert!(
        eventually(Duration::from_secs(5), || gauge(
            &h.server.udp_sessions_open
        ) == 0
            && gauge(&h.client.udp_sessions_open) == 0)
        .await,
        "the server closed the idle session and the client saw it"
    );
    assert_eq!(echo_once(&a, &t, b"second").await, b"second");
    assert_eq!(
        gauge(&h.server.udp_sessions_total),
        2,
        "a new session was opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_udp_is_refused_cleanly() {
    let h = start(Opts {
        udp_enabled: false,
        ..Opts::default()
    })
    .await;
    match UdpAssociation::open(h.socks, None).await {
        Err(UdpSocksError::Refused(0x07)) => {}
        other => panic!("expected reply 0x07 (command not supported), got {other:?}"),
    }
    assert_eq!(gauge(&h.server.udp_sessions_total), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_policy_refuses_loopback_without_allow_private() {
    let h = start(Opts {
        allow_private: false,
        ..Opts::default()
    })
    .await;
    let (echo, _e) = udp_echo().await;
    let a = UdpAssociation::open(h.socks, None)
        .await
        .expect("associate");
    a.send_to(&TargetAddr::Ip(echo), b"x").await.expect("send");
    assert!(
        eventually(Duration::from_secs(5), || gauge(
            &h.server.udp_sessions_refused
        ) == 1)
        .await,
        "the server refused the loopback destination"
    );
    assert_eq!(
        gauge(&h.server.udp_sessions_total),
        0,
        "no socket was opened"
    );
    let got = tokio::time::timeout(Duration::from_millis(300), a.recv_from()).await;
    assert!(got.is_err(), "nothing relayed");
}

#[ignore = "needs python3 with PySocks (pip install PySocks, or apt-get install python3-socks); run with `cargo test -- --ignored` (CI does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pysocks_udp_echo() {
    if !have_py("socks") {
        return;
    }
    let h = start(Opts::default()).await;
    let (echo, _e) = udp_echo().await;
    let script = format!(
        r#"
import socket, socks
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "127.0.0.1", {socks})
s.settimeout(3)
for size in (64, 3000):
    msg = bytes((i * 13) % 256 for i in range(size))
    for attempt in range(3):
        s.sendto(msg, ("127.0.0.1", {echo}))
        try:
            data, addr = s.recvfrom(65535)
            break
        except socket.timeout:
            continue
    assert data == msg, (len(data), size)
    assert addr == ("127.0.0.1", {echo}), addr
print("ok")
"#,
        socks = h.socks.port(),
        echo = echo.port()
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", &script]);
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "PySocks failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[ignore = "needs python3 with PySocks and dnslib (pip install PySocks dnslib); run with `cargo test -- --ignored` (CI does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_query_through_udp_associate() {
    if !have_py("socks") || !have_py("dnslib") {
        return;
    }
    let h = start(Opts::default()).await;
    // dnslib's resolver on port 0: it binds a free port itself and prints it.
    let mut dns = std::process::Command::new("python3")
        .args([
            "-u",
            "-c",
            "import time\n\
             from dnslib.fixedresolver import FixedResolver\n\
             from dnslib.server import DNSServer, DNSLogger\n\
             s = DNSServer(FixedResolver('. 60 IN A 192.0.2.53'), port=0, address='127.0.0.1', \
             logger=DNSLogger('-request,-reply,-truncated,-error,-recv,-send,-data'))\n\
             s.start_thread()\n\
             print('port=%d' % s.server.server_address[1])\n\
             while True: time.sleep(1)\n",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dnslib server starts");
    let stdout = dns.stdout.take().expect("stdout piped");
    let _dns = ChildGuard(dns);
    let port: u16 = field(
        &wait_for_line(stdout, "port=", Duration::from_secs(15)),
        "port",
    )
    .parse()
    .expect("port number");
    // A real DNS query (dnslib builds and parses it) from PySocks through the proxy.
    let script = format!(
        r#"
import socket, socks, time
from dnslib import DNSRecord
q = DNSRecord.question("mqproxy.example.", "A")
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "127.0.0.1", {socks})
s.settimeout(1)
deadline = time.time() + 15   # the DNS server may still be starting
while True:
    s.sendto(q.pack(), ("127.0.0.1", {port}))
    try:
        data, _ = s.recvfrom(4096)
        break
    except socket.timeout:
        if time.time() > deadline:
            raise
r = DNSRecord.parse(data)
assert r.header.id == q.header.id
print(r.a.rdata)
"#,
        socks = h.socks.port(),
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", &script]);
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "DNS query failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "192.0.2.53");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udpsocks_tool_reports_and_exits() {
    let h = start(Opts::default()).await;
    let (echo, _e) = udp_echo().await;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_udpsocks"));
    cmd.args([
        "--proxy",
        &h.socks.to_string(),
        "--target",
        &echo.to_string(),
    ])
    .args(["--send", "3000", "--count", "5", "--timeout-ms", "1000"]);
    let out = output(cmd).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("5 sent, 5 received, 0.0% loss"), "{stdout}");
    // A destination that never answers: non-zero exit.
    let silent = silent_udp();
    let dead = silent.local_addr().expect("addr").port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_udpsocks"));
    cmd.args([
        "--proxy",
        &h.socks.to_string(),
        "--target",
        &format!("127.0.0.1:{dead}"),
    ])
    .args(["--count", "1", "--timeout-ms", "300"]);
    let out = output(cmd).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 sent, 0 received"));
}
