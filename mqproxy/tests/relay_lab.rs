//! `mqproxy server --relay` behind real kernel NATs (netlab): behind a symmetric NAT the client
//! reaches it through the relay, behind a port-restricted NAT directly; either way
//! `curl --socks5-hostname` through the `mqproxy client` binary fetches a file from a web
//! server on the lab's public segment byte for byte, and the logs name the path.
//!
//! Needs root and nftables: skipped with a message elsewhere, never under `CI=true`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{have, temp_dir, ChildGuard};
use netlab::{Lab, LabConfig, NatType, Side};
use quic_relay::server::{Server, ServerHandle};
use quic_relay::sessions::RelayConfig;

const WAIT: Duration = Duration::from_secs(30);
const RELAY_PORT: u16 = 4433;
/// The web server: the relay host's second address, on the public segment.
const WEB_PORT: u16 = 8080;
const SOCKS_PORT: u16 = 1080;
const TOKEN: &str = "lab-proxy-token";
const FILE_LEN: usize = 2 << 20;

fn start_relay(lab: &Lab) -> ServerHandle {
    let addr = SocketAddr::from((lab.relay_ip(), RELAY_PORT));
    lab.run_in(&lab.relay_ns(), move || {
        Server::bind(addr, RelayConfig::default(), 4 << 20)
            .expect("bind relay")
            .spawn()
            .expect("spawn relay")
    })
    .expect("relay namespace")
}

/// A static web server (Python's http.server) on the public segment serving `dir`; returns
/// once it accepts connections.
fn start_web(lab: &Lab, dir: &Path) -> (ChildGuard, SocketAddr) {
    let addr = SocketAddr::from((lab.relay_ip2(), WEB_PORT));
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "http.server", &WEB_PORT.to_string(), "--bind"])
        .arg(lab.relay_ip2().to_string())
        .arg("--directory")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = ChildGuard(lab.spawn(&lab.relay_ns(), cmd).expect("start web server"));
    let up = lab
        .run_in(&lab.relay_ns(), move || {
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        })
        .expect("relay namespace");
    assert!(up, "web server on {addr} did not come up");
    (child, addr)
}

/// Log lines of a child's stderr, without ANSI colours, as they arrive; read in order.
struct Log {
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Lines before this index were consumed by earlier [`Log::wait_for`] calls.
    cursor: usize,
    what: &'static str,
}

impl Log {
    fn of(child: &mut std::process::Child, what: &'static str) -> Log {
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(strip_ansi(&line)).is_err() {
                    break;
                }
            }
        });
        Log {
            lines: rx,
            seen: Vec::new(),
            cursor: 0,
            what,
        }
    }

    /// The next line containing `needle` after the previous match (waiting up to [`WAIT`]).
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.seen[self.cursor..]
                .iter()
                .position(|l| l.contains(needle))
            {
                self.cursor += i + 1;
                return self.seen[self.cursor - 1].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "{} never logged {needle:?}; its log:\n{}",
                    self.what,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every line so far (without waiting).
    fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        &self.seen
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
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

fn mqproxy(role: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mqproxy"));
    c.arg(role)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// The bytes of the served file: deterministic, incompressible-looking.
fn content() -> Vec<u8> {
    (0..FILE_LEN)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Runs the whole scenario: relay and web server on the public segment, `mqproxy server
/// --relay` behind `server_nat` (side A), `mqproxy client --relay` behind `client_nat` (side
/// B), curl through the client's SOCKS5 port; then the client stops, the server waits for
/// the next one, and a second client fetches again. Returns the path both clients reported.
fn scenario(server_nat: NatType, client_nat: NatType, session: &str) -> &'static str {
    let lab = Lab::new(LabConfig::new(server_nat, client_nat)).expect("lab");
    let _relay = start_relay(&lab);
    let dir = temp_dir("lab");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).expect("www dir");
    let body = content();
    std::fs::write(www.join("file.bin"), &body).expect("write file");
    let (_web, web) = start_web(&lab, &www);
    let relay = SocketAddr::from((lab.relay_ip(), RELAY_PORT)).to_string();

    // The server: no --allow-private needed, 198.18.0.0/15 is not a private range.
    let mut cmd = mqproxy("server");
    cmd.args(["--relay", &relay, "--session", session, "--token", TOKEN])
        .arg("--state-dir")
        .arg(dir.join("state"));
    let mut server = ChildGuard(lab.spawn(&lab.peer_ns(Side::A), cmd).expect("server"));
    let mut slog = Log::of(&mut server.0, "mqproxy server");
    let registered = slog.wait_for("registered with the relay");
    let fingerprint = field(&registered, "fingerprint");
    assert_eq!(fingerprint.len(), 64, "fingerprint in {registered:?}");

    let mut paths = Vec::new();
    for round in 0..2 {
        if round > 0 {
            slog.wait_for("registered with the relay");
        }
        let socks = SocketAddr::from((lab.peer_ip(Side::B), SOCKS_PORT)).to_string();
        let mut cmd = mqproxy("client");
        cmd.args(["--relay", &relay, "--session", session, "--token", TOKEN])
            .args(["--server-cert-sha256", &fingerprint, "--socks5", &socks]);
        let mut client = ChildGuard(lab.spawn(&lab.peer_ns(Side::B), cmd).expect("client"));
        let mut clog = Log::of(&mut client.0, "mqproxy client");
        let reached = clog.wait_for("reached the server through the relay session");
        let path = field(&reached, "path");
        clog.wait_for("connected and authenticated");
        let served = slog.wait_for("client connected through the relay session");
        assert_eq!(field(&served, "path"), path, "both ends report one path");
        slog.wait_for("client authenticated");

        let out = dir.join(format!("got{round}.bin"));
        let mut curl = Command::new("curl");
        curl.args([
            "-sS",
            "--fail",
            "--max-time",
            "60",
            "--socks5-hostname",
            &socks,
        ])
        .arg(format!("http://{web}/file.bin"))
        .arg("-o")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let done = lab
            .spawn(&lab.peer_ns(Side::B), curl)
            .expect("curl")
            .wait_with_output()
            .expect("curl runs");
        assert!(
            done.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&done.stderr)
        );
        let got = std::fs::read(&out).expect("curl wrote the file");
        assert_eq!(got.len(), body.len(), "downloaded length");
        assert!(got == body, "download differs from the served file");

        // The path did not change under the transfer (a change is logged).
        let moved: Vec<&String> = clog
            .drain()
            .iter()
            .filter(|l| l.contains("traffic moved to the"))
            .collect();
        assert!(moved.is_empty(), "path changed during the test: {moved:?}");

        // A clean client stop closes the connection; the server's per-path counts show which
        // path carried the download (2 MiB: 1,500 datagrams, sent in a few hundred GSO batches).
        let stopped = Command::new("kill")
            .args(["-TERM", &client.0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(stopped.success(), "SIGTERM to the client");
        // Its exit sends the relay a BYE, which frees the session for the next client (a
        // killed client's slot is only reclaimed after the relay's unpaired timeout).
        let deadline = Instant::now() + WAIT;
        while client.0.try_wait().expect("try_wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "the client did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let finished = slog.wait_for("peer connection finished: datagrams per path");
        let count = |k: &str| -> u64 { field(&finished, k).parse().expect("a count") };
        let (direct, relayed) = (count("tx_direct"), count("tx_relay"));
        match path.as_str() {
            "relay" => assert!(
                direct == 0 && relayed > 100,
                "relayed connection: {finished:?}"
            ),
            "direct" => assert!(
                direct > 100 && relayed < direct / 10,
                "direct connection: {finished:?}"
            ),
            other => panic!("unknown path {other:?}"),
        }
        drop(client);
        paths.push(path);
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(paths[0], paths[1], "both clients took the same path");
    if paths[0] == "direct" {
        "direct"
    } else {
        "relay"
    }
}

#[test]
fn symmetric_nat_server_is_reached_through_the_relay() {
    netlab::require_lab!();
    if !have("curl", &["--version"]) || !have("python3", &["--version"]) {
        return;
    }
    let path = scenario(
        NatType::Symmetric,
        NatType::PortRestricted,
        "6f1c2d3e-0a4b-4c5d-8e6f-000000000001",
    );
    assert_eq!(path, "relay", "a symmetric NAT leaves only the relay");
}

#[test]
fn port_restricted_nat_server_is_reached_directly() {
    netlab::require_lab!();
    if !have("curl", &["--version"]) || !have("python3", &["--version"]) {
        return;
    }
    let path = scenario(
        NatType::PortRestricted,
        NatType::PortRestricted,
        "6f1c2d3e-0a4b-4c5d-8e6f-000000000002",
    );
    assert_eq!(
        path, "direct",
        "two port-restricted NATs punch a direct path"
    );
}
