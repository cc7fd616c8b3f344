//! `cargo xtask deploy` against a real OpenSSH server on loopback, with throwaway keys: it
//! installs and starts the relay (without systemd: `--no-systemd` below `--remote-root`), the
//! health check passes, a broken binary is rolled back by itself, `--rollback` swaps back and
//! `--dry-run` changes nothing. Needs root and `openssh-server`; skips without them, except
//! under CI=true.

use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A throwaway sshd on a free loopback port, the temp directory it lives in, and whatever
/// the deploys started below the remote root; all removed on drop, on every exit path.
struct Fixture {
    dir: PathBuf,
    sshd: Child,
    port: u16,
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
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let d = dir.display();
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\n\
                 AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n\
                 StrictModes no\nUsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
            ),
        )
        .expect("write sshd_config");
        let sshd = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start sshd");
        let f = Fixture { dir, sshd, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        f
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
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port();
    let args = format!("--bind 127.0.0.1 --port {port}");

    // --dry-run prints every step and touches nothing (not even the remote root).
    let out = f.deploy(&["--dry-run", "--args", &args]);
    assert!(out.status.success());
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
    let out = f.deploy(&["--args", &args, "--health-timeout", "10"]);
    assert!(out.status.success(), "first deploy failed");
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
    assert!(relay_acks(port), "the deployed relay does not answer REG");

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
    assert!(relay_acks(port), "healthy again after the rollback");

    // A second good version (the same ELF with trailing bytes), then --rollback swaps back.
    let v2_path = f.dir.join("quic-relay-v2");
    let mut v2 = v1.clone();
    v2.extend_from_slice(b"\nversion 2\n");
    std::fs::write(&v2_path, &v2).expect("write v2");
    let out = f.deploy(&["--binary", v2_path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "deploy of v2 failed");
    assert_eq!(read(&f.bin()), v2);
    assert_eq!(
        read(&f.bin().with_extension("prev")),
        v1,
        "previous kept as .prev"
    );

    let out = f.deploy(&["--rollback"]);
    assert!(out.status.success(), "--rollback failed");
    assert_eq!(read(&f.bin()), v1, "--rollback restored v1");
    assert_eq!(
        read(&f.bin().with_extension("prev")),
        v2,
        "and kept v2 to go forward"
    );
    assert!(relay_acks(port), "healthy after --rollback");
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
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port();
    // The secret file on the "host" (the same machine here), passed in the service's flags.
    let secret = f.dir.join("secrets");
    std::fs::write(
        &secret,
        "\n  deploy-test-secret-0123456789  \nsecond-secret-0123456789\n",
    )
    .expect("write the secret file");
    let args = format!(
        "--bind 127.0.0.1 --port {port} --secret-file {}",
        secret.display()
    );
    let out = f.deploy(&["--args", &args, "--health-timeout", "10"]);
    assert!(
        out.status.success(),
        "deploy of a token-protected relay failed"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("the relay requires tokens"), "{text}");
    assert!(text.contains("answered ACK"), "{text}");
    // It really requires tokens: the check passed because it minted one.
    assert_eq!(relay_reply(port), "ERR auth");

    // The secret file from the environment instead (as the systemd drop-in of deploy/README.md
    // sets it): redeploy with flags that do not name it.
    let env_file = f.remote_root().join("etc/quic-relay/quic-relay.env");
    let mut env = String::from_utf8_lossy(&read(&env_file)).into_owned();
    env.push_str(&format!("QUIC_RELAY_SECRET_FILE={}\n", secret.display()));
    std::fs::write(&env_file, env).expect("write the env file");
    let args = format!("--bind 127.0.0.1 --port {port}");
    let out = f.deploy(&["--args", &args, "--health-timeout", "10"]);
    assert!(
        out.status.success(),
        "deploy with QUIC_RELAY_SECRET_FILE failed"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("the relay requires tokens"));
    assert_eq!(relay_reply(port), "ERR auth");

    // A rotated secret: the restarted relay reads the new file and so does the check.
    std::fs::write(&secret, "another-secret-0123456789abcdef\n").expect("rewrite");
    let out = f.deploy(&["--args", &args, "--health-timeout", "10"]);
    assert!(
        out.status.success(),
        "deploy after rotating the secret failed"
    );
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
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port();
    let args = format!("--listen 127.0.0.1:{port}");
    // The health check is a real `mqproxy client` that must authenticate with the token and pin
    // the certificate it reads from the host.
    let out = f.deploy(&[
        "--bin",
        "mqproxy",
        "--args",
        &args,
        "--health-timeout",
        "20",
    ]);
    assert!(out.status.success(), "mqproxy deploy failed");
    let installed = f.remote_root().join("opt/mqproxy/bin/mqproxy");
    assert_eq!(
        read(&installed),
        read(&target_dir().join("release/mqproxy"))
    );
}
