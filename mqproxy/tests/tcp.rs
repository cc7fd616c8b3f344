//! End-to-end TCP tests on loopback: curl `--socks5-hostname` downloading 100 MB byte-exact,
//! curl through HTTP CONNECT, the SOCKS5 reply code of each failure, a wrong token, the
//! `--max-conns` pre-auth cap and DATAGRAMs before authentication.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use mqproxy::proto::TargetAddr;
use mqproxy::socks;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `len` deterministic pseudo-random bytes.
fn write_file(path: &std::path::Path, len: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).expect("write");
        left -= n;
    }
    f.flush().expect("flush");
}

fn sha256sum(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

/// python3's http.server on a loopback port, serving `dir`.
async fn http_server(dir: &std::path::Path) -> (u16, ChildGuard) {
    // Port 0: the server binds a free port itself and prints it ("Serving HTTP on ... port N").
    let mut child = Command::new("python3")
        .args(["-u", "-m", "http.server", "--bind", "127.0.0.1", "0"])
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 http.server starts");
    let stdout = child.stdout.take().expect("stdout piped");
    let serving = wait_for_line(stdout, "Serving HTTP on", Duration::from_secs(10));
    let port: u16 = serving
        .split(" port ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {serving:?}"));
    let up = eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    assert!(up, "http.server listening on {port}");
    (port, ChildGuard(child))
}

#[ignore = "needs curl and python3 (apt-get install curl python3); run with `cargo test -- --ignored` (CI does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_socks5_hostname_100mb_byte_exact_and_http_connect() {
    if !have("curl", &["--version"])
        || !have("python3", &["--version"])
        || !have("sha256sum", &["--version"])
    {
        return;
    }
    let h = start(Opts {
        http: true,
        ..Opts::default()
    })
    .await;
    let www = temp_dir("www");
    let big = www.join("big.bin");
    write_file(&big, 100 << 20);
    let (port, _srv) = http_server(&www).await;
    let out_path = h.dir.join("download.bin");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "100", "--socks5-hostname"])
        .arg(h.socks.to_string())
        .arg(format!("http://localhost:{port}/big.bin"))
        .arg("-o")
        .arg(&out_path);
    let t0 = std::time::Instant::now();
    let out = output(cmd).await;
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "100 MB through SOCKS5 in {secs:.2} s ({:.0} Mbit/s)",
        800.0 / secs
    );
    assert_eq!(sha256sum(&out_path), sha256sum(&big), "byte-exact download");

    // The same server through HTTP CONNECT (curl -p -x).
    write_file(&www.join("small.bin"), 100_000);
    let small_out = h.dir.join("small.bin");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "30", "-p", "-x"])
        .arg(format!("http://{}", h.http.expect("http listener")))
        .arg(format!("http://127.0.0.1:{port}/small.bin"))
        .arg("-o")
        .arg(&small_out);
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "curl -p: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256sum(&small_out), sha256sum(&www.join("small.bin")));
    let _ = std::fs::remove_dir_all(&www);
    let _ = std::fs::remove_file(&out_path);
}

/// A raw SOCKS5 exchange: greeting, then `request`; returns the reply code.
async fn socks_reply(proxy: SocketAddr, request: &[u8]) -> u8 {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.expect("method");
    assert_eq!(m, [5, 0]);
    s.write_all(request).await.expect("request");
    let mut head = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut head))
        .await
        .expect("a reply in time")
        .expect("reply");
    assert_eq!(head[0], 5);
    head[1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_reply_codes() {
    let h = start(Opts::default()).await;
    let connect = |a: TargetAddr| socks::encode_request(socks::CMD_CONNECT, &a);
    // Success, to a live listener.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let live = l.local_addr().expect("addr");
    assert_eq!(
        socks_reply(h.socks, &connect(TargetAddr::Ip(live))).await,
        0x00
    );
    // Connection refused: a port nobody listens on.
    let (_held, dead) = refusing_tcp();
    assert_eq!(
        socks_reply(h.socks, &connect(TargetAddr::Ip(dead))).await,
        0x05
    );
    // Host unreachable: a name that does not resolve (RFC 2606 .invalid).
    let nx = TargetAddr::Domain("no-such-host.invalid".into(), 80);
    assert_eq!(socks_reply(h.socks, &connect(nx)).await, 0x04);
    // Command not supported: BIND.
    let bind = socks::encode_request(socks::CMD_BIND, &TargetAddr::Ip(live));
    assert_eq!(socks_reply(h.socks, &bind).await, 0x07);
    // Address type not supported.
    assert_eq!(
        socks_reply(h.socks, &[5, 1, 0, 0x09, 1, 2, 3, 4, 0, 80]).await,
        0x08
    );

    // Not allowed by ruleset: the policy refuses loopback without --allow-private.
    let strict = start(Opts {
        allow_private: false,
        ..Opts::default()
    })
    .await;
    assert_eq!(
        socks_reply(strict.socks, &connect(TargetAddr::Ip(live))).await,
        0x02
    );
    let local = TargetAddr::Domain("localhost".into(), live.port());
    assert_eq!(
        socks_reply(strict.socks, &connect(local)).await,
        0x02,
        "names are checked after resolution"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_refused_with_no_data_path() {
    let h = start(Opts {
        client_token: "wrong".into(),
        ..Opts::default()
    })
    .await;
    assert!(
        eventually(Duration::from_secs(10), || gauge(&h.server.auth_failures)
            >= 1)
        .await,
        "the server counted the refusal"
    );
    assert_eq!(gauge(&h.server.authenticated), 0);
    // SOCKS requests fail at once (general failure), not after a timeout.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let req = socks::encode_request(
        socks::CMD_CONNECT,
        &TargetAddr::Ip(l.local_addr().expect("addr")),
    );
    let t0 = std::time::Instant::now();
    assert_eq!(socks_reply(h.socks, &req).await, 0x01);
    assert!(t0.elapsed() < Duration::from_secs(5), "refused promptly");
    assert_eq!(gauge(&h.server.tcp_streams), 0, "no data path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_caps_unauthenticated_and_datagrams_before_auth_are_dropped() {
    init_tracing();
    let dir = temp_dir("maxconns");
    let o = Opts {
        max_conns: 1,
        ..Opts::default()
    };
    let server = mqproxy::server::Server::bind(server_config(&o, &dir)).expect("bind");
    let addr = server.local_addr();
    let m = server.metrics();
    let _t = mqproxy::AbortOnDrop(tokio::spawn(server.run(std::future::pending())));
    // A raw QUIC client that completes the handshake but never authenticates.
    let mut cc = mqproxy::tls::client_config(&mqproxy::tls::ClientVerify::Insecure).expect("tls");
    cc.transport_config(Arc::new(mqproxy::transport::transport_config(
        Duration::from_secs(30),
        true,
    )));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("lit")).expect("endpoint");
    let first = ep
        .connect_with(cc.clone(), addr, "mqproxy")
        .expect("connect")
        .await
        .expect("handshake");
    first
        .send_datagram(bytes::Bytes::from_static(b"\0\0\0\x01\0\0\0\0\x01early"))
        .expect("send datagram");
    assert!(
        eventually(Duration::from_secs(5), || gauge(&m.datagrams_before_auth)
            == 1)
        .await,
        "the DATAGRAM sent before authentication was dropped"
    );
    // The one pre-auth slot is taken: the next connection is refused.
    let second = ep
        .connect_with(cc.clone(), addr, "mqproxy")
        .expect("connect")
        .await;
    assert!(second.is_err(), "second unauthenticated connection refused");
    assert_eq!(gauge(&m.refused_max_conns), 1);
    // Freeing the slot lets a new one in.
    first.close(0u32.into(), b"");
    assert!(
        eventually(Duration::from_secs(5), || {
            gauge(&m.connections) == 1
                && m.refused_max_conns
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 1
        })
        .await
    );
    let mut third = None;
    for _ in 0..50 {
        if let Ok(c) = ep
            .connect_with(cc.clone(), addr, "mqproxy")
            .expect("connect")
            .await
        {
            third = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        third.is_some(),
        "a slot frees when the unauthenticated connection goes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_a_server_restart() {
    init_tracing();
    let dir = temp_dir("restart");
    let o = Opts::default();
    let server = mqproxy::server::Server::bind(server_config(&o, &dir)).expect("bind");
    let addr = server.local_addr();
    let fp = server.fingerprint();
    let task = mqproxy::AbortOnDrop(tokio::spawn(server.run(std::future::pending())));
    let mut cc = mqproxy::client::ClientConfig::new(
        addr.to_string(),
        TOKEN,
        mqproxy::tls::ClientVerify::Pinned(fp),
    );
    cc.socks5 = "127.0.0.1:0".parse().expect("literal");
    let client = mqproxy::client::Client::bind(cc).await.expect("client");
    let socks = client.socks_addr();
    let cm = client.metrics();
    let _c = mqproxy::AbortOnDrop(tokio::spawn(client.run(std::future::pending())));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let req = socks::encode_request(
        socks::CMD_CONNECT,
        &TargetAddr::Ip(l.local_addr().expect("addr")),
    );
    assert_eq!(socks_reply(socks, &req).await, 0x00);
    // Restart the server on the same port with the same kept certificate.
    drop(task);
    let mut cfg = server_config(&o, &dir);
    cfg.listen = addr;
    let server = loop {
        match mqproxy::server::Server::bind(cfg.clone()) {
            Ok(s) => break s,
            // The old endpoint's socket closes as its task unwinds.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert_eq!(
        server.fingerprint(),
        fp,
        "the self-signed certificate was kept"
    );
    let _t = mqproxy::AbortOnDrop(tokio::spawn(server.run(std::future::pending())));
    // The client notices (idle timeout or close), backs off with jitter and reconnects.
    assert!(
        eventually(Duration::from_secs(40), || gauge(&cm.connections) >= 2).await,
        "reconnected"
    );
    assert_eq!(socks_reply(socks, &req).await, 0x00);
}
