//! Shared test harness: an in-process server and client on loopback (real sockets, real
//! Quinn), UDP echo servers, temp dirs, and the skip-or-fail rule for external tools.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqproxy::client::{Client, ClientConfig};
use mqproxy::server::{Server, ServerConfig};
use mqproxy::tls::{ClientVerify, ServerCert};
use mqproxy::AbortOnDrop;
use tokio::net::UdpSocket;

pub const TOKEN: &str = "secret123";

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "mqproxy-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating a temp dir");
    d
}

/// Whether an external tool can be used. Missing tools skip the test with a message, except
/// under CI=true, where they fail it.
pub fn have(tool: &str, probe: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        let msg = format!("`{tool} {}` failed: the tool is missing", probe.join(" "));
        // Tests that need tools are #[ignore]d with the tools as the reason: a run that asks
        // for them (--ignored) must not pass them without running them.
        if std::env::var("CI").as_deref() == Ok("true") || netlab::ignored_tests_requested() {
            panic!("{msg} (CI=true or --ignored: failing instead of skipping)");
        }
        eprintln!("SKIPPED: {msg}");
    }
    ok
}

/// Whether a Python module imports.
pub fn have_py(module: &str) -> bool {
    have("python3", &["-c", &format!("import {module}")])
}

/// Settings for [`start`].
pub struct Opts {
    pub udp_enabled: bool,
    pub udp_idle_timeout: Duration,
    pub server_idle_timeout: Duration,
    pub client_token: String,
    pub allow_private: bool,
    pub max_conns: usize,
    pub http: bool,
    /// Multipath: the client's local addresses, one path each.
    pub paths: Vec<std::net::IpAddr>,
    pub scheduler: mqproxy::multipath::sched::Scheduler,
    /// Serve both `--metrics` pages (on loopback, any port).
    pub metrics: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            udp_enabled: true,
            udp_idle_timeout: Duration::from_secs(30),
            server_idle_timeout: Duration::from_secs(30),
            client_token: TOKEN.into(),
            allow_private: true,
            max_conns: 256,
            http: false,
            paths: Vec::new(),
            scheduler: Default::default(),
            metrics: false,
        }
    }
}

pub struct Harness {
    pub server_addr: SocketAddr,
    pub fingerprint: String,
    pub socks: SocketAddr,
    pub http: Option<SocketAddr>,
    pub server: Arc<mqproxy::server::ServerCounters>,
    pub client: Arc<mqproxy::client::ClientCounters>,
    pub paths: mqproxy::client::PathsHandle,
    /// The `--metrics` pages, with [`Opts::metrics`].
    pub client_metrics_addr: Option<SocketAddr>,
    pub server_metrics_addr: Option<SocketAddr>,
    pub dir: PathBuf,
    _tasks: Vec<AbortOnDrop<()>>,
}

pub fn server_config(o: &Opts, dir: &std::path::Path) -> ServerConfig {
    let mut sc = ServerConfig::new(
        "127.0.0.1:0".parse().expect("literal"),
        TOKEN,
        ServerCert::SelfSigned(dir.to_owned()),
    );
    sc.udp_enabled = o.udp_enabled;
    sc.udp_idle_timeout = o.udp_idle_timeout;
    sc.idle_timeout = o.server_idle_timeout;
    sc.allow_private = o.allow_private;
    sc.max_conns = o.max_conns;
    if o.metrics {
        sc.metrics = Some("127.0.0.1:0".parse().expect("literal"));
    }
    sc
}

/// Logs to stderr when RUST_LOG is set (e.g. `RUST_LOG=mqproxy=debug cargo test`).
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Starts a server and a client wired to it.
pub async fn start(o: Opts) -> Harness {
    init_tracing();
    let dir = temp_dir("h");
    let server = Server::bind(server_config(&o, &dir)).expect("server binds");
    let server_addr = server.local_addr();
    let fp = server.fingerprint();
    let server_metrics = server.metrics();
    let server_metrics_addr = server.metrics_addr();
    let st = AbortOnDrop(tokio::spawn(server.run(std::future::pending())));
    let mut cc = ClientConfig::new(
        server_addr.to_string(),
        o.client_token.clone(),
        ClientVerify::Pinned(fp),
    );
    cc.socks5 = "127.0.0.1:0".parse().expect("literal");
    if o.http {
        cc.http = Some("127.0.0.1:0".parse().expect("literal"));
    }
    cc.paths = o.paths.clone();
    cc.scheduler = o.scheduler;
    if o.metrics {
        cc.metrics = Some("127.0.0.1:0".parse().expect("literal"));
    }
    let client = Client::bind(cc).await.expect("client binds");
    let client_metrics_addr = client.metrics_addr();
    let paths = client.paths();
    let socks = client.socks_addr();
    let http = client.http_addr();
    let client_metrics = client.metrics();
    let ct = AbortOnDrop(tokio::spawn(client.run(std::future::pending())));
    Harness {
        server_addr,
        fingerprint: fp.to_string(),
        socks,
        http,
        server: server_metrics,
        client: client_metrics,
        paths,
        client_metrics_addr,
        server_metrics_addr,
        dir,
        _tasks: vec![st, ct],
    }
}

/// SOCKS5 CONNECT (no authentication) through `proxy` to `target`.
pub async fn socks_connect(proxy: SocketAddr, target: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect proxy");
    s.write_all(&[5, 1, 0]).await.expect("greeting");
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await.expect("method");
    assert_eq!(r, [5, 0]);
    let SocketAddr::V4(t) = target else {
        panic!("IPv4 targets only")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&t.ip().octets());
    req.extend_from_slice(&t.port().to_be_bytes());
    s.write_all(&req).await.expect("request");
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.expect("reply");
    assert_eq!(rep[1], 0, "SOCKS reply code");
    s
}

/// A UDP echo server on loopback.
pub async fn udp_echo() -> (SocketAddr, AbortOnDrop<()>) {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
    let a = s.local_addr().expect("addr");
    let t = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    (a, AbortOnDrop(t))
}

/// Polls `f` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn gauge(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// A loopback UDP socket that is bound and never read: a destination that never answers,
/// whose port nobody else can take while the test holds it.
pub fn silent_udp() -> std::net::UdpSocket {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP")
}

/// A loopback TCP socket that is bound but not listening: connections to it are refused, and
/// nobody else can take its port while the test holds it.
pub fn refusing_tcp() -> (socket2::Socket, std::net::SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("TCP socket");
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind TCP");
    let addr = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("bound address");
    (s, addr)
}

/// Reads `stream` (a child's piped stdout or stderr) on a thread until a line contains
/// `needle`, and returns that line with terminal colour codes removed. This is how a test
/// learns the address a process bound for port 0; the rest of the stream keeps being drained.
pub fn wait_for_line(
    stream: impl std::io::Read + Send + 'static,
    needle: &'static str,
    timeout: Duration,
) -> String {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            let plain = strip_ansi(&line);
            if plain.contains(needle) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(plain);
                }
            }
        }
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("no line containing {needle:?} within {timeout:?}"))
}

/// The value of `key=` in a log line (up to the next space), e.g. `socks5=127.0.0.1:1080`;
/// `Some(...)` around it (a Debug-logged option) is removed.
pub fn field(line: &str, key: &str) -> String {
    let v = line
        .split(&format!("{key}="))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    v.trim_start_matches("Some(")
        .trim_end_matches(')')
        .to_owned()
}

/// `s` without terminal colour codes (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Kills a child process when dropped.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command to completion off the async threads.
pub async fn output(mut cmd: Command) -> std::process::Output {
    let what = format!("{cmd:?}");
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("blocking task")
        .unwrap_or_else(|e| panic!("running {what}: {e}"))
}

/// `len` pseudo-random bytes (xorshift from `seed`): test data that is cheap to make and
/// unlikely to match by accident.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
