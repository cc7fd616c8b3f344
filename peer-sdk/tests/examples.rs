//! The example the README is built from, run as a user runs it: `echo listen` and `echo dial`
//! meet through a real relay on loopback; a dialer against a relay that is not there ends with
//! the SDK's error after the timeout its --help states, saying what it waited for meanwhile.
//!
//! `cargo test -p peer-sdk` builds the examples; `cargo test --test examples` alone does not
//! rebuild them (run `cargo build -p peer-sdk --examples` first after changing them).

use std::io::{BufRead as _, BufReader};
use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peer_sdk::{ClientTls, Error, Options, Uuid};
use quic_relay::server::Server;
use quic_relay::sessions::RelayConfig;

/// The register timeout the example's --help states (`Options::register_timeout`).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// An example binary next to this test's own (target/<profile>/examples/NAME).
fn example(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("test executable");
    let dir = me
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let exe = dir.join("examples").join(name);
    assert!(
        exe.exists(),
        "{} is missing: `cargo test -p peer-sdk` builds it (or `cargo build -p peer-sdk --examples`)",
        exe.display()
    );
    exe
}

/// Kills the child when dropped, so a failing test leaves no process behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_echo_example_listens_and_dials_through_a_relay() {
    let relay = Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        RelayConfig::default(),
        1 << 20,
    )
    .expect("bind relay")
    .spawn()
    .expect("spawn relay");
    let relay_addr = relay.local_addr().to_string();
    let session = random_session();
    let mut listener = Killed(
        Command::new(example("echo"))
            .args(["listen", "--relay", &relay_addr, "--session", &session])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the listener"),
    );
    let mut pin = String::new();
    BufReader::new(listener.0.stdout.take().expect("stdout piped"))
        .read_line(&mut pin)
        .expect("the listener prints its pin");
    let out = Command::new(example("echo"))
        .args([
            "dial",
            "--relay",
            &relay_addr,
            "--session",
            &session,
            "--pin",
            pin.trim(),
        ])
        .output()
        .expect("run the dialer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dialer failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("hello, peer (over the "), "{stdout}");
    // Progress at the default level, on stderr.
    for step in [
        "registered with the relay",
        "path chosen",
        "connected to the peer",
    ] {
        assert!(
            stderr.contains(step),
            "no {step:?} in the dialer's stderr: {stderr}"
        );
    }
    // The listener ends by itself once the dialer closed the connection.
    let deadline = Instant::now() + Duration::from_secs(20);
    while listener.0.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "the listener did not exit after the dialer closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dialer_against_an_absent_relay_fails_after_the_stated_timeout_and_says_so() {
    let help = Command::new(example("echo"))
        .args(["dial", "--help"])
        .output()
        .expect("--help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("within 10 s"),
        "--help does not state the timeout: {help}"
    );

    // Nobody answers on this port: the UDP socket is held but never read, and the TCP socket
    // is bound but not listening, so the TCP fallback is refused too.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
    let addr = silent.local_addr().expect("addr");
    let tcp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("TCP socket");
    tcp.bind(&addr.into()).expect("bind TCP on the same port");
    let session = random_session();
    let pin = "00".repeat(32);
    let started = Instant::now();
    let out = Command::new(example("echo"))
        .args([
            "dial",
            "--relay",
            &addr.to_string(),
            "--session",
            &session,
            "--pin",
            &pin,
        ])
        .output()
        .expect("run the dialer");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the dialer succeeded without a relay: {stderr}"
    );
    assert!(
        stderr.contains(&format!("no reply from relay {addr} within 10s")),
        "not the SDK's error: {stderr}"
    );
    assert!(stderr.contains("registering with the relay"), "{stderr}");
    assert!(stderr.contains("reaching the relay over TCP"), "{stderr}");
    assert!(took >= REGISTER_TIMEOUT, "gave up early, after {took:?}");
    // The stated 10 s plus slack for a loaded machine.
    assert!(
        took < REGISTER_TIMEOUT + Duration::from_secs(10),
        "took {took:?}"
    );
    drop(silent);
}

#[tokio::test]
async fn a_peer_that_never_joins_ends_with_peer_timeout() {
    let relay = Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        RelayConfig::default(),
        1 << 20,
    )
    .expect("bind relay")
    .spawn()
    .expect("spawn relay");
    let mut opts = Options::new(
        relay.local_addr(),
        Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0001),
    );
    opts.peer_timeout = Duration::from_millis(500);
    let pin = "00".repeat(32).parse().expect("pin");
    let started = Instant::now();
    match peer_sdk::connect(opts, ClientTls::Pinned(pin)).await {
        Err(Error::PeerTimeout { waited, .. }) => assert_eq!(waited, Duration::from_millis(500)),
        other => panic!("expected PeerTimeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A random session id, so parallel runs never share a session.
fn random_session() -> String {
    Uuid::from_u128(rand::random()).to_string()
}
