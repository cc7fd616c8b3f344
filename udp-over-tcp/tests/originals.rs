//! `udp-over-tcp` against the real programs it replaces, in both roles: datagrams of 0, 1,
//! 1,400, 9,000 and 65,507 bytes both ways, byte for byte, from the preserved source ports.
//!
//! - jonhoo's original (`--framing plain`): `udp-over-tcp` 0.1.10 from crates.io, installed by
//!   `.ci/run` (`cargo install udp-over-tcp --version 0.1.10 --locked --root
//!   target/interop-tools`). Under `CI=true` this test never skips; elsewhere it skips (and says
//!   so) when the binary is missing. `UOT_ORIGINAL_BIN` points at another copy.
//! - The per-flow fork (`--framing flow`, nicktdot/udp-over-tcp 0.2.0) is on no registry CI
//!   reaches (not crates.io, PyPI or Debian; CI cannot fetch GitHub), so CI runs
//!   `framing::tests::flow_vectors_from_the_fork` instead: frames captured from the fork's binary.
//!   With a binary built from its source at `target/interop-tools/bin/udp-over-tcp-flow-fork` (or
//!   `UOT_FLOW_FORK_BIN`), `cargo test -p udp-over-tcp --features interop-flow-fork --test
//!   originals` runs it too.
//! - Mullvad's `udp2tcp`/`tcp2udp` (`--framing mullvad`) is `publish = false` and on no
//!   registry either; `framing::tests::mullvad_vectors_from_udp2tcp` replays frames captured
//!   from its binary, and `tunnel.rs` plays its `u16 BE length` format byte for byte.
//!
//! Port preservation needs two hosts; loopback gives two addresses: application A and the
//! connecting tunnel on 127.0.0.1, application B and the listening tunnel on 127.0.0.2. Each
//! tunnel binds the *other* application's port on its own address, as the original's README
//! sets it up, so A sends to 127.0.0.1:PB and B sees the datagram come from 127.0.0.2:PA.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::timeout;
use udp_over_tcp::framing::Framing;
use udp_over_tcp::tunnel::{Metrics, TcpRole, Tunnel, TunnelConfig, UdpBind, UdpSendTo};

const T: Duration = Duration::from_secs(10);

/// The sizes the issue asks for: empty, one byte, a typical QUIC packet, a jumbo frame and the
/// largest IPv4 UDP payload.
const SIZES: [usize; 5] = [0, 1, 1_400, 9_000, 65_507];

const HOST_X: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const HOST_Y: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A peer program and the log lines that say it holds the TCP connection (it drops datagrams
/// until then, so the test awaits them).
struct Program {
    name: &'static str,
    bin: PathBuf,
    framing: Framing,
    connected_log: &'static str,
    accepted_log: &'static str,
}

fn workspace_bin(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/interop-tools/bin")
            .join(name)
    })
}

fn original() -> Option<Program> {
    let bin = workspace_bin("UOT_ORIGINAL_BIN", "udp-over-tcp");
    if !bin.exists() {
        // #[ignore]d with this as the reason: under CI or --ignored it must run, not pass unrun.
        let asked = std::env::args().any(|a| a == "--ignored" || a == "--include-ignored");
        assert!(
            std::env::var("CI").as_deref() != Ok("true") && !asked,
            "the original udp-over-tcp is not at {} (CI=true or --ignored: failing instead of \
             skipping); .ci/run installs it with \
             `cargo install udp-over-tcp --version 0.1.10 --locked --root target/interop-tools`",
            bin.display()
        );
        eprintln!(
            "SKIPPED: the original udp-over-tcp is not at {} (install it with `cargo install \
             udp-over-tcp --version 0.1.10 --locked --root target/interop-tools`)",
            bin.display()
        );
        return None;
    }
    Some(Program {
        name: "udp-over-tcp 0.1.10",
        bin,
        framing: Framing::Plain,
        connected_log: "established tcp connection",
        accepted_log: "accepted incoming tcp connection",
    })
}

#[cfg(feature = "interop-flow-fork")]
fn flow_fork() -> Option<Program> {
    let bin = workspace_bin("UOT_FLOW_FORK_BIN", "udp-over-tcp-flow-fork");
    if !bin.exists() {
        // Asked for with the `interop-flow-fork` feature: the binary must be there.
        panic!(
            "no per-flow fork binary at {} (build nicktdot/udp-over-tcp and copy it there, or \
             set UOT_FLOW_FORK_BIN)",
            bin.display()
        );
    }
    Some(Program {
        name: "per-flow fork 0.2.0",
        bin,
        framing: Framing::Flow,
        connected_log: "TCP connection established",
        accepted_log: "accepted incoming tcp connection",
    })
}

/// The peer program, killed when dropped; its log lines arrive on `log`.
struct Running {
    child: Child,
    log: mpsc::UnboundedReceiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn spawn(p: &Program, args: &[String]) -> Running {
        let mut child = Command::new(&p.bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", p.bin.display()));
        let stderr = child.stderr.take().expect("piped");
        let (tx, log) = mpsc::unbounded_channel();
        let name = p.name;
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, log }
    }

    async fn wait_log(&mut self, what: &str) {
        timeout(T, async {
            while let Some(line) = self.log.recv().await {
                if line.contains(what) {
                    return;
                }
            }
            panic!("the program exited before logging {what:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no {what:?} in its log within 10 s"));
    }

    /// The TCP port it listens on. It is told port 0 (so the kernel picks a free one) and does
    /// not print the port, so it is read from /proc: the LISTEN socket among its descriptors.
    /// There is no event to await for that, so this polls, bounded.
    async fn tcp_listen_port(&self) -> u16 {
        let pid = self.child.id();
        timeout(T, async {
            loop {
                if let Some(p) = listen_port_of(pid) {
                    return p;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the program listens within 10 s")
    }
}

fn listen_port_of(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).ok()?;
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // st 0A = LISTEN; column 9 is the inode.
        if cols.get(3) == Some(&"0A") && inodes.iter().any(|i| Some(&i.as_str()) == cols.get(9)) {
            let port = cols.get(1)?.rsplit(':').next()?;
            u16::from_str_radix(port, 16).ok()
        } else {
            None
        }
    })
}

struct Ours {
    metrics: std::sync::Arc<Metrics>,
    tcp: Option<SocketAddr>,
    _task: tokio::task::JoinSet<()>,
}

async fn ours(role: TcpRole, bind: SocketAddr, sendto: SocketAddr, framing: Framing) -> Ours {
    let mut cfg = TunnelConfig::new(role, UdpBind::Addr(bind), UdpSendTo::Addr(sendto));
    cfg.framing = framing;
    let t = Tunnel::bind(cfg).await.expect("our tunnel binds");
    Ours {
        metrics: t.metrics(),
        tcp: t.tcp_local_addr(),
        _task: {
            // Dropping the set stops the tunnel.
            let mut set = tokio::task::JoinSet::new();
            set.spawn(t.run(std::future::pending()));
            set
        },
    }
}

async fn until_connected(m: &Metrics) {
    timeout(T, async {
        while m.connections.load(Ordering::Relaxed) == 0 {
            // A counter, not an event: poll it, bounded.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("our tunnel holds a connection within 10 s");
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn arg(a: SocketAddr) -> String {
    a.to_string()
}

async fn recv(s: &UdpSocket, what: &str) -> (Vec<u8>, SocketAddr) {
    let mut b = vec![0u8; 70_000];
    let (n, from) = timeout(T, s.recv_from(&mut b))
        .await
        .unwrap_or_else(|_| panic!("{what}: no datagram within 10 s"))
        .expect("recv");
    b.truncate(n);
    (b, from)
}

fn pattern(size: usize, salt: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

/// Every size both ways between application A (behind the connecting side) and B (behind the
/// listening side), checking bytes and the preserved source ports.
async fn exchange(a: &UdpSocket, b: &UdpSocket, label: &str) {
    let pa = a.local_addr().expect("addr").port();
    let pb = b.local_addr().expect("addr").port();
    for size in SIZES {
        let out = pattern(size, 1);
        a.send_to(&out, sa(HOST_X, pb)).await.expect("send");
        let (got, from) = recv(b, &format!("{label}: {size} B A->B")).await;
        assert!(
            got == out,
            "{label}: {size} B A->B arrived altered ({} B)",
            got.len()
        );
        assert_eq!(from, sa(HOST_Y, pa), "{label}: A's port preserved");
        let back = pattern(size, 2);
        b.send_to(&back, sa(HOST_Y, pa)).await.expect("send");
        let (got, from) = recv(a, &format!("{label}: {size} B B->A")).await;
        assert!(
            got == back,
            "{label}: {size} B B->A arrived altered ({} B)",
            got.len()
        );
        assert_eq!(from, sa(HOST_X, pb), "{label}: B's port preserved");
    }
}

async fn apps() -> (UdpSocket, UdpSocket) {
    let a = UdpSocket::bind(sa(HOST_X, 0)).await.expect("bind A");
    let b = UdpSocket::bind(sa(HOST_Y, 0)).await.expect("bind B");
    (a, b)
}

/// The program listens (host Y), ours connects (host X).
async fn program_listens(p: &Program) {
    let (a, b) = apps().await;
    let (pa, pb) = (
        a.local_addr().expect("a").port(),
        b.local_addr().expect("b").port(),
    );
    let mut prog = Running::spawn(
        p,
        &[
            "--tcp-listen".into(),
            arg(sa(HOST_Y, 0)),
            "--udp-bind".into(),
            arg(sa(HOST_Y, pa)),
            "--udp-sendto".into(),
            arg(sa(HOST_Y, pb)),
        ],
    );
    let port = prog.tcp_listen_port().await;
    let ours = ours(
        TcpRole::Connect(arg(sa(HOST_Y, port))),
        sa(HOST_X, pb),
        sa(HOST_X, pa),
        p.framing,
    )
    .await;
    prog.wait_log(p.accepted_log).await;
    until_connected(&ours.metrics).await;
    exchange(&a, &b, &format!("{} listening, ours connecting", p.name)).await;
    assert_eq!(ours.metrics.framing_errors.load(Ordering::Relaxed), 0);
}

/// Ours listens (host Y), the program connects (host X).
async fn program_connects(p: &Program) {
    let (a, b) = apps().await;
    let (pa, pb) = (
        a.local_addr().expect("a").port(),
        b.local_addr().expect("b").port(),
    );
    let ours = ours(
        TcpRole::Listen(sa(HOST_Y, 0)),
        sa(HOST_Y, pa),
        sa(HOST_Y, pb),
        p.framing,
    )
    .await;
    let mut prog = Running::spawn(
        p,
        &[
            "--tcp-connect".into(),
            arg(ours.tcp.expect("listening")),
            "--udp-bind".into(),
            arg(sa(HOST_X, pb)),
            "--udp-sendto".into(),
            arg(sa(HOST_X, pa)),
        ],
    );
    prog.wait_log(p.connected_log).await;
    until_connected(&ours.metrics).await;
    exchange(&a, &b, &format!("ours listening, {} connecting", p.name)).await;
    assert_eq!(ours.metrics.framing_errors.load(Ordering::Relaxed), 0);
}

#[ignore = "needs the original udp-over-tcp 0.1.10 (cargo install udp-over-tcp --version 0.1.10 --locked --root target/interop-tools); run with `cargo test -- --include-ignored` (CI does)"]
#[tokio::test]
async fn original_listens_ours_connects() {
    if let Some(p) = original() {
        program_listens(&p).await;
    }
}

#[ignore = "needs the original udp-over-tcp 0.1.10 (cargo install udp-over-tcp --version 0.1.10 --locked --root target/interop-tools); run with `cargo test -- --include-ignored` (CI does)"]
#[tokio::test]
async fn ours_listens_original_connects() {
    if let Some(p) = original() {
        program_connects(&p).await;
    }
}

#[cfg(feature = "interop-flow-fork")]
#[tokio::test]
async fn flow_fork_listens_ours_connects() {
    if let Some(p) = flow_fork() {
        program_listens(&p).await;
    }
}

#[cfg(feature = "interop-flow-fork")]
#[tokio::test]
async fn ours_listens_flow_fork_connects() {
    if let Some(p) = flow_fork() {
        program_connects(&p).await;
    }
}
