//! `kill -9` of the client process: the server notices (QUIC idle timeout), tears down every
//! UDP session of that connection, and its UDP sockets return to the baseline. Alone in its
//! test binary so `/proc/self/fd` holds only this test's sockets.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use mqproxy::proto::TargetAddr;
use mqproxy::udpsocks::UdpAssociation;

/// UDP sockets of this process connected to `remote` (the server's session sockets), found
/// by matching `/proc/self/fd` socket inodes against `/proc/net/udp`.
fn udp_sockets_connected_to(remote: SocketAddr) -> usize {
    let SocketAddr::V4(r) = remote else {
        panic!("IPv4 only")
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(r.ip().octets()),
        r.port()
    );
    let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    std::fs::read_to_string("/proc/net/udp")
        .expect("/proc/net/udp")
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9 && f[2] == want && inodes.contains(f[9])
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_client_tears_server_sessions_down() {
    init_tracing();
    let dir = temp_dir("kill");
    let o = Opts {
        server_idle_timeout: Duration::from_secs(3),
        ..Opts::default()
    };
    let server = mqproxy::server::Server::bind(server_config(&o, &dir)).expect("bind");
    let addr = server.local_addr();
    let fp = server.fingerprint().to_string();
    let m = server.metrics();
    let _server = mqproxy::AbortOnDrop(tokio::spawn(server.run(std::future::pending())));
    let (echo, _e) = udp_echo().await;
    assert_eq!(udp_sockets_connected_to(echo), 0, "baseline");

    // Port 0: the client binds its SOCKS5 listener itself and logs the address.
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_mqproxy"))
            .args(["client", "--server", &addr.to_string(), "--token", TOKEN])
            .args(["--server-cert-sha256", &fp, "--socks5", "127.0.0.1:0"])
            .args(["--idle-timeout", "3"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("client binary starts"),
    );
    let stderr = child.0.stderr.take().expect("stderr piped");
    let running = wait_for_line(stderr, "client running", Duration::from_secs(10));
    let socks: SocketAddr = field(&running, "socks5").parse().expect("socks5 address");
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            socks
        )
        .is_ok())
        .await,
        "client listening"
    );
    let mut assocs = Vec::new();
    for i in 0..5u8 {
        let a = UdpAssociation::open(socks, None).await.expect("associate");
        let mut ok = false;
        for _ in 0..3 {
            a.send_to(&TargetAddr::Ip(echo), &[i; 100])
                .await
                .expect("send");
            if let Ok(r) = tokio::time::timeout(Duration::from_secs(2), a.recv_from()).await {
                assert_eq!(&r.expect("recv").1[..], &[i; 100]);
                ok = true;
                break;
            }
        }
        assert!(ok, "echo through association {i}");
        assocs.push(a);
    }
    assert_eq!(gauge(&m.udp_sessions_open), 5);
    assert_eq!(
        udp_sockets_connected_to(echo),
        5,
        "one server socket per session"
    );

    // SIGKILL: no FIN, no CONNECTION_CLOSE; only the idle timeout can tell the server.
    child.0.kill().expect("kill -9");
    let _ = child.0.wait();
    assert!(
        eventually(Duration::from_secs(15), || udp_sockets_connected_to(echo)
            == 0
            && gauge(&m.udp_sessions_open) == 0
            && gauge(&m.connections_open) == 0)
        .await,
        "server sockets back to baseline (sockets {}, sessions {}, connections {})",
        udp_sockets_connected_to(echo),
        gauge(&m.udp_sessions_open),
        gauge(&m.connections_open)
    );
}
