//! The `quic-relay` binary: parses flags, installs logging and signal handlers, runs the relay.

use std::sync::Arc;

mod cli_assets;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use quic_relay::config::{Cli, Command};
use quic_relay::metrics;
use quic_relay::server::Server;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

fn main() -> anyhow::Result<()> {
    if cli_assets::write_if_asked(Cli::command())
        .context("cannot write completions and man pages")?
    {
        return Ok(());
    }
    let cli = Cli::parse();
    let args = match cli.command {
        None => cli.server,
        Some(Command::Session) => {
            println!("{}", new_session()?);
            return Ok(());
        }
        Some(Command::Token(t)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("the system clock is before 1970")?
                .as_secs();
            println!("{}", t.mint(now)?);
            return Ok(());
        }
    };
    netkit::logging::init("info");

    let config = args.relay_config()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Signal handlers first: "listening" is logged only once a SIGTERM would be clean.
        let mut sigterm =
            signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
        let mut sigint =
            signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
        // Drain mode for planned maintenance (PROTOCOL.md §5.2): on with SIGUSR1, off with SIGUSR2.
        let mut drain_on =
            signal(SignalKind::user_defined1()).context("cannot install SIGUSR1 handler")?;
        let mut drain_off =
            signal(SignalKind::user_defined2()).context("cannot install SIGUSR2 handler")?;
        let server = Server::bind_with_tcp(
            args.listen_addr(),
            config.clone(),
            args.socket_buffer_bytes,
            args.tcp_config(),
        )?;
        let metrics_data = server.metrics();
        let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics_task = match args.metrics {
            None => None,
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                    format!("cannot listen for --metrics on TCP {addr}: is the port taken?")
                })?;
                // The bound address, so `--metrics 127.0.0.1:0` reports its port.
                let addr = listener.local_addr().unwrap_or(addr);
                info!(%addr, "metrics at http://{addr}/metrics");
                Some(tokio::spawn(metrics::serve(
                    listener,
                    Arc::clone(&metrics_data),
                    async {
                        let _ = metrics_stopped.await;
                    },
                )))
            }
        };
        server.set_draining(args.drain);
        let mut relay = server.spawn()?;
        info!(
            addr = %relay.local_addr(),
            session_timeout_secs = args.session_timeout_secs,
            unpaired_timeout_secs = args.unpaired_timeout_secs,
            max_sessions = args.max_sessions,
            max_sessions_per_ip = args.max_sessions_per_ip,
            reg_rate_per_ip = args.reg_rate_per_ip,
            tokens_required = !config.secrets.is_empty(),
            tcp = !args.no_tcp,
            draining = args.drain,
            "quic-relay listening"
        );
        let reason = loop {
            tokio::select! {
                _ = sigterm.recv() => break "SIGTERM",
                _ = sigint.recv() => break "SIGINT",
                () = relay.exited() => break "relay thread ended",
                _ = drain_on.recv() => relay.set_draining(true),
                _ = drain_off.recv() => relay.set_draining(false),
            }
        };
        info!(reason, "shutting down");
        let clean = relay.shutdown();
        let _ = stop_metrics.send(());
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        anyhow::ensure!(clean, "the relay thread panicked");
        Ok(())
    })
}

/// A random (version 4) session id from the kernel's random source.
fn new_session() -> anyhow::Result<uuid::Uuid> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for a random session id")?;
    Ok(uuid::Builder::from_random_bytes(bytes).into_uuid())
}
