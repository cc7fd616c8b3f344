//! The smallest complete pair of peers, one binary with two roles: `echo listen` registers a
//! session at the relay, prints its certificate pin and echoes every stream; `echo dial` joins
//! that session, pins the listener's certificate, sends a greeting on a stream and prints the
//! echo. Copy it as a starting point.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};
use peer_sdk::{proto::Token, ClientTls, Fingerprint, Identity, Options, ServerTls, Uuid};

/// Two peers meeting through a relay: one listens, the other dials and gets its greeting
/// echoed. Progress goes to stderr (RUST_LOG=warn quiets it).
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Waits for a dialer in a relay session and echoes its streams.
    ///
    /// Prints the pin for the dialer's --pin on stdout. Ends with an error if the relay does not answer within 10 s;
    /// waits for the dialer without a limit, and ends when the dialer closes the connection.
    Listen {
        #[command(flatten)]
        relay: Relay,
    },
    /// Connects to the listener of a relay session and prints the echo of a greeting.
    ///
    /// Ends with an error if the relay does not answer within 10 s, or the listener has not joined
    /// the session within 60 s.
    Dial {
        #[command(flatten)]
        relay: Relay,
        /// The listener's certificate fingerprint (the line it printed).
        #[arg(long)]
        pin: Fingerprint,
    },
}

/// Where the two peers meet: both roles take the same three flags.
#[derive(Debug, Args)]
struct Relay {
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

impl Relay {
    fn options(self) -> Options {
        let mut opts = Options::new(self.relay, self.session);
        opts.token = self.token;
        opts
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().role {
        Role::Listen { relay } => listen(relay.options()).await,
        Role::Dial { relay, pin } => dial(relay.options(), pin).await,
    }
}

async fn listen(opts: Options) -> anyhow::Result<()> {
    // A fresh self-signed certificate; the dialer pins its fingerprint.
    let identity = Identity::generate()?;
    println!("{}", identity.fingerprint());
    let conn = peer_sdk::accept(opts, ServerTls::Identity(identity)).await?;

    // Echo every stream until the dialer closes the connection.
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        tokio::io::copy(&mut recv, &mut send).await?;
        send.finish()?;
    }
    Ok(())
}

async fn dial(opts: Options, pin: Fingerprint) -> anyhow::Result<()> {
    let conn = peer_sdk::connect(opts, ClientTls::Pinned(pin)).await?;

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
