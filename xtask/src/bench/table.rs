//! The memory baseline for the relay: what a bare `HashMap<SocketAddr, SocketAddr>` (each member
//! maps to its peer, two entries per session, grown by inserting as a relay would) costs per
//! session. Runs as the hidden task `bench-table` so its RSS is not mixed with the benchmark's.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::{Context, Result};

use super::sys;
use crate::cli::Args;

pub const SUBCOMMAND: &str = "bench-table";

/// `bench-table --sessions N`: prints the RSS growth per session in bytes on stdout.
pub fn main(args: &[String]) -> Result<()> {
    let mut args = Args::new(args);
    let sessions: u32 = args
        .parsed("--sessions")?
        .context("--sessions N is required")?;
    args.finish()?;
    let pid = std::process::id();
    let before = sys::rss_bytes(pid)?;
    let addr = |side: u32, k: u32| {
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(0x7f00_0000 | (side << 22) | (k >> 8)),
            k as u16,
        ))
    };
    let mut table = HashMap::new();
    for k in 0..sessions {
        let (a, b) = (addr(1, k), addr(2, k));
        table.insert(a, b);
        table.insert(b, a);
    }
    let after = sys::rss_bytes(pid)?;
    // Keep the table alive until measured, and prove it is complete.
    assert_eq!(table.len(), 2 * sessions as usize);
    println!(
        "{}",
        after.saturating_sub(before) as f64 / f64::from(sessions.max(1))
    );
    Ok(())
}
