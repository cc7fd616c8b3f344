//! `mqproxy`: the command-line front end (`mqproxy server ...`, `mqproxy client ...`); parses
//! options, installs logging and signal handling, and runs the library.

#[path = "../../../relay/src/cli_assets.rs"]
mod cli_assets;

use anyhow::Context;
use clap::{CommandFactory as _, Parser, Subcommand};
use mqproxy::config::{ClientOpts, ServerOpts};

/// SOCKS5 (TCP and UDP ASSOCIATE) and HTTP CONNECT over QUIC.
///
/// Run `mqproxy server` on a reachable host and `mqproxy client` next to the applications;
/// point the applications at the client's SOCKS5 (or HTTP) listener. Logs go to stderr;
/// RUST_LOG=debug shows each connection and session.
#[derive(Debug, Parser)]
#[command(name = "mqproxy", version)]
struct Cli {
    #[command(subcommand)]
    role: Role,
    /// Threads running the proxy [default: 1]. One QUIC connection is always driven by one
    /// thread at a time, so for one busy client more threads only add hand-offs between them
    /// (measured on loopback: ~25 % more CPU per byte with 2). Raise it on a server with several
    /// cores and many clients busy at once.
    #[arg(long, global = true, value_name = "N", env = "MQPROXY_THREADS")]
    threads: Option<std::num::NonZeroUsize>,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Accept QUIC connections from clients and make their TCP connections and UDP flows.
    Server(ServerOpts),
    /// Offer SOCKS5/HTTP CONNECT locally and carry the traffic to a server over QUIC.
    Client(ClientOpts),
}

fn main() -> anyhow::Result<()> {
    // Before any thread starts: glibc reads its parameters once per arena.
    let malloc_tuned = mqproxy::alloc::tune();
    // `cargo xtask dist` asks for completions and man pages through the environment.
    if cli_assets::write_if_asked(Cli::command())? {
        return Ok(());
    }
    let cli = Cli::parse();
    mqproxy::logging::init("info");
    tracing::debug!(
        malloc_tuned,
        mmap_threshold = mqproxy::alloc::MMAP_THRESHOLD,
        trim_threshold = mqproxy::alloc::TRIM_THRESHOLD,
        "allocator settings (not applied where MALLOC_*_THRESHOLD_ is set or off glibc)"
    );
    let rt = match cli.threads.map_or(1, std::num::NonZeroUsize::get) {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    }
    .enable_all()
    .build()
    .context("starting the async runtime")?;
    rt.block_on(async {
        match cli.role {
            Role::Server(opts) => {
                let cfg = opts.resolve().context("server configuration")?;
                if cfg.also_listen {
                    let mut server =
                        mqproxy::server::Server::bind(cfg).context("starting the server")?;
                    let relay = server
                        .relay_front()
                        .await
                        .context("registering with the relay")?;
                    // One signal stops both front ends.
                    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                        let _ = rx.wait_for(|s| *s).await;
                    };
                    let signal = async {
                        shutdown_signal().await;
                        let _ = stop_tx.send(true);
                    };
                    tokio::join!(
                        signal,
                        server.run(stopped(stop_rx.clone())),
                        relay.run(stopped(stop_rx))
                    );
                } else if cfg.relay.is_some() {
                    let server = mqproxy::server::RelayServer::bind(cfg)
                        .await
                        .context("starting the server in the relay session")?;
                    server.run(shutdown_signal()).await;
                } else {
                    let server =
                        mqproxy::server::Server::bind(cfg).context("starting the server")?;
                    server.run(shutdown_signal()).await;
                }
            }
            Role::Client(opts) => {
                let cfg = opts.resolve().context("client configuration")?;
                if cfg.relay.is_some() && !cfg.paths.is_empty() {
                    let client = mqproxy::client::Client::bind_paths_with_relay(cfg)
                        .await
                        .context("starting the client")?;
                    client.run(shutdown_signal()).await;
                } else if cfg.relay.is_some() {
                    let client = mqproxy::client::Client::bind_relay(cfg)
                        .await
                        .context("starting the client")?;
                    client.run(shutdown_signal()).await;
                } else {
                    let client = mqproxy::client::Client::bind(cfg)
                        .await
                        .context("starting the client")?;
                    client.run(shutdown_signal()).await;
                }
            }
        }
        Ok(())
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler succeeds in a normal process");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
