//! Multipath on loopback (two local addresses, 127.0.0.1 and 127.0.0.2, as two paths): the
//! server binds both connections into one bundle, a TCP flow striped over the paths arrives
//! byte exact both ways, UDP echoes (small and fragmented) work, and `backup` keeps the traffic on
//! the first path. Bandwidth and path loss are measured in the namespace lab
//! (`netlab_multipath.rs`, `cargo xtask bench multipath`).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use mqproxy::multipath::sched::Scheduler;
use mqproxy::proto::TargetAddr;
use mqproxy::udpsocks::UdpAssociation;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP server that sends `down` bytes, reads everything the client sends, and replies with
/// the SHA-256 of what it read.
async fn tcp_source(down: Vec<u8>) -> (SocketAddr, mqproxy::AbortOnDrop<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a = l.local_addr().expect("addr");
    let t = tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        let (mut r, mut w) = s.into_split();
        let send = async {
            w.write_all(&down).await.expect("send");
            w
        };
        let recv = async {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let n = r.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            h.finalize()
        };
        let (mut w, digest) = tokio::join!(send, recv);
        w.write_all(&digest).await.expect("digest");
        w.shutdown().await.expect("fin");
    });
    (a, mqproxy::AbortOnDrop(t))
}

fn two_paths(scheduler: Scheduler) -> Opts {
    Opts {
        paths: vec![
            "127.0.0.1".parse().expect("literal"),
            "127.0.0.2".parse().expect("literal"),
        ],
        scheduler,
        ..Opts::default()
    }
}

async fn both_paths_up(h: &Harness) {
    let paths = h.paths.clone();
    assert!(
        eventually(Duration::from_secs(10), || paths.reports().len() == 2).await,
        "both paths connect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn striped_tcp_is_byte_exact_both_ways() {
    let h = start(two_paths(Scheduler::MinRtt)).await;
    both_paths_up(&h).await;
    assert_eq!(
        gauge(&h.server.paths_bound),
        2,
        "both connections joined one bundle"
    );
    let down = pattern(24 << 20, 7);
    let up = pattern(8 << 20, 9);
    let (target, _srv) = tcp_source(down.clone()).await;
    let before: Vec<u64> = h.paths.reports().iter().map(|r| r.rx_bytes).collect();
    let s = socks_connect(h.socks, target).await;
    let (mut r, mut w) = s.into_split();
    let writer = async {
        w.write_all(&up).await.expect("upload");
        w.shutdown().await.expect("fin");
    };
    let reader = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("download");
        got
    };
    let (_, got) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(writer, reader)
    })
    .await
    .expect("transfer completes");
    assert_eq!(got.len(), down.len() + 32);
    assert!(got[..down.len()] == down[..], "download byte exact");
    assert_eq!(
        &got[down.len()..],
        &Sha256::digest(&up)[..],
        "upload byte exact"
    );
    assert_eq!(gauge(&h.server.tcp_flows), 1, "one striped flow");
    let reports = h.paths.reports();
    for (i, r) in reports.iter().enumerate() {
        let carried = r.rx_bytes - before.get(i).copied().unwrap_or(0);
        eprintln!(
            "path {} carried {carried} bytes down, rtt {:?}",
            r.index, r.rtt
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_over_two_paths_and_backup_keeps_the_primary() {
    let h = start(two_paths(Scheduler::Backup)).await;
    both_paths_up(&h).await;
    let (echo, _e) = udp_echo().await;
    let a = UdpAssociation::open(h.socks, None)
        .await
        .expect("associate");
    let target = TargetAddr::Ip(echo);
    // Path MTU discovery probes each path once after its handshake, with probes of up to
    // MAX_UDP_PAYLOAD bytes on loopback: wait until the backup path is down to keepalives
    // (no event marks the end of a search; its byte counter going quiet does).
    let bytes = |paths: &[mqproxy::multipath::PathReport]| -> Vec<u64> {
        paths.iter().map(|r| r.tx_bytes + r.rx_bytes).collect()
    };
    let mut before = bytes(&h.paths.reports());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = bytes(&h.paths.reports());
        let quiet = now[1].saturating_sub(before[1]) < 8_192;
        before = now;
        if quiet {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backup path did not go quiet"
        );
    }
    for len in [64usize, 3000, 20_000] {
        let p = pattern(len, len as u64);
        let mut ok = false;
        for _ in 0..3 {
            a.send_to(&target, &p).await.expect("send");
            if let Ok(r) = tokio::time::timeout(Duration::from_secs(2), a.recv_from()).await {
                let (from, data) = r.expect("recv");
                assert_eq!(from, target);
                assert_eq!(&data[..], &p[..], "{len}-byte echo");
                ok = true;
                break;
            }
        }
        assert!(ok, "no echo for {len} bytes");
    }
    // 2 MB through the TCP side too, then compare what each path sent.
    let (target, _srv) = tcp_source(pattern(2 << 20, 3)).await;
    let mut s = socks_connect(h.socks, target).await;
    s.shutdown().await.expect("fin");
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.expect("download");
    assert_eq!(got.len(), (2 << 20) + 32);
    let reports = h.paths.reports();
    let sent: Vec<u64> = reports
        .iter()
        .map(|r| r.tx_bytes + r.rx_bytes - before.get(r.index).copied().unwrap_or(0))
        .collect();
    eprintln!("bytes sent and received per path: {sent:?}");
    let total: u64 = sent.iter().sum();
    // Keepalives (10/s) are all the backup path sends.
    assert!(
        sent[0] as f64 >= 0.95 * total as f64,
        "backup keeps >= 95 % on the primary: {sent:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redundant_sends_udp_twice_and_delivers_once() {
    let h = start(two_paths(Scheduler::Redundant)).await;
    both_paths_up(&h).await;
    let (echo, _e) = udp_echo().await;
    let a = UdpAssociation::open(h.socks, None)
        .await
        .expect("associate");
    let target = TargetAddr::Ip(echo);
    // Paced so none is lost to socket buffers: every copy counts.
    let n = 50u32;
    for i in 0..n {
        a.send_to(&target, &i.to_be_bytes()).await.expect("send");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut seen = std::collections::HashMap::new();
    while let Ok(Ok((_, d))) = tokio::time::timeout(Duration::from_millis(500), a.recv_from()).await
    {
        *seen.entry(d.to_vec()).or_insert(0u32) += 1;
    }
    assert!(seen.len() as u32 >= n - 2, "echoes: {}", seen.len());
    assert!(
        seen.values().all(|&c| c == 1),
        "a reply was delivered twice: {seen:?}"
    );
    assert!(
        gauge(&h.server.udp_duplicates) >= u64::from(n) / 2,
        "the server dropped the second copies: {}",
        gauge(&h.server.udp_duplicates)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wlb_striped_download_is_byte_exact() {
    let h = start(two_paths(Scheduler::Wlb)).await;
    both_paths_up(&h).await;
    let down = pattern(8 << 20, 11);
    let (target, _srv) = tcp_source(down.clone()).await;
    let mut s = socks_connect(h.socks, target).await;
    s.shutdown().await.expect("fin");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut got))
        .await
        .expect("completes")
        .expect("download");
    assert_eq!(got.len(), down.len() + 32);
    assert!(got[..down.len()] == down[..], "byte exact");
}

/// Downloads `down` through the proxy (sending nothing) and checks it arrived whole; returns it.
async fn download(h: &Harness, down: Vec<u8>) -> Vec<u8> {
    let (target, _srv) = tcp_source(down.clone()).await;
    let mut s = socks_connect(h.socks, target).await;
    s.shutdown().await.expect("fin");
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.expect("download");
    assert_eq!(got.len(), down.len() + 32);
    down
}

/// Fetches a `--metrics` page.
async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut page = String::new();
    s.read_to_string(&mut page).await.expect("page");
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    page
}

/// The value of the sample that starts with `prefix` (name and labels).
fn sample(page: &str, prefix: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pages_show_each_paths_health() {
    let h = start(Opts {
        metrics: true,
        ..two_paths(Scheduler::MinRtt)
    })
    .await;
    both_paths_up(&h).await;
    let down = download(&h, pattern(4 << 20, 13)).await;

    let client = scrape(h.client_metrics_addr.expect("client page")).await;
    assert_eq!(
        sample(&client, "mqproxy_client_tcp_connects_total "),
        Some(1.0)
    );
    let mut rx = 0.0;
    for (i, ip) in ["127.0.0.1", "127.0.0.2"].iter().enumerate() {
        let labels = format!("{{path=\"{i}\",local=\"{ip}\"}}");
        assert_eq!(
            sample(&client, &format!("mqproxy_path_usable{labels}")),
            Some(1.0),
            "{client}"
        );
        let rtt = sample(&client, &format!("mqproxy_path_rtt_seconds{labels}")).expect("rtt");
        assert!(rtt > 0.0 && rtt < 1.0, "rtt {rtt}");
        rx += sample(&client, &format!("mqproxy_path_rx_bytes_total{labels}")).expect("rx");
    }
    assert!(
        rx >= down.len() as f64,
        "the paths received the download: {rx}"
    );

    let server = scrape(h.server_metrics_addr.expect("server page")).await;
    assert_eq!(
        sample(&server, "mqproxy_server_paths_bound_total "),
        Some(2.0)
    );
    assert_eq!(
        sample(&server, "mqproxy_server_tcp_flows_total "),
        Some(1.0)
    );
    let server_paths = server
        .lines()
        .filter(|l| l.starts_with("mqproxy_path_tx_bytes_total{bundle="))
        .count();
    assert_eq!(server_paths, 2, "{server}");
}

/// A single-path connection's health is on the server's page too (bundle `none`), and on
/// loopback path MTU discovery takes both sides' packets past 6,550 bytes (where quinn's GSO
/// batch of ten passes the kernel's 64 KiB per send), up to the proxy's `MAX_UDP_PAYLOAD`,
/// and a bulk download at that size then takes no loss for an MTU black hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_path_pages_show_the_discovered_mtu() {
    let h = start(Opts {
        metrics: true,
        ..Opts::default()
    })
    .await;
    download(&h, pattern(1 << 20, 17)).await;

    let limit = f64::from(mqproxy::defaults::MAX_UDP_PAYLOAD);
    let big = 6_551.0;
    let first = |page: &str, prefix: &str| {
        page.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let mtus = || async {
        let client = scrape(h.client_metrics_addr.expect("client page")).await;
        let server = scrape(h.server_metrics_addr.expect("server page")).await;
        let c = sample(&client, "mqproxy_path_mtu_bytes{path=\"0\",local=\"any\"}");
        let s = first(
            &server,
            "mqproxy_path_mtu_bytes{bundle=\"none\",path=\"0\",",
        );
        (c, s, client, server)
    };
    // MTU discovery runs on its own after the handshake: poll the pages until both sides
    // report packets past 6,550 bytes (no event to await from outside the processes).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (c, s, client, server) = mtus().await;
        if let Some((c, s)) = c.zip(s).filter(|&(c, s)| c > big && s > big) {
            assert!(c <= limit && s <= limit, "{client}\n{server}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "MTU discovery did not pass 6,550 bytes on loopback: client {c:?}, server {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Full GSO batches of such packets: every one must reach the other side.
    download(&h, pattern(16 << 20, 18)).await;
    let (c, s, client, server) = mtus().await;
    assert!(
        c.zip(s).is_some_and(|(c, s)| c > big && s > big),
        "the packet size fell back after a bulk download: {client}\n{server}"
    );
    assert_eq!(
        first(&server, "mqproxy_path_black_holes_total{bundle=\"none\""),
        Some(0.0),
        "{server}"
    );
    assert_eq!(
        sample(
            &client,
            "mqproxy_path_black_holes_total{path=\"0\",local=\"any\"}"
        ),
        Some(0.0),
        "{client}"
    );
}
