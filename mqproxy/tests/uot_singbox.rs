//! sing-box UDP-over-TCP through a real mqproxy server and client (real Quinn, real sockets):
//! the golden byte sequences from the sing code on a raw SOCKS5 CONNECT stream (v2 connect,
//! v2 non-connect, v1), `create_udp_proxy`, and the destination policy.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{start, udp_echo, Opts};
use mqproxy::proto::TargetAddr;
use mqproxy::uot::{create_udp_proxy, singbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

/// SOCKS5 CONNECT to `host:0` through the client; returns the stream after a success reply.
async fn socks_connect(socks: SocketAddr, host: &str) -> TcpStream {
    let mut s = TcpStream::connect(socks).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.expect("method");
    assert_eq!(m, [5, 0]);
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&[0, 0]);
    s.write_all(&req).await.expect("request");
    let mut head = [0u8; 4];
    timeout(T, s.read_exact(&mut head))
        .await
        .expect("reply")
        .expect("read");
    assert_eq!(head[..2], [5, 0], "CONNECT to {host} accepted");
    let rest = match head[3] {
        1 => 6,
        4 => 18,
        other => panic!("unexpected ATYP {other}"),
    };
    let mut skip = vec![0u8; rest];
    s.read_exact(&mut skip).await.expect("bound address");
    s
}

fn v4(a: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(a) = a else {
        panic!("IPv4 echo")
    };
    let mut v = a.ip().octets().to_vec();
    v.extend_from_slice(&a.port().to_be_bytes());
    v
}

async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    timeout(T, s.read_exact(&mut b))
        .await
        .expect("bytes within 10 s")
        .expect("read");
    b
}

/// v2 connect: `01 01 <ip> <port>` then `0006 "packet"`, sent in one write as sing may.
#[tokio::test]
async fn v2_connect_golden_bytes() {
    let h = start(Opts::default()).await;
    let (echo, _e) = udp_echo().await;
    let mut s = socks_connect(h.socks, singbox::MAGIC_V2).await;
    let mut w = vec![0x01, 0x01];
    w.extend(v4(echo));
    w.extend_from_slice(b"\x00\x06packet\x00\x00");
    s.write_all(&w).await.expect("write");
    // Both packets echo back in the connect format, the zero-length one included.
    assert_eq!(read_n(&mut s, 8).await, b"\x00\x06packet");
    assert_eq!(read_n(&mut s, 2).await, b"\x00\x00");
}

/// v2 non-connect: per-packet address (sing's 0x00 = IPv4 table), the reply names its source.
#[tokio::test]
async fn v2_non_connect_golden_bytes() {
    let h = start(Opts::default()).await;
    let (echo, _e) = udp_echo().await;
    let mut s = socks_connect(h.socks, singbox::MAGIC_V2).await;
    let mut w = vec![0x00, 0x01];
    w.extend(v4(echo));
    s.write_all(&w).await.expect("request");
    let mut p = vec![0x00];
    p.extend(v4(echo));
    p.extend_from_slice(b"\x00\x06packet");
    // Split across writes: the server must reassemble.
    s.write_all(&p[..3]).await.expect("write");
    s.write_all(&p[3..]).await.expect("write");
    assert_eq!(read_n(&mut s, p.len()).await, p);
}

/// v1: no request; packets in the addressed format from the first byte.
#[tokio::test]
async fn v1_golden_bytes() {
    let h = start(Opts::default()).await;
    let (echo, _e) = udp_echo().await;
    let mut s = socks_connect(h.socks, singbox::MAGIC_V1).await;
    let mut p = vec![0x00];
    p.extend(v4(echo));
    p.extend_from_slice(b"\x00\x02v1");
    s.write_all(&p).await.expect("write");
    assert_eq!(read_n(&mut s, p.len()).await, p);
}

/// The client API: a local UDP socket whose datagrams reach the target and whose replies come
/// back, sizes 0 to 65,507.
#[tokio::test]
async fn create_udp_proxy_round_trips() {
    let h = start(Opts::default()).await;
    let (echo, _e) = udp_echo().await;
    let proxy = create_udp_proxy(
        h.socks,
        "127.0.0.1:0".parse().expect("lit"),
        TargetAddr::Ip(echo),
    )
    .await
    .expect("proxy opens");
    let app = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut buf = vec![0u8; 70_000];
    for size in [0usize, 1, 1200, 65_507] {
        let p: Vec<u8> = (0..size).map(|i| (i * 3) as u8).collect();
        app.send_to(&p, proxy.local_addr()).await.expect("send");
        let (n, from) = timeout(T, app.recv_from(&mut buf))
            .await
            .expect("echo")
            .expect("recv");
        assert_eq!((n, from), (size, proxy.local_addr()));
        assert_eq!(&buf[..n], &p[..]);
    }
}

/// Without --allow-private a loopback target is refused like a normal CONNECT: nothing is
/// sent, and the stream ends.
#[tokio::test]
async fn policy_refuses_private_targets() {
    let h = start(Opts {
        allow_private: false,
        ..Opts::default()
    })
    .await;
    let (echo, _e) = udp_echo().await;
    let proxy = create_udp_proxy(
        h.socks,
        "127.0.0.1:0".parse().expect("lit"),
        TargetAddr::Ip(echo),
    )
    .await
    .expect("the CONNECT itself succeeds");
    let app = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    app.send_to(b"x", proxy.local_addr()).await.expect("send");
    let ended = timeout(T, proxy.closed())
        .await
        .expect("stream ends within 10 s");
    assert!(ended.is_err());
    let mut buf = [0u8; 8];
    assert!(timeout(Duration::from_millis(200), app.recv_from(&mut buf))
        .await
        .is_err());
}
