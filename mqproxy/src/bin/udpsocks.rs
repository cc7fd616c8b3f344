//! `udpsocks`: sends UDP packets to a target through a SOCKS5 proxy's UDP ASSOCIATE, prints
//! each round trip and a summary, and exits non-zero when replies are missing.

#[path = "../../../relay/src/cli_assets.rs"]
mod cli_assets;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{CommandFactory as _, Parser};
use mqproxy::proto::TargetAddr;
use mqproxy::udpsocks::UdpAssociation;

/// Send UDP through a SOCKS5 proxy (UDP ASSOCIATE) and check the replies.
///
/// Each packet carries a sequence number and a pattern; a reply counts when it echoes both
/// (an echo server), or when any reply arrives with --any-reply (e.g. a DNS server).
#[derive(Debug, Parser)]
#[command(name = "udpsocks", version)]
struct Args {
    /// SOCKS5 proxy address.
    #[arg(long, default_value = "127.0.0.1:1080")]
    proxy: SocketAddr,
    /// Destination HOST:PORT (a name is resolved by the proxy's server).
    #[arg(long)]
    target: String,
    /// Payload bytes per packet (at least 8; up to 65,507).
    #[arg(long, default_value_t = 32)]
    send: usize,
    /// Packets to send.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// How long to wait for each reply, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Pause between packets, in milliseconds.
    #[arg(long, default_value_t = 0)]
    interval_ms: u64,
    /// Count any reply, not just an exact echo.
    #[arg(long)]
    any_reply: bool,
    /// SOCKS5 username (RFC 1929).
    #[arg(long, requires = "password")]
    user: Option<String>,
    /// SOCKS5 password.
    #[arg(long)]
    password: Option<String>,
}

fn payload(seq: u32, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|i| (i as u32 ^ seq) as u8).collect();
    p[..4].copy_from_slice(&seq.to_be_bytes());
    p
}

fn main() -> anyhow::Result<ExitCode> {
    // `cargo xtask dist` asks for completions and man pages through the environment.
    if cli_assets::write_if_asked(Args::command())? {
        return Ok(ExitCode::SUCCESS);
    }
    let a = Args::parse();
    mqproxy::logging::init("warn");
    anyhow::ensure!(
        (8..=65_507).contains(&a.send),
        "--send {}: must be between 8 and 65507 bytes",
        a.send
    );
    let target: TargetAddr = a
        .target
        .parse()
        .with_context(|| format!("--target {:?}: expected HOST:PORT", a.target))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let auth = a.user.as_deref().zip(a.password.as_deref());
        let assoc = UdpAssociation::open(a.proxy, auth.map(|(u, p)| (u.as_bytes(), p.as_bytes())))
            .await
            .with_context(|| format!("UDP ASSOCIATE with {}", a.proxy))?;
        println!("relay {} -> {}", assoc.relay_addr(), target);
        let (mut ok, mut rtts) = (0u32, Vec::new());
        for seq in 0..a.count {
            let p = payload(seq, a.send);
            let t0 = Instant::now();
            assoc
                .send_to(&target, &p)
                .await
                .context("sending to the relay")?;
            let deadline = t0 + Duration::from_millis(a.timeout_ms);
            let got = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, assoc.recv_from()).await {
                    Err(_) => break None,
                    Ok(r) => {
                        let (from, data) = r.context("receiving from the relay")?;
                        if a.any_reply || data[..] == p[..] {
                            break Some((from, data.len()));
                        }
                        // A late reply to an earlier packet: keep waiting for this one.
                    }
                }
            };
            match got {
                Some((from, n)) => {
                    let rtt = t0.elapsed();
                    ok += 1;
                    rtts.push(rtt);
                    println!(
                        "seq={seq} bytes={n} from={from} rtt={:.3} ms",
                        rtt.as_secs_f64() * 1e3
                    );
                }
                None => println!("seq={seq} timeout after {} ms", a.timeout_ms),
            }
            if a.interval_ms > 0 {
                tokio::time::sleep(Duration::from_millis(a.interval_ms)).await;
            }
        }
        let lost = a.count - ok;
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        let (min, max) = (rtts.iter().min(), rtts.iter().max());
        let avg = rtts.iter().map(ms).sum::<f64>() / rtts.len().max(1) as f64;
        println!(
            "{} sent, {} received, {:.1}% loss; rtt min/avg/max = {:.3}/{:.3}/{:.3} ms",
            a.count,
            ok,
            100.0 * f64::from(lost) / f64::from(a.count.max(1)),
            min.map_or(0.0, ms),
            avg,
            max.map_or(0.0, ms),
        );
        Ok(if lost == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}
