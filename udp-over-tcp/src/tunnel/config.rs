//! The tunnel's options: roles, addresses and the parsers for the original tool's flags; pure.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use super::{FLOW_IDLE, QUEUE_BYTES, UDP_RECV_BUFFER};
use crate::framing::Framing;

/// Where the tool talks TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpRole {
    /// `--tcp-listen`: accept the peer's connections (the newest one carries the tunnel).
    Listen(SocketAddr),
    /// `--tcp-connect`: connect (and reconnect) to `HOST:PORT`.
    Connect(String),
}

/// `--udp-bind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpBind {
    /// One socket bound here: datagrams arriving on it enter the tunnel, datagrams leaving the
    /// tunnel are sent from it (so their source port is this port: port-preserving).
    Addr(SocketAddr),
    /// One socket per flow (flow framing): created for each source address named in frames.
    Auto,
}

/// `--udp-sendto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpSendTo {
    /// Every datagram leaving the tunnel goes here.
    Addr(SocketAddr),
    /// `IP:auto` (flow framing): to this IP, at the source port the frame carries.
    AutoPort(IpAddr),
}

/// Everything the tunnel needs.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Listen or connect.
    pub tcp: TcpRole,
    /// `--udp-bind`.
    pub udp_bind: UdpBind,
    /// `--udp-sendto`.
    pub udp_sendto: UdpSendTo,
    /// `--framing`.
    pub framing: Framing,
    /// `--psk`: authenticate the tunnel with this key.
    pub psk: Option<Vec<u8>>,
    /// Flow idle expiry (`--udp-bind auto`).
    pub flow_idle: Duration,
    /// Frame queue bound, bytes.
    pub queue_bytes: usize,
    /// UDP receive buffer asked for.
    pub udp_recv_buffer: usize,
}

impl TunnelConfig {
    /// A configuration with the defaults for everything but the addresses.
    pub fn new(tcp: TcpRole, udp_bind: UdpBind, udp_sendto: UdpSendTo) -> Self {
        TunnelConfig {
            tcp,
            udp_bind,
            udp_sendto,
            framing: Framing::Plain,
            psk: None,
            flow_idle: FLOW_IDLE,
            queue_bytes: QUEUE_BYTES,
            udp_recv_buffer: UDP_RECV_BUFFER,
        }
    }
}

/// Parses `PORT` or `ADDR:PORT` (`[v6]:PORT` for IPv6), with `default_ip` for a bare port.
pub fn parse_endpoint(s: &str, default_ip: IpAddr) -> Result<SocketAddr, TunnelError> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(default_ip, port));
    }
    s.parse()
        .map_err(|_| TunnelError::BadEndpoint(s.to_owned()))
}

/// Parses `--udp-bind`: `auto`, `PORT` or `ADDR:PORT` (default address 0.0.0.0).
pub fn parse_udp_bind(s: &str) -> Result<UdpBind, TunnelError> {
    if s == "auto" {
        return Ok(UdpBind::Auto);
    }
    parse_endpoint(s, Ipv4Addr::UNSPECIFIED.into()).map(UdpBind::Addr)
}

/// Parses `--udp-sendto`: `PORT`, `ADDR:PORT` or `IP:auto` (default address 127.0.0.1).
pub fn parse_udp_sendto(s: &str) -> Result<UdpSendTo, TunnelError> {
    if let Some(ip) = s.strip_suffix(":auto") {
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        return ip
            .parse()
            .map(UdpSendTo::AutoPort)
            .map_err(|_| TunnelError::BadEndpoint(s.to_owned()));
    }
    parse_endpoint(s, Ipv4Addr::LOCALHOST.into()).map(UdpSendTo::Addr)
}

/// Parses `--tcp-connect`: `PORT` (to 127.0.0.1) or `HOST:PORT`.
pub fn parse_tcp_connect(s: &str) -> Result<String, TunnelError> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(format!("127.0.0.1:{port}"));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(s.to_owned()),
        _ => Err(TunnelError::BadEndpoint(s.to_owned())),
    }
}

/// Why the tunnel could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// An address argument is neither `PORT` nor `ADDR:PORT`.
    #[error("`{0}` is not PORT or ADDR:PORT (IPv6 as [ADDR]:PORT)")]
    BadEndpoint(String),
    /// The options contradict each other.
    #[error("{0}")]
    BadOptions(&'static str),
    /// A socket could not be bound.
    #[error("bind {what} {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}
