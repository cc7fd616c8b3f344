//! peer_portal (the Python package) across real kernel NATs: two Python processes, each in its
//! own network namespace behind a NAT (netlab), meet through a relay on the lab's "internet".
//! With both peers behind symmetric NATs they go through the relay (birthday punching needs
//! one endpoint-independent side); a full-cone server with a port-restricted client goes direct.
//!
//! Needs root, nftables and the package installed in a Python (`PEER_PORTAL_PYTHON`, default
//! the workspace's `target/pyvenv/bin/python`, which `.ci/run` builds): skipped with a message
//! elsewhere, a failure under `CI=true` or `--ignored`.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod support;

use netlab::{Lab, LabConfig, NatType, Side};
use quic_relay::server::Server;
use quic_relay::sessions::RelayConfig;
use support::python;

/// Bound for each step (registration, a 16 MiB echo through the relay on a busy machine).
const WAIT: Duration = Duration::from_secs(120);
const RELAY_PORT: u16 = 4433;

/// Reads `child`'s stdout lines into a channel.
fn lines(out: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn path_of(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    v["path"].as_str().expect("a path").to_owned()
}

fn python_pair(listener_nat: NatType, dialer_nat: NatType, want: &str) {
    netlab::require_lab!();
    let py = match python() {
        Ok(p) => p,
        Err(why) if netlab::in_ci() || netlab::ignored_tests_requested() => {
            panic!("the Python NAT-lab test must run here: {why}")
        }
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/lab_peer.py");
    let lab = Lab::new(LabConfig::new(listener_nat, dialer_nat)).expect("lab");
    let relay_addr = SocketAddr::from((lab.relay_ip(), RELAY_PORT));
    let _relay = lab
        .run_in(&lab.relay_ns(), move || {
            Server::bind(relay_addr, RelayConfig::default(), 4 << 20)
                .expect("bind relay")
                .spawn()
                .expect("spawn relay")
        })
        .expect("relay namespace");

    let mut server_cmd = Command::new(&py);
    server_cmd
        .arg(&script)
        .args(["server", &relay_addr.to_string()])
        .stdout(Stdio::piped());
    let mut server = lab
        .spawn(&lab.peer_ns(Side::A), server_cmd)
        .expect("spawn the Python server");
    let server_out = lines(server.stdout.take().expect("piped"));
    let info = server_out
        .recv_timeout(WAIT)
        .expect("the server published its rendezvous in time");

    let mut client_cmd = Command::new(&py);
    client_cmd
        .arg(&script)
        .args(["client", &info])
        .stdout(Stdio::piped());
    let mut client = lab
        .spawn(&lab.peer_ns(Side::B), client_cmd)
        .expect("spawn the Python client");
    let client_out = lines(client.stdout.take().expect("piped"));
    let client_path = client_out
        .recv_timeout(WAIT)
        .expect("the client finished its echoes in time");
    let server_path = server_out
        .recv_timeout(WAIT)
        .expect("the server reported its path");
    assert!(
        client.wait().expect("client exit").success(),
        "client failed"
    );
    assert!(
        server.wait().expect("server exit").success(),
        "server failed"
    );
    eprintln!("{listener_nat:?} (Python server) x {dialer_nat:?} (Python client): {client_path}");
    assert_eq!(path_of(&client_path), want, "client path");
    assert_eq!(path_of(&server_path), want, "server path");
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack and peer_portal built into target/pyvenv (see .ci/run); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn symmetric_nat_goes_through_the_relay() {
    // Symmetric on both sides: birthday punching needs one endpoint-independent mapping.
    python_pair(NatType::Symmetric, NatType::Symmetric, "relay");
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack and peer_portal built into target/pyvenv (see .ci/run); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn full_cone_nat_goes_direct() {
    python_pair(NatType::FullCone, NatType::PortRestricted, "direct");
}
