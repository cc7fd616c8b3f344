//! Attacks on the real binaries (`mqproxy server`, `udpsocks`) on loopback, bounded in time and
//! count, each asserting the figure that matters to a bystander: QUIC Initial floods, UDP
//! session exhaustion, log injection and colours, destinations hidden in IPv6. Every test prints
//! its figure (`FIGURE ...`). udp-over-tcp's (its log files, idle `--psk` handshakes) are in
//! that crate's tests/abuse.rs.
//!
//! `MQPROXY_ABUSE_BIN_DIR=DIR` runs the attacks against the binaries in DIR instead (an older
//! build, to measure the figure before a fix); flags that build lacks are then left out.

mod common;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{strip_ansi, temp_dir, ChildGuard, TOKEN};
use mqproxy::client::{Client, ClientConfig};
use mqproxy::proto::TargetAddr;
use mqproxy::tls::ClientVerify;
use mqproxy::udpsocks::UdpAssociation;
use mqproxy::AbortOnDrop;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a process may take to log what a test waits for.
const WAIT: Duration = Duration::from_secs(20);

/// A binary of this crate: this build's, or `MQPROXY_ABUSE_BIN_DIR`'s.
fn bin(name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("MQPROXY_ABUSE_BIN_DIR") {
        return Path::new(&d).join(name);
    }
    PathBuf::from(match name {
        "mqproxy" => env!("CARGO_BIN_EXE_mqproxy"),
        "udpsocks" => env!("CARGO_BIN_EXE_udpsocks"),
        other => panic!("no binary {other}"),
    })
}

/// Whether the binaries under test are an older build (see the module docs).
fn old_build() -> bool {
    std::env::var_os("MQPROXY_ABUSE_BIN_DIR").is_some()
}

/// A child whose stderr goes to a file (not a terminal, as under systemd or `2>log`).
struct Proc {
    _child: ChildGuard,
    pid: u32,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr to a fresh file; `NO_COLOR` is removed so that colours
    /// depend on the terminal check alone.
    fn start(mut cmd: Command, tag: &str) -> Proc {
        let log = temp_dir(tag).join("stderr.log");
        let f = std::fs::File::create(&log).expect("log file");
        cmd.env_remove("NO_COLOR")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Proc {
            pid: child.id(),
            _child: ChildGuard(child),
            log,
        }
    }

    /// The raw log so far.
    fn raw(&self) -> String {
        let mut s = String::new();
        std::fs::File::open(&self.log)
            .and_then(|mut f| f.read_to_string(&mut s))
            .expect("reading the log");
        s
    }

    /// The first log line containing `needle`, ANSI codes removed (waiting up to [`WAIT`]).
    async fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let raw = self.raw();
            if let Some(l) = raw.lines().find(|l| strip_ansi(l).contains(needle)) {
                return strip_ansi(l);
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log within {WAIT:?}:\n{raw}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Descriptors the process holds.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// The value of `key=` in a log line (quotes removed).
fn field(line: &str, key: &str) -> String {
    let pat = format!(" {key}=");
    let start = line
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        + pat.len();
    line[start..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_matches('"')
        .to_owned()
}

/// A running `mqproxy server` on loopback.
struct Server {
    proc: Proc,
    addr: SocketAddr,
    fingerprint: peer_sdk_fp::Fingerprint,
    metrics: SocketAddr,
}

mod peer_sdk_fp {
    pub use mqproxy::peer_sdk::tls::Fingerprint;
}

/// `mqproxy server --listen 127.0.0.1:0 --metrics 127.0.0.1:0` plus `args`, optionally under
/// `ulimit -n nofile` (soft and hard).
async fn server(args: &[&str], nofile: Option<u32>) -> Server {
    let dir = temp_dir("abuse-server");
    let exe = bin("mqproxy");
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                .arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args([
        "server",
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ])
    .args(["--token", TOKEN, "--state-dir"])
    .arg(dir.join("state"))
    .args(args)
    .env("RUST_LOG", "info");
    let proc = Proc::start(cmd, "abuse-server-log");
    let fp = proc.wait_for("clients pin it").await;
    let running = proc.wait_for("server running").await;
    let metrics = proc.wait_for("serving Prometheus metrics").await;
    Server {
        addr: field(&running, "listen").parse().expect("listen address"),
        fingerprint: field(&fp, "fingerprint").parse().expect("fingerprint"),
        metrics: field(&metrics, "metrics").parse().expect("metrics address"),
        proc,
    }
}

impl Server {
    /// A metric's value from the `--metrics` page (0 when absent, as in an older build).
    async fn metric(&self, name: &str) -> u64 {
        let mut s = tokio::net::TcpStream::connect(self.metrics)
            .await
            .expect("metrics page");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("response");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// An in-process client (real Quinn) of `server`, from `from` when given.
async fn client(
    server: &Server,
    client_id: &str,
    from: Option<std::net::IpAddr>,
) -> (SocketAddr, AbortOnDrop<()>) {
    client_to(
        &server.addr.to_string(),
        ClientVerify::Pinned(server.fingerprint),
        client_id,
        from,
    )
    .await
}

async fn client_to(
    server: &str,
    verify: ClientVerify,
    client_id: &str,
    from: Option<std::net::IpAddr>,
) -> (SocketAddr, AbortOnDrop<()>) {
    let mut cc = ClientConfig::new(server, TOKEN, verify);
    cc.socks5 = "127.0.0.1:0".parse().expect("literal");
    cc.client_id = client_id.into();
    cc.paths = from.into_iter().collect();
    let c = Client::bind(cc).await.expect("client binds");
    let socks = c.socks_addr();
    (
        socks,
        AbortOnDrop(tokio::spawn(c.run(std::future::pending()))),
    )
}

/// SOCKS5 CONNECT through `proxy`: the reply code, and the stream when it is 0.
async fn socks_connect(proxy: SocketAddr, target: SocketAddr) -> (u8, tokio::net::TcpStream) {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect proxy");
    s.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await.expect("method");
    let mut req = vec![5, 1, 0];
    match target {
        SocketAddr::V4(t) => {
            req.push(1);
            req.extend_from_slice(&t.ip().octets());
        }
        SocketAddr::V6(t) => {
            req.push(4);
            req.extend_from_slice(&t.ip().octets());
        }
    }
    req.extend_from_slice(&target.port().to_be_bytes());
    s.write_all(&req).await.expect("request");
    let mut head = [0u8; 4];
    if s.read_exact(&mut head).await.is_err() {
        return (0xff, s);
    }
    let rest = match head[3] {
        4 => 18,
        _ => 6,
    };
    let mut tail = vec![0u8; rest];
    let _ = s.read_exact(&mut tail).await;
    (head[1], s)
}

/// A TCP echo server on loopback.
async fn tcp_echo() -> (SocketAddr, AbortOnDrop<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
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

/// Whether a CONNECT through `socks` to the echo server `echo` works end to end.
async fn connect_works(socks: SocketAddr, echo: SocketAddr) -> bool {
    let attempt = async {
        let (code, mut s) = socks_connect(socks, echo).await;
        if code != 0 {
            return false;
        }
        if s.write_all(b"ping").await.is_err() {
            return false;
        }
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.is_ok() && &b == b"ping"
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or(false)
}

/// How long after `since` a CONNECT through `socks` first worked, retrying every 50 ms until
/// `wait` has passed since then; `None` if it never did.
async fn first_working_connect(
    socks: SocketAddr,
    echo: SocketAddr,
    since: Instant,
    wait: Duration,
) -> Option<Duration> {
    while since.elapsed() < wait {
        if connect_works(socks, echo).await {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// `n` QUIC Initials of distinct connections (distinct connection ids, as a server keys
/// new connections by them), made by a real Quinn client towards a socket that never answers.
async fn captured_initials(n: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let to = sink.local_addr().expect("addr");
    let mut ep =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal")).expect("endpoint");
    ep.set_default_client_config(
        mqproxy::tls::client_config(&ClientVerify::Insecure).expect("client config"),
    );
    let _pending: Vec<quinn::Connecting> = (0..n)
        .map(|_| ep.connect(to, "localhost").expect("connect"))
        .collect();
    let mut by_dcid = std::collections::HashMap::new();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + WAIT;
    while by_dcid.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let (len, _) = tokio::time::timeout(left, sink.recv_from(&mut buf))
            .await
            .expect("the client sends its Initials")
            .expect("recv");
        let p = &buf[..len];
        // Long header: flags, version (4), DCID length, DCID.
        assert!(len >= 1200 && p[0] & 0xf0 == 0xc0, "a long-header Initial");
        let dcid = p[6..6 + p[5] as usize].to_vec();
        by_dcid.entry(dcid).or_insert_with(|| p.to_vec());
    }
    ep.close(0u32.into(), b"");
    by_dcid.into_values().collect()
}

/// Issue 13, item 5: Initials from sources that never answer (each from its own socket, as
/// spoofed sources would be) must not hold `--max-conns` slots; a legitimate client connects
/// within 1 s while the flood goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_flood_does_not_lock_out_a_client() {
    const FLOOD: usize = 400;
    const EVERY: Duration = Duration::from_millis(5);
    let (echo, _e) = tcp_echo().await;
    let s = server(&["--max-conns", "16", "--allow-private"], None).await;
    let initials = captured_initials(FLOOD).await;
    let to = s.addr;
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(0usize);
    let flood = tokio::task::spawn_blocking(move || {
        // Sockets stay open (and unread) until the flood ends: sources that never answer.
        let mut socks = Vec::with_capacity(FLOOD);
        for (i, initial) in initials.iter().enumerate() {
            let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            u.send_to(initial, to).expect("send");
            socks.push(u);
            let _ = sent_tx.send(i + 1);
            std::thread::sleep(EVERY);
        }
        socks.len()
    });
    // Far more Initials than slots are outstanding before the client starts.
    sent_rx
        .wait_for(|n| *n >= 100)
        .await
        .expect("the flood runs");
    let t0 = Instant::now();
    let (socks, _c) = client(&s, "legit", None).await;
    let ok_after = first_working_connect(socks, echo, t0, WAIT).await;
    let during_flood = *sent_rx.borrow() < FLOOD;
    assert_eq!(flood.await.expect("flood task"), FLOOD);
    let retries = s.metric("mqproxy_server_retries_total").await;
    let refused = s.metric("mqproxy_server_refused_max_conns_total").await;
    eprintln!(
        "FIGURE initial flood ({FLOOD} Initials, --max-conns 16): legitimate client connected after {ok_after:?} (flood still running: {during_flood}); retries sent {retries}, refused for --max-conns {refused}"
    );
    let ok_after = ok_after.expect("the legitimate client connects at all");
    assert!(
        ok_after < Duration::from_secs(1),
        "the legitimate client needed {ok_after:?}"
    );
    assert!(during_flood, "measured while the flood was still running");
    assert!(
        retries >= 100,
        "flooded Initials were answered with Retry: {retries}"
    );
    assert_eq!(refused, 0, "no validated client was refused");
}

/// Issue 13, item 6: one client opening UDP sessions to many destinations cannot take the
/// server's descriptors: its sessions stop at the per-client cap with SESSION_LIMIT, counted
/// on the metrics page, and another client's UDP and TCP keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sessions_are_capped_per_client_and_in_total() {
    // 512 descriptors: the derived process-wide cap is 128 sessions.
    const NOFILE: u32 = 512;
    const PER_CLIENT: usize = 48;
    const DESTINATIONS: usize = 300;
    let per_client = PER_CLIENT.to_string();
    let mut args = vec!["--allow-private"];
    if !old_build() {
        args.extend(["--max-udp-sessions-per-client", &per_client]);
    }
    let s = server(&args, Some(NOFILE)).await;
    let (echo, _e) = tcp_echo().await;
    let (udp_echo, _ue) = common::udp_echo().await;
    let sinks: Vec<std::net::UdpSocket> = (0..DESTINATIONS)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let fds_before = s.proc.fds();

    // The attacker: one client, sessions to many destinations.
    let (socks, _attacker) = client(&s, "attacker", None).await;
    let a = UdpAssociation::open(socks, None).await.expect("associate");
    for sink in &sinks {
        let to = TargetAddr::Ip(sink.local_addr().expect("addr"));
        a.send_to(&to, b"x").await.expect("send");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Every open was answered one way or the other.
    let deadline = Instant::now() + WAIT;
    let (mut open, mut refused);
    loop {
        open = s.metric("mqproxy_server_udp_sessions").await;
        refused = s.metric("mqproxy_server_udp_sessions_refused_total").await;
        if open + refused >= DESTINATIONS as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_limit = s
        .metric("mqproxy_server_udp_sessions_refused_limit_total")
        .await;
    let cap = s.metric("mqproxy_server_udp_sessions_limit").await;
    let fds_attack = s.proc.fds();

    // A bystander from another address: UDP through its own association, and TCP.
    let (socks_b, _bystander) =
        client(&s, "bystander", Some("127.0.0.2".parse().expect("lit"))).await;
    let b = UdpAssociation::open(socks_b, None)
        .await
        .expect("associate");
    let target = TargetAddr::Ip(udp_echo);
    let mut udp_ok = false;
    for _ in 0..20 {
        b.send_to(&target, b"hello").await.expect("send");
        if let Ok(Ok((_, p))) =
            tokio::time::timeout(Duration::from_millis(250), b.recv_from()).await
        {
            udp_ok = &p[..] == b"hello";
            break;
        }
    }
    let tcp_ok = connect_works(socks_b, echo).await;
    eprintln!(
        "FIGURE UDP sessions (RLIMIT_NOFILE {NOFILE}, {DESTINATIONS} destinations from one client): open {open}, refused {refused} (SESSION_LIMIT {refused_limit}), process cap {cap}, server fds {fds_before} -> {fds_attack}; bystander UDP works: {udp_ok}, TCP works: {tcp_ok}"
    );
    assert_eq!(
        open, PER_CLIENT as u64,
        "the attacker stops at the per-client cap"
    );
    assert_eq!(
        refused_limit,
        (DESTINATIONS - PER_CLIENT) as u64,
        "the rest are refused with SESSION_LIMIT"
    );
    assert_eq!(cap, u64::from(NOFILE) / 4, "the derived process-wide cap");
    assert!(
        fds_attack < NOFILE as usize / 2,
        "sessions hold under half the descriptors: {fds_attack}"
    );
    assert!(udp_ok, "the bystander's UDP session works");
    assert!(tcp_ok, "the bystander's TCP CONNECT works");
}

/// Issue 13, item 6, the process-wide cap: many clients together stop at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sessions_stop_at_the_process_wide_cap() {
    if old_build() {
        eprintln!("SKIPPED: --max-udp-sessions-total does not exist in the older build");
        return;
    }
    const TOTAL: u64 = 20;
    let s = server(
        &[
            "--allow-private",
            "--max-udp-sessions-total",
            "20",
            "--max-udp-sessions-per-client",
            "15",
        ],
        None,
    )
    .await;
    let sinks: Vec<std::net::UdpSocket> = (0..30)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let mut keep = Vec::new();
    for from in ["127.0.0.1", "127.0.0.3"] {
        let (socks, c) = client(&s, "many", Some(from.parse().expect("lit"))).await;
        let a = UdpAssociation::open(socks, None).await.expect("associate");
        for sink in &sinks[..15] {
            a.send_to(&TargetAddr::Ip(sink.local_addr().expect("addr")), b"x")
                .await
                .expect("send");
        }
        keep.push((a, c));
    }
    let deadline = Instant::now() + WAIT;
    while s
        .metric("mqproxy_server_udp_sessions_refused_limit_total")
        .await
        < 30 - TOTAL
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open = s.metric("mqproxy_server_udp_sessions").await;
    let refused = s
        .metric("mqproxy_server_udp_sessions_refused_limit_total")
        .await;
    eprintln!("FIGURE process-wide cap {TOTAL}: 2 clients x 15 sessions -> open {open}, SESSION_LIMIT {refused}");
    assert_eq!(open, TOTAL);
    assert_eq!(refused, 30 - TOTAL);
}

/// Issue 13, item 7: a client_id with a newline and terminal escapes cannot forge a log line
/// or reach the log raw, and a log file (not a terminal) gets no ANSI codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_strings_cannot_forge_log_lines_and_files_get_no_colours() {
    let s = server(&[], None).await;
    let evil =
        "x\n2026-01-01T00:00:00.000000Z  INFO conn: client authenticated client_id=admin\x1b[2J";
    let (_socks, _c) = client(&s, evil, None).await;
    s.proc.wait_for("client authenticated").await;
    let raw = s.proc.raw();
    let forged = raw
        .lines()
        .filter(|l| l.starts_with("2026-01-01T00:00:00"))
        .count();
    let escapes = raw.matches('\x1b').count();
    let auth_lines = raw
        .lines()
        .filter(|l| l.contains("client authenticated"))
        .count();
    eprintln!(
        "FIGURE log injection: forged lines {forged}, ESC bytes in the server's log file {escapes}, lines saying 'client authenticated' {auth_lines}"
    );
    assert_eq!(forged, 0, "a forged line:\n{raw}");
    assert_eq!(auth_lines, 1, "one authentication, one line:\n{raw}");
    assert_eq!(escapes, 0, "ANSI codes in a log file:\n{raw}");
    assert!(
        raw.contains(r"x\n2026-01-01"),
        "the client_id is logged escaped:\n{raw}"
    );

    // udpsocks logs nothing of its own today; it installs the same subscriber
    // (`mqproxy::logging::init`), whose terminal check the next test runs on a terminal.
}

/// Issue 13, item 7: on a terminal the binaries colour their logs, unless `NO_COLOR` is set.
#[tokio::test]
async fn colours_only_to_a_terminal_and_never_with_no_color() {
    if !common::have("script", &["--version"]) {
        return;
    }
    let dir = temp_dir("abuse-colours");
    let run = |no_color: bool| {
        let exe = bin("mqproxy");
        let line = format!(
            "RUST_LOG=info timeout 2 {} server --listen 127.0.0.1:0 --token {TOKEN} --state-dir {}",
            exe.display(),
            dir.join("state").display()
        );
        let mut c = Command::new("script");
        c.args(["-qec", &line, "/dev/null"]).stdin(Stdio::null());
        if no_color {
            c.env("NO_COLOR", "1");
        } else {
            c.env_remove("NO_COLOR");
        }
        c
    };
    let coloured = common::output(run(false)).await;
    let plain = common::output(run(true)).await;
    let (c, p) = (
        String::from_utf8_lossy(&coloured.stdout).into_owned(),
        String::from_utf8_lossy(&plain.stdout).into_owned(),
    );
    eprintln!(
        "FIGURE terminal: ESC bytes without NO_COLOR {}, with NO_COLOR=1 {}",
        c.matches('\x1b').count(),
        p.matches('\x1b').count()
    );
    assert!(c.contains("server running") && c.contains('\x1b'), "{c:?}");
    assert!(p.contains("server running") && !p.contains('\x1b'), "{p:?}");
}

/// Issue 13, item 8: a destination hidden in an IPv6 address (NAT64 here: 64:ff9b::7f00:1 is
/// 127.0.0.1) is refused by the policy, for TCP CONNECT and for UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_ipv4_destinations_are_refused() {
    let s = server(&[], None).await;
    let (socks, _c) = client(&s, "policy", None).await;
    let (echo, _e) = tcp_echo().await;
    let port = echo.port();
    let mut codes = Vec::new();
    for target in [
        format!("[64:ff9b::7f00:1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("[2002:7f00:1::1]:{port}"),
        format!("[::127.0.0.1]:{port}"),
    ] {
        let t: SocketAddr = target.parse().expect("literal");
        // The client may still be connecting: the first attempt waits for it.
        let mut code = 0xff;
        for _ in 0..40 {
            code = socks_connect(socks, t).await.0;
            if code != 1 && code != 0xff {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        codes.push((target, code));
    }
    // UDP to 10.0.0.5 by NAT64.
    let a = UdpAssociation::open(socks, None).await.expect("associate");
    let udp_target = TargetAddr::Ip("[64:ff9b::a00:5]:53".parse().expect("literal"));
    a.send_to(&udp_target, b"x").await.expect("send");
    let deadline = Instant::now() + WAIT;
    while s.metric("mqproxy_server_udp_sessions_refused_total").await == 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let udp_refused = s.metric("mqproxy_server_udp_sessions_refused_total").await;
    let udp_open = s.metric("mqproxy_server_udp_sessions_total").await;
    eprintln!("FIGURE embedded IPv4: SOCKS reply codes {codes:?} (2 = not allowed); UDP to 64:ff9b::a00:5 refused {udp_refused}, opened {udp_open}");
    for (t, code) in &codes {
        assert_eq!(
            *code, 2,
            "{t}: SOCKS reply {code:#04x}, want 0x02 (not allowed)"
        );
    }
    assert_eq!((udp_refused, udp_open), (1, 0));
}

/// The server's resident memory, from `/proc`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// The endpoint takes packets up to 65,000 bytes (path MTU discovery on loopback and jumbo
/// frames): a paced flood of junk datagrams of that size and of the largest UDP datagram,
/// from many sources, long and short headers, must neither grow the server's memory past a
/// bound nor keep a legitimate client from connecting and working while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_the_largest_datagrams_is_dropped_and_bounded() {
    const SOURCES: usize = 64;
    const DATAGRAMS: usize = 1_500;
    const EVERY: Duration = Duration::from_millis(1);
    let (echo, _e) = tcp_echo().await;
    let s = server(&["--allow-private"], None).await;
    let to = s.addr;
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(0usize);
    let flood = tokio::task::spawn_blocking(move || {
        let socks: Vec<std::net::UdpSocket> = (0..SOURCES)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let mut junk = vec![0u8; 65_507];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in junk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for i in 0..DATAGRAMS {
            // Alternate a long header (Initial-like) and a short header, and both sizes.
            junk[0] = if i % 2 == 0 { 0xc3 } else { 0x43 };
            let len = if i % 4 < 2 { 65_000 } else { 65_507 };
            socks[i % SOURCES].send_to(&junk[..len], to).expect("send");
            let _ = sent_tx.send(i + 1);
            std::thread::sleep(EVERY);
        }
        DATAGRAMS
    });
    sent_rx
        .wait_for(|n| *n >= 200)
        .await
        .expect("the flood runs");
    let (socks, _c) = client(&s, "legit", None).await;
    let ok_after = first_working_connect(socks, echo, Instant::now(), WAIT).await;
    let during_flood = *sent_rx.borrow() < DATAGRAMS;
    let rss_during = rss_bytes(s.proc.pid);
    assert_eq!(flood.await.expect("flood task"), DATAGRAMS);
    let rss_after = rss_bytes(s.proc.pid);
    eprintln!(
        "FIGURE big-datagram flood ({DATAGRAMS} of 65,000-65,507 B from {SOURCES} sources at 1/ms): client worked after {ok_after:?} (flood still running: {during_flood}); server RSS {} KiB during, {} KiB after",
        rss_during / 1024,
        rss_after / 1024
    );
    let ok_after = ok_after.expect("the legitimate client works at all");
    assert!(
        ok_after < Duration::from_secs(1),
        "the legitimate client needed {ok_after:?}"
    );
    assert!(during_flood, "measured while the flood was still running");
    assert!(
        rss_during.max(rss_after) < 96 << 20,
        "server memory grew under the flood: {rss_during} / {rss_after} bytes"
    );
    assert!(
        connect_works(socks, echo).await,
        "the client still works after the flood"
    );
}
