//! `udp-over-tcp`: tunnels UDP datagrams over one TCP connection, a drop-in for the original
//! tool (same flags and defaults, `plain` framing byte-compatible), plus the per-flow fork's
//! and Mullvad's framings and an optional pre-shared key.

// One file for every binary of the workspace (relay, mqproxy's, this one).
#[path = "../../relay/src/cli_assets.rs"]
mod cli_assets;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, CommandFactory as _, Parser};
use udp_over_tcp::framing::Framing;
use udp_over_tcp::tunnel::{self, TcpRole, Tunnel, TunnelConfig};

/// Tunnel UDP datagrams over TCP, both ways, keeping datagram boundaries and ports.
///
/// Run it on both hosts, one with --tcp-listen and one with --tcp-connect. Each side binds
/// --udp-bind, forwards what arrives there through the tunnel, and sends what comes out of the
/// tunnel to --udp-sendto from that same socket (so the source port is preserved). Example:
///
///   Y$ udp-over-tcp --tcp-listen 7878 --udp-bind $A --udp-sendto $B
///   X$ udp-over-tcp --tcp-connect Y:7878 --udp-bind $B --udp-sendto $A
///
/// Addresses are PORT or ADDR:PORT (IPv6 in brackets, `[::1]:PORT`); a bare port means 0.0.0.0 for
/// --tcp-listen/--udp-bind and 127.0.0.1 for --tcp-connect/--udp-sendto. The connect side
/// reconnects by itself (with backoff) whenever the connection drops.
#[derive(Debug, Parser)]
#[command(name = "udp-over-tcp", version, verbatim_doc_comment, group(ArgGroup::new("tcp").required(true).args(["tcp_listen", "tcp_connect"])))]
struct Args {
    /// Accept the tunnel's TCP connection here (PORT or ADDR:PORT). The newest connection (with
    /// --psk: the newest authenticated one) carries the tunnel.
    #[arg(short = 'l', long, value_name = "ADDR")]
    tcp_listen: Option<String>,
    /// Connect the tunnel to this TCP address (PORT or HOST:PORT), reconnecting as needed.
    #[arg(short = 't', long, value_name = "ADDR")]
    tcp_connect: Option<String>,
    /// Local UDP socket: PORT or ADDR:PORT; `auto` (listen side, --framing flow) opens one socket
    /// per client flow instead, closed after --flow-idle.
    #[arg(short = 'u', long, value_name = "ADDR")]
    udp_bind: String,
    /// Where datagrams leaving the tunnel go: PORT or ADDR:PORT; `IP:auto` (--framing flow)
    /// sends to IP at the port the datagram came from on the other side.
    #[arg(short = 'p', long, value_name = "ADDR")]
    udp_sendto: String,
    /// Wire format: plain (u32 LE length; the original udp-over-tcp), flow (the per-flow fork:
    /// u32 LE length of source port + source IP + payload, then those) or mullvad (u16 BE
    /// length; udp2tcp/tcp2udp).
    /// Both sides must agree.
    #[arg(long, default_value = "plain", env = "UDP_OVER_TCP_FRAMING")]
    framing: Framing,
    /// Pre-shared key, the same on both sides: a challenge/response (HMAC-SHA256) at connection
    /// start, so nobody without the key can replace the tunnel. Without it the wire is exactly
    /// the original's. Pending handshakes: 64, 4 per source address; a newcomer closes the
    /// oldest. Prefer the environment variable to keep the key out of `ps`.
    #[arg(long, env = "UDP_OVER_TCP_PSK", hide_env_values = true)]
    psk: Option<String>,
    /// Close a per-flow socket (--udp-bind auto) after this many seconds without traffic.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    flow_idle: u64,
    /// Log connections and flows (info); RUST_LOG overrides.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Log every datagram (trace); RUST_LOG overrides.
    #[arg(long)]
    debug: bool,
}

fn main() -> anyhow::Result<()> {
    // `cargo xtask dist` asks for completions and man pages through the environment.
    if cli_assets::write_if_asked(Args::command())? {
        return Ok(());
    }
    let a = Args::parse();
    let level = if a.debug {
        "udp_over_tcp=trace"
    } else if a.verbose {
        "udp_over_tcp=debug"
    } else {
        "warn"
    };
    netkit::logging::init(level);
    let tcp = match (&a.tcp_listen, &a.tcp_connect) {
        (Some(l), None) => TcpRole::Listen(
            tunnel::parse_endpoint(l, std::net::Ipv4Addr::UNSPECIFIED.into())
                .context("--tcp-listen")?,
        ),
        (None, Some(c)) => TcpRole::Connect(tunnel::parse_tcp_connect(c).context("--tcp-connect")?),
        _ => anyhow::bail!("give exactly one of --tcp-listen and --tcp-connect"),
    };
    let mut cfg = TunnelConfig::new(
        tcp,
        tunnel::parse_udp_bind(&a.udp_bind).context("--udp-bind")?,
        tunnel::parse_udp_sendto(&a.udp_sendto).context("--udp-sendto")?,
    );
    cfg.framing = a.framing;
    cfg.flow_idle = Duration::from_secs(a.flow_idle.max(1));
    if let Some(k) = a.psk {
        anyhow::ensure!(
            !k.is_empty(),
            "--psk is empty: give a key, or leave the flag out"
        );
        cfg.psk = Some(k.into_bytes());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let t = Tunnel::bind(cfg).await?;
        let udp: Option<SocketAddr> = t.udp_local_addr();
        tracing::info!(udp = ?udp, tcp = ?t.tcp_local_addr(), framing = %a.framing, "udp-over-tcp running");
        t.run(shutdown()).await;
        anyhow::Ok(())
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
