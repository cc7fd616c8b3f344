//! `cargo xtask deploy`: builds a release binary, uploads it atomically over the system
//! `ssh`/`scp`, installs the systemd unit and environment file from `deploy/`, restarts the
//! service, checks its health from this machine and rolls back by itself when the check fails.
//!
//! Every remote action is one `ssh` invocation running a `set -eu` script fed on stdin, so
//! nothing depends on the remote login shell's quoting rules and `--dry-run` can print exactly
//! what would run.

use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs as _, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use quic_relay::proto::{Extended, Registration, Reply, Token, Uuid};

use crate::cli::Args;
use crate::process::ChildGuard;
use crate::{project_root, target_dir};

mod health;
mod scripts;

pub const HELP: &str = "\
Usage: cargo xtask deploy --host USER@HOST [options]
       cargo xtask deploy --host USER@HOST --rollback [options]

Builds the release binary (cargo build --release --locked), uploads it to the host over the
system ssh/scp under a temporary name and renames it into place (the previous binary is kept
as <name>.prev), installs the systemd unit and (once) the environment file from deploy/,
restarts the service and checks its health from this machine: for quic-relay a REG:<uuid>
must get ACK; for mqproxy `mqproxy client` must connect and authenticate. When the check
fails the previous binary is restored, restarted and checked again, and deploy exits non-zero.

Remote layout (under --remote-root, default /):
  /opt/<name>/bin/<name>              the binary (+ <name>.prev, + <name>.failed after a rollback)
  /etc/<name>/<name>.env              settings, created once, then only its *_ARGS line changes
  /etc/systemd/system/<name>.service  the unit, replaced on every deploy
  /etc/mqproxy/token                  mqproxy only: the client token, created when missing

Options:
  --host USER@HOST        where to deploy (ssh destination; its host part is also where the
                          health check is sent, unless --health-addr says otherwise)
  --ssh-port N            ssh port (default: ssh's own default / ~/.ssh/config)
  --identity FILE         ssh private key (ssh -i)
  --ssh-option OPT        extra ssh/scp option, repeatable (ssh -o OPT); also
                          XTASK_DEPLOY_SSH_OPTIONS, whitespace-separated
  --bin NAME              quic-relay (default) or mqproxy (deploys `mqproxy server`)
  --args \"...\"            extra flags for the service, stored as QUIC_RELAY_ARGS / MQPROXY_ARGS
                          in the environment file (no quotes, $, ` or \\ inside)
  --binary PATH           upload this file instead of building (e.g. a cross-compiled binary)
  --rollback              swap the binary and <name>.prev, restart, check health
  --dry-run               print every step (commands and remote scripts); run nothing
  --health-addr HOST:PORT where to send the health check (default: the ssh host and the port
                          from --args or the remote environment file, else 4433; for port 0
                          the port the service bound, read from the host's /proc)
  --health-timeout SECS   how long the service may take to pass the check (default 10)
  --health-cert-sha256 HEX  mqproxy: the certificate pin for the check (default: the
                          fingerprint of the self-signed certificate in the state directory)

Without systemd on the host (containers, tests):
  --remote-root DIR       install below DIR instead of / (unit paths are rewritten to match)
  --no-systemd            start the binary with setsid nohup, pid in /opt/<name>/run/<name>.pid,
                          log in /opt/<name>/run/<name>.log (paths below --remote-root)
  --start-cmd CMD         shell snippet that starts the service (implies --no-systemd); also
                          XTASK_DEPLOY_START_CMD. It may use $BIN, $NAME, $ENV_FILE, $RUN_DIR,
                          $PIDFILE, $LOG, $STATE_DIRECTORY, $CREDENTIALS_DIRECTORY
  --stop-cmd CMD          shell snippet that stops it (same variables); also
                          XTASK_DEPLOY_STOP_CMD

Examples:
  cargo xtask deploy --host root@203.0.113.7 --identity ~/.ssh/relay.pem
  cargo xtask deploy --host root@203.0.113.7 --args \"--metrics 127.0.0.1:9433\"
  cargo xtask deploy --host root@203.0.113.7 --rollback
";

/// Polling interval of the health checks: short enough that a healthy service is seen at
/// once, long enough not to flood a service that is still starting.
const HEALTH_POLL: Duration = Duration::from_millis(250);
/// ssh's connect timeout: a wrong address should fail in seconds, not minutes.
const SSH_CONNECT_TIMEOUT_SECS: u32 = 15;
/// What `mqproxy client` logs once it has authenticated with the server
/// (mqproxy/src/client.rs, `supervise`).
const MQPROXY_CONNECTED: &str = "connected and authenticated";
/// What it logs when the server refused its token: no point waiting any longer.
const MQPROXY_REFUSED: &str = "authentication refused";

/// What can be deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Product {
    Relay,
    Mqproxy,
}

impl Product {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "quic-relay" => Ok(Product::Relay),
            "mqproxy" => Ok(Product::Mqproxy),
            other => bail!("--bin {other}: expected quic-relay or mqproxy"),
        }
    }

    /// Package, binary, service and directory name at once.
    fn name(self) -> &'static str {
        match self {
            Product::Relay => "quic-relay",
            Product::Mqproxy => "mqproxy",
        }
    }

    /// The environment variable holding `--args`, expanded in the unit's `ExecStart=`.
    fn args_var(self) -> &'static str {
        match self {
            Product::Relay => "QUIC_RELAY_ARGS",
            Product::Mqproxy => "MQPROXY_ARGS",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Product::Relay => include_str!("../../deploy/quic-relay.service"),
            Product::Mqproxy => include_str!("../../deploy/mqproxy.service"),
        }
    }

    fn env_file(self) -> &'static str {
        match self {
            Product::Relay => include_str!("../../deploy/quic-relay.env"),
            Product::Mqproxy => include_str!("../../deploy/mqproxy.env"),
        }
    }

    /// The arguments before `$<NAME>_ARGS` when started without systemd: the same command as
    /// the unit's `ExecStart=`, with `%d` spelled as the shell variable.
    fn shell_fixed_args(self) -> &'static str {
        match self {
            Product::Relay => "",
            Product::Mqproxy => "server --token-file \"$CREDENTIALS_DIRECTORY/token\"",
        }
    }
}

/// How the service is started and stopped on the host.
#[derive(Debug, Clone)]
enum Manager {
    Systemd,
    /// Shell snippets; `None` means the built-in `setsid nohup` commands.
    Shell {
        start: Option<String>,
        stop: Option<String>,
    },
}

#[derive(Debug)]
struct Opts {
    host: String,
    ssh_port: Option<u16>,
    identity: Option<PathBuf>,
    ssh_options: Vec<String>,
    product: Product,
    args: Option<String>,
    binary: Option<PathBuf>,
    rollback: bool,
    dry_run: bool,
    remote_root: String,
    manager: Manager,
    health_addr: Option<String>,
    health_timeout: Duration,
    health_cert_sha256: Option<String>,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut a = Args::new(args);
    // Values first: a flag-looking value such as `--args "--dry-run"` must not be taken for a flag.
    let args_value = a.value("--args")?;
    let host = a
        .value("--host")?
        .ok_or_else(|| anyhow!("--host USER@HOST is required (try --help)"))?;
    let ssh_port = a.parsed::<u16>("--ssh-port")?;
    let identity = a.value("--identity")?.map(PathBuf::from);
    let mut ssh_options = Vec::new();
    while let Some(o) = a.value("--ssh-option")? {
        ssh_options.push(o);
    }
    if let Ok(env) = std::env::var("XTASK_DEPLOY_SSH_OPTIONS") {
        ssh_options.extend(env.split_whitespace().map(str::to_owned));
    }
    let product = Product::parse(a.value("--bin")?.as_deref().unwrap_or("quic-relay"))?;
    let binary = a.value("--binary")?.map(PathBuf::from);
    let remote_root = a.value("--remote-root")?.unwrap_or_else(|| "/".into());
    let start = a
        .value("--start-cmd")?
        .or_else(|| std::env::var("XTASK_DEPLOY_START_CMD").ok());
    let stop = a
        .value("--stop-cmd")?
        .or_else(|| std::env::var("XTASK_DEPLOY_STOP_CMD").ok());
    let health_addr = a.value("--health-addr")?;
    let health_timeout = Duration::from_secs(a.parsed::<u64>("--health-timeout")?.unwrap_or(10));
    let health_cert_sha256 = a.value("--health-cert-sha256")?;
    let no_systemd = a.flag("--no-systemd");
    let rollback = a.flag("--rollback");
    let dry_run = a.flag("--dry-run");
    a.finish()?;

    if host.is_empty() || host.starts_with('-') || host.chars().any(char::is_whitespace) {
        bail!("--host {host:?}: expected USER@HOST (or HOST)");
    }
    if let Some(v) = &args_value {
        check_args_value(v)?;
    }
    if rollback && (args_value.is_some() || binary.is_some()) {
        bail!("--rollback restores the previous binary: it takes no --args or --binary");
    }
    if let Some(b) = &binary {
        if !b.is_file() {
            bail!("--binary {}: no such file", b.display());
        }
    }
    if let Some(id) = &identity {
        if !id.is_file() {
            bail!("--identity {}: no such file", id.display());
        }
    }
    let remote_root = normalize_root(&remote_root)?;
    let manager = if no_systemd || start.is_some() || stop.is_some() {
        Manager::Shell { start, stop }
    } else {
        Manager::Systemd
    };
    Ok(Opts {
        host,
        ssh_port,
        identity,
        ssh_options,
        product,
        args: args_value,
        binary,
        rollback,
        dry_run,
        remote_root,
        manager,
        health_addr,
        health_timeout,
        health_cert_sha256,
    })
}

/// `--args` ends up inside double quotes in a file read by both systemd and sh: characters
/// either of them would interpret are refused rather than escaped two different ways.
fn check_args_value(v: &str) -> Result<()> {
    if let Some(c) = v
        .chars()
        .find(|c| matches!(c, '"' | '\'' | '\\' | '$' | '`') || c.is_control())
    {
        bail!("--args {v:?}: the character {c:?} is not allowed (flags and plain values only)");
    }
    Ok(())
}

/// The remote root without a trailing slash ("" for /). Limited to plain path characters
/// because it is pasted into remote scripts and scp destinations.
fn normalize_root(root: &str) -> Result<String> {
    if !root.starts_with('/')
        || !root
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
    {
        bail!(
            "--remote-root {root:?}: expected an absolute path of letters, digits, /, ., _ and -"
        );
    }
    Ok(root.trim_end_matches('/').to_owned())
}

/// Remote paths of one product below the remote root.
#[derive(Debug)]
struct Layout {
    root: String,
    name: &'static str,
}

impl Layout {
    fn bin_dir(&self) -> String {
        format!("{}/opt/{}/bin", self.root, self.name)
    }
    fn bin(&self) -> String {
        format!("{}/{}", self.bin_dir(), self.name)
    }
    fn etc(&self) -> String {
        format!("{}/etc/{}", self.root, self.name)
    }
    fn env_file(&self) -> String {
        format!("{}/{}.env", self.etc(), self.name)
    }
    fn unit(&self) -> String {
        format!("{}/etc/systemd/system/{}.service", self.root, self.name)
    }
    fn run_dir(&self) -> String {
        format!("{}/opt/{}/run", self.root, self.name)
    }
    fn state_dir(&self) -> String {
        format!("{}/var/lib/{}", self.root, self.name)
    }

    /// The unit as shipped in deploy/, its paths moved below the remote root.
    fn unit_text(&self, product: Product) -> String {
        let text = product.unit();
        if self.root.is_empty() {
            return text.to_owned();
        }
        text.replace(
            &format!("/opt/{}/", self.name),
            &format!("{}/opt/{}/", self.root, self.name),
        )
        .replace(
            &format!("/etc/{}/", self.name),
            &format!("{}/etc/{}/", self.root, self.name),
        )
    }
}

/// Single-quotes `s` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs the deploy task.
pub fn run(args: &[String]) -> Result<()> {
    if args.is_empty() || matches!(args[0].as_str(), "-h" | "--help" | "help") {
        print!("{HELP}");
        return Ok(());
    }
    let opts = parse(args)?;
    let d = Deployer {
        layout: Layout {
            root: opts.remote_root.clone(),
            name: opts.product.name(),
        },
        opts,
    };
    if d.opts.rollback {
        d.rollback()
    } else {
        d.deploy()
    }
}

#[derive(Debug)]
struct Deployer {
    opts: Opts,
    layout: Layout,
}

impl Deployer {
    fn step(&self, n: usize, what: &str) {
        let prefix = if self.opts.dry_run { "[dry run] " } else { "" };
        println!("==> {prefix}{n}. {what}");
    }

    fn deploy(&self) -> Result<()> {
        let name = self.opts.product.name();
        let local = match &self.opts.binary {
            Some(p) => {
                self.step(1, &format!("use the given binary {}", p.display()));
                p.clone()
            }
            None => {
                self.step(1, &format!("build {name} (release, --locked)"));
                self.build()?
            }
        };

        self.step(
            2,
            &format!("prepare {} on {}", self.layout.bin_dir(), self.opts.host),
        );
        self.ssh(&self.prepare_script(), "prepare")?;

        let tmp_name = format!("{}.new.{}", self.layout.bin(), random_hex(8)?);
        self.step(3, &format!("upload {} to {tmp_name}", local.display()));
        self.scp(&local, &tmp_name)?;

        self.step(
            4,
            &format!(
                "install the binary (previous kept as {name}.prev), {}, {}, restart",
                self.layout.unit(),
                self.layout.env_file()
            ),
        );
        let out = self.ssh(&self.install_script(&tmp_name), "install")?;

        self.step(5, "health check from this machine");
        let Err(e) = self.health(&out) else {
            if self.opts.dry_run {
                println!("dry run: nothing was built, uploaded or changed");
                return Ok(());
            }
            println!("deployed {name} to {}: healthy", self.opts.host);
            return Ok(());
        };
        eprintln!("health check failed: {e:#}");

        self.step(6, "roll back to the previous binary and check again");
        let out = self
            .ssh(&self.restore_script(), "roll back")
            .context("automatic rollback failed")?;
        if let Some(log) = section(&out, "log") {
            eprintln!("last log lines of the failed {name}:\n{}", log.trim_end());
        }
        self.health(&out).with_context(|| {
            format!("deploy failed its health check ({e:#}) and the rolled-back binary fails too: {name} on {} is down", self.opts.host)
        })?;
        bail!(
            "deploy failed its health check ({e:#}); rolled back to the previous binary, which \
             is healthy again; the failed binary is kept on the host as {}.failed",
            self.layout.bin()
        )
    }

    fn rollback(&self) -> Result<()> {
        let name = self.opts.product.name();
        self.step(
            1,
            &format!("swap {0} and {0}.prev, restart", self.layout.bin()),
        );
        let out = self.ssh(&self.swap_script(), "rollback")?;
        self.step(2, "health check from this machine");
        self.health(&out).with_context(|| {
            format!(
                "rolled back {name} on {}, but it fails the health check; `cargo xtask deploy \
                 --rollback` again swaps back",
                self.opts.host
            )
        })?;
        if self.opts.dry_run {
            println!("dry run: nothing was changed");
            return Ok(());
        }
        println!("rolled back {name} on {}: healthy", self.opts.host);
        Ok(())
    }

    fn build(&self) -> Result<PathBuf> {
        let name = self.opts.product.name();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let args = ["build", "--release", "--locked", "-p", name, "--bin", name];
        let path = target_dir().join("release").join(name);
        if self.opts.dry_run {
            println!("    {cargo} {}", args.join(" "));
            return Ok(path);
        }
        let status = Command::new(&cargo)
            .current_dir(project_root())
            .args(args)
            .status()
            .with_context(|| format!("run {cargo}"))?;
        if !status.success() {
            bail!("cargo build --release --locked -p {name} failed ({status})");
        }
        Ok(path)
    }

    /// ssh/scp options shared by both tools. BatchMode: a deploy must never stop at a password
    /// prompt (an unattended CI job would hang).
    fn common_ssh_args(&self) -> Vec<String> {
        let mut v = vec![
            "-o".to_owned(),
            "BatchMode=yes".to_owned(),
            "-o".to_owned(),
            format!("ConnectTimeout={SSH_CONNECT_TIMEOUT_SECS}"),
        ];
        if let Some(id) = &self.opts.identity {
            v.push("-i".into());
            v.push(id.display().to_string());
        }
        for o in &self.opts.ssh_options {
            v.push("-o".into());
            v.push(o.clone());
        }
        v
    }

    /// Runs `script` on the host with `sh -s` and returns its stdout; its stderr goes to ours.
    fn ssh(&self, script: &str, what: &str) -> Result<String> {
        let mut args = self.common_ssh_args();
        if let Some(p) = self.opts.ssh_port {
            args.push("-p".into());
            args.push(p.to_string());
        }
        args.push(self.opts.host.clone());
        args.push("sh -s".into());
        if self.opts.dry_run {
            println!("    ssh {} <<'SCRIPT'", args.join(" "));
            for line in script.lines() {
                println!("    | {line}");
            }
            println!("    SCRIPT");
            return Ok(String::new());
        }
        let mut child = Command::new("ssh")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("run ssh (is the OpenSSH client installed?)")?;
        child
            .stdin
            .take()
            .expect("stdin was piped")
            .write_all(script.as_bytes())
            .context("send the script to ssh")?;
        let out = child.wait_with_output().context("wait for ssh")?;
        if !out.status.success() {
            bail!(
                "remote step `{what}` on {} failed ({}); see the messages above",
                self.opts.host,
                out.status
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn scp(&self, local: &Path, remote: &str) -> Result<()> {
        let mut args = vec!["-q".to_owned()];
        args.extend(self.common_ssh_args());
        if let Some(p) = self.opts.ssh_port {
            args.push("-P".into());
            args.push(p.to_string());
        }
        args.push(local.display().to_string());
        args.push(format!("{}:{remote}", scp_host(&self.opts.host)));
        if self.opts.dry_run {
            println!("    scp {}", args.join(" "));
            return Ok(());
        }
        if !local.is_file() {
            bail!("{}: no such file to upload", local.display());
        }
        let status = Command::new("scp")
            .args(&args)
            .status()
            .context("run scp (is the OpenSSH client installed?)")?;
        if !status.success() {
            bail!(
                "scp {} to {}:{remote} failed ({status})",
                local.display(),
                self.opts.host
            );
        }
        Ok(())
    }
}

/// The service's port: `--port N` / `--listen ADDR` in the args (flags win over variables),
/// else the variable in the environment file, else 4433.
fn service_port(product: Product, args: Option<&str>, env: &str) -> Result<u16> {
    let env_vars: Vec<(&str, String)> = env
        .lines()
        .filter_map(|l| l.trim().split_once('='))
        .filter(|(k, _)| !k.starts_with('#'))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('"').to_owned()))
        .collect();
    let var = |name: &str| {
        env_vars
            .iter()
            .rev()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    };
    let args = args.map(str::to_owned).or_else(|| var(product.args_var()));
    let (flag, env_name) = match product {
        Product::Relay => ("--port", "QUIC_RELAY_PORT"),
        Product::Mqproxy => ("--listen", "MQPROXY_LISTEN"),
    };
    let from_args = args.as_deref().and_then(|a| flag_value(a, flag));
    let (source, value) = match (from_args, var(env_name)) {
        (Some(v), _) => (flag, v),
        (None, Some(v)) if !v.is_empty() => (env_name, v),
        _ => return Ok(4433),
    };
    let port = match product {
        Product::Relay => value.parse::<u16>().ok(),
        Product::Mqproxy => value
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok()),
    };
    port.ok_or_else(|| anyhow!("{source} {value:?}: cannot tell the service's port from it"))
}

/// The value of `--flag V` or `--flag=V` in a whitespace-separated argument string.
fn flag_value(args: &str, flag: &str) -> Option<String> {
    let mut words = args.split_whitespace();
    let prefix = format!("{flag}=");
    let mut found = None;
    while let Some(w) = words.next() {
        if w == flag {
            found = words.next().map(str::to_owned);
        } else if let Some(v) = w.strip_prefix(&prefix) {
            found = Some(v.to_owned());
        }
    }
    found
}

/// The text between `--- name ---` and `--- end ---` in a script's output.
fn section(out: &str, name: &str) -> Option<String> {
    let start = format!("--- {name} ---");
    let mut lines = out.lines().skip_while(|l| *l != start);
    lines.next()?;
    Some(
        lines
            .take_while(|l| *l != "--- end ---")
            .map(|l| format!("{l}\n"))
            .collect(),
    )
}

/// `user@host` -> `host`.
fn host_part(dest: &str) -> &str {
    dest.rsplit_once('@').map_or(dest, |(_, h)| h)
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// scp needs brackets around an IPv6 host: `user@[::1]:path`.
fn scp_host(dest: &str) -> String {
    match dest.rsplit_once('@') {
        Some((user, host)) => format!("{user}@{}", bracket_v6(host)),
        None => bracket_v6(dest),
    }
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("resolve {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_owned()
    } else {
        format!("{s}\n")
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    use std::io::Read as _;
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("read /dev/urandom")?;
    Ok(b)
}

fn random_hex(n: usize) -> Result<String> {
    let b = random_bytes::<16>()?;
    Ok(b[..n.min(16)].iter().map(|x| format!("{x:02x}")).collect())
}

/// A random version-4 UUID, so health checks never collide with real sessions.
fn random_uuid() -> Result<String> {
    let mut b = random_bytes::<16>()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests;
