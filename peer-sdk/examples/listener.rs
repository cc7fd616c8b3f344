//! The listening peer: registers a session at the relay, prints its certificate pin, and echoes
//! what the dialer (`examples/dialer.rs`) sends on each stream. Copy it as a starting point.

use std::net::SocketAddr;

use clap::Parser;
use peer_sdk::{proto::Token, Identity, Options, ServerTls, Uuid};

/// Waits for a dialer in a relay session and echoes its streams. Prints the pin for the
/// dialer's --pin on stdout; progress goes to stderr (RUST_LOG=warn quiets it). Ends with an
/// error if the relay does not answer within 10 s; waits for the dialer without a limit.
#[derive(Debug, Parser)]
struct Args {
    /// The relay's address, e.g. 127.0.0.1:4433.
    #[arg(long)]
    relay: SocketAddr,
    /// The session id both peers share (e.g. from `quic-relay session`).
    #[arg(long)]
    session: Uuid,
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

    // A fresh self-signed certificate; the dialer pins its fingerprint.
    let identity = Identity::generate()?;
    println!("{}", identity.fingerprint());
    let mut opts = Options::new(args.relay, args.session);
    opts.token = args.token;
    let conn = peer_sdk::accept(opts, ServerTls::Identity(identity)).await?;

    // Echo every stream until the dialer closes the connection.
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tokio::io::copy(&mut recv, &mut send).await?;
        send.finish()?;
    }
    Ok(())
}
