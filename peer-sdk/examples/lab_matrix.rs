//! `cargo xtask lab matrix`: connects two peer-sdk peers through a relay in the NAT lab for every
//! ordered pair of NAT types and prints the path, connect time and direct share per pair. Needs
//! root (network namespaces) and nftables, like every netlab run.

use clap::Parser;
use netlab::NatType;

#[path = "../tests/support/matrix.rs"]
mod matrix;

/// Every ordered pair (A dials, B listens) of NAT types, `--repeat` times each, in fresh labs.
#[derive(Parser)]
struct Cli {
    /// Connections per ordered pair (each in a new lab, so earlier ones leave no state).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Only these NAT types (repeatable; default: none, full-cone, port-restricted,
    /// port-restricted-open, symmetric, symmetric-sequential).
    #[arg(long = "nat")]
    nats: Vec<NatType>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Quiet unless asked: `RUST_LOG=peer_sdk=debug` shows each attempt's punching.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if let Some(reason) = netlab::lab_unavailable() {
        anyhow::bail!("the NAT lab cannot run here: {reason}");
    }
    let types = if cli.nats.is_empty() {
        NatType::PUNCHABLE.to_vec()
    } else {
        cli.nats
    };
    println!("{}", matrix::header());
    let results = matrix::run(&types, cli.repeat as usize, |r| {
        println!("{}", matrix::row(r));
        for a in r.attempts.iter().filter(|a| a.path.starts_with("failed")) {
            println!("    {}", a.path);
        }
    });
    println!();
    print!("{}", matrix::table(&results));
    Ok(())
}
