//! Command-line and config-file options for `mqproxy server` and `mqproxy client`. A TOML file
//! (`--config`) uses the long flag names as keys; the command line overrides the file, which
//! overrides the defaults.

#![cfg(feature = "runtime")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::client::ClientConfig;
use crate::relay_session::RelayTarget;
use crate::server::{self, ServerConfig};
use crate::tls::{ClientVerify, ServerCert};

/// Configuration errors; each names the flag or file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this role.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A required setting is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// Settings that exclude each other were both given.
    #[error("{0} and {1} exclude each other")]
    Conflict(&'static str, &'static str),
    /// A setting has a bad value.
    #[error("{flag} {value:?}: {reason}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// Why it is bad.
        reason: String,
    },
}

fn load_file<T: for<'de> Deserialize<'de> + Default>(
    path: Option<&Path>,
) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// The token from `--token` or `--token-file` (one of them; the file's trailing newline is
/// not part of the token).
fn resolve_token(token: Option<String>, file: Option<PathBuf>) -> Result<Vec<u8>, ConfigError> {
    let t = match (token, file) {
        (Some(_), Some(_)) => return Err(ConfigError::Conflict("--token", "--token-file")),
        (Some(t), None) => t.into_bytes(),
        (None, Some(f)) => {
            let s = std::fs::read(&f).map_err(|source| ConfigError::Read { path: f, source })?;
            let end = s
                .iter()
                .rposition(|b| !b"\r\n".contains(b))
                .map_or(0, |i| i + 1);
            s[..end].to_vec()
        }
        (None, None) => return Err(ConfigError::Missing("--token or --token-file")),
    };
    if t.is_empty() {
        return Err(ConfigError::Invalid {
            flag: "--token",
            value: String::new(),
            reason: "the token is empty".into(),
        });
    }
    if t.len() > crate::proto::MAX_TOKEN_LEN {
        return Err(ConfigError::Invalid {
            flag: "--token",
            value: format!("<{} bytes>", t.len()),
            reason: format!("longer than {} bytes", crate::proto::MAX_TOKEN_LEN),
        });
    }
    Ok(t)
}

/// The options both roles have (`--metrics`, `--token`/`--token-file`, `--relay`,
/// `--session`, `--relay-token`; `role_opts!` declares them in both), taken out of either
/// role's options so that both merge and check them the same way.
struct Shared {
    metrics: Option<SocketAddr>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    relay: Vec<String>,
    session: Option<String>,
    relay_token: Option<String>,
}

/// Moves the shared fields out of a `ServerOpts` or `ClientOpts`.
macro_rules! shared_of {
    ($opts:expr) => {
        Shared {
            metrics: $opts.metrics,
            token: $opts.token,
            token_file: $opts.token_file,
            relay: $opts.relay,
            session: $opts.session,
            relay_token: $opts.relay_token,
        }
    };
}

/// The shared options resolved: the token, the relay session (if any) and `--metrics`.
struct SharedConfig {
    token: Vec<u8>,
    relay: Option<RelayTarget>,
    metrics: Option<SocketAddr>,
}

impl Shared {
    /// Merges the command line (`self`) over the config `file` and checks the result.
    fn resolve(self, file: Shared) -> Result<SharedConfig, ConfigError> {
        let relay = resolve_relay(
            if self.relay.is_empty() {
                file.relay
            } else {
                self.relay
            },
            self.session.or(file.session),
            self.relay_token.or(file.relay_token),
        )?;
        let token = resolve_token(
            self.token.or(file.token),
            self.token_file.or(file.token_file),
        )?;
        Ok(SharedConfig {
            token,
            relay,
            metrics: self.metrics.or(file.metrics),
        })
    }
}

/// Most `--relay` flags: peer-sdk fails over along the list, and a handful of relays covers
/// any deployment; the cap keeps a runaway config from making every registration walk a long
/// list.
const MAX_RELAYS: usize = 16;

/// The relay session from `--relay` (repeatable), `--session` and `--relay-token` (all or
/// none of the first two).
fn resolve_relay(
    relays: Vec<String>,
    session: Option<String>,
    token: Option<String>,
) -> Result<Option<RelayTarget>, ConfigError> {
    let (relays, session) = match (relays.is_empty(), session) {
        (true, None) if token.is_some() => {
            return Err(ConfigError::Missing(
                "--relay and --session for --relay-token",
            ))
        }
        (true, None) => return Ok(None),
        (false, None) => {
            return Err(ConfigError::Missing(
                "--session UUID for --relay (the same on server and client; e.g. from `quic-relay session`)",
            ))
        }
        (true, Some(_)) => return Err(ConfigError::Missing("--relay ADDR for --session")),
        (false, Some(s)) => (relays, s),
    };
    if relays.len() > MAX_RELAYS {
        return Err(ConfigError::Invalid {
            flag: "--relay",
            value: relays.join(" "),
            reason: format!("at most {MAX_RELAYS} relays"),
        });
    }
    let mut addrs = Vec::with_capacity(relays.len());
    let mut relay_other_family = Vec::new();
    for r in &relays {
        let (addr, other) = resolve_relay_addr(r).map_err(|reason| ConfigError::Invalid {
            flag: "--relay",
            value: r.clone(),
            reason,
        })?;
        addrs.push(addr);
        relay_other_family.extend(other.map(|o| (addr, o)));
    }
    let session = peer_sdk::Uuid::parse_str(session.trim()).map_err(|e| ConfigError::Invalid {
        flag: "--session",
        value: session.clone(),
        reason: format!("not a UUID ({e}); generate one with `quic-relay session`"),
    })?;
    let token = token
        .map(|t| {
            t.parse::<peer_sdk::proto::Token>()
                .map_err(|_| ConfigError::Invalid {
                    flag: "--relay-token",
                    value: t.clone(),
                    reason: "expected EXPIRY:MAC (Unix seconds, ':', 64 hex digits), as minted \
                             for the relay's --secret-file"
                        .into(),
                })
        })
        .transpose()?;
    Ok(Some(RelayTarget {
        relays: addrs,
        relay_other_family,
        session,
        token,
    }))
}

/// One `--relay` value: `HOST:PORT`, or `HOST:PORT,OTHER_HOST:PORT` naming the same relay by
/// its address in the other IP family too (as peer-sdk's `peer` example takes it).
fn resolve_relay_addr(value: &str) -> Result<(SocketAddr, Option<SocketAddr>), String> {
    let Some((a, b)) = value.split_once(',') else {
        return Ok((resolve_addr(value.trim())?, None));
    };
    let a = resolve_addr(a.trim())?;
    let b = resolve_addr(b.trim()).map_err(|e| format!("the other-family address: {e}"))?;
    if a.is_ipv4() == b.is_ipv4() {
        return Err(format!(
            "{a} and {b} are in the same IP family; ADDR,OTHER names one relay by an IPv4 \
             and an IPv6 address"
        ));
    }
    Ok((a, Some(b)))
}

/// A TOML value that is one string or a list of them (`relay = "a:1"` or
/// `relay = ["a:1", "b:2"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// `HOST:PORT` to one address: an IP literal as is, a name through the system resolver (IPv4
/// preferred: the common case for a relay, and what an IPv4-only host can reach).
fn resolve_addr(hostport: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = hostport.parse() {
        return Ok(a);
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {}
        _ => {
            return Err(
                "expected HOST:PORT (e.g. 203.0.113.7:4433 or relay.example.com:4433)".into(),
            )
        }
    }
    let addrs = std::net::ToSocketAddrs::to_socket_addrs(hostport)
        .map_err(|e| format!("cannot resolve: {e}"))?;
    netkit::resolve::ipv4_first(addrs).ok_or_else(|| "the name has no address".into())
}

/// Declares a role's options (`ServerOpts`, `ClientOpts`) with the flags both roles share, so
/// that each shared flag's help, env var and TOML key is written once. A macro rather than a
/// shared struct under `#[command(flatten)]` + `#[serde(flatten)]`: serde documents flatten as
/// unsupported with `deny_unknown_fields`, and through it an unknown key loses the "expected
/// one of ..." list and its own line (serde-rs/serde#1957). The invocation names the shared
/// flags where they go and puts the role's own fields in the brace groups between them, which
/// keeps each role's `--help` in its order; the doc before `relay` opens `--relay`'s help with
/// what the relay replaces for that role.
macro_rules! role_opts {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            config,
            { $($head:tt)* }
            metrics, token, token_file,
            { $($middle:tt)* }
            $(#[$relay_doc:meta])*
            relay, session, relay_token,
            { $($tail:tt)* }
        }
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Default, Args, Deserialize)]
        #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
        pub struct $name {
            /// TOML config file; its keys are the long flag names (e.g.
            /// `token-file = "/etc/mqproxy/token"`).
            #[arg(long, env = "MQPROXY_CONFIG")]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $($head)*
            /// Serve Prometheus metrics (counters, and per path: usable, RTT, congestion window,
            /// packets sent and lost, bytes, packet size and MTU black holes) at
            /// http://ADDR/metrics, e.g. 127.0.0.1:9464. Off by default; the page is
            /// unauthenticated, so keep it on a private address.
            #[arg(long, env = "MQPROXY_METRICS", value_name = "ADDR")]
            pub metrics: Option<SocketAddr>,
            /// Shared secret that clients present to the server (prefer --token-file: command lines
            /// are visible to other local users).
            #[arg(long, env = "MQPROXY_TOKEN", hide_env_values = true)]
            pub token: Option<String>,
            /// File holding the shared secret (a trailing newline is ignored).
            #[arg(long, env = "MQPROXY_TOKEN_FILE")]
            pub token_file: Option<PathBuf>,
            $($middle)*
            $(#[$relay_doc])*
            /// The relay is UDP HOST:PORT; a name is resolved once at start. peer-sdk hole-punches
            /// a direct path when both NATs allow it and relays the QUIC connection otherwise.
            /// Needs --session. Repeat for several relays (in the config file: a list): both ends
            /// order them by a hash of the session, so server and client must list the same relays
            /// (in any order) to meet on the same one, and both move to the next when it dies or
            /// drains. HOST:PORT,OTHER gives the same relay's address in the other IP family as
            /// well.
            #[arg(long, env = "MQPROXY_RELAY", value_name = "HOST:PORT[,OTHER]")]
            #[serde(deserialize_with = "one_or_many")]
            pub relay: Vec<String>,
            /// The relay session (a UUID) server and client share, e.g. from `quic-relay session`;
            /// with --relay.
            #[arg(long, env = "MQPROXY_SESSION", value_name = "UUID")]
            pub session: Option<String>,
            /// Token for a relay that requires one (its --secret-file): EXPIRY:MAC as minted for
            /// this session. Not the proxy's --token.
            #[arg(
                long,
                env = "MQPROXY_RELAY_TOKEN",
                hide_env_values = true,
                value_name = "EXPIRY:MAC"
            )]
            pub relay_token: Option<String>,
            $($tail)*
        }
    };
}

role_opts! {
    /// `mqproxy server` options.
    pub struct ServerOpts {
        config,
        {
            /// UDP address the QUIC server listens on [default: 0.0.0.0:4433].
            #[arg(long, env = "MQPROXY_LISTEN")]
            pub listen: Option<SocketAddr>,
        }
        metrics, token, token_file,
        {
            /// Seconds a UDP session may stay silent before the server closes it; clients may ask
            /// for less, never more [default: 30].
            #[arg(long, value_name = "SECS")]
            pub udp_idle_timeout: Option<u64>,
            /// Refuse all UDP relaying (clients are told at authentication; UDP ASSOCIATE fails
            /// with "command not supported").
            #[arg(long)]
            pub no_udp: bool,
            /// PEM certificate chain. Without --cert/--key the server creates a self-signed
            /// certificate on first start, keeps it in --state-dir and logs its SHA-256
            /// fingerprint.
            #[arg(long, requires = "key")]
            pub cert: Option<PathBuf>,
            /// PEM private key for --cert.
            #[arg(long, requires = "cert")]
            pub key: Option<PathBuf>,
            /// Where the self-signed certificate is kept [default: $STATE_DIRECTORY,
            /// $XDG_STATE_HOME/mqproxy or ~/.local/state/mqproxy].
            #[arg(long, env = "MQPROXY_STATE_DIR")]
            pub state_dir: Option<PathBuf>,
            /// Most connections allowed between handshake and authentication (a cap on
            /// unauthenticated clients) [default: 256]. Only clients whose address a QUIC Retry has
            /// validated count, so Initials from spoofed or silent sources take no slot.
            #[arg(long, value_name = "N")]
            pub max_conns: Option<usize>,
            /// Most UDP sessions per client connection [default: 1024].
            #[arg(long, value_name = "N")]
            pub max_udp_sessions: Option<usize>,
            /// Most UDP sessions of all connections from one client address (an IPv6 /64) together
            /// [default: 2048].
            #[arg(long, value_name = "N")]
            pub max_udp_sessions_per_client: Option<usize>,
            /// Most UDP sessions of the whole server; each holds two file descriptors. Further
            /// opens are refused with SESSION_LIMIT [default: a quarter of the open-file limit,
            /// which the server first raises to its hard limit: half the descriptors, at most 65536
            /// sessions].
            #[arg(long, value_name = "N")]
            pub max_udp_sessions_total: Option<usize>,
            /// Allow loopback, private (RFC 1918, ULA), link-local and CGNAT destinations. Off by
            /// default so the proxy cannot be used to reach the server's own network (SSRF); IPv4
            /// addresses inside IPv6 ones (NAT64, 6to4, Teredo, IPv4-mapped/-compatible) are judged
            /// as IPv4.
            #[arg(long)]
            pub allow_private: bool,
            /// QUIC idle timeout in seconds: a client silent this long is disconnected and its
            /// sessions torn down [default: 30].
            #[arg(long, value_name = "SECS")]
            pub idle_timeout: Option<u64>,
        }
        /// Reach clients through this quic-relay instead of listening on --listen: for a server
        /// behind a NAT with no open port. Given together with --listen, the server does both: a
        /// multipath client (--path ... --relay ...) then uses the relay session as one more path.
        relay, session, relay_token,
        {}
    }
}

impl ServerOpts {
    /// Reads `--config` (if any) and merges: command line over file over defaults.
    pub fn resolve(self) -> Result<ServerConfig, ConfigError> {
        let file: ServerOpts = load_file(self.config.as_deref())?;
        let shared = shared_of!(self).resolve(shared_of!(file))?;
        let cert = match (self.cert.or(file.cert), self.key.or(file.key)) {
            (Some(cert), Some(key)) => ServerCert::Files { cert, key },
            (None, None) => ServerCert::SelfSigned(
                self.state_dir
                    .or(file.state_dir)
                    .unwrap_or_else(server::default_state_dir),
            ),
            _ => return Err(ConfigError::Missing("--cert and --key together")),
        };
        let relay = shared.relay;
        let listen = self.listen.or(file.listen);
        // --relay alone: the relay session only. With --listen as well: both front ends, so
        // a multipath client's direct paths and its relay path join one bundle.
        let also_listen = relay.is_some() && listen.is_some();
        let listen = listen.unwrap_or_else(|| "0.0.0.0:4433".parse().expect("literal"));
        let mut c = ServerConfig::new(listen, shared.token, cert);
        c.relay = relay;
        c.also_listen = also_listen;
        c.metrics = shared.metrics;
        if let Some(s) = self.udp_idle_timeout.or(file.udp_idle_timeout) {
            c.udp_idle_timeout = positive_secs("--udp-idle-timeout", s)?;
        }
        if let Some(s) = self.idle_timeout.or(file.idle_timeout) {
            c.idle_timeout = positive_secs("--idle-timeout", s)?;
        }
        c.udp_enabled = !(self.no_udp || file.no_udp);
        c.allow_private = self.allow_private || file.allow_private;
        if let Some(n) = self.max_conns.or(file.max_conns) {
            c.max_conns = at_least_one("--max-conns", n)?;
        }
        if let Some(n) = self.max_udp_sessions.or(file.max_udp_sessions) {
            c.max_udp_sessions = at_least_one("--max-udp-sessions", n)?;
        }
        if let Some(n) = self
            .max_udp_sessions_per_client
            .or(file.max_udp_sessions_per_client)
        {
            c.max_udp_sessions_per_client = at_least_one("--max-udp-sessions-per-client", n)?;
        }
        if let Some(n) = self.max_udp_sessions_total.or(file.max_udp_sessions_total) {
            c.max_udp_sessions_total = Some(at_least_one("--max-udp-sessions-total", n)?);
        }
        Ok(c)
    }
}

fn positive_secs(flag: &'static str, s: u64) -> Result<Duration, ConfigError> {
    if s == 0 || s > 86_400 {
        return Err(ConfigError::Invalid {
            flag,
            value: s.to_string(),
            reason: "must be between 1 and 86400 seconds".into(),
        });
    }
    Ok(Duration::from_secs(s))
}

fn at_least_one(flag: &'static str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(ConfigError::Invalid {
            flag,
            value: "0".into(),
            reason: "must be at least 1".into(),
        });
    }
    Ok(n)
}

role_opts! {
    /// `mqproxy client` options.
    pub struct ClientOpts {
        config,
        {
            /// The mqproxy server, HOST:PORT.
            #[arg(long, env = "MQPROXY_SERVER")]
            pub server: Option<String>,
        }
        metrics, token, token_file,
        {
            /// SOCKS5 listen address (TCP CONNECT and UDP ASSOCIATE) [default: 127.0.0.1:1080].
            #[arg(long)]
            pub socks5: Option<SocketAddr>,
            /// Also accept HTTP CONNECT on this address.
            #[arg(long)]
            pub http: Option<SocketAddr>,
            /// Pin the server certificate by SHA-256 fingerprint (hex, ':' allowed), as the server
            /// logs it at start.
            #[arg(long, value_name = "HEX")]
            pub server_cert_sha256: Option<String>,
            /// Verify the server against the CA certificates in this PEM file.
            #[arg(long, value_name = "FILE")]
            pub ca: Option<PathBuf>,
            /// Name to verify with --ca (and send as SNI) [default: the host part of --server].
            #[arg(long)]
            pub server_name: Option<String>,
            /// Do not verify the server at all. Anyone on the path can then read the token and the
            /// traffic; for tests only.
            #[arg(long)]
            pub insecure: bool,
            /// QUIC idle timeout in seconds; keepalives go out every third of it, at most 5 s apart
            /// [default: 30].
            #[arg(long, value_name = "SECS")]
            pub idle_timeout: Option<u64>,
            /// UDP session idle timeout to ask the server for, in seconds (it applies the smaller
            /// of this and its own) [default: the server's].
            #[arg(long, value_name = "SECS")]
            pub udp_idle_timeout: Option<u64>,
            /// Require this SOCKS5 username (RFC 1929); needs --socks-password.
            #[arg(long, requires = "socks_password")]
            pub socks_user: Option<String>,
            /// SOCKS5 password for --socks-user.
            #[arg(long, env = "MQPROXY_SOCKS_PASSWORD", hide_env_values = true)]
            pub socks_password: Option<String>,
        }
        /// Reach the server through this quic-relay instead of --server: for a server behind a NAT
        /// with no open port. With --server and --path, the relay session is one more path of the
        /// multipath bundle (the server runs --listen and --relay together).
        relay, session, relay_token,
        {
            /// Multipath: reach the server from this local address as one path (repeat for each
            /// network, e.g. --path 192.0.2.10 --path 198.51.100.7; at most 8). Each path is its
            /// own QUIC connection; the server binds them together. TCP flows are striped over all
            /// paths and UDP packets scheduled one by one, so traffic survives the loss of a path.
            /// Without --path: one connection from any address.
            #[arg(long = "path", value_name = "LOCAL_IP")]
            pub path: Vec<std::net::IpAddr>,
            /// How traffic is spread over the paths: minrtt (lowest RTT with room in its congestion
            /// window), backup (the first path while it is alive), wlb (in proportion to measured
            /// bandwidth), redundant (minrtt, and every UDP packet also sent on a second path)
            /// [default: minrtt].
            #[arg(long, value_name = "NAME")]
            pub scheduler: Option<String>,
        }
    }
}

impl ClientOpts {
    /// Reads `--config` (if any) and merges: command line over file over defaults.
    pub fn resolve(self) -> Result<ClientConfig, ConfigError> {
        let file: ClientOpts = load_file(self.config.as_deref())?;
        let shared = shared_of!(self).resolve(shared_of!(file))?;
        let relay = shared.relay;
        let paths = if self.path.is_empty() {
            file.path
        } else {
            self.path
        };
        let server = match (self.server.or(file.server), &relay) {
            // Multipath: the --path paths go to --server, the relay session is one more path.
            (Some(s), Some(_)) if !paths.is_empty() => s,
            (Some(_), Some(_)) => {
                return Err(ConfigError::Conflict(
                    "--server",
                    "--relay (together only with --path: the relay session then joins the direct paths)",
                ))
            }
            (Some(s), None) => s,
            // Only names the server in logs.
            (None, Some(r)) => format!("session {} at relays {:?}", r.session, r.relays),
            (None, None) => {
                return Err(ConfigError::Missing(
                    "--server HOST:PORT (or --relay ADDR --session UUID)",
                ))
            }
        };
        let host = match server.rsplit_once(':') {
            _ if relay.is_some() && paths.is_empty() => String::new(),
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                h.trim_start_matches('[').trim_end_matches(']').to_owned()
            }
            _ => {
                return Err(ConfigError::Invalid {
                    flag: "--server",
                    value: server,
                    reason: "expected HOST:PORT".into(),
                })
            }
        };
        let pin = self.server_cert_sha256.or(file.server_cert_sha256);
        let ca = self.ca.or(file.ca);
        let insecure = self.insecure || file.insecure;
        let verify = match (pin, ca, insecure) {
            (Some(p), None, false) => {
                ClientVerify::Pinned(p.parse().map_err(|_| ConfigError::Invalid {
                    flag: "--server-cert-sha256",
                    value: p.clone(),
                    reason: "expected 64 hex digits (':' separators allowed)".into(),
                })?)
            }
            (None, Some(_), false) if relay.is_some() => {
                return Err(ConfigError::Conflict(
                    "--ca (the relay path has no server name to check; pin with --server-cert-sha256)",
                    "--relay",
                ))
            }
            (None, Some(f), false) => ClientVerify::Ca(f),
            (None, None, true) => ClientVerify::Insecure,
            (None, None, false) => {
                return Err(ConfigError::Missing(
                    "server verification: --server-cert-sha256 HEX (printed by the server), --ca FILE, or --insecure",
                ))
            }
            (Some(_), _, _) => return Err(ConfigError::Conflict("--server-cert-sha256", "--ca/--insecure")),
            (None, Some(_), true) => return Err(ConfigError::Conflict("--ca", "--insecure")),
        };
        let server_name = match (&verify, self.server_name.or(file.server_name)) {
            (_, Some(n)) => n,
            (ClientVerify::Ca(_), None) => host,
            _ => crate::tls::SELF_SIGNED_NAME.to_owned(),
        };
        let mut c = ClientConfig::new(server, shared.token, verify);
        c.server_name = server_name;
        c.relay = relay;
        c.metrics = shared.metrics;
        if let Some(a) = self.socks5.or(file.socks5) {
            c.socks5 = a;
        }
        c.http = self.http.or(file.http);
        if let Some(s) = self.idle_timeout.or(file.idle_timeout) {
            c.idle_timeout = positive_secs("--idle-timeout", s)?;
        }
        if let Some(s) = self.udp_idle_timeout.or(file.udp_idle_timeout) {
            c.udp_idle_timeout = Some(positive_secs("--udp-idle-timeout", s)?);
        }
        let relay_path = usize::from(c.relay.is_some() && !paths.is_empty());
        if paths.len() + relay_path > crate::multipath::sched::MAX_PATHS {
            return Err(ConfigError::Invalid {
                flag: "--path",
                value: format!("{} addresses", paths.len()),
                reason: format!(
                    "at most {} paths{}",
                    crate::multipath::sched::MAX_PATHS,
                    if relay_path == 1 {
                        ", the relay session counting as one"
                    } else {
                        ""
                    }
                ),
            });
        }
        for (i, p) in paths.iter().enumerate() {
            if paths[..i].contains(p) {
                return Err(ConfigError::Invalid {
                    flag: "--path",
                    value: p.to_string(),
                    reason: "given twice; each path needs its own local address".into(),
                });
            }
        }
        c.paths = paths;
        if let Some(s) = self.scheduler.or(file.scheduler) {
            c.scheduler = s.parse().map_err(|reason| ConfigError::Invalid {
                flag: "--scheduler",
                value: s.clone(),
                reason,
            })?;
        }
        match (
            self.socks_user.or(file.socks_user),
            self.socks_password.or(file.socks_password),
        ) {
            (Some(u), Some(p)) => c.socks_auth = Some((u.into_bytes(), p.into_bytes())),
            (None, None) => {}
            _ => {
                return Err(ConfigError::Missing(
                    "--socks-user and --socks-password together",
                ))
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests;
