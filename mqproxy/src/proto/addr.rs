//! Target addresses in the SOCKS5 layout (ATYP, address, port), as frames carry them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, BytesMut};

use super::*;

/// SOCKS5 address type: IPv4.
pub const ATYP_IPV4: u8 = 0x01;
/// SOCKS5 address type: domain name.
pub const ATYP_DOMAIN: u8 = 0x03;
/// SOCKS5 address type: IPv6.
pub const ATYP_IPV6: u8 = 0x04;

/// A destination: an IP address or a domain name the server resolves, with a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    /// An IP address and port.
    Ip(SocketAddr),
    /// A domain name (1..=255 bytes, no NUL) and port.
    Domain(String, u16),
}

impl TargetAddr {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            TargetAddr::Ip(a) => a.port(),
            TargetAddr::Domain(_, p) => *p,
        }
    }

    /// Encoded length in the SOCKS5 layout.
    pub fn encoded_len(&self) -> usize {
        match self {
            TargetAddr::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
            TargetAddr::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
            TargetAddr::Domain(d, _) => 1 + 1 + d.len() + 2,
        }
    }

    /// Appends the SOCKS5 layout (`ATYP | ADDR | PORT`).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            TargetAddr::Ip(SocketAddr::V4(a)) => {
                out.put_u8(ATYP_IPV4);
                out.put_slice(&a.ip().octets());
                out.put_u16(a.port());
            }
            TargetAddr::Ip(SocketAddr::V6(a)) => {
                out.put_u8(ATYP_IPV6);
                out.put_slice(&a.ip().octets());
                out.put_u16(a.port());
            }
            TargetAddr::Domain(d, port) => {
                out.put_u8(ATYP_DOMAIN);
                // Constructors keep domains at 1..=255 bytes; clamp so a bug cannot desync.
                let d = &d.as_bytes()[..d.len().min(255)];
                out.put_u8(d.len() as u8);
                out.put_slice(d);
                out.put_u16(*port);
            }
        }
    }

    /// Parses the SOCKS5 layout from the front of `buf`. `Ok(None)`: `buf` is too short yet.
    pub fn decode(buf: &[u8]) -> Result<Option<(TargetAddr, usize)>, DecodeError> {
        let Some(&atyp) = buf.first() else {
            return Ok(None);
        };
        let port_at = |i: usize| u16::from_be_bytes([buf[i], buf[i + 1]]);
        match atyp {
            ATYP_IPV4 => {
                if buf.len() < 7 {
                    return Ok(None);
                }
                let ip = Ipv4Addr::new(buf[1], buf[2], buf[3], buf[4]);
                Ok(Some((
                    TargetAddr::Ip(SocketAddr::new(ip.into(), port_at(5))),
                    7,
                )))
            }
            ATYP_IPV6 => {
                if buf.len() < 19 {
                    return Ok(None);
                }
                let mut o = [0u8; 16];
                o.copy_from_slice(&buf[1..17]);
                let ip = Ipv6Addr::from(o);
                Ok(Some((
                    TargetAddr::Ip(SocketAddr::new(ip.into(), port_at(17))),
                    19,
                )))
            }
            ATYP_DOMAIN => {
                let Some(&len) = buf.get(1) else {
                    return Ok(None);
                };
                let len = len as usize;
                if buf.len() < 2 + len + 2 {
                    return Ok(None);
                }
                let name = parse_domain(&buf[2..2 + len])?;
                Ok(Some((
                    TargetAddr::Domain(name, port_at(2 + len)),
                    2 + len + 2,
                )))
            }
            _ => Err(DecodeError::Invalid("address type")),
        }
    }
}

/// A domain from the wire: non-empty UTF-8 without NUL (a NUL would truncate it in libc's
/// resolver and resolve a different name than the one checked).
pub(crate) fn parse_domain(b: &[u8]) -> Result<String, DecodeError> {
    if b.is_empty() || b.contains(&0) {
        return Err(DecodeError::Invalid("domain name"));
    }
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid("domain name"))
}

impl std::fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetAddr::Ip(a) => a.fmt(f),
            // A client-supplied name: escaped when it holds control characters (or the
            // escape character itself), so it cannot forge or colour a log line.
            TargetAddr::Domain(d, p) if d.chars().any(|c| c.is_control() || c == '\\') => {
                write!(f, "{}:{p}", d.escape_debug())
            }
            TargetAddr::Domain(d, p) => write!(f, "{d}:{p}"),
        }
    }
}

impl std::str::FromStr for TargetAddr {
    type Err = DecodeError;

    /// `1.2.3.4:53`, `[::1]:53` or `example.com:53`.
    fn from_str(s: &str) -> Result<Self, DecodeError> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(TargetAddr::Ip(a));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or(DecodeError::Invalid("HOST:PORT"))?;
        let port = port.parse().map_err(|_| DecodeError::Invalid("port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(TargetAddr::Ip(SocketAddr::new(ip, port)));
        }
        if host.len() > 255 {
            return Err(DecodeError::TooLong {
                field: "domain name",
                len: host.len() as u64,
                limit: 255,
            });
        }
        Ok(TargetAddr::Domain(parse_domain(host.as_bytes())?, port))
    }
}

pub(super) fn take_addr(c: &mut Cursor<'_>) -> Result<TargetAddr, DecodeError> {
    match TargetAddr::decode(c.buf)? {
        Some((a, n)) => {
            c.buf = &c.buf[n..];
            Ok(a)
        }
        None => Err(DecodeError::Truncated("address")),
    }
}

pub(super) fn put_sockaddr_opt(out: &mut BytesMut, a: Option<SocketAddr>) {
    match a {
        Some(a) => TargetAddr::Ip(a).encode(out),
        None => out.put_u8(0),
    }
}

pub(super) fn take_sockaddr_opt(c: &mut Cursor<'_>) -> Result<Option<SocketAddr>, DecodeError> {
    if c.buf.first() == Some(&0) {
        c.buf = &c.buf[1..];
        return Ok(None);
    }
    match take_addr(c)? {
        TargetAddr::Ip(a) => Ok(Some(a)),
        TargetAddr::Domain(..) => Err(DecodeError::Invalid("socket address")),
    }
}
