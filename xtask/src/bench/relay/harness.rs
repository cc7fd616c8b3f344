//! The harness of `bench relay`: the relay under test and the baseline forwarder as child
//! processes, the measured peers, and the drop counters read around each run.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use quic_relay::proto::Reply;

use super::report::{pct, si};
use super::{Ctx, PEER_A, PEER_B, STARTUP_TIMEOUT};
use crate::bench::forwarder;
use crate::bench::load::{self, LoadReport};
use crate::bench::metrics::{self, Scrape, PUBLISH_PERIOD};
use crate::bench::multiaddr::reg_datagram;
use crate::bench::sys::{self, bind_udp, local_v4};
use crate::process::ChildGuard;

/// The datagram size of the loss, CPU and registration runs: a typical QUIC packet.
pub(super) const DATAGRAM: usize = 1200;
/// Sockets the registration fleets send from: each carries `sessions / 64` addresses per side.
pub(super) const FLEET_SOCKETS: usize = 64;

// The relay under test

/// A relay child process on 127.0.0.1 with a metrics endpoint; killed when dropped.
#[derive(Debug)]
pub(super) struct Relay {
    pub(super) child: ChildGuard,
    pub(super) addr: SocketAddrV4,
    pub(super) metrics: SocketAddr,
}

impl Relay {
    /// Starts a fresh relay (a fresh session table per part keeps the parts independent),
    /// with limits raised so that only capacity, not policy, is measured.
    pub(super) fn start(ctx: &Ctx, tag: &str) -> Result<Relay> {
        Self::start_on(ctx, tag, ctx.server_cpu)
    }

    /// [`Relay::start`] on CPU `cpu` (any, if `None`).
    pub(super) fn start_on(ctx: &Ctx, tag: &str, cpu: Option<usize>) -> Result<Relay> {
        // Port 0 for both: the relay binds free ports itself and logs them (read below).
        let mut cmd = Command::new(&ctx.relay_bin);
        cmd.args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--metrics", "127.0.0.1:0"])
            // Room for the memory part's sessions, or the registration part's three floods.
            .args([
                "--max-sessions",
                &(2 * ctx.plan.memory_sessions).max(2_000_000).to_string(),
            ])
            .args(["--max-sessions-per-ip", "10000000"])
            .args([
                "--reg-rate-per-ip",
                // The flag's ceiling; each fleet address sends one REG at a time anyway.
                "1000000",
                "--reg-burst-per-ip",
                "100000000",
            ]);
        if std::env::var_os("RUST_LOG").is_none() {
            // Per-registration logging (debug) would cost the relay CPU we are measuring; info
            // has the startup lines with the bound addresses and nothing per packet or session.
            cmd.env("RUST_LOG", "warn,quic_relay=info");
        }
        if let Some(cpu) = cpu {
            crate::process::pin_command(&mut cmd, cpu)?;
        }
        let log = ctx.log_dir.join(format!("{tag}.log"));
        let mut child = ChildGuard::spawn(cmd, "quic-relay", &log)?;
        let addr: SocketAddrV4 = child
            .wait_logged("relay socket bound", "local_addr", STARTUP_TIMEOUT)?
            .parse()
            .context("the relay's logged UDP address")?;
        let metrics: SocketAddr = child
            .wait_logged("metrics at", "addr", STARTUP_TIMEOUT)?
            .parse()
            .context("the relay's logged metrics address")?;
        let start = Instant::now();
        loop {
            child.check_alive()?;
            match metrics::scrape(metrics) {
                Ok(_) => break,
                Err(e) if start.elapsed() > STARTUP_TIMEOUT => {
                    return Err(e).context(format!(
                        "relay did not serve metrics; see {}",
                        log.display()
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        Ok(Relay {
            child,
            addr,
            metrics,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// A scrape that includes everything up to now (waits one publishing period first).
    pub(super) fn scrape_current(&mut self) -> Result<Scrape> {
        std::thread::sleep(PUBLISH_PERIOD + PUBLISH_PERIOD / 2);
        self.child.check_alive()?;
        metrics::scrape(self.metrics)
    }
}

/// A command running `program`, or `wrapper[0]` with the rest of `wrapper` and then `program`
/// as its arguments when `wrapper` is not empty.
pub(super) fn wrapped(wrapper: &[String], program: &std::path::Path) -> Command {
    match wrapper.split_first() {
        None => Command::new(program),
        Some((tool, args)) => {
            let mut cmd = Command::new(tool);
            cmd.args(args).arg(program);
            cmd
        }
    }
}

pub(super) fn peer_socket(ip: Ipv4Addr) -> Result<UdpSocket> {
    bind_udp(SocketAddrV4::new(ip, 0))
}

/// Registers `a` and `b` as the two members of a new session (original form, retried: a REG
/// or its ACK may be lost like any datagram).
pub(super) fn register_pair(relay: SocketAddrV4, a: &UdpSocket, b: &UdpSocket) -> Result<()> {
    let reg = reg_datagram(load::random_u64(), load::random_u64());
    let mut buf = [0u8; 256];
    for sock in [a, b] {
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let acked = (0..30).any(|_| {
            if sock.send_to(&reg, relay).is_err() {
                return false;
            }
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    from == SocketAddr::V4(relay)
                        && matches!(Reply::parse(&buf[..n]), Some(Reply::Ack { .. }))
                }
                Err(_) => false,
            }
        });
        if !acked {
            bail!(
                "relay at {relay} did not ACK a registration from {}",
                sock.local_addr()?
            );
        }
    }
    Ok(())
}

/// Two fresh peer sockets registered as one session.
pub(super) fn relay_pair(relay: &Relay) -> Result<(UdpSocket, UdpSocket)> {
    let (a, b) = (peer_socket(PEER_A)?, peer_socket(PEER_B)?);
    register_pair(relay.addr, &a, &b)?;
    Ok((a, b))
}

pub(super) fn direct_pair() -> Result<(UdpSocket, UdpSocket)> {
    Ok((peer_socket(PEER_A)?, peer_socket(PEER_B)?))
}

// ---------------------------------------------------------------------------------------------
// The baseline forwarder

/// The minimal forwarder (see [`forwarder`]) as a child process on its own loopback port;
/// killed when dropped.
pub(super) struct Forwarder {
    pub(super) child: ChildGuard,
    pub(super) addr: SocketAddrV4,
}

impl Forwarder {
    /// Starts a forwarder from `a` to `b` (and from `b` back to `a`); with `ack` it also answers
    /// registrations. Returns once a probe from `a` has reached `b` through it.
    pub(super) fn start(ctx: &Ctx, a: &UdpSocket, b: &UdpSocket, ack: bool) -> Result<Forwarder> {
        Self::start_on(ctx, a, b, ack, ctx.server_cpu)
    }

    /// [`Forwarder::start`] on CPU `cpu` (any, if `None`).
    pub(super) fn start_on(
        ctx: &Ctx,
        a: &UdpSocket,
        b: &UdpSocket,
        ack: bool,
        cpu: Option<usize>,
    ) -> Result<Forwarder> {
        Self::start_wrapped(ctx, a, b, ack, cpu, &[])
    }

    /// [`Forwarder::start_on`], run by the program and arguments in `wrapper` (e.g. valgrind)
    /// when it is not empty.
    pub(super) fn start_wrapped(
        ctx: &Ctx,
        a: &UdpSocket,
        b: &UdpSocket,
        ack: bool,
        cpu: Option<usize>,
        wrapper: &[String],
    ) -> Result<Forwarder> {
        let mut cmd = wrapped(wrapper, &ctx.xtask_bin);
        cmd.args([forwarder::SUBCOMMAND, "--listen", "127.0.0.1:0"])
            .args(["--to", &local_v4(b)?.to_string()])
            .args(["--return-to", &local_v4(a)?.to_string()])
            .args(["--max-secs", "300"]);
        if ack {
            cmd.arg("--ack");
        }
        if let Some(cpu) = cpu {
            crate::process::pin_command(&mut cmd, cpu)?;
        }
        let log = ctx.log_dir.join("forwarder.log");
        let mut child = ChildGuard::spawn(cmd, "bench-forwarder", &log)?;
        let addr: SocketAddrV4 = child
            .wait_logged("bench-forwarder listening", "addr", STARTUP_TIMEOUT)?
            .parse()
            .context("the forwarder's logged address")?;
        b.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut buf = [0u8; 64];
        for _ in 0..200 {
            child.check_alive()?;
            a.send_to(b"probe", addr)?;
            if matches!(b.recv_from(&mut buf), Ok((5, _))) {
                return Ok(Forwarder { child, addr });
            }
        }
        bail!("the baseline forwarder on {addr} did not start forwarding")
    }
}

/// The kernel's drop counters of the sockets along a path, read before and after a run, to show
/// where datagrams were lost (a full receive buffer at the relay, or at our receiver).
pub(super) struct PathDrops(Vec<(&'static str, u16, u64)>);

pub(super) trait LocalPort {
    fn port(&self) -> Result<u16>;
}

impl LocalPort for UdpSocket {
    fn port(&self) -> Result<u16> {
        Ok(self.local_addr()?.port())
    }
}

impl LocalPort for SocketAddrV4 {
    fn port(&self) -> Result<u16> {
        Ok(SocketAddrV4::port(self))
    }
}

impl PathDrops {
    pub(super) fn start(sockets: &[(&'static str, &dyn LocalPort)]) -> Result<Self> {
        let mut v = Vec::new();
        for (name, s) in sockets {
            let port = s.port()?;
            v.push((*name, port, sys::udp_drops(&[port])?));
        }
        Ok(PathDrops(v))
    }

    pub(super) fn report(&self) -> Result<String> {
        let mut parts = Vec::new();
        for (name, port, before) in &self.0 {
            parts.push(format!(
                "{name} {}",
                sys::udp_drops(&[*port])?.saturating_sub(*before)
            ));
        }
        Ok(parts.join(", "))
    }
}

pub(super) fn describe(r: &LoadReport) -> String {
    let mut s = format!(
        "loss {} ({}/{} at {}/s",
        pct(r.loss()),
        r.received,
        r.sent,
        si(r.offered_rate())
    );
    if r.skipped > 0 {
        let _ = write!(s, ", sender starved: {} not sent", r.skipped);
    }
    if r.send_errors > 0 {
        let _ = write!(s, ", {} send errors", r.send_errors);
    }
    if r.duplicates > 0 {
        let _ = write!(s, ", {} duplicates", r.duplicates);
    }
    s.push(')');
    s
}

pub(super) fn dropped(before: &Scrape, after: &Scrape) -> String {
    let delta: Vec<String> = after
        .family("quic_relay_dropped_packets_total")
        .into_iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(&k);
            let reason = k.split('"').nth(1).unwrap_or(&k).to_owned();
            (d > 0.0).then(|| format!("{reason}={d}"))
        })
        .collect();
    if delta.is_empty() {
        "0".to_owned()
    } else {
        delta.join(" ")
    }
}
