//! The dialing peer: joins the listener's session (`examples/listener.rs`), pins its
//! certificate, sends a greeting on a stream and prints the echo. Copy it as a starting point.

use std::net::SocketAddr;

use clap::Parser;
use peer_sdk::{proto::Token, ClientTls, Fingerprint, Options, Uuid};

/// Connects to the listener of a relay session and prints the echo of a greeting. Progress goes
/// to stderr (RUST_LOG=warn quiets it). Ends with an error if the relay does not answer within
/// 10 s, or the listener has not joined the session within 60 s.
#[derive(Debug, Parser)]
struct Args {
    /// The relay's address, e.g. 127.0.0.1:4433.
    #[arg(long)]
    relay: SocketAddr,
    /// The session id both peers share.
    #[arg(long)]
    session: Uuid,
    /// The listener's certificate fingerprint (the line it printed).
    #[arg(long)]
    pin: Fingerprint,
    /// The relay token, if the relay runs with --secret-file (from `quic-relay token`).
    #[arg(long)]
    token: Option<Token>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let mut opts = Options::new(args.relay, args.session);
    opts.token = args.token;
    let conn = peer_sdk::connect(opts, ClientTls::Pinned(args.pin)).await?;

    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"hello, peer").await?;
    send.finish()?;
    let echo = recv.read_to_end(64 * 1024).await?;
    println!(
        "{} (over the {} path)",
        String::from_utf8_lossy(&echo),
        conn.path().kind()
    );
    conn.close(0, b"done").await;
    Ok(())
}
