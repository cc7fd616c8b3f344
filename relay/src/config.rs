//! Command-line and environment configuration of the relay (every flag has a `QUIC_RELAY_*`
//! environment variable, for systemd environment files).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::defaults;
use crate::sessions::{Limits, RelayConfig};
use crate::tcp::TcpConfig;

/// A UDP rendezvous relay: two peers register a session and it forwards their datagrams.
///
/// Peers send `REG:<session-uuid>` and get `ACK`; once two peers registered the same session,
/// every other datagram from one is forwarded to the other. Built for QUIC between peers that
/// cannot reach each other directly. Protocol: relay/PROTOCOL.md. Logs: set RUST_LOG (e.g.
/// RUST_LOG=debug for per-session events).
///
/// With no subcommand it runs the relay; `quic-relay session` and `quic-relay token` print a
/// session id and a session token for its peers.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "quic-relay",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A helper instead of the relay.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The relay's flags (when no subcommand is given).
    #[command(flatten)]
    pub server: Args,
}

/// The helpers: what a backend (or a shell) needs to hand peers their credentials.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Print a fresh random session id (a UUID v4) for two peers to share.
    Session,
    /// Print a session token for a relay run with --secret-file.
    ///
    /// The token (`<expiry>:<mac>`, PROTOCOL.md §6) is accepted by a relay run with the same
    /// --secret-file, for --session, until it expires. Peers pass it as their relay token
    /// (`--token` of the peer-sdk examples, `--relay-token` of mqproxy).
    Token(TokenArgs),
}

/// `quic-relay token`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The relay's secret file; the token is minted with its first secret.
    #[arg(long)]
    pub secret_file: PathBuf,
    /// The session the token is for (e.g. from `quic-relay session`).
    #[arg(long)]
    pub session: uuid::Uuid,
    /// How long the token stays valid: a number with a unit s, m, h or d (e.g. 90s, 30m, 24h,
    /// 7d). The relay checks it on every registration, keepalives included, so make it
    /// outlive the session.
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    pub ttl: Duration,
}

impl TokenArgs {
    /// The token for `now` (Unix seconds), minted with the file's first secret.
    pub fn mint(&self, now: u64) -> Result<crate::proto::Token, ConfigError> {
        let secrets = read_secrets(&self.secret_file)?;
        Ok(crate::proto::Token::mint(
            &secrets[0],
            self.session,
            now.saturating_add(self.ttl.as_secs()),
        ))
    }
}

/// Parses a duration like `90s`, `30m`, `24h` or `7d` (a bare number is seconds).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: write e.g. 90s, 30m, 24h or 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err("the token would be expired at once: give a TTL above 0".into()),
        Some(secs) => Ok(Duration::from_secs(secs)),
        None => Err(format!("{s:?} is too long")),
    }
}

/// The relay's flags; every one has a `QUIC_RELAY_*` environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// UDP port to listen on (and TCP, unless --no-tcp). 0 picks one that is free for both;
    /// the "listening" log line names it.
    #[arg(long, env = "QUIC_RELAY_PORT", default_value_t = defaults::PORT)]
    pub port: u16,

    /// IP address to listen on. The default `::` serves IPv4 and IPv6 (dual-stack); use
    /// 0.0.0.0 for IPv4 only.
    #[arg(long, env = "QUIC_RELAY_BIND", default_value = "::")]
    pub bind: IpAddr,

    /// Seconds a paired session lives without forwarded traffic or a registration.
    #[arg(long, env = "QUIC_RELAY_SESSION_TIMEOUT_SECS", default_value_t = defaults::SESSION_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub session_timeout_secs: u64,

    /// Seconds a session waits for its second peer without a registration.
    #[arg(long, env = "QUIC_RELAY_UNPAIRED_TIMEOUT_SECS", default_value_t = defaults::UNPAIRED_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub unpaired_timeout_secs: u64,

    /// Most sessions held at once (about 240 bytes of memory each).
    #[arg(long, env = "QUIC_RELAY_MAX_SESSIONS", default_value_t = Limits::default().max_sessions,
          value_parser = clap::value_parser!(u32).range(1..=(1 << 30)))]
    pub max_sessions: u32,

    /// Most sessions one source IP may be a member of (CGNAT shares IPs: keep it well above 1).
    #[arg(long, env = "QUIC_RELAY_MAX_SESSIONS_PER_IP", default_value_t = Limits::default().max_sessions_per_ip,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions_per_ip: u32,

    /// Sustained registrations per second allowed from one source IP (keepalives count).
    #[arg(long, env = "QUIC_RELAY_REG_RATE_PER_IP", default_value_t = Limits::default().reg_rate_per_ip,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub reg_rate_per_ip: u32,

    /// Registrations one source IP may send in a burst before the rate applies.
    #[arg(long, env = "QUIC_RELAY_REG_BURST_PER_IP", default_value_t = Limits::default().reg_burst_per_ip,
          value_parser = clap::value_parser!(u32).range(1..=100_000_000))]
    pub reg_burst_per_ip: u32,

    /// File of secrets, one per line: registrations must then carry a token (`t=`) minted with
    /// one of them (several lines allow rotation). See PROTOCOL.md, "Tokens".
    #[arg(long, env = "QUIC_RELAY_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,

    /// Serve Prometheus metrics over HTTP at this address (e.g. 127.0.0.1:9433), path /metrics.
    #[arg(long, env = "QUIC_RELAY_METRICS")]
    pub metrics: Option<SocketAddr>,

    /// Start in drain mode: refuse registrations for new sessions (`ERR moved`, clients go to
    /// their next relay) and serve existing ones until they end (PROTOCOL.md §5.2). SIGUSR1
    /// turns drain mode on in a running relay, SIGUSR2 off.
    #[arg(long, env = "QUIC_RELAY_DRAIN")]
    pub drain: bool,

    /// Do not accept TCP. By default the relay also listens on TCP at the same address and port,
    /// for peers whose networks block UDP (datagrams framed with a u16 length; PROTOCOL.md §11).
    #[arg(long, env = "QUIC_RELAY_NO_TCP")]
    pub no_tcp: bool,

    /// Most TCP connections open at once.
    #[arg(long, env = "QUIC_RELAY_TCP_MAX_CONNECTIONS", default_value_t = defaults::TCP_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub tcp_max_connections: u32,

    /// Most TCP connections open at once from one IP.
    #[arg(long, env = "QUIC_RELAY_TCP_MAX_PER_IP", default_value_t = defaults::TCP_MAX_PER_IP as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub tcp_max_per_ip: u32,

    /// Seconds a TCP connection has to register (become a session member) before it is closed.
    #[arg(long, env = "QUIC_RELAY_TCP_HANDSHAKE_TIMEOUT_SECS", default_value_t = defaults::TCP_HANDSHAKE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub tcp_handshake_timeout_secs: u64,

    /// Seconds a TCP connection may send nothing before it is closed (and its member leaves).
    #[arg(long, env = "QUIC_RELAY_TCP_IDLE_TIMEOUT_SECS", default_value_t = defaults::TCP_IDLE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub tcp_idle_timeout_secs: u64,

    /// Frames queued for one TCP connection before more are dropped (the UDP loop never waits
    /// for a slow TCP peer).
    #[arg(long, env = "QUIC_RELAY_TCP_WRITE_QUEUE", default_value_t = defaults::TCP_WRITE_QUEUE as u32,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub tcp_write_queue: u32,

    /// Bytes queued for one TCP connection before more frames are dropped (a frame can be
    /// 64 KiB, so the frame count alone does not bound memory).
    #[arg(long, env = "QUIC_RELAY_TCP_WRITE_QUEUE_BYTES", default_value_t = defaults::TCP_WRITE_QUEUE_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(65_536..))]
    pub tcp_write_queue_bytes: u64,

    /// Bytes queued for all TCP connections together before more frames are dropped: the
    /// bound on the relay's memory for TCP, however many connections are open.
    #[arg(long, env = "QUIC_RELAY_TCP_QUEUE_BUDGET_BYTES", default_value_t = defaults::TCP_QUEUE_BUDGET_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(65_536..))]
    pub tcp_queue_budget_bytes: u64,

    /// Socket send and receive buffer size in bytes. Above net.core.rmem_max it needs root
    /// (CAP_NET_ADMIN); otherwise the kernel caps it and the relay warns.
    #[arg(long, env = "QUIC_RELAY_SOCKET_BUFFER_BYTES", default_value_t = defaults::SOCKET_BUFFER_BYTES)]
    pub socket_buffer_bytes: usize,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The secret file could not be read.
    #[error("cannot read --secret-file {path}: {source}")]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// The secret file holds no secret.
    #[error(
        "--secret-file {0} holds no secret: put one secret (e.g. 32 random bytes in hex) per line"
    )]
    NoSecret(PathBuf),
    /// A secret is too short to resist guessing.
    #[error("--secret-file {path}: line {line} is shorter than 16 characters; use at least 16 random bytes")]
    WeakSecret {
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
    },
}

impl Args {
    /// The address to bind.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// The TCP listener's configuration (`None` with `--no-tcp`).
    pub fn tcp_config(&self) -> Option<TcpConfig> {
        (!self.no_tcp).then(|| TcpConfig {
            max_connections: self.tcp_max_connections as usize,
            max_per_ip: self.tcp_max_per_ip as usize,
            handshake_timeout: Duration::from_secs(self.tcp_handshake_timeout_secs),
            idle_timeout: Duration::from_secs(self.tcp_idle_timeout_secs),
            write_queue: self.tcp_write_queue as usize,
            write_queue_bytes: usize::try_from(self.tcp_write_queue_bytes).unwrap_or(usize::MAX),
            queue_budget_bytes: usize::try_from(self.tcp_queue_budget_bytes).unwrap_or(usize::MAX),
        })
    }

    /// The state machine's configuration (reads the secret file).
    pub fn relay_config(&self) -> Result<RelayConfig, ConfigError> {
        let secrets = match &self.secret_file {
            None => Vec::new(),
            Some(path) => read_secrets(path)?,
        };
        Ok(RelayConfig {
            session_timeout: Duration::from_secs(self.session_timeout_secs),
            unpaired_timeout: Duration::from_secs(self.unpaired_timeout_secs),
            limits: Limits {
                max_sessions: self.max_sessions,
                max_sessions_per_ip: self.max_sessions_per_ip,
                reg_rate_per_ip: self.reg_rate_per_ip,
                reg_burst_per_ip: self.reg_burst_per_ip,
            },
            secrets,
            ..RelayConfig::default()
        })
    }
}

/// Reads one secret per non-empty line (surrounding whitespace trimmed).
pub fn read_secrets(path: &std::path::Path) -> Result<Vec<Vec<u8>>, ConfigError> {
    let text = std::fs::read(path).map_err(|source| ConfigError::SecretFile {
        path: path.to_owned(),
        source,
    })?;
    let mut secrets = Vec::new();
    for (n, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if line.len() < 16 {
            return Err(ConfigError::WeakSecret {
                path: path.to_owned(),
                line: n + 1,
            });
        }
        secrets.push(line.to_vec());
    }
    if secrets.is_empty() {
        return Err(ConfigError::NoSecret(path.to_owned()));
    }
    Ok(secrets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_take_a_unit_and_reject_nonsense() {
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1_800)));
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "h", "3w", "-1h", "1.5h", "0s", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
