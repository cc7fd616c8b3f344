//! The `quic-relay` binary as users run it: flags, environment, errors, metrics, signals.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_quic-relay");
const WAIT: Duration = Duration::from_secs(10);

/// A running relay process, killed on drop so a failing test leaves nothing behind.
struct Relay {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Relay {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Relay {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn quic-relay");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Relay {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_log(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(WAIT) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line with {needle:?}; log so far: {:#?}", self.log),
            }
        }
    }

    /// The UDP address from the "relay socket bound" line.
    fn wait_bound(&mut self) -> SocketAddr {
        let line = self.wait_log("relay socket bound");
        let addr = line
            .split("local_addr=")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .expect("local_addr field");
        addr.parse().expect("socket address in log")
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) with a pid we spawned.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(r, 0, "kill failed");
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "relay did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn reg(relay: SocketAddr) -> Vec<u8> {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.send_to(b"REG:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\n", relay)
        .expect("send");
    let mut buf = [0u8; 64];
    let n = s.recv(&mut buf).expect("reply");
    buf[..n].to_vec()
}

#[test]
fn help_explains_every_flag_and_its_environment_variable() {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--port",
        "--bind",
        "--session-timeout-secs",
        "--unpaired-timeout-secs",
        "--max-sessions",
        "--max-sessions-per-ip",
        "--reg-rate-per-ip",
        "--reg-burst-per-ip",
        "--secret-file",
        "--metrics",
        "--socket-buffer-bytes",
        "--no-tcp",
        "--tcp-max-connections",
        "--tcp-max-per-ip",
        "--tcp-handshake-timeout-secs",
        "--tcp-idle-timeout-secs",
        "--tcp-write-queue",
        "--drain",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
        let env = format!(
            "QUIC_RELAY_{}",
            flag.trim_start_matches("--")
                .replace('-', "_")
                .to_uppercase()
        );
        assert!(help.contains(&env), "--help lacks {env}");
    }
    assert!(help.contains("[default: 4433]"));
}

#[test]
fn serves_on_the_port_from_the_environment_and_exits_cleanly_on_sigterm() {
    // Port 0 from the environment: the relay binds a free port itself (a port picked here
    // and released could be taken before the relay binds it). Without the variable it would
    // bind the default 4433.
    let mut relay = Relay::start(&["--bind", "127.0.0.1"], &[("QUIC_RELAY_PORT", "0")]);
    let addr = relay.wait_bound();
    assert_ne!(addr.port(), 4433, "QUIC_RELAY_PORT was ignored");
    relay.wait_log("quic-relay listening");
    assert_eq!(reg(addr), b"ACK\n");
    relay.signal(libc::SIGTERM);
    relay.wait_log("reason=\"SIGTERM\"");
    assert!(relay.wait_exit().success());
}

#[test]
fn sigint_also_stops_it_cleanly() {
    let mut relay = Relay::start(&["--bind", "127.0.0.1", "--port", "0"], &[]);
    relay.wait_log("quic-relay listening");
    relay.signal(libc::SIGINT);
    relay.wait_log("relay stopped");
    assert!(relay.wait_exit().success());
}

#[test]
fn a_taken_port_is_a_clear_error_and_a_non_zero_exit() {
    let holder = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port().to_string();
    let out = Command::new(BIN)
        .args(["--bind", "127.0.0.1", "--port", &port])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot bind UDP 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("choose another --port"), "{err}");
}

#[test]
fn bad_flags_and_secret_files_are_named() {
    let out = Command::new(BIN)
        .args(["--port", "70000"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--port"));

    let dir = std::env::temp_dir().join(format!("quic-relay-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let missing = dir.join("missing");
    let out = Command::new(BIN)
        .args(["--secret-file", missing.to_str().expect("utf-8 path")])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read --secret-file") && err.contains("missing"),
        "{err}"
    );

    let weak = dir.join("weak");
    std::fs::write(&weak, "short\n").expect("write");
    let out = Command::new(BIN)
        .args(["--secret-file", weak.to_str().expect("utf-8 path")])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1 is shorter than 16"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_are_served_as_prometheus_text() {
    let mut relay = Relay::start(
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics",
            "127.0.0.1:0",
        ],
        &[],
    );
    let addr = relay.wait_bound();
    // The relay reports the address it bound for port 0.
    let line = relay.wait_log("metrics at");
    let maddr = line
        .split("metrics at http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("metrics address in the log")
        .to_owned();
    assert!(!maddr.ends_with(":0"), "{line}");
    assert_eq!(reg(addr), b"ACK\n");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut s = TcpStream::connect(&maddr).expect("connect to metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("response");
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains("# TYPE quic_relay_sessions gauge"));
        if body.contains("quic_relay_registrations_total{result=\"new\"} 1") {
            assert!(
                body.contains("quic_relay_sessions{state=\"unpaired\"} 1"),
                "{body}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "registration never showed up: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut s = TcpStream::connect(&maddr).expect("connect");
    s.write_all(b"GET /nope HTTP/1.1\r\n\r\n").expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    assert!(body.starts_with("HTTP/1.1 404"), "{body}");
}

#[test]
fn nothing_is_logged_per_packet_at_info() {
    let mut relay = Relay::start(&["--bind", "127.0.0.1", "--port", "0"], &[]);
    let addr = relay.wait_bound();
    relay.wait_log("quic-relay listening");
    let a = UdpSocket::bind("127.0.0.2:0").expect("bind");
    let b = UdpSocket::bind("127.0.0.3:0").expect("bind");
    b.set_read_timeout(Some(WAIT)).expect("timeout");
    let session = "REG:7d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6\n";
    a.send_to(session.as_bytes(), addr).expect("send");
    b.send_to(session.as_bytes(), addr).expect("send");
    let mut buf = [0u8; 2048];
    b.recv(&mut buf).expect("ACK");
    for i in 0..500u32 {
        a.send_to(&i.to_be_bytes(), addr).expect("send");
        b.recv(&mut buf).expect("forwarded datagram");
    }
    relay.signal(libc::SIGTERM);
    relay.wait_log("relay stopped");
    relay.wait_exit();
    // Startup lines, the shutdown lines, and nothing in between.
    assert!(
        relay.log.len() <= 6,
        "too many info lines: {:#?}",
        relay.log
    );
}

#[test]
fn tcp_is_served_on_the_same_port_unless_turned_off() {
    // Port 0: the relay binds TCP on the port the kernel gave its UDP socket.
    let mut relay = Relay::start(&["--bind", "127.0.0.1", "--port", "0"], &[]);
    let addr = relay.wait_bound();
    relay.wait_log("relay TCP listener bound");
    relay.wait_log("quic-relay listening");
    let mut t = TcpStream::connect(addr).expect("TCP on the relay's port");
    t.set_read_timeout(Some(WAIT)).expect("timeout");
    let request = b"REG:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b\n";
    let mut frame = vec![0, request.len() as u8];
    frame.extend_from_slice(request);
    t.write_all(&frame).expect("write");
    let mut reply = [0u8; 6];
    t.read_exact(&mut reply).expect("framed reply");
    assert_eq!(&reply, b"\x00\x04ACK\n");
    drop(relay);

    let mut relay = Relay::start(
        &["--bind", "127.0.0.1", "--port", "0"],
        &[("QUIC_RELAY_NO_TCP", "true")],
    );
    let addr = relay.wait_bound();
    relay.wait_log("quic-relay listening");
    assert_eq!(reg(addr), b"ACK\n");
    assert!(
        TcpStream::connect(addr).is_err(),
        "QUIC_RELAY_NO_TCP=true still listens on TCP"
    );
}

#[test]
fn a_taken_tcp_port_is_a_clear_error_that_names_no_tcp() {
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port().to_string();
    let out = Command::new(BIN)
        .args(["--bind", "127.0.0.1", "--port", &port])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on TCP 127.0.0.1:{port}")) && err.contains("--no-tcp"),
        "{err}"
    );
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run quic-relay");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends `request` from a fresh socket and returns the reply's first line.
fn ask(relay: SocketAddr, request: &[u8]) -> String {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.send_to(request, relay).expect("send");
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).expect("reply");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn registration(session: &str, token: Option<&str>) -> Vec<u8> {
    use quic_relay::proto::{Extended, Registration};
    Registration {
        session: session.parse().expect("session id"),
        extended: Some(Extended {
            peer: None,
            token: token.map(|t| t.parse().expect("the printed token parses")),
            cookie: None,
            alt_aware: false,
            alt: false,
        }),
    }
    .encode()
}

#[test]
fn session_prints_a_fresh_random_uuid() {
    let (ok, a, err) = run(&["session"]);
    assert!(ok, "{err}");
    let (_, b, _) = run(&["session"]);
    let (a, b) = (a.trim(), b.trim());
    let parsed: uuid::Uuid = a.parse().expect("a UUID");
    assert_eq!(parsed.get_version_num(), 4, "{a}");
    assert_eq!(parsed.hyphenated().to_string(), a, "lowercase hyphenated");
    assert_ne!(a, b, "two calls gave the same session id");
}

#[test]
fn a_minted_token_is_accepted_by_a_relay_with_the_same_secret_file() {
    let dir = std::env::temp_dir().join(format!("quic-relay-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let secrets = dir.join("secrets");
    std::fs::write(
        &secrets,
        "first-secret-0123456789\nsecond-secret-0123456789\n",
    )
    .expect("write");
    let secrets = secrets.to_str().expect("utf-8 path");
    let (_, session, _) = run(&["session"]);
    let session = session.trim();
    let (ok, token, err) = run(&["token", "--secret-file", secrets, "--session", session]);
    assert!(ok, "{err}");
    let token = token.trim();
    // The default TTL is 24 hours.
    let expiry: u64 = token
        .split(':')
        .next()
        .expect("expiry")
        .parse()
        .expect("number");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(expiry.abs_diff(now + 86_400) <= 5, "{token} vs now {now}");

    let mut relay = Relay::start(
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--secret-file",
            secrets,
        ],
        &[],
    );
    let addr = relay.wait_bound();
    relay.wait_log("quic-relay listening");
    assert!(ask(addr, &registration(session, Some(token))).starts_with("ACK"));
    assert_eq!(ask(addr, &registration(session, None)), "ERR auth");
    // A token is bound to its session.
    let (_, other, _) = run(&["session"]);
    assert_eq!(
        ask(addr, &registration(other.trim(), Some(token))),
        "ERR auth"
    );
    // --ttl sets the expiry.
    let (ok, short, err) = run(&[
        "token",
        "--secret-file",
        secrets,
        "--session",
        session,
        "--ttl",
        "90s",
    ]);
    assert!(ok, "{err}");
    let short_expiry: u64 = short
        .split(':')
        .next()
        .expect("expiry")
        .parse()
        .expect("number");
    assert!(short_expiry.abs_diff(now + 90) <= 5, "{short}");

    // Errors name the bad input.
    let (ok, _, err) = run(&["token", "--secret-file", secrets, "--session", "nope"]);
    assert!(!ok && err.contains("--session"), "{err}");
    let (ok, _, err) = run(&[
        "token",
        "--secret-file",
        secrets,
        "--session",
        session,
        "--ttl",
        "3w",
    ]);
    assert!(
        !ok && err.contains("--ttl") && err.contains("unknown unit"),
        "{err}"
    );
    let (ok, _, err) = run(&[
        "token",
        "--secret-file",
        "/nonexistent/secrets",
        "--session",
        session,
    ]);
    assert!(!ok && err.contains("cannot read --secret-file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_server_flags_still_work_without_a_subcommand_and_do_not_mix_with_one() {
    let (ok, _, err) = run(&["--port", "0", "session"]);
    assert!(!ok, "a server flag before a subcommand was accepted");
    assert!(err.contains("session") || err.contains("--port"), "{err}");
    let (ok, help, _) = run(&["--help"]);
    assert!(ok);
    assert!(help.contains("session") && help.contains("token"), "{help}");
}

#[test]
fn version_names_the_binary() {
    let (ok, out, _) = run(&["--version"]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        format!("quic-relay {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn drain_mode_refuses_new_sessions_with_moved_and_keeps_existing_ones() {
    const OLD: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
    let new = |i: u32| format!("0b7e4a3c-5d2f-4e8a-9c1b-2a3d4e5f{i:04x}");
    let mut relay = Relay::start(&["--bind", "127.0.0.1", "--port", "0", "--no-tcp"], &[]);
    let addr = relay.wait_bound();
    relay.wait_log("quic-relay listening");
    // A session from before the drain: one member, from a socket kept for later.
    let member = UdpSocket::bind("127.0.0.1:0").expect("bind");
    member.set_read_timeout(Some(WAIT)).expect("timeout");
    let old_reg = registration(OLD, None);
    member.send_to(&old_reg, addr).expect("send");
    let mut buf = [0u8; 256];
    let n = member.recv(&mut buf).expect("ACK");
    assert!(buf[..n].starts_with(b"ACK "));
    // SIGUSR1: new sessions are sent on; the existing one still takes its second peer.
    relay.signal(libc::SIGUSR1);
    relay.wait_log("draining=true");
    assert_eq!(ask(addr, &registration(&new(1), None)), "ERR moved");
    assert!(
        ask(addr, &registration(OLD, None)).starts_with("ACK "),
        "joins the old session"
    );
    member.send_to(&old_reg, addr).expect("send");
    let n = member.recv(&mut buf).expect("ACK");
    assert!(buf[..n].starts_with(b"ACK "), "the member refreshes");
    // SIGUSR2: back to normal.
    relay.signal(libc::SIGUSR2);
    relay.wait_log("draining=false");
    assert!(ask(addr, &registration(&new(2), None)).starts_with("ACK "));
    drop(relay);
    // --drain: draining from the start.
    let mut relay = Relay::start(
        &["--bind", "127.0.0.1", "--port", "0", "--no-tcp", "--drain"],
        &[],
    );
    let addr = relay.wait_bound();
    relay.wait_log("quic-relay listening");
    assert_eq!(ask(addr, &registration(&new(3), None)), "ERR moved");
}
