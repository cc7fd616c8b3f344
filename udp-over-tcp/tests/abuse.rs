//! Attacks on the real `udp-over-tcp` binary on loopback, bounded in time and count, each
//! asserting the figure that matters to a bystander: no colour codes in log files, colours on a
//! terminal only without `NO_COLOR`, idle `--psk` handshakes that do not keep the real peer out.
//! Every test prints its figure (`FIGURE ...`).
//!
//! `UOT_ABUSE_BIN=PATH` runs the attacks against another build of the binary instead (an older
//! one, to measure the figure before a fix).

mod common;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{field, strip_ansi, temp_dir, ChildGuard};

/// How long a process may take to log what a test waits for.
const WAIT: Duration = Duration::from_secs(20);

/// The binary under test: this build's, or `UOT_ABUSE_BIN`.
fn bin() -> PathBuf {
    std::env::var_os("UOT_ABUSE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_udp-over-tcp")))
}

/// A child whose stderr goes to a file (not a terminal, as under systemd or `2>log`).
struct Proc {
    _child: ChildGuard,
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
            // The log is a file: no event says it grew.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Both roles, verbose, logging to files: no ANSI codes in either file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_files_get_no_colours() {
    let mut l = Command::new(bin());
    l.args([
        "-v",
        "--tcp-listen",
        "127.0.0.1:0",
        "--udp-bind",
        "127.0.0.1:0",
        "--udp-sendto",
        "127.0.0.1:9",
    ]);
    let listener = Proc::start(l, "abuse-uot-l");
    let running = listener.wait_for("udp-over-tcp running").await;
    let tcp = field(&running, "tcp");
    let mut c = Command::new(bin());
    c.args([
        "-v",
        "--tcp-connect",
        &tcp,
        "--udp-bind",
        "127.0.0.1:0",
        "--udp-sendto",
        "127.0.0.1:9",
    ]);
    let connector = Proc::start(c, "abuse-uot-c");
    connector.wait_for("tunnel connected").await;
    listener.wait_for("tunnel connected").await;
    for (what, p) in [
        ("udp-over-tcp listener", &listener),
        ("udp-over-tcp connector", &connector),
    ] {
        let raw = p.raw();
        eprintln!(
            "FIGURE {what}: ESC bytes in its log file {}",
            raw.matches('\x1b').count()
        );
        assert!(
            !raw.contains('\x1b'),
            "ANSI codes in {what}'s log file:\n{raw}"
        );
    }
}

/// Issue 13, item 7: on a terminal the binary colours its log, unless `NO_COLOR` is set.
#[tokio::test]
async fn colours_only_to_a_terminal_and_never_with_no_color() {
    if !common::have("script", &["--version"]) {
        return;
    }
    let run = |no_color: bool| {
        let line = format!(
            "timeout 2 {} -v --tcp-listen 127.0.0.1:0 --udp-bind 127.0.0.1:0 --udp-sendto 127.0.0.1:9",
            bin().display()
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
    assert!(
        c.contains("udp-over-tcp running") && c.contains('\x1b'),
        "{c:?}"
    );
    assert!(
        p.contains("udp-over-tcp running") && !p.contains('\x1b'),
        "{p:?}"
    );
}

/// Issue 13, item 10: 32 idle connections to a `--psk` listener do not keep the real peer out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_psk_handshakes_do_not_keep_the_peer_out() {
    const IDLE: usize = 32;
    let app = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let app_addr = app.local_addr().expect("addr");
    let mut l = Command::new(bin());
    l.args([
        "-v",
        "--tcp-listen",
        "127.0.0.1:0",
        "--udp-bind",
        "127.0.0.1:0",
    ])
    .args(["--udp-sendto", &app_addr.to_string()])
    .env("UDP_OVER_TCP_PSK", "correct horse");
    let listener = Proc::start(l, "abuse-psk-l");
    let running = listener.wait_for("udp-over-tcp running").await;
    let tcp = field(&running, "tcp");
    // Idle connections: connected, never a byte.
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        idle.push(tokio::net::TcpStream::connect(&tcp).await.expect("connect"));
    }
    let t0 = Instant::now();
    let mut c = Command::new(bin());
    c.args(["-v", "--tcp-connect", &tcp, "--udp-bind", "127.0.0.1:0"])
        .args(["--udp-sendto", "127.0.0.1:9"])
        .env("UDP_OVER_TCP_PSK", "correct horse");
    let connector = Proc::start(c, "abuse-psk-c");
    let running = connector.wait_for("udp-over-tcp running").await;
    let ingress_port: SocketAddr = field(&running, "udp")
        .parse()
        .expect("the connector's UDP address");
    // A datagram into the connector's side comes out at the listener's --udp-sendto.
    let src = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut buf = [0u8; 64];
    let mut through = None;
    while t0.elapsed() < WAIT {
        src.send_to(b"real peer", ingress_port).await.expect("send");
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(100), app.recv_from(&mut buf)).await
        {
            if &buf[..n] == b"real peer" {
                through = Some(t0.elapsed());
                break;
            }
        }
    }
    eprintln!("FIGURE --psk with {IDLE} idle connections: the real peer's first datagram through after {through:?}");
    let through = through.expect("the real peer gets through at all");
    assert!(
        through < Duration::from_secs(2),
        "the real peer waited {through:?}"
    );
    drop(idle);
}
