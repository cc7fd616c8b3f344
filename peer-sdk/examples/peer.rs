//! `peer`: a listener that echoes, and a dialer that measures, over a peer-sdk connection.
//!
//! ```text
//! peer listen  --relay ADDR[,ADDR6] [--relay ...] --session UUID   # prints {"fingerprint":"<hex>"} first
//! peer connect --relay ADDR[,ADDR6] [--relay ...] --session UUID --pin HEX --bytes N
//!              [--datagrams N] [--relay-only] [--direct-timeout-ms MS] [--tcp auto|never|always]
//! ```
//! `--relay` repeats for several relays (tried, and failed over, in the order both peers share);
//! `ADDR,ADDR6` names one relay by its addresses in both IP families.
//! The dialer prints one JSON line: `{"path":"direct"|"relay"|"relay-tcp","connect_ms":..,"bytes":..,
//! "secs":..,"mbps":..,"datagrams":..}` and exits non-zero on any failure.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::{Parser, Subcommand};
use peer_sdk::{
    ClientTls, Fingerprint, Identity, Options, Peer, PeerConnection, ServerTls, Strategy,
    TcpFallback, Uuid,
};

#[derive(Debug, Parser)]
#[command(about = "Echo listener and measuring dialer over peer-sdk")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Args)]
struct Common {
    /// A relay's UDP address; repeat for several relays (failover, drain). `ADDR,OTHER` gives
    /// the same relay's address in the other IP family too (a dual-stack peer registers at both).
    #[arg(long = "relay", required = true, value_parser = parse_relay)]
    relays: Vec<(SocketAddr, Option<SocketAddr>)>,
    /// The session both peers name.
    #[arg(long)]
    session: Uuid,
    /// Use only the relay (no hole punching).
    #[arg(long)]
    relay_only: bool,
    /// How long to try hole punching before using the relay.
    #[arg(long, default_value_t = 1000)]
    direct_timeout_ms: u64,
    /// Relay token (`<expiry>:<hex mac>`), when the relay requires one.
    #[arg(long)]
    token: Option<String>,
    /// TCP to the relay: `auto` (when UDP registration gets no answer), `never`, `always`.
    #[arg(long, value_enum, default_value_t = Tcp::Auto)]
    tcp: Tcp,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Tcp {
    Auto,
    Never,
    Always,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Accept connections and echo every stream and datagram, until killed.
    Listen {
        #[command(flatten)]
        common: Common,
    },
    /// Connect, send data, check the echo, print a JSON summary.
    Connect {
        #[command(flatten)]
        common: Common,
        /// The listener's certificate fingerprint (SHA-256 hex), from its first output line.
        #[arg(long)]
        pin: Fingerprint,
        /// Bytes to send over one stream (echo checked byte for byte).
        #[arg(long, default_value_t = 1 << 20)]
        bytes: u64,
        /// Datagrams to send (each echo checked).
        #[arg(long, default_value_t = 0)]
        datagrams: u32,
    },
}

/// `ADDR` or `ADDR,OTHER_FAMILY_ADDR`.
fn parse_relay(s: &str) -> Result<(SocketAddr, Option<SocketAddr>), String> {
    let addr = |a: &str| a.parse::<SocketAddr>().map_err(|e| format!("{a:?}: {e}"));
    match s.split_once(',') {
        None => Ok((addr(s)?, None)),
        Some((a, b)) => Ok((addr(a)?, Some(addr(b)?))),
    }
}

fn options(c: &Common) -> anyhow::Result<Options> {
    let (first, _) = *c.relays.first().context("--relay is required")?;
    let mut o = Options::new(first, c.session);
    o.relays = c.relays.iter().map(|&(a, _)| a).collect();
    o.relay_other_family = c
        .relays
        .iter()
        .filter_map(|&(a, b)| b.map(|b| (a, b)))
        .collect();
    o.direct_timeout = Duration::from_millis(c.direct_timeout_ms);
    if c.relay_only {
        o.strategy = Strategy::RelayOnly;
    }
    o.tcp_fallback = match c.tcp {
        Tcp::Auto => TcpFallback::Auto,
        Tcp::Never => TcpFallback::Never,
        Tcp::Always => TcpFallback::Always,
    };
    if let Some(t) = &c.token {
        o.token = Some(
            t.parse::<peer_sdk::proto::Token>()
                .ok()
                .context("--token is <expiry>:<64 hex digits mac>")?,
        );
    }
    Ok(o)
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded per process from the OS: enough for an id, without a dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish() | 1
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Listen { common } => listen(&common).await,
        Cmd::Connect {
            common,
            pin,
            bytes,
            datagrams,
        } => connect(&common, pin, bytes, datagrams).await,
    }
}

async fn listen(common: &Common) -> anyhow::Result<()> {
    let identity = Identity::generate()?;
    println!(
        "{}",
        serde_json::json!({ "fingerprint": identity.fingerprint().to_string() })
    );
    std::io::stdout().flush()?;
    // One peer id for every accept: each new socket takes over this listener's old slot.
    let mut opts = options(common)?;
    opts.peer_id = Some(rand_id());
    loop {
        let peer = Peer::bind(opts.clone()).await?;
        let conn = peer.accept(ServerTls::Identity(identity.clone())).await?;
        eprintln!("peer connected over the {} path", conn.path().kind());
        // The listener's own path, for tests and operators (stdout is the dialer's report).
        println!(
            "{}",
            serde_json::json!({ "accepted_path": conn.path().kind() })
        );
        std::io::stdout().flush()?;
        serve(conn).await;
    }
}

async fn serve(conn: PeerConnection) {
    let datagrams = {
        let c = conn.connection().clone();
        tokio::spawn(async move {
            while let Ok(d) = c.read_datagram().await {
                let _ = c.send_datagram(d);
            }
        })
    };
    let mut streams = tokio::task::JoinSet::new();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        streams.spawn(async move {
            let _ = tokio::io::copy(&mut recv, &mut send).await;
            let _ = send.finish();
            let _ = send.stopped().await;
        });
    }
    datagrams.abort();
    streams.shutdown().await;
}

async fn connect(
    common: &Common,
    pin: Fingerprint,
    bytes: u64,
    datagrams: u32,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let conn = peer_sdk::connect(options(common)?, ClientTls::Pinned(pin)).await?;
    let connect_ms = started.elapsed().as_secs_f64() * 1e3;
    let path = conn.path_at_connect().kind();

    let t = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let pattern = |i: u64| (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    let writer = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            for (k, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(sent + k as u64);
            }
            send.write_all(&buf[..n]).await?;
            sent += n as u64;
        }
        send.finish()?;
        anyhow::Ok(())
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while let Some(n) = recv.read(&mut buf).await? {
            for (k, b) in buf[..n].iter().enumerate() {
                ensure!(
                    *b == pattern(got + k as u64),
                    "echo differs at byte {}",
                    got + k as u64
                );
            }
            got += n as u64;
        }
        ensure!(got == bytes, "echo ended after {got} of {bytes} bytes");
        anyhow::Ok(())
    };
    tokio::try_join!(writer, reader)?;
    let secs = t.elapsed().as_secs_f64();

    let echoed = echo_datagrams(conn.connection(), datagrams).await?;
    println!(
        "{}",
        serde_json::json!({
            "path": path,
            "path_now": conn.path().kind(),
            "connect_ms": (connect_ms * 10.0).round() / 10.0,
            "bytes": bytes,
            "secs": secs,
            "mbps": bytes as f64 * 8.0 / secs / 1e6,
            "datagrams": echoed,
        })
    );
    conn.close(0, b"done").await;
    Ok(())
}

/// Sends `n` numbered datagrams in windows, resending those whose echo did not come back
/// (datagrams are unreliable by design), and fails if any is still missing after 5 rounds.
async fn echo_datagrams(c: &peer_sdk::quinn::Connection, n: u32) -> anyhow::Result<u32> {
    let mut missing: std::collections::BTreeSet<u32> = (0..n).collect();
    for _round in 0..5 {
        if missing.is_empty() {
            break;
        }
        let batch: Vec<u32> = missing.iter().copied().collect();
        for chunk in batch.chunks(64) {
            for &i in chunk {
                let mut d = vec![0u8; 512];
                d[..4].copy_from_slice(&i.to_be_bytes());
                c.send_datagram(d.into())?;
            }
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while chunk.iter().any(|i| missing.contains(i)) {
                match tokio::time::timeout_at(deadline, c.read_datagram()).await {
                    Ok(Ok(d)) if d.len() == 512 => {
                        missing.remove(&u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => break,
                }
            }
        }
    }
    if !missing.is_empty() {
        bail!("{} of {n} datagrams never echoed", missing.len());
    }
    Ok(n)
}
