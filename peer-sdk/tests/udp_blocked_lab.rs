//! The `peer` example across a real kernel NAT whose network drops all UDP (netlab's
//! `udp-blocked`): the blocked peer's UDP registrations get no answer, it falls back to TCP to the
//! relay by itself, and the two example processes exchange a stream and datagrams both ways
//! through the relay, the blocked side over TCP.
//!
//! Runs the example binary inside the lab's namespaces. `cargo test -p peer-sdk` (and
//! `--workspace`) builds it like every example; `cargo test --test udp_blocked_lab` alone does
//! *not* rebuild it, so after changing the SDK run `cargo build -p peer-sdk --example peer` first
//! or the test exercises a stale binary. Needs root and nftables: skipped with a message elsewhere, never under `CI=true`.
//! The lab kills both processes and removes its namespaces when dropped, also on a failure.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use netlab::{Lab, LabConfig, NatType, Side};
use quic_relay::server::{Server, ServerHandle};
use quic_relay::sessions::RelayConfig;
use quic_relay::tcp::TcpConfig;

const RELAY_PORT: u16 = 4433;
/// Registering (2.5 s of unanswered UDP, then TCP), connecting and 4 MiB through the relay.
const WAIT: Duration = Duration::from_secs(60);

/// The example binary next to this test's own (target/<profile>/examples/peer).
fn example() -> PathBuf {
    let me = std::env::current_exe().expect("test executable");
    let dir = me
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let exe = dir.join("examples").join("peer");
    assert!(
        exe.exists(),
        "{} is missing: `cargo test -p peer-sdk` builds it (or `cargo build -p peer-sdk --example peer`)",
        exe.display()
    );
    exe
}

fn start_relay(lab: &Lab) -> ServerHandle {
    let addr = SocketAddr::from((lab.relay_ip(), RELAY_PORT));
    lab.run_in(&lab.relay_ns(), move || {
        Server::bind(addr, RelayConfig::default(), 4 << 20)
            .expect("bind relay")
            .with_tcp(TcpConfig::default())
            .expect("relay TCP listener")
            .spawn()
            .expect("spawn relay")
    })
    .expect("relay namespace")
}

/// Reads JSON lines from a child's stdout on a thread, so the test can wait with a deadline.
fn lines(stdout: std::process::ChildStdout) -> mpsc::Receiver<serde_json::Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            match serde_json::from_str(&line) {
                Ok(v) => {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("peer example printed a non-JSON line {line:?}: {e}"),
            }
        }
    });
    rx
}

fn peer_cmd(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new(example());
    c.args(args)
        .arg("--relay")
        .arg(SocketAddr::from((lab.relay_ip(), RELAY_PORT)).to_string())
        .env("RUST_LOG", "peer_sdk=info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

fn udp_blocked_test(blocked: Side) {
    netlab::require_lab!();
    let (a, b) = match blocked {
        Side::A => (NatType::UdpBlocked, NatType::PortRestricted),
        Side::B => (NatType::PortRestricted, NatType::UdpBlocked),
    };
    let lab = Lab::new(LabConfig::new(a, b)).expect("lab");
    // The premise: from the blocked side no UDP gets out; TCP does.
    assert_eq!(
        lab.probe_udp(blocked).expect("UDP probe"),
        None,
        "UDP must be blocked on side {blocked:?}"
    );
    let relay = start_relay(&lab);
    let session = format!(
        "5eed0000-0000-4000-8000-00000000000{}",
        if blocked == Side::A { 1 } else { 2 }
    );

    // The listener on side A, the dialer on side B.
    let mut listen = peer_cmd(&lab, &["listen", "--session", &session]);
    listen.arg("--direct-timeout-ms").arg("500");
    let mut listener = lab.spawn(&lab.peer_ns(Side::A), listen).expect("listener");
    let listener_out = lines(listener.stdout.take().expect("stdout"));
    let hello = listener_out
        .recv_timeout(WAIT)
        .expect("listener's fingerprint");
    let pin = hello["fingerprint"]
        .as_str()
        .expect("fingerprint line")
        .to_string();

    let mut connect = peer_cmd(
        &lab,
        &[
            "connect",
            "--session",
            &session,
            "--pin",
            &pin,
            "--bytes",
            "4194304",
            "--datagrams",
            "200",
            "--direct-timeout-ms",
            "500",
        ],
    );
    connect.stdout(Stdio::piped());
    let mut dialer = lab.spawn(&lab.peer_ns(Side::B), connect).expect("dialer");
    let dialer_out = lines(dialer.stdout.take().expect("stdout"));
    let report = dialer_out
        .recv_timeout(WAIT)
        .expect("the dialer's report (it failed or hung: see its log above)");
    let status = dialer.wait().expect("dialer exit");
    assert!(status.success(), "dialer failed: {status}");
    let accepted = listener_out
        .recv_timeout(WAIT)
        .expect("the listener's accepted path");
    eprintln!("udp blocked on {blocked:?}: dialer {report}, listener {accepted}");

    // Both ways: the stream echo (4 MiB out and back, checked byte for byte by the dialer) and
    // 200 datagram echoes.
    assert_eq!(report["bytes"], 4_194_304);
    assert_eq!(report["datagrams"], 200);
    let (blocked_path, open_path) = match blocked {
        Side::A => (&accepted["accepted_path"], &report["path"]),
        Side::B => (&report["path"], &accepted["accepted_path"]),
    };
    assert_eq!(blocked_path, "relay-tcp", "the UDP-blocked peer uses TCP");
    assert_eq!(
        open_path, "relay",
        "the other peer reaches the relay over UDP"
    );
    let m = relay.metrics();
    assert!(
        m.tcp.frames_in.load(std::sync::atomic::Ordering::Relaxed) > 1000,
        "the relay carried the transfer over TCP"
    );
    assert!(m.tcp.frames_out.load(std::sync::atomic::Ordering::Relaxed) > 1000);
    let _ = listener.kill();
    let _ = listener.wait();
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn peer_example_with_the_dialer_behind_a_udp_blocking_network() {
    udp_blocked_test(Side::B);
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn peer_example_with_the_listener_behind_a_udp_blocking_network() {
    udp_blocked_test(Side::A);
}
