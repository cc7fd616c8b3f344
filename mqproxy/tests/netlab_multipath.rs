//! Multipath in the namespace lab: a client with two paths, each a shaped link (100 Mbit/s,
//! 25 ms each way), to the server. The `mqproxy` binaries run inside the namespaces. A path is
//! cut in the middle of a TCP download (it completes byte exact) and of a UDP ping stream
//! (round trips resume within about a second), then healed (the client redials it). This is
//! the short CI version; `cargo xtask bench multipath` measures the bandwidth ratios.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use netlab::{LinkShape, MultipathLab};
use sha2::{Digest, Sha256};

const TOKEN: &str = "lab-token";
const SERVER_PORT: u16 = 4433;
const SOURCE_PORT: u16 = 5001;
const ECHO_PORT: u16 = 5002;
const RELAY_PORT: u16 = 3478;
/// Where both roles serve `--metrics` (each on its namespace's loopback).
const METRICS: &str = "127.0.0.1:9464";
const SOCKS: &str = "127.0.0.1:1080";

fn pattern(len: usize) -> Vec<u8> {
    common::pattern(len, 0x9e37_79b9_7f4a_7c15)
}

/// The lab every test here uses: two paths, each 100 Mbit/s with 25 ms one way.
fn two_path_lab() -> Result<MultipathLab> {
    MultipathLab::new(
        2,
        LinkShape {
            delay_ms: 25,
            loss_pct: 0.0,
            rate_mbit: Some(100.0),
        },
    )
}

/// The server side: a TCP source (each connection sends a `u64` length, big-endian, and gets
/// that many bytes of `data`), and a UDP echo.
/// Returns the set of source addresses the echo has seen (one per server-side UDP socket).
fn start_targets(
    lab: &MultipathLab,
    data: Arc<Vec<u8>>,
    stop: Arc<AtomicBool>,
) -> Result<Arc<std::sync::Mutex<std::collections::HashSet<SocketAddr>>>> {
    let ip = lab.server_ip();
    let tcp = lab.run_in(&lab.server_ns(), move || {
        TcpListener::bind((ip, SOURCE_PORT))
    })??;
    let udp = lab.run_in(&lab.server_ns(), move || {
        std::net::UdpSocket::bind((ip, ECHO_PORT))
    })??;
    udp.set_read_timeout(Some(Duration::from_millis(100)))?;
    let s2 = stop.clone();
    let sources = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let seen = sources.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !s2.load(Ordering::Relaxed) {
            if let Ok((n, from)) = udp.recv_from(&mut buf) {
                seen.lock().expect("not poisoned").insert(from);
                let _ = udp.send_to(&buf[..n], from);
            }
        }
    });
    tcp.set_nonblocking(true)?;
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match tcp.accept() {
                Ok((mut s, _)) => {
                    let d = data.clone();
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let mut len = [0u8; 8];
                        if s.read_exact(&mut len).is_ok() {
                            let n = (u64::from_be_bytes(len) as usize).min(d.len());
                            let _ = s.write_all(&d[..n]);
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    Ok(sources)
}

/// Holds the lab for one test: the tests in this file run one after another. Each pushes
/// tens of MB/s through user-space shaped links and three proxy processes; on two cores two of
/// them at once starve each other long enough for healthy paths to hit their 1 s idle timeout,
/// and the timings these tests check (UDP gaps, redials) would measure the overload instead.
fn one_lab_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed while holding it leaves nothing behind to protect.
    LAB.lock().unwrap_or_else(|p| p.into_inner())
}

/// A process started in the lab, killed (by its own handle) when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server in the server namespace; returns it and the certificate fingerprint.
fn start_server(lab: &MultipathLab, dir: &std::path::Path) -> Result<(Proc, String)> {
    start_server_with(lab, dir, &[])
}

/// [`start_server`] with extra flags.
fn start_server_with(
    lab: &MultipathLab,
    dir: &std::path::Path,
    extra: &[String],
) -> Result<(Proc, String)> {
    let cert =
        mqproxy::tls::load_server_cert(&mqproxy::tls::ServerCert::SelfSigned(dir.to_owned()))?;
    let mut server = Command::new(env!("CARGO_BIN_EXE_mqproxy"));
    server
        .args(["server", "--listen"])
        .arg(format!("{}:{SERVER_PORT}", lab.server_ip()))
        .args(["--token", TOKEN, "--state-dir"])
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null());
    Ok((
        Proc(lab.spawn(&lab.server_ns(), server)?),
        cert.fingerprint.to_string(),
    ))
}

/// Starts a client in the client namespace with SOCKS5 on `socks`, over `paths` (none: one
/// ordinary connection, which leaves through path 0). Its log is passed through to stderr;
/// the receiver gets each path (re)connection the log reports, with the time it was seen.
fn start_client(
    lab: &MultipathLab,
    fingerprint: &str,
    socks: &str,
    paths: &[usize],
    scheduler: &str,
) -> Result<(Proc, std::sync::mpsc::Receiver<(usize, Instant)>)> {
    let (proc, lines) = start_client_with(lab, fingerprint, socks, paths, scheduler, &[])?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (line, at) in lines {
            if let Some(path) = path_connected(&line) {
                if tx.send((path, at)).is_err() {
                    break;
                }
            }
        }
    });
    Ok((proc, rx))
}

/// [`start_client`] with extra flags; the receiver gets every log line (colour codes removed)
/// with the time it was read.
fn start_client_with(
    lab: &MultipathLab,
    fingerprint: &str,
    socks: &str,
    paths: &[usize],
    scheduler: &str,
    extra: &[String],
) -> Result<(Proc, std::sync::mpsc::Receiver<(String, Instant)>)> {
    let mut client = Command::new(env!("CARGO_BIN_EXE_mqproxy"));
    client
        .args(["client", "--server"])
        .arg(format!("{}:{SERVER_PORT}", lab.server_ip()))
        .args([
            "--token",
            TOKEN,
            "--socks5",
            socks,
            "--server-cert-sha256",
            fingerprint,
        ])
        .args(["--scheduler", scheduler]);
    for &i in paths {
        client.arg("--path").arg(lab.client_ip(i).to_string());
    }
    client.args(extra);
    // The path events below are read from the client's info-level log.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    client
        .env("RUST_LOG", format!("{filter},mqproxy::client=info"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = lab.spawn(&lab.client_ns(), client)?;
    let stderr = child.stderr.take().context("client stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            // A receiver that stopped listening just leaves the passing through.
            let _ = tx.send((plain(&line), Instant::now()));
        }
    });
    Ok((Proc(child), rx))
}

/// A log line without its colour escapes (`ESC [ ... m`), so fields read `path=1`.
fn plain(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The path of a client log line reporting a connected path.
fn path_connected(plain: &str) -> Option<usize> {
    if !plain.contains("connected and authenticated") {
        return None;
    }
    let rest = &plain[plain.find(" path=")? + " path=".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// SOCKS5 CONNECT from the client namespace (blocking).
fn socks_connect(socks: &str, target: SocketAddr) -> Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect(socks) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).context("SOCKS listener"),
        }
    };
    s.write_all(&[5, 1, 0])?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r)?;
    let SocketAddr::V4(t) = target else {
        anyhow::bail!("IPv4 only")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&t.ip().octets());
    req.extend_from_slice(&t.port().to_be_bytes());
    s.write_all(&req)?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep)?;
    anyhow::ensure!(rep[1] == 0, "SOCKS reply {}", rep[1]);
    Ok(s)
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn path_cut_during_tcp_download_and_udp_pings() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let _one_lab = one_lab_at_a_time();
    common::init_tracing();
    let lab = two_path_lab()?;
    let dir = common::temp_dir("mplab");
    let data = Arc::new(pattern(48 << 20));
    let stop = Arc::new(AtomicBool::new(false));
    let echo_sources = start_targets(&lab, data.clone(), stop.clone())?;
    let (_server, fp) = start_server(&lab, &dir)?;
    let (_client, connected) = start_client(&lab, &fp, SOCKS, &[0, 1], "minrtt")?;
    let source = SocketAddr::from((lab.server_ip(), SOURCE_PORT));
    let echo = SocketAddr::from((lab.server_ip(), ECHO_PORT));

    // UDP pings every 20 ms through SOCKS5 UDP ASSOCIATE, timestamps of each reply kept.
    let pinger = lab.spawn_thread(&lab.client_ns(), {
        let stop = stop.clone();
        move || -> Result<Vec<Duration>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                let a = loop {
                    match mqproxy::udpsocks::UdpAssociation::open(SOCKS.parse()?, None).await {
                        Ok(a) => break a,
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                let target = mqproxy::proto::TargetAddr::Ip(echo);
                let start = Instant::now();
                let mut replies = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_millis(20));
                while !stop.load(Ordering::Relaxed) {
                    tokio::select! {
                        _ = tick.tick() => { let _ = a.send_to(&target, b"ping").await; }
                        r = a.recv_from() => if r.is_ok() { replies.push(start.elapsed()) },
                    }
                }
                Ok(replies)
            })
        }
    })?;

    // TCP download, with path 1 cut a second in and path 0 cut later (after healing 1).
    let t0 = Instant::now();
    // The reader takes at most 4 MiB/s, so the download spans both cuts (the proxy's windows
    // and TCP flow control hold the rest back, across both paths).
    let downloader = paced_download(&lab, source, 48 << 20, 4 << 20, t0)?;
    std::thread::sleep(Duration::from_millis(1500));
    let cut1 = t0.elapsed();
    lab.set_path(1, false)?;
    std::thread::sleep(Duration::from_millis(2500));
    while connected.try_recv().is_ok() {}
    lab.set_path(1, true)?;
    let healed = Instant::now();
    // Cut the other path once the client has redialed path 1.
    let readded = loop {
        let (path, at) = connected
            .recv_timeout(Duration::from_secs(10))
            .context("path 1 was not redialed within 10 s of healing")?;
        if path == 1 {
            break at - healed;
        }
    };
    eprintln!("path 1 re-added {readded:?} after its link came back");
    // The redial gives up on a cut path after ~1 s and tries again at once, so a healed path
    // is back within about a second; the bound has slack for a loaded CI machine.
    assert!(
        readded < Duration::from_secs(4),
        "path 1 took {readded:?} to be re-added"
    );
    let cut0 = t0.elapsed();
    lab.set_path(0, false)?;
    std::thread::sleep(Duration::from_millis(2500));
    lab.set_path(0, true)?;
    let (got, done_at) = downloader
        .join()
        .map_err(|_| anyhow::anyhow!("downloader panicked"))??;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let replies = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("pinger panicked"))??;
    assert_eq!(got.len(), data.len());
    assert!(
        Sha256::digest(&got) == Sha256::digest(&data[..]),
        "download byte exact"
    );
    eprintln!("48 MiB (read at 4 MiB/s) downloaded byte exact by {done_at:?}, across cuts at {cut1:?} and {cut0:?}");
    assert!(done_at > cut0, "the download should span both cuts");
    // The pinger's clock started a little after t0; compare gaps around each cut instead.
    let longest_gap = replies
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "UDP: {} replies, longest gap {longest_gap:?} (cuts at {cut1:?} and {cut0:?})",
        replies.len()
    );
    assert!(
        replies.len() > 100,
        "UDP round trips work: {}",
        replies.len()
    );
    // Acceptance: round trips resume within about a second of a cut. The bound here has slack
    // for a loaded CI machine; the benchmark reports the measured figure.
    assert!(
        longest_gap < Duration::from_millis(1500),
        "UDP round trips stopped for {longest_gap:?} around a path cut"
    );
    // The session survived both cuts: its server socket (the source the destination sees)
    // never changed, although its signalling stream had to move to the other path each time.
    let sources = echo_sources.lock().expect("not poisoned").clone();
    assert_eq!(
        sources.len(),
        1,
        "the UDP session was re-created: {sources:?}"
    );
    Ok(())
}

/// A multipath client with one direct path (path 1's link) and the relay session as its
/// second path, to a server that listens and waits in the relay session at once. Direct UDP
/// from the client to anything but the proxy and relay ports is dropped in the server's
/// namespace, so the relay path cannot be hole-punched: it really goes through the relay
/// (which sits beside the server, reached over path 0's link). The direct path is cut during a
/// download: the download completes byte exact on the relay path.
#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn relay_session_joins_the_direct_paths() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let _one_lab = one_lab_at_a_time();
    common::init_tracing();
    let lab = two_path_lab()?;
    // No direct path from the client's relay-session socket to the server's.
    let nft = format!(
        "table inet mplab {{\n chain input {{\n type filter hook input priority 0; policy accept;\n \
         ip saddr 198.18.10.0/23 udp dport != {{ {SERVER_PORT}, {RELAY_PORT} }} drop\n }}\n}}\n"
    );
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"]).stdin(Stdio::piped());
    let mut child = lab.spawn(&lab.server_ns(), cmd)?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(nft.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "nft refused the lab's rules");

    let relay_addr = SocketAddr::from((lab.server_ip(), RELAY_PORT));
    let _relay = lab.run_in(&lab.server_ns(), move || {
        quic_relay::server::Server::bind(
            relay_addr,
            quic_relay::sessions::RelayConfig::default(),
            4 << 20,
        )?
        .spawn()
    })??;
    let dir = common::temp_dir("mprelay");
    let data = Arc::new(pattern(40 << 20));
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_targets = StopOnDrop(stop.clone());
    start_targets(&lab, data.clone(), stop)?;
    let session = "6f1d2c3b-4a59-4e8d-9c7b-0a1b2c3d4e5f";
    let relay_flags: Vec<String> = ["--relay", &relay_addr.to_string(), "--session", session]
        .map(str::to_owned)
        .to_vec();
    let server_flags = [
        relay_flags.clone(),
        vec!["--metrics".into(), METRICS.into()],
    ]
    .concat();
    let (_server, fp) = start_server_with(&lab, &dir, &server_flags)?;
    let client_flags = [relay_flags, vec!["--metrics".into(), METRICS.into()]].concat();
    let (_client, lines) = start_client_with(&lab, &fp, SOCKS, &[1], "minrtt", &client_flags)?;
    // Path 0 is the direct one (--path on link 1), path 1 the relay session.
    let (mut direct_up, mut relay_up, mut relayed) = (false, false, false);
    while !(direct_up && relay_up && relayed) {
        let (line, _) = lines
            .recv_timeout(Duration::from_secs(20))
            .context("the client did not bring up both paths within 20 s")?;
        match path_connected(&line) {
            Some(0) => direct_up = true,
            Some(1) => relay_up = true,
            _ => {}
        }
        if line.contains("reached the server through the relay session") {
            anyhow::ensure!(
                line.contains("(relay path)"),
                "the relay path was hole-punched despite the filter: {line}"
            );
            relayed = true;
        }
    }
    // Both metrics pages show the relay session as a path, and that it is relayed.
    let client_page = lab.run_in(&lab.client_ns(), || scrape(METRICS))??;
    for want in [
        "mqproxy_path_usable{path=\"1\",local=\"relay-session\"} 1",
        "mqproxy_path_usable{path=\"0\",local=\"198.18.11.2\"} 1",
        "mqproxy_relay_session_relayed{path=\"1\"} 1",
    ] {
        anyhow::ensure!(
            client_page.contains(want),
            "client page lacks {want}:\n{client_page}"
        );
    }
    let server_page = lab.run_in(&lab.server_ns(), || scrape(METRICS))??;
    for want in [
        "mqproxy_server_paths_bound_total 2",
        "mqproxy_relay_session_relayed{path=\"relay-session\"} 1",
    ] {
        anyhow::ensure!(
            server_page.contains(want),
            "server page lacks {want}:\n{server_page}"
        );
    }

    let t0 = Instant::now();
    let source = SocketAddr::from((lab.server_ip(), SOURCE_PORT));
    // At most 5 MiB/s, so the download spans the cut.
    let downloader = paced_download(&lab, source, 40 << 20, 5 << 20, t0)?;
    std::thread::sleep(Duration::from_millis(2000));
    let before_cut = lab.client_if_bytes(0)?.0;
    lab.set_path(1, false)?;
    let cut = t0.elapsed();
    let (got, done_at) = downloader
        .join()
        .map_err(|_| anyhow::anyhow!("downloader panicked"))??;
    lab.set_path(1, true)?;
    assert_eq!(got.len(), data.len());
    assert!(
        Sha256::digest(&got) == Sha256::digest(&data[..]),
        "download byte exact"
    );
    let after_cut = lab.client_if_bytes(0)?.0 - before_cut;
    eprintln!(
        "40 MiB (read at 5 MiB/s) byte exact by {done_at:?}; direct path cut at {cut:?}; \
         {after_cut} bytes arrived over the relay path's link after the cut"
    );
    assert!(done_at > cut, "the download should span the cut");
    // What remained after the cut came over the relay path (link 0); keepalives alone would be
    // a few kB. (Up to a flow window and the socket buffers are in the client by the cut.)
    assert!(
        after_cut > 4 << 20,
        "only {after_cut} bytes came over the relay path after the direct one was cut"
    );
    Ok(())
}

/// A flow whose application stops reading keeps its unacknowledged bytes (the flow window),
/// but they have arrived: they must not use up the paths' room (about two congestion windows,
/// far less than a flow window on these 100 Mbit/s links), or every other flow of the client
/// would stall behind one paused download.
#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn a_stalled_reader_does_not_block_other_flows() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let _one_lab = one_lab_at_a_time();
    common::init_tracing();
    let lab = two_path_lab()?;
    let dir = common::temp_dir("mpstall");
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_targets = StopOnDrop(stop.clone());
    let data = Arc::new(pattern(64 << 20));
    start_targets(&lab, data.clone(), stop)?;
    let (_server, fp) = start_server(&lab, &dir)?;
    let metrics = ["--metrics".to_owned(), METRICS.to_owned()];
    let (_client, _) = start_client_with(&lab, &fp, SOCKS, &[0, 1], "minrtt", &metrics)?;
    wait_ready(&lab, SOCKS)?;
    let source = SocketAddr::from((lab.server_ip(), SOURCE_PORT));
    // Opened, asked for 64 MiB, and never read.
    let mut stalled = lab.run_in(&lab.client_ns(), || -> Result<TcpStream> {
        let mut s = socks_connect(SOCKS, source)?;
        s.write_all(&(64u64 << 20).to_be_bytes())?;
        Ok(s)
    })??;
    // Until the flow window (and the socket buffers behind it) has crossed the paths.
    let rx = || -> Result<u64> { Ok(lab.client_if_bytes(0)?.0 + lab.client_if_bytes(1)?.0) };
    let start_rx = rx()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rx()? - start_rx < mqproxy::defaults::FLOW_WINDOW as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the stalled flow did not fill its window"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client holds what arrived for it (beyond the socket buffers), and says so.
    let page = lab.run_in(&lab.client_ns(), || scrape(METRICS))??;
    let held: f64 = page
        .lines()
        .find_map(|l| l.strip_prefix("mqproxy_flow_unwritten_bytes "))
        .and_then(|v| v.parse().ok())
        .context("no unwritten-bytes gauge")?;
    eprintln!("the client holds {held} bytes for the unread flow");
    assert!(
        held > f64::from(4 << 20) && held <= mqproxy::defaults::FLOW_WINDOW as f64,
        "unwritten bytes {held}"
    );
    // A second download through the same paths completes meanwhile.
    let t = Instant::now();
    let got = lab.run_in(&lab.client_ns(), || -> Result<Vec<u8>> {
        let mut s = socks_connect(SOCKS, source)?;
        s.write_all(&(8u64 << 20).to_be_bytes())?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .context("second download stalled behind the unread flow")?;
        Ok(got)
    })??;
    eprintln!(
        "8 MiB downloaded in {:?} beside a stalled flow",
        t.elapsed()
    );
    assert!(got[..] == data[..8 << 20], "second download byte exact");
    // The stalled flow carries on once read.
    let mut first = vec![0u8; 1 << 20];
    stalled.set_read_timeout(Some(Duration::from_secs(20)))?;
    stalled.read_exact(&mut first)?;
    assert!(first[..] == data[..1 << 20], "stalled flow byte exact");
    Ok(())
}

/// Fetches the `--metrics` page at `addr` (from the caller's namespace).
fn scrape(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).context("metrics page")?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lab\r\n\r\n")?;
    let mut page = String::new();
    s.read_to_string(&mut page)?;
    anyhow::ensure!(
        page.starts_with("HTTP/1.1 200 OK"),
        "metrics answer: {page}"
    );
    Ok(page)
}

/// A download thread: the bytes and when they were complete.
type Download = std::thread::JoinHandle<Result<(Vec<u8>, Duration)>>;

/// Downloads `len` bytes from the TCP source through [`SOCKS`] on a thread in the client
/// namespace, reading at most `rate` bytes/s from `t0`; returns the data and when it completed.
fn paced_download(
    lab: &MultipathLab,
    source: SocketAddr,
    len: usize,
    rate: u32,
    t0: Instant,
) -> Result<Download> {
    lab.spawn_thread(&lab.client_ns(), move || -> Result<(Vec<u8>, Duration)> {
        let mut s = socks_connect(SOCKS, source)?;
        s.write_all(&(len as u64).to_be_bytes())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut got = Vec::with_capacity(len);
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < len {
            let n = s.read(&mut buf).context("download stalled")?;
            anyhow::ensure!(n > 0, "download ended early at {}", got.len());
            got.extend_from_slice(&buf[..n]);
            let due = Duration::from_secs_f64(got.len() as f64 / f64::from(rate));
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok((got, t0.elapsed()))
    })
}

/// Sets a flag when dropped (stops the lab's target threads however the test ends).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Downloads `len` bytes from the TCP source through `socks` in `flows` parallel connections
/// (each reads `len / flows` and closes); returns the aggregate rate in Mbit/s.
#[cfg(feature = "bench-multipath")]
fn tcp_download(lab: &MultipathLab, socks: &str, flows: usize, len: usize) -> Result<f64> {
    let source = SocketAddr::from((lab.server_ip(), SOURCE_PORT));
    let per = len / flows;
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..flows {
        let socks = socks.to_owned();
        handles.push(
            lab.spawn_thread(&lab.client_ns(), move || -> Result<usize> {
                let mut s = socks_connect(&socks, source)?;
                s.write_all(&(per as u64).to_be_bytes())?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut buf = vec![0u8; 1 << 16];
                let mut got = 0;
                while got < per {
                    let n = s.read(&mut buf).context("download stalled")?;
                    anyhow::ensure!(n > 0, "download ended early");
                    got += n;
                }
                Ok(got)
            })?,
        );
    }
    let mut total = 0;
    for h in handles {
        total += h.join().map_err(|_| anyhow::anyhow!("flow panicked"))??;
    }
    Ok(total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e6)
}

/// Offers `mbit` Mbit/s of 1,200-byte UDP packets through `socks` to the server side's sink
/// for `secs` seconds; returns the rate the sink received, in Mbit/s.
#[cfg(feature = "bench-multipath")]
fn udp_upload(lab: &MultipathLab, socks: &str, mbit: f64, secs: f64) -> Result<f64> {
    const SIZE: usize = 1200;
    let ip = lab.server_ip();
    let sink = lab.run_in(&lab.server_ns(), move || std::net::UdpSocket::bind((ip, 0)))??;
    let sink_addr = sink.local_addr()?;
    sink.set_read_timeout(Some(Duration::from_millis(50)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let (mut bytes, mut first, mut last) = (0u64, None, Instant::now());
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sink.recv(&mut buf) {
                    bytes += n as u64;
                    first.get_or_insert_with(Instant::now);
                    last = Instant::now();
                }
            }
            (bytes, first, last)
        })
    };
    let socks = socks.to_owned();
    let sender = lab.spawn_thread(&lab.client_ns(), move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let a = mqproxy::udpsocks::UdpAssociation::open(socks.parse()?, None).await?;
            let target = mqproxy::proto::TargetAddr::Ip(sink_addr);
            let payload = vec![0x5au8; SIZE];
            let pps = mbit * 1e6 / 8.0 / SIZE as f64;
            let start = Instant::now();
            let mut sent = 0u64;
            // Paced in 1 ms steps: bursts stay small against the links' 1,000-frame queues.
            while start.elapsed().as_secs_f64() < secs {
                let due = (start.elapsed().as_secs_f64() * pps) as u64;
                while sent < due {
                    a.send_to(&target, &payload).await?;
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok::<_, anyhow::Error>(())
        })
    })?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (bytes, first, last) = counter
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))?;
    let Some(first) = first else {
        anyhow::bail!("the UDP sink received nothing")
    };
    Ok(bytes as f64 * 8.0 / last.duration_since(first).as_secs_f64().max(1e-3) / 1e6)
}

#[cfg(feature = "bench-multipath")]
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Waits until an echo goes through `socks` (the client is up and connected).
fn wait_ready(lab: &MultipathLab, socks: &str) -> Result<()> {
    let source = SocketAddr::from((lab.server_ip(), SOURCE_PORT));
    let socks = socks.to_owned();
    lab.run_in(&lab.client_ns(), move || -> Result<()> {
        let mut s = socks_connect(&socks, source)?;
        s.write_all(&1u64.to_be_bytes())?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(())
    })??;
    // Let the other paths of a multipath client finish their handshakes.
    std::thread::sleep(Duration::from_millis(1000));
    Ok(())
}

/// The full multipath benchmark (`cargo xtask bench multipath` runs it in release):
/// single path vs two paths, each 100 Mbit/s with 25 ms one-way delay, all in one run, and
/// each ratio printed. `MQPROXY_BENCH_REPS` repetitions (default 3), medians reported;
/// `MQPROXY_BENCH_QUICK=1` for short transfers.
#[cfg(feature = "bench-multipath")]
#[test]
fn bench_multipath() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let _one_lab = one_lab_at_a_time();
    common::init_tracing();
    let reps: usize = std::env::var("MQPROXY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let quick = std::env::var("MQPROXY_BENCH_QUICK").is_ok_and(|v| v == "1");
    let (tcp_len, udp_secs) = if quick {
        (48 << 20, 3.0)
    } else {
        (96 << 20, 4.0)
    };
    let lab = two_path_lab()?;
    let dir = common::temp_dir("mpbench");
    let stop = Arc::new(AtomicBool::new(false));
    let _echo_sources = start_targets(&lab, Arc::new(pattern(tcp_len)), stop.clone())?;
    let (_server, fp) = start_server(&lab, &dir)?;
    // (name, paths, scheduler)
    let configs: [(&str, &[usize], &str); 2] =
        [("single", &[], "minrtt"), ("two paths", &[0, 1], "minrtt")];
    let mut results: Vec<[Vec<f64>; 3]> = vec![Default::default(), Default::default()];
    let mut port = 1080;
    for rep in 0..reps {
        for (k, (name, paths, sched)) in configs.iter().enumerate() {
            port += 1;
            let socks = format!("127.0.0.1:{port}");
            let (_client, _) = start_client(&lab, &fp, &socks, paths, sched)?;
            wait_ready(&lab, &socks)?;
            let one = tcp_download(&lab, &socks, 1, tcp_len)?;
            let many = tcp_download(&lab, &socks, 16, tcp_len)?;
            let udp = udp_upload(&lab, &socks, 250.0, udp_secs)?;
            eprintln!(
                "rep {rep} {name:>9}: 1 TCP flow {one:6.1} Mbit/s, 16 TCP flows {many:6.1} Mbit/s, UDP {udp:6.1} Mbit/s (offered 250)"
            );
            results[k][0].push(one);
            results[k][1].push(many);
            results[k][2].push(udp);
        }
    }
    // backup: the share of bytes on the primary path's interface during a download.
    let mut shares = Vec::new();
    for _ in 0..reps {
        port += 1;
        let socks = format!("127.0.0.1:{port}");
        let (_client, _) = start_client(&lab, &fp, &socks, &[0, 1], "backup")?;
        wait_ready(&lab, &socks)?;
        let before: Vec<(u64, u64)> = (0..2)
            .map(|i| lab.client_if_bytes(i))
            .collect::<Result<_>>()?;
        tcp_download(&lab, &socks, 1, tcp_len / 2)?;
        let after: Vec<(u64, u64)> = (0..2)
            .map(|i| lab.client_if_bytes(i))
            .collect::<Result<_>>()?;
        let moved: Vec<u64> = (0..2)
            .map(|i| (after[i].0 - before[i].0) + (after[i].1 - before[i].1))
            .collect();
        shares.push(moved[0] as f64 / (moved[0] + moved[1]).max(1) as f64);
    }
    stop.store(true, Ordering::Relaxed);
    let m = |k: usize, j: usize| median(results[k][j].clone());
    println!(
        "\nmultipath benchmark: 2 paths × (100 Mbit/s, 25 ms one way), {reps} rep(s), medians"
    );
    println!(
        "{:<22} {:>12} {:>12} {:>8} {:>8}",
        "", "single", "two paths", "ratio", "target"
    );
    for (j, (what, target)) in [
        ("1 TCP flow (Mbit/s)", 1.8),
        ("16 TCP flows (Mbit/s)", 1.9),
        ("UDP (Mbit/s)", 1.8),
    ]
    .into_iter()
    .enumerate()
    {
        println!(
            "{what:<22} {:>12.1} {:>12.1} {:>7.2}x {:>7.1}x",
            m(0, j),
            m(1, j),
            m(1, j) / m(0, j),
            target
        );
    }
    println!(
        "{:<22} {:>12} {:>11.1}% {:>8} {:>7}%",
        "backup: primary share",
        "",
        median(shares) * 100.0,
        "",
        95
    );
    Ok(())
}
