//! Probe servers in the relay namespace and the client probes that classify a NAT: what public
//! address a socket gets (a tiny STUN), whether that depends on the destination (mapping), and
//! who may send to it unasked (filtering).
//!
//! Wire format, ASCII over UDP, one datagram each way:
//! - `netlab probe NONCE` -> `netlab seen NONCE IP:PORT` (the request's source as the server saw it)
//! - `netlab filter NONCE` -> the same reply, plus `netlab alt-port NONCE` from the same address on
//!   [`PROBE_ALT_PORT`] and `netlab alt-addr NONCE` from [`RELAY_IP2`]:[`PROBE_PORT`], neither of
//!   which the client has sent to.
//!
//! Over TCP, a connection to [`RELAY_IP`]:[`PROBE_PORT`] receives `netlab seen IP:PORT\n`.

use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tracing::{trace, warn};

use crate::sys;
use crate::workers::{readable_unless_stopped, Workers, STOP_POLL};

/// The relay host's first public address; probe servers listen on it, and it is where a test
/// runs its relay.
pub const RELAY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The relay host's second public address: the other destination of the mapping check and the
/// unsolicited sender of the filtering check.
pub const RELAY_IP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// UDP and TCP port of the probe servers on both relay addresses (the STUN port).
pub const PROBE_PORT: u16 = 3478;
/// Second UDP port of the probe server on [`RELAY_IP`] (a destination with the same address and
/// a different port).
pub const PROBE_ALT_PORT: u16 = 3479;

/// Whether a NAT gives one socket the same public endpoint for every destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MappingKind {
    /// One public endpoint for all destinations ("easy", cone NATs and no NAT).
    EndpointIndependent,
    /// A different public endpoint per destination ("hard", symmetric NAT).
    EndpointDependent,
}

/// Who may send to a public endpoint the NAT created for an inside socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FilteringKind {
    /// Anyone (full cone, or no NAT and no firewall).
    EndpointIndependent,
    /// Only addresses the socket has sent to, from any port (restricted cone).
    AddressDependent,
    /// Only the exact address:port pairs the socket has sent to (port-restricted cone, symmetric).
    AddressAndPortDependent,
}

impl fmt::Display for MappingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MappingKind::EndpointIndependent => "endpoint-independent",
            MappingKind::EndpointDependent => "endpoint-dependent",
        })
    }
}

impl fmt::Display for FilteringKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FilteringKind::EndpointIndependent => "endpoint-independent",
            FilteringKind::AddressDependent => "address-dependent",
            FilteringKind::AddressAndPortDependent => "address-and-port-dependent",
        })
    }
}

/// How patient a probe is: `attempts` requests, each waiting `timeout` for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Requests sent before giving up (each lost request or reply costs one).
    pub attempts: u32,
    /// How long each request waits for its reply.
    pub timeout: Duration,
}

impl Default for ProbeOptions {
    /// Three tries of 200 ms: replies in the lab take well under a millisecond on unshaped links,
    /// and declaring UDP blocked takes 0.6 s.
    fn default() -> Self {
        ProbeOptions {
            attempts: 3,
            timeout: Duration::from_millis(200),
        }
    }
}

/// A request id that is unique within the process, so a late reply to an earlier probe is never
/// taken for the answer to this one.
fn nonce() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 40)
}

/// Asks the probe server at `server` which address `sock`'s datagrams arrive from.
///
/// `Ok(None)` when no reply came within `opts` (UDP blocked, or everything lost). Run it from the
/// namespace the socket lives in (inside a lab's `run_in`). Datagrams from other senders that
/// arrive meanwhile are discarded.
pub fn observed_addr(
    sock: &UdpSocket,
    server: SocketAddrV4,
    opts: ProbeOptions,
) -> io::Result<Option<SocketAddrV4>> {
    Ok(probe_rtt(sock, server, opts)?.map(|(addr, _)| addr))
}

/// Like [`observed_addr`], also returning the round-trip time of the request that was answered.
pub fn probe_rtt(
    sock: &UdpSocket,
    server: SocketAddrV4,
    opts: ProbeOptions,
) -> io::Result<Option<(SocketAddrV4, Duration)>> {
    for _ in 0..opts.attempts {
        let n = nonce();
        let sent = Instant::now();
        sock.send_to(format!("netlab probe {n}").as_bytes(), server)?;
        let deadline = sent + opts.timeout;
        while let Some(msg) = recv_until(sock, deadline)? {
            if msg.from != SocketAddr::V4(server) {
                continue;
            }
            if let Some(Reply::Seen(addr)) = parse_reply(&msg.text, n) {
                return Ok(Some((addr, sent.elapsed())));
            }
        }
    }
    Ok(None)
}

/// What the filtering probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterObservation {
    /// The public address of the probing socket (from the direct reply).
    pub observed: SocketAddrV4,
    /// An unsolicited datagram from the same address, other port, arrived.
    pub alt_port_reached: bool,
    /// An unsolicited datagram from another address arrived.
    pub alt_addr_reached: bool,
}

impl FilterObservation {
    /// The filtering behaviour these observations show.
    pub fn kind(&self) -> FilteringKind {
        if self.alt_addr_reached {
            FilteringKind::EndpointIndependent
        } else if self.alt_port_reached {
            FilteringKind::AddressDependent
        } else {
            FilteringKind::AddressAndPortDependent
        }
    }
}

/// How long the filtering probe keeps listening after the direct reply: the unsolicited
/// datagrams leave the server right after it and travel the same path, so they arrive within
/// microseconds unless dropped.
const FILTER_LISTEN: Duration = Duration::from_millis(150);

/// Runs the filtering probe from a socket that has sent nothing yet: asks [`RELAY_IP`] to answer
/// and to have two other endpoints send to the socket's public address. `rounds` repeats the
/// request (more rounds make a lossy link less likely to hide an unsolicited datagram).
///
/// `Ok(None)` when the server never answered (UDP blocked).
pub fn observe_filtering(
    sock: &UdpSocket,
    rounds: u32,
    opts: ProbeOptions,
) -> io::Result<Option<FilterObservation>> {
    let server = SocketAddrV4::new(RELAY_IP, PROBE_PORT);
    let alt_port = SocketAddr::V4(SocketAddrV4::new(RELAY_IP, PROBE_ALT_PORT));
    let alt_addr = SocketAddr::V4(SocketAddrV4::new(RELAY_IP2, PROBE_PORT));
    let mut obs: Option<FilterObservation> = None;
    for _ in 0..rounds.max(1) {
        for _ in 0..opts.attempts {
            let n = nonce();
            sock.send_to(format!("netlab filter {n}").as_bytes(), server)?;
            let mut deadline = Instant::now() + opts.timeout;
            let mut answered = false;
            while let Some(msg) = recv_until(sock, deadline)? {
                match (parse_reply(&msg.text, n), msg.from) {
                    (Some(Reply::Seen(addr)), from) if from == SocketAddr::V4(server) => {
                        let o = obs.get_or_insert(FilterObservation {
                            observed: addr,
                            alt_port_reached: false,
                            alt_addr_reached: false,
                        });
                        o.observed = addr;
                        if !answered {
                            answered = true;
                            deadline = Instant::now() + FILTER_LISTEN;
                        }
                    }
                    (Some(Reply::AltPort), from) if from == alt_port => {
                        if let Some(o) = obs.as_mut() {
                            o.alt_port_reached = true;
                        }
                    }
                    (Some(Reply::AltAddr), from) if from == alt_addr => {
                        if let Some(o) = obs.as_mut() {
                            o.alt_addr_reached = true;
                        }
                    }
                    _ => {}
                }
            }
            if answered {
                break;
            }
        }
        if obs.is_some_and(|o| o.alt_addr_reached && o.alt_port_reached) {
            break;
        }
    }
    Ok(obs)
}

/// Connects over TCP to the probe server at `server` and returns the address it saw.
pub fn observed_tcp_addr(server: SocketAddrV4, timeout: Duration) -> io::Result<SocketAddrV4> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(server), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    text.trim()
        .strip_prefix("netlab seen ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {text:?}")))
}

struct Msg {
    from: SocketAddr,
    text: String,
}

/// Receives one datagram, or `None` once `deadline` passes.
fn recv_until(sock: &UdpSocket, deadline: Instant) -> io::Result<Option<Msg>> {
    let mut buf = [0u8; 512];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        sock.set_read_timeout(Some(deadline - now))?;
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                return Ok(Some(Msg {
                    from,
                    text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                }))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            // ICMP errors from an earlier send (port unreachable) surface here on Linux; they say
            // nothing about this probe.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Seen(SocketAddrV4),
    AltPort,
    AltAddr,
}

/// Parses a server datagram answering the request with nonce `n`; anything else is `None`.
fn parse_reply(text: &str, n: u64) -> Option<Reply> {
    let mut words = text.split_ascii_whitespace();
    if words.next()? != "netlab" {
        return None;
    }
    let kind = words.next()?;
    if words.next()?.parse::<u64>().ok()? != n {
        return None;
    }
    match kind {
        "seen" => Some(Reply::Seen(words.next()?.parse().ok()?)),
        "alt-port" => Some(Reply::AltPort),
        "alt-addr" => Some(Reply::AltAddr),
        _ => None,
    }
}

/// Builds the server's answer to one request datagram (`None`: not a request, ignore it).
/// The bool says whether the unsolicited follow-ups are wanted.
fn answer(request: &[u8], from: SocketAddr) -> Option<(String, Option<u64>)> {
    let text = std::str::from_utf8(request).ok()?;
    let mut words = text.split_ascii_whitespace();
    if words.next()? != "netlab" {
        return None;
    }
    let kind = words.next()?;
    let n: u64 = words.next()?.parse().ok()?;
    match kind {
        "probe" => Some((format!("netlab seen {n} {from}"), None)),
        "filter" => Some((format!("netlab seen {n} {from}"), Some(n))),
        _ => None,
    }
}

/// The probe servers of one lab, running on threads in its relay namespace until dropped.
#[derive(Debug)]
pub(crate) struct ProbeServers {
    /// Stopped and joined on drop.
    _workers: Workers,
}

impl ProbeServers {
    /// Binds every server socket in namespace `ns` (returns once all are bound) and starts them.
    pub(crate) fn start(ns: &str) -> Result<ProbeServers> {
        let ns_owned = ns.to_owned();
        // Bind on a thread inside the namespace; sockets keep their namespace wherever used.
        let (udp, tcp) = std::thread::scope(|s| {
            s.spawn(|| -> Result<_> {
                sys::enter_netns(&ns_owned)?;
                let bind = |ip, port| {
                    UdpSocket::bind(SocketAddrV4::new(ip, port))
                        .with_context(|| format!("bind probe server {ip}:{port} in {ns_owned}"))
                };
                let udp = [
                    bind(RELAY_IP, PROBE_PORT)?,
                    bind(RELAY_IP, PROBE_ALT_PORT)?,
                    bind(RELAY_IP2, PROBE_PORT)?,
                ];
                let tcp = TcpListener::bind(SocketAddrV4::new(RELAY_IP, PROBE_PORT))
                    .with_context(|| format!("bind TCP probe server in {ns_owned}"))?;
                Ok((udp, tcp))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("probe server setup thread panicked"))?
        })?;
        let udp = Arc::new(udp);
        let mut workers = Workers::new("probe server thread");
        for i in 0..udp.len() {
            let udp = udp.clone();
            workers.spawn(format!("netlab-probe-udp{i}"), move |stop| {
                udp_server(&udp, i, stop)
            })?;
        }
        workers.spawn("netlab-probe-tcp".into(), move |stop| {
            tcp_server(&tcp, stop)
        })?;
        Ok(ProbeServers { _workers: workers })
    }
}

/// Serves requests arriving on `socks[i]`; sockets 1 and 2 are also the senders of the
/// unsolicited follow-ups (alternate port, alternate address).
fn udp_server(socks: &[UdpSocket; 3], i: usize, stop: &AtomicBool) {
    let sock = &socks[i];
    if let Err(e) = sock.set_read_timeout(Some(STOP_POLL)) {
        warn!(error = %e, "probe server cannot set a timeout; not serving");
        return;
    }
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => continue,
        };
        let Some((reply, follow_up)) = answer(&buf[..n], from) else {
            trace!(%from, "probe server ignored a datagram");
            continue;
        };
        // Send errors (ICMP from a vanished client) are the client's problem, not the server's.
        let _ = sock.send_to(reply.as_bytes(), from);
        if let Some(n) = follow_up {
            let _ = socks[1].send_to(format!("netlab alt-port {n}").as_bytes(), from);
            let _ = socks[2].send_to(format!("netlab alt-addr {n}").as_bytes(), from);
        }
    }
}

fn tcp_server(listener: &TcpListener, stop: &AtomicBool) {
    while readable_unless_stopped(listener.as_fd(), stop, "TCP probe server") {
        if let Ok((mut stream, from)) = listener.accept() {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = stream.write_all(format!("netlab seen {from}\n").as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    fn v4(addr: SocketAddr) -> Result<SocketAddrV4> {
        match addr {
            SocketAddr::V4(a) => Ok(a),
            SocketAddr::V6(a) => bail!("expected an IPv4 address, got {a}"),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn server_answers_probe_and_filter() {
        let from = addr("198.18.1.1:40000");
        assert_eq!(
            answer(b"netlab probe 7", from),
            Some(("netlab seen 7 198.18.1.1:40000".into(), None))
        );
        assert_eq!(
            answer(b"netlab filter 9", from),
            Some(("netlab seen 9 198.18.1.1:40000".into(), Some(9)))
        );
        assert_eq!(answer(b"netlab nonsense 9", from), None);
        assert_eq!(answer(b"REG:x", from), None);
        assert_eq!(answer(&[0xff, 0xfe], from), None);
    }

    #[test]
    fn client_matches_only_its_nonce() {
        assert_eq!(
            parse_reply("netlab seen 5 198.18.1.1:1234", 5),
            Some(Reply::Seen("198.18.1.1:1234".parse().expect("addr")))
        );
        assert_eq!(parse_reply("netlab seen 4 198.18.1.1:1234", 5), None);
        assert_eq!(parse_reply("netlab alt-port 5", 5), Some(Reply::AltPort));
        assert_eq!(parse_reply("netlab alt-addr 5", 5), Some(Reply::AltAddr));
        assert_eq!(parse_reply("hello", 5), None);
    }

    #[test]
    fn filtering_kind_from_observation() {
        let o = |port, addr| FilterObservation {
            observed: "198.18.1.1:1".parse().expect("addr"),
            alt_port_reached: port,
            alt_addr_reached: addr,
        };
        assert_eq!(o(true, true).kind(), FilteringKind::EndpointIndependent);
        assert_eq!(o(true, false).kind(), FilteringKind::AddressDependent);
        assert_eq!(
            o(false, false).kind(),
            FilteringKind::AddressAndPortDependent
        );
    }

    /// The probe protocol end to end on loopback (no namespaces, no root): the server threads
    /// are exercised through `answer`, the client through a fake server socket.
    #[test]
    fn probe_round_trip_on_loopback() -> Result<()> {
        let server = UdpSocket::bind("127.0.0.1:0")?;
        let server_addr = v4(server.local_addr()?)?;
        let handle = std::thread::spawn(move || -> Result<()> {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf)?;
            let (reply, _) = answer(&buf[..n], from).context("request")?;
            server.send_to(reply.as_bytes(), from)?;
            Ok(())
        });
        let client = UdpSocket::bind("127.0.0.1:0")?;
        let seen = observed_addr(&client, server_addr, ProbeOptions::default())?;
        assert_eq!(seen, Some(v4(client.local_addr()?)?));
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))??;
        Ok(())
    }
}
