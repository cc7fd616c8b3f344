//! `cargo xtask deploy` against a real OpenSSH server on loopback, with throwaway keys: it
//! installs and starts the relay (without systemd: `--no-systemd` below `--remote-root`), the
//! health check passes, a broken binary is rolled back by itself, `--rollback` swaps back and
//! `--dry-run` changes nothing. Needs root and `openssh-server`; skips without them, except
//! under CI=true.

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SSHD: &str = "/usr/sbin/sshd";

/// Whether the test can run here; under CI a missing prerequisite is a failure, not a skip.
fn prerequisites() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = Path::new(SSHD).is_file() && which("ssh") && which("scp") && which("ssh-keygen");
    if root && tools {
        return true;
    }
    let why = if root {
        "needs sshd, ssh, scp and ssh-keygen (apt-get install openssh-server openssh-client)"
    } else {
        "needs root (sshd only runs as root)"
    };
    // The tests are #[ignore]d with these prerequisites as the reason: under CI or when asked
    // for with --ignored they must run, not pass without running.
    let asked = std::env::args().any(|a| a == "--ignored" || a == "--include-ignored");
    assert!(
        std::env::var("CI").as_deref() != Ok("true") && !asked,
        "deploy test cannot run (CI=true or --ignored): {why}"
    );
    eprintln!("skipping the deploy test: {why}");
    false
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A throwaway sshd on loopback, the temp directory it lives in, and whatever the deploys
/// started below the remote root; all removed on drop, on every exit path.
///
/// The test holds the listening socket (bound to port 0) and runs `sshd -i` (inetd mode) for
/// each connection it accepts, so no port is picked, released and raced for.
struct Fixture {
    dir: PathBuf,
    port: u16,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Fixture {
    fn start() -> Fixture {
        // One directory per fixture: the tests of this file run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("xtask-deploy-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temp dir");
        for key in ["hostkey", "client"] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key)));
        }
        std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).expect("copy key");
        // sshd refuses to start without its privilege separation directory, which the
        // package's tmpfiles.d normally creates at boot.
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the ssh listener");
        let port = listener.local_addr().expect("listener address").port();
        let d = dir.display();
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "HostKey {d}/hostkey\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n\
                 StrictModes no\nUsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
            ),
        )
        .expect("write sshd_config");
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = Arc::clone(&stop);
            let config = dir.join("sshd_config");
            std::thread::spawn(move || serve_ssh(&listener, &config, &stop))
        };
        Fixture {
            dir,
            port,
            stop,
            acceptor: Some(acceptor),
        }
    }

    fn remote_root(&self) -> PathBuf {
        self.dir.join("remote")
    }

    fn bin(&self) -> PathBuf {
        self.remote_root().join("opt/quic-relay/bin/quic-relay")
    }

    /// `cargo xtask deploy` with the connection flags; the host-key options come through the
    /// environment variable, so that path is exercised too.
    fn deploy(&self, extra: &[&str]) -> Output {
        let root = self.remote_root();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.args(["deploy", "--host", "root@127.0.0.1", "--ssh-port"])
            .arg(self.port.to_string())
            .arg("--identity")
            .arg(self.dir.join("client"))
            .args(["--ssh-option", "LogLevel=ERROR", "--remote-root"])
            .arg(&root)
            .arg("--no-systemd")
            .args(extra)
            .env(
                "XTASK_DEPLOY_SSH_OPTIONS",
                "StrictHostKeyChecking=no UserKnownHostsFile=/dev/null",
            );
        let out = cmd.output().expect("run xtask deploy");
        eprintln!(
            "--- xtask deploy {extra:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The relay was started with setsid nohup through sshd, so it is no child of ours:
        // stop it through the pid file the deploy wrote.
        for name in ["quic-relay", "mqproxy"] {
            let pidfile = self
                .remote_root()
                .join(format!("opt/{name}/run/{name}.pid"));
            if let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a pid this test's deploys started and recorded.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Wake the acceptor with a connection of our own; it sees the flag and returns, after
        // waiting for the sshd it ran (each ends with its connection).
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Accepts ssh connections until `stop` is set, each served by its own `sshd -i`; kills and
/// reaps the ones still running when it stops.
fn serve_ssh(listener: &TcpListener, config: &Path, stop: &AtomicBool) {
    let mut children: Vec<Child> = Vec::new();
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let Ok(out) = conn.try_clone() else { continue };
        // Reap the sessions that ended, so the list stays as long as the live ones.
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        match Command::new(SSHD)
            .args(["-i", "-e", "-f"])
            .arg(config)
            .stdin(Stdio::from(OwnedFd::from(conn)))
            .stdout(Stdio::from(OwnedFd::from(out)))
            .spawn()
        {
            Ok(c) => children.push(c),
            Err(e) => eprintln!("cannot run {SSHD} -i: {e}"),
        }
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn run(cmd: &mut Command) {
    let status = cmd.status().expect("spawn");
    assert!(status.success(), "{cmd:?}: {status}");
}

/// The relay health check of PROTOCOL.md §3.1: REG:<uuid> gets exactly ACK.
fn relay_acks(port: u16) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    (0..4).any(|_| {
        sock.send_to(
            b"REG:6f1c1f7e-8a52-4b2e-9a55-0d5c2a0e7b11\n",
            ("127.0.0.1", port),
        )
        .is_ok()
            && matches!(sock.recv(&mut buf), Ok(4) if &buf[..4] == b"ACK\n")
    })
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[ignore = "needs root and a real sshd (apt-get install openssh-server openssh-client); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn deploy_health_check_rollback_and_dry_run() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::start();
    let args = "--bind 127.0.0.1 --port 0";

    // --dry-run prints every step and touches nothing (not even the remote root).
    let out = f.deploy(&["--dry-run", "--args", args]);
    expect_success(&out, "the dry run");
    let text = String::from_utf8_lossy(&out.stdout);
    for step in [
        "cargo build --release --locked -p quic-relay",
        "scp ",
        "ssh ",
        "quic-relay.prev",
        "health check",
    ] {
        assert!(text.contains(step), "dry run does not mention {step:?}");
    }
    assert!(
        !f.remote_root().exists(),
        "--dry-run created the remote root"
    );

    // A real deploy: builds the release binary, installs unit and env file, starts, is healthy.
    let out = f.deploy(&["--args", args, "--health-timeout", "10"]);
    expect_success(&out, "first deploy failed");
    let built = target_dir().join("release/quic-relay");
    let v1 = read(&built);
    assert_eq!(read(&f.bin()), v1, "the installed binary is the built one");
    let env = String::from_utf8_lossy(&read(
        &f.remote_root().join("etc/quic-relay/quic-relay.env"),
    ))
    .into_owned();
    assert!(
        env.contains(&format!("QUIC_RELAY_ARGS=\"{args}\"")),
        "{env}"
    );
    let unit = String::from_utf8_lossy(&read(
        &f.remote_root()
            .join("etc/systemd/system/quic-relay.service"),
    ))
    .into_owned();
    assert!(
        unit.contains(&format!("ExecStart={} $QUIC_RELAY_ARGS", f.bin().display())),
        "unit paths follow --remote-root:\n{unit}"
    );
    assert!(
        relay_acks(bound_port(&out)),
        "the deployed relay does not answer REG"
    );

    // A broken binary: the health check fails, the previous binary comes back by itself.
    let broken = f.dir.join("broken");
    std::fs::write(&broken, "#!/bin/sh\necho deliberately broken >&2\nexit 1\n").expect("write");
    let out = f.deploy(&[
        "--binary",
        broken.to_str().expect("utf-8"),
        "--health-timeout",
        "2",
    ]);
    assert!(!out.status.success(), "a broken deploy must exit non-zero");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rolled back to the previous binary"), "{err}");
    assert!(
        err.contains("deliberately broken"),
        "the failed binary's log is shown: {err}"
    );
    assert_eq!(read(&f.bin()), v1, "rollback restored the previous binary");
    assert_eq!(read(&f.bin().with_extension("failed")), read(&broken));
    assert!(
        relay_acks(bound_port(&out)),
        "healthy again after the rollback"
    );

    // A second good version (the same ELF with trailing bytes), then --rollback swaps back.
    let v2_path = f.dir.join("quic-relay-v2");
    let mut v2 = v1.clone();
    v2.extend_from_slice(b"\nversion 2\n");
    std::fs::write(&v2_path, &v2).expect("write v2");
    let out = f.deploy(&["--binary", v2_path.to_str().expect("utf-8")]);
    expect_success(&out, "deploy of v2 failed");
    assert_eq!(read(&f.bin()), v2);
    assert_eq!(
        read(&f.bin().with_extension("prev")),
        v1,
        "previous kept as .prev"
    );

    let out = f.deploy(&["--rollback"]);
    expect_success(&out, "--rollback failed");
    assert_eq!(read(&f.bin()), v1, "--rollback restored v1");
    assert_eq!(
        read(&f.bin().with_extension("prev")),
        v2,
        "and kept v2 to go forward"
    );
    assert!(relay_acks(bound_port(&out)), "healthy after --rollback");
}

/// Panics with `what` and the end of the deploy's stderr unless it succeeded: CI keeps only part
/// of a long test log, and the cause (a failed build, a refused connection) sits at the end.
fn expect_success(out: &Output, what: &str) {
    if out.status.success() {
        return;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    panic!("{what} ({}); the end of its stderr:\n{tail}", out.status);
}

/// The UDP port the deployed service bound, as deploy reported it for `--port 0` (the last
/// report: after a rollback, the restored binary's).
fn bound_port(out: &Output) -> u16 {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| l.split_once("the service bound UDP port ").map(|(_, p)| p))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("deploy did not report the bound port:\n{text}"))
}

/// What the relay answers a token-less `REG`: `ERR auth` when it requires tokens.
fn relay_reply(port: u16) -> String {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    for _ in 0..4 {
        let _ = sock.send_to(
            b"REG:6f1c1f7e-8a52-4b2e-9a55-0d5c2a0e7b11\n",
            ("127.0.0.1", port),
        );
        if let Ok(n) = sock.recv(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).trim().to_owned();
        }
    }
    "no reply".into()
}

#[ignore = "needs root and a real sshd (apt-get install openssh-server openssh-client); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn a_relay_that_requires_tokens_passes_the_health_check_with_a_minted_token() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::start();
    // The secret file on the "host" (the same machine here), passed in the service's flags.
    let secret = f.dir.join("secrets");
    std::fs::write(
        &secret,
        "\n  deploy-test-secret-0123456789  \nsecond-secret-0123456789\n",
    )
    .expect("write the secret file");
    let args = format!(
        "--bind 127.0.0.1 --port 0 --secret-file {}",
        secret.display()
    );
    let out = f.deploy(&["--args", &args, "--health-timeout", "10"]);
    expect_success(&out, "deploy of a token-protected relay failed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("the relay requires tokens"), "{text}");
    assert!(text.contains("answered ACK"), "{text}");
    // It really requires tokens: the check passed because it minted one.
    assert_eq!(relay_reply(bound_port(&out)), "ERR auth");

    // The secret file from the environment instead (as the systemd drop-in of deploy/README.md
    // sets it): redeploy with flags that do not name it.
    let env_file = f.remote_root().join("etc/quic-relay/quic-relay.env");
    let mut env = String::from_utf8_lossy(&read(&env_file)).into_owned();
    env.push_str(&format!("QUIC_RELAY_SECRET_FILE={}\n", secret.display()));
    std::fs::write(&env_file, env).expect("write the env file");
    let args = String::from("--bind 127.0.0.1 --port 0");
    let out = f.deploy(&["--args", &args, "--health-timeout", "10"]);
    expect_success(&out, "deploy with QUIC_RELAY_SECRET_FILE failed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("the relay requires tokens"));
    assert_eq!(relay_reply(bound_port(&out)), "ERR auth");

    // A rotated secret: the restarted relay reads the new file and so does the check.
    std::fs::write(&secret, "another-secret-0123456789abcdef\n").expect("rewrite");
    let out = f.deploy(&["--args", &args, "--health-timeout", "10"]);
    expect_success(&out, "deploy after rotating the secret failed");
}

/// Where xtask's cargo build puts binaries (as xtask computes it).
fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ sits in the workspace root")
        .to_path_buf();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

#[ignore = "needs root and a real sshd (apt-get install openssh-server openssh-client); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn deploy_mqproxy_server_and_check_it_with_a_quic_handshake() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::start();
    let args = "--listen 127.0.0.1:0";
    // The health check is a real `mqproxy client` that must authenticate with the token and pin
    // the certificate it reads from the host.
    let out = f.deploy(&["--bin", "mqproxy", "--args", args, "--health-timeout", "20"]);
    expect_success(&out, "mqproxy deploy failed");
    let installed = f.remote_root().join("opt/mqproxy/bin/mqproxy");
    assert_eq!(
        read(&installed),
        read(&target_dir().join("release/mqproxy"))
    );
}
