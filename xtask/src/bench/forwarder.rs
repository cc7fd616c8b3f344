//! The baseline for the relay: the least a userspace UDP relay can do. One thread, `recvmmsg`
//! in, `sendmmsg` out, datagrams sent on unchanged from the receive buffers to a fixed
//! destination: no session table, no parsing. Runs as the hidden task `bench-forwarder` so the
//! benchmark can read its CPU time from /proc exactly as it reads the relay's.
//!
//! Two options make it stand in for the relay in every part of the benchmark: `--return-to`
//! sends datagrams coming from the destination back to one fixed address (for ping-pong), and
//! `--ack` answers every `REG:` datagram with `ACK\n` (for the registration rate).

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use quic_relay::proto;

use super::sys::{self, RecvBatch, Route};
use crate::cli::Args;

pub const SUBCOMMAND: &str = "bench-forwarder";

/// Same as the relay's default `--socket-buffer-bytes`, so neither gets bigger buffers.
pub const DEFAULT_SOCKET_BUFFER: usize = 8 << 20;

/// Read timeout: how often the loop checks its lifetime bound when idle.
const IDLE_CHECK: Duration = Duration::from_millis(100);

/// `bench-forwarder --listen ADDR --to ADDR [--return-to ADDR] [--ack]
/// [--socket-buffer-bytes N] [--max-secs N]`. It stops by itself after `--max-secs` (default
/// 600) in case its parent could not kill it.
pub fn main(args: &[String]) -> Result<()> {
    let mut args = Args::new(args);
    let listen: SocketAddrV4 = args
        .parsed("--listen")?
        .context("--listen ADDR is required")?;
    let to: SocketAddrV4 = args.parsed("--to")?.context("--to ADDR is required")?;
    let return_to: Option<SocketAddrV4> = args.parsed("--return-to")?;
    let ack = args.flag("--ack");
    let buffer = args
        .parsed("--socket-buffer-bytes")?
        .unwrap_or(DEFAULT_SOCKET_BUFFER);
    let max = Duration::from_secs(args.parsed("--max-secs")?.unwrap_or(600));
    args.finish()?;

    let sock = std::net::UdpSocket::bind(listen).with_context(|| format!("bind {listen}"))?;
    sys::set_buffers(&sock, buffer).context("socket buffers")?;
    // The benchmark passes port 0 and reads the bound address from this line.
    eprintln!("bench-forwarder listening addr={}", sock.local_addr()?);
    sock.set_read_timeout(Some(IDLE_CHECK))?;
    let route = |payload: &[u8], src: SocketAddrV4| match return_to {
        _ if ack && proto::is_registration(payload) => Route::Reply(b"ACK\n"),
        Some(back) if src == to => Route::Forward(back),
        _ => Route::Forward(to),
    };
    let mut batch = RecvBatch::new();
    let start = Instant::now();
    while start.elapsed() < max {
        if batch
            .recv(&sock, libc::MSG_WAITFORONE)
            .context("recvmmsg")?
            > 0
        {
            batch.send_routed(&sock, route);
        }
    }
    Ok(())
}
