//! The mqproxy wire format, pure and sans-IO: QUIC varints, control frames, target addresses,
//! the 9-byte DATAGRAM header, fragmentation and reassembly. `PROTOCOL.md` is the prose version.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

/// The ALPN protocol identifier (the original's, kept so the names line up).
pub const ALPN: &[u8] = b"mqproxy-tcp/1";

/// The protocol version carried in AUTH_REQUEST.
pub const VERSION: u64 = 1;

/// Stream type of the first bidi stream a client opens: authentication.
pub const STREAM_AUTH: u64 = 0x00;
/// Stream type of a TCP CONNECT stream (the original's value).
pub const STREAM_CONNECT_TCP: u64 = 0x01;
/// Stream type of a UDP session's signalling stream (the original's value).
pub const STREAM_UDP_SESSION: u64 = 0x02;
/// Stream type of a multipath TCP CONNECT: MP_CONNECT, CONNECT_RESPONSE, then [`Record`]s.
pub const STREAM_MP_CONNECT: u64 = 0x03;
/// Stream type of a further subflow of a multipath TCP flow: SUBFLOW, then [`Record`]s.
pub const STREAM_SUBFLOW: u64 = 0x04;

/// Largest control-frame body accepted. The largest real frame is an AUTH_REQUEST with a
/// [`MAX_TOKEN_LEN`] token plus a client id and padding; anything bigger is an attack or a bug.
pub const MAX_FRAME_BODY: usize = 4096;
/// Longest token accepted (bytes).
pub const MAX_TOKEN_LEN: usize = 1024;
/// Longest client id / message string accepted (bytes).
pub const MAX_TEXT_LEN: usize = 512;

/// Feature bit 0: the server relays UDP (the original's bit assignment).
pub const FEATURE_UDP: u64 = 1;
/// Feature bit 1: the server bound this connection into a multipath bundle (PATH_BIND).
pub const FEATURE_MULTIPATH: u64 = 2;
/// UDP_SESSION_OPEN flag bit 0: re-attach the signalling of an existing session of the bundle
/// (its previous stream died with its path); the session keeps its socket.
pub const UDP_FLAG_ATTACH: u64 = 1;
/// Length of a bundle id.
pub const BUNDLE_ID_LEN: usize = 16;

/// Size of the DATAGRAM header.
pub const DATAGRAM_HEADER_LEN: usize = 9;
/// Largest UDP payload carried (after reassembly): what a UDP length field can describe.
pub const MAX_PACKET: usize = 65_535;
/// Most fragments per packet: `frag_count` is a `u8`.
pub const MAX_FRAGMENTS: usize = 255;
/// Reassembly slots per session (the original's 4, LRU). Enough for a few packets interleaved
/// in flight; more would only hold memory for packets that have already lost a fragment.
pub const REASSEMBLY_SLOTS: usize = 4;
/// How long an incomplete packet may wait for its other fragments. Fragments of one packet are
/// sent back to back, so a packet still incomplete after this has lost a fragment.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A length field exceeds the limit for that field.
    #[error("{field} too long: {len} bytes (limit {limit})")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its declared length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// A field holds a value the protocol does not allow.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// The frame body ended inside a field.
    #[error("frame body truncated in {0}")]
    Truncated(&'static str),
}

// ---------------------------------------------------------------------------------------------
// Varints (RFC 9000 §16).

/// Largest value a QUIC varint holds.
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Appends `v` as a QUIC varint. Values above [`VARINT_MAX`] are clamped (callers only encode
/// lengths and small enums).
pub fn put_varint(out: &mut BytesMut, v: u64) {
    let v = v.min(VARINT_MAX);
    if v < 1 << 6 {
        out.put_u8(v as u8);
    } else if v < 1 << 14 {
        out.put_u16(0x4000 | v as u16);
    } else if v < 1 << 30 {
        out.put_u32(0x8000_0000 | v as u32);
    } else {
        out.put_u64(0xc000_0000_0000_0000 | v);
    }
}

/// Encoded length of a varint.
pub fn varint_len(v: u64) -> usize {
    match v {
        0..0x40 => 1,
        0x40..0x4000 => 2,
        0x4000..0x4000_0000 => 4,
        _ => 8,
    }
}

/// Reads a varint from the front of `buf`: `None` when `buf` is too short.
pub fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// A cursor over a complete frame body; running out of bytes is `Truncated`.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let (v, n) = get_varint(self.buf).ok_or(DecodeError::Truncated(what))?;
        self.buf = &self.buf[n..];
        Ok(v)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A varint length then that many bytes.
    fn string(&mut self, what: &'static str, limit: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.varint(what)?;
        if len > limit as u64 {
            return Err(DecodeError::TooLong {
                field: what,
                len,
                limit,
            });
        }
        self.bytes(len as usize, what)
    }

    fn text(&mut self, what: &'static str, limit: usize) -> Result<String, DecodeError> {
        let b = self.string(what, limit)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid(what))
    }
}

fn put_string(out: &mut BytesMut, s: &[u8]) {
    put_varint(out, s.len() as u64);
    out.put_slice(s);
}

// ---------------------------------------------------------------------------------------------
// Target addresses (SOCKS5 layout: ATYP, address, port).

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

fn take_addr(c: &mut Cursor<'_>) -> Result<TargetAddr, DecodeError> {
    match TargetAddr::decode(c.buf)? {
        Some((a, n)) => {
            c.buf = &c.buf[n..];
            Ok(a)
        }
        None => Err(DecodeError::Truncated("address")),
    }
}

fn put_sockaddr_opt(out: &mut BytesMut, a: Option<SocketAddr>) {
    match a {
        Some(a) => TargetAddr::Ip(a).encode(out),
        None => out.put_u8(0),
    }
}

fn take_sockaddr_opt(c: &mut Cursor<'_>) -> Result<Option<SocketAddr>, DecodeError> {
    if c.buf.first() == Some(&0) {
        c.buf = &c.buf[1..];
        return Ok(None);
    }
    match take_addr(c)? {
        TargetAddr::Ip(a) => Ok(Some(a)),
        TargetAddr::Domain(..) => Err(DecodeError::Invalid("socket address")),
    }
}

// ---------------------------------------------------------------------------------------------
// Control frames.

/// Status of an AUTH_RESPONSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStatus {
    /// Authenticated.
    Ok,
    /// The token did not match.
    BadToken,
    /// The client's protocol version is not supported.
    BadVersion,
    /// A status this implementation does not know (from a newer peer).
    Other(u64),
}

impl AuthStatus {
    fn code(self) -> u64 {
        match self {
            AuthStatus::Ok => 0,
            AuthStatus::BadToken => 1,
            AuthStatus::BadVersion => 2,
            AuthStatus::Other(c) => c,
        }
    }
    fn from_code(c: u64) -> Self {
        match c {
            0 => AuthStatus::Ok,
            1 => AuthStatus::BadToken,
            2 => AuthStatus::BadVersion,
            c => AuthStatus::Other(c),
        }
    }
}

/// Outcome of a CONNECT, as a SOCKS5 reply code (RFC 1928 §6), so the client can pass it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectStatus {
    /// 0x00 succeeded.
    Ok,
    /// 0x01 general failure.
    GeneralFailure,
    /// 0x02 connection not allowed by ruleset (the server's destination policy).
    NotAllowed,
    /// 0x03 network unreachable.
    NetworkUnreachable,
    /// 0x04 host unreachable (including name resolution failures).
    HostUnreachable,
    /// 0x05 connection refused.
    Refused,
    /// 0x06 TTL expired (used for connect timeouts).
    TtlExpired,
    /// 0x08 address type not supported.
    AddressTypeNotSupported,
}

impl ConnectStatus {
    /// The SOCKS5 reply code.
    pub fn socks_code(self) -> u8 {
        match self {
            ConnectStatus::Ok => 0x00,
            ConnectStatus::GeneralFailure => 0x01,
            ConnectStatus::NotAllowed => 0x02,
            ConnectStatus::NetworkUnreachable => 0x03,
            ConnectStatus::HostUnreachable => 0x04,
            ConnectStatus::Refused => 0x05,
            ConnectStatus::TtlExpired => 0x06,
            ConnectStatus::AddressTypeNotSupported => 0x08,
        }
    }
    /// From a SOCKS5 reply code; unknown codes are a general failure.
    pub fn from_socks_code(c: u64) -> Self {
        match c {
            0x00 => ConnectStatus::Ok,
            0x02 => ConnectStatus::NotAllowed,
            0x03 => ConnectStatus::NetworkUnreachable,
            0x04 => ConnectStatus::HostUnreachable,
            0x05 => ConnectStatus::Refused,
            0x06 => ConnectStatus::TtlExpired,
            0x08 => ConnectStatus::AddressTypeNotSupported,
            _ => ConnectStatus::GeneralFailure,
        }
    }
}

/// Outcome of a UDP_SESSION_OPEN (the original's error codes plus two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpStatus {
    /// The session is open.
    Ok,
    /// The destination name did not resolve.
    DnsFailed,
    /// The server could not create or connect its UDP socket.
    SocketFailed,
    /// The server's destination policy refused the destination.
    PolicyDenied,
    /// The connection already has the maximum number of UDP sessions.
    SessionLimit,
    /// The server relays no UDP (`--no-udp`).
    UdpDisabled,
    /// The session id is already in use on this connection.
    DuplicateId,
    /// A status this implementation does not know.
    Other(u64),
}

impl UdpStatus {
    fn code(self) -> u64 {
        match self {
            UdpStatus::Ok => 0,
            UdpStatus::DnsFailed => 1,
            UdpStatus::SocketFailed => 2,
            UdpStatus::PolicyDenied => 3,
            UdpStatus::SessionLimit => 4,
            UdpStatus::UdpDisabled => 5,
            UdpStatus::DuplicateId => 6,
            UdpStatus::Other(c) => c,
        }
    }
    fn from_code(c: u64) -> Self {
        match c {
            0 => UdpStatus::Ok,
            1 => UdpStatus::DnsFailed,
            2 => UdpStatus::SocketFailed,
            3 => UdpStatus::PolicyDenied,
            4 => UdpStatus::SessionLimit,
            5 => UdpStatus::UdpDisabled,
            6 => UdpStatus::DuplicateId,
            c => UdpStatus::Other(c),
        }
    }
}

/// Why the server closed a UDP session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No packet either way for the effective idle timeout.
    Idle,
    /// The server's UDP socket failed.
    SocketError,
    /// The server is shutting down.
    Shutdown,
    /// A reason this implementation does not know.
    Other(u64),
}

impl CloseReason {
    fn code(self) -> u64 {
        match self {
            CloseReason::Idle => 0,
            CloseReason::SocketError => 1,
            CloseReason::Shutdown => 2,
            CloseReason::Other(c) => c,
        }
    }
    fn from_code(c: u64) -> Self {
        match c {
            0 => CloseReason::Idle,
            1 => CloseReason::SocketError,
            2 => CloseReason::Shutdown,
            c => CloseReason::Other(c),
        }
    }
}

/// A control frame. Every frame is `type varint | length varint | body`; the body holds the
/// fields, then `padding length varint | padding`, and decoders ignore whatever follows (room
/// for fields added later).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// Client → server, first frame on the auth stream.
    AuthRequest {
        /// Protocol version ([`VERSION`]).
        version: u64,
        /// Free-form client name, for logs.
        client_id: String,
        /// The shared secret.
        token: Vec<u8>,
        /// Feature bits the client wants ([`FEATURE_UDP`]).
        features: u64,
    },
    /// Server → client.
    AuthResponse {
        /// Outcome.
        status: AuthStatus,
        /// Feature bits the server grants ([`FEATURE_UDP`]).
        features: u64,
        /// The server's UDP idle timeout limit in milliseconds.
        udp_idle_timeout_ms: u64,
        /// UDP sessions allowed on this connection.
        max_udp_sessions: u64,
    },
    /// Client → server, first frame on a CONNECT_TCP stream.
    ConnectRequest {
        /// Destination.
        addr: TargetAddr,
    },
    /// Server → client; on success the stream then carries the TCP bytes.
    ConnectResponse {
        /// Outcome.
        status: ConnectStatus,
        /// The server-side address the TCP connection was made to, when it was.
        remote: Option<SocketAddr>,
    },
    /// Client → server, first frame on a UDP_SESSION stream.
    UdpOpen {
        /// Connection- (multipath: bundle-) unique id chosen by the client; DATAGRAMs carry it.
        session_id: u32,
        /// Bit 0: [`UDP_FLAG_ATTACH`] (multipath); the others reserved, 0.
        flags: u64,
        /// Destination.
        addr: TargetAddr,
        /// Idle timeout the client asks for (0: the server's limit).
        idle_timeout_ms: u64,
    },
    /// Server → client.
    UdpResp {
        /// The session this answers.
        session_id: u32,
        /// Outcome.
        status: UdpStatus,
        /// The effective idle timeout: min(client's request, server's limit).
        idle_timeout_ms: u64,
        /// The resolved destination the server's socket is connected to.
        remote: Option<SocketAddr>,
    },
    /// Server → client: the session is over (the server then finishes the stream).
    UdpClose {
        /// The session.
        session_id: u32,
        /// Why.
        reason: CloseReason,
    },
    /// Client → server, second frame on the auth stream: this connection is path
    /// `path_index` of bundle `bundle`.
    PathBind {
        /// Random id the client picked for all its paths.
        bundle: [u8; BUNDLE_ID_LEN],
        /// The path's position in the client's list (0: primary).
        path_index: u64,
        /// The scheduler the client runs, so the server schedules its direction the same way.
        scheduler: u64,
    },
    /// Client → server, first frame on an MP_CONNECT stream.
    MpConnect {
        /// Bundle-unique flow id chosen by the client.
        flow_id: u64,
        /// Destination.
        addr: TargetAddr,
    },
    /// Client → server, first frame on a SUBFLOW stream.
    Subflow {
        /// The flow (from MP_CONNECT) this stream carries chunks of.
        flow_id: u64,
    },
    /// A frame type this implementation does not know; skipped.
    Unknown {
        /// Its type.
        frame_type: u64,
    },
}

const FT_AUTH_REQUEST: u64 = 0x01;
const FT_AUTH_RESPONSE: u64 = 0x02;
const FT_CONNECT_REQUEST: u64 = 0x03;
const FT_CONNECT_RESPONSE: u64 = 0x04;
const FT_UDP_OPEN: u64 = 0x05;
const FT_UDP_RESP: u64 = 0x06;
const FT_UDP_CLOSE: u64 = 0x07;
const FT_PATH_BIND: u64 = 0x08;
const FT_MP_CONNECT: u64 = 0x09;
const FT_SUBFLOW: u64 = 0x0a;

impl Frame {
    /// Encodes the frame with `padding` bytes of zero padding.
    pub fn encode_padded(&self, out: &mut BytesMut, padding: usize) {
        let mut body = BytesMut::with_capacity(64 + padding);
        let ft = match self {
            Frame::AuthRequest {
                version,
                client_id,
                token,
                features,
            } => {
                put_varint(&mut body, *version);
                put_string(&mut body, client_id.as_bytes());
                put_string(&mut body, token);
                put_varint(&mut body, *features);
                FT_AUTH_REQUEST
            }
            Frame::AuthResponse {
                status,
                features,
                udp_idle_timeout_ms,
                max_udp_sessions,
            } => {
                put_varint(&mut body, status.code());
                put_varint(&mut body, *features);
                put_varint(&mut body, *udp_idle_timeout_ms);
                put_varint(&mut body, *max_udp_sessions);
                FT_AUTH_RESPONSE
            }
            Frame::ConnectRequest { addr } => {
                addr.encode(&mut body);
                FT_CONNECT_REQUEST
            }
            Frame::ConnectResponse { status, remote } => {
                put_varint(&mut body, u64::from(status.socks_code()));
                put_sockaddr_opt(&mut body, *remote);
                FT_CONNECT_RESPONSE
            }
            Frame::UdpOpen {
                session_id,
                flags,
                addr,
                idle_timeout_ms,
            } => {
                body.put_u32(*session_id);
                put_varint(&mut body, *flags);
                addr.encode(&mut body);
                put_varint(&mut body, *idle_timeout_ms);
                FT_UDP_OPEN
            }
            Frame::UdpResp {
                session_id,
                status,
                idle_timeout_ms,
                remote,
            } => {
                body.put_u32(*session_id);
                put_varint(&mut body, status.code());
                put_varint(&mut body, *idle_timeout_ms);
                put_sockaddr_opt(&mut body, *remote);
                FT_UDP_RESP
            }
            Frame::UdpClose { session_id, reason } => {
                body.put_u32(*session_id);
                put_varint(&mut body, reason.code());
                FT_UDP_CLOSE
            }
            Frame::PathBind {
                bundle,
                path_index,
                scheduler,
            } => {
                body.put_slice(bundle);
                put_varint(&mut body, *path_index);
                put_varint(&mut body, *scheduler);
                FT_PATH_BIND
            }
            Frame::MpConnect { flow_id, addr } => {
                put_varint(&mut body, *flow_id);
                addr.encode(&mut body);
                FT_MP_CONNECT
            }
            Frame::Subflow { flow_id } => {
                put_varint(&mut body, *flow_id);
                FT_SUBFLOW
            }
            Frame::Unknown { frame_type } => *frame_type,
        };
        put_varint(&mut body, padding as u64);
        body.put_bytes(0, padding);
        put_varint(out, ft);
        put_varint(out, body.len() as u64);
        out.put_slice(&body);
    }

    /// Encodes the frame without padding.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_padded(out, 0);
    }

    /// The frame as bytes, without padding.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }

    /// Cheap completeness test: the length of the first frame in `buf` once all of it is
    /// there, `Ok(None)` while more bytes are needed.
    pub fn check(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
        let Some((_, n1)) = get_varint(buf) else {
            return Ok(None);
        };
        let Some((len, n2)) = get_varint(&buf[n1..]) else {
            return Ok(None);
        };
        if len > MAX_FRAME_BODY as u64 {
            return Err(DecodeError::TooLong {
                field: "frame body",
                len,
                limit: MAX_FRAME_BODY,
            });
        }
        let total = n1 + n2 + len as usize;
        Ok((buf.len() >= total).then_some(total))
    }

    /// Decodes the first frame in `buf`: the frame and the bytes it used, or `Ok(None)` while
    /// more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
        let Some(total) = Frame::check(buf)? else {
            return Ok(None);
        };
        let (ft, n1) = get_varint(buf).ok_or(DecodeError::Truncated("frame type"))?;
        let (_, n2) = get_varint(&buf[n1..]).ok_or(DecodeError::Truncated("frame length"))?;
        let mut c = Cursor {
            buf: &buf[n1 + n2..total],
        };
        let frame = match ft {
            FT_AUTH_REQUEST => Frame::AuthRequest {
                version: c.varint("version")?,
                client_id: c.text("client id", MAX_TEXT_LEN)?,
                token: c.string("token", MAX_TOKEN_LEN)?.to_vec(),
                features: c.varint("features")?,
            },
            FT_AUTH_RESPONSE => Frame::AuthResponse {
                status: AuthStatus::from_code(c.varint("status")?),
                features: c.varint("features")?,
                udp_idle_timeout_ms: c.varint("idle timeout")?,
                max_udp_sessions: c.varint("session limit")?,
            },
            FT_CONNECT_REQUEST => Frame::ConnectRequest {
                addr: take_addr(&mut c)?,
            },
            FT_CONNECT_RESPONSE => Frame::ConnectResponse {
                status: ConnectStatus::from_socks_code(c.varint("status")?),
                remote: take_sockaddr_opt(&mut c)?,
            },
            FT_UDP_OPEN => Frame::UdpOpen {
                session_id: c.u32("session id")?,
                flags: c.varint("flags")?,
                addr: take_addr(&mut c)?,
                idle_timeout_ms: c.varint("idle timeout")?,
            },
            FT_UDP_RESP => Frame::UdpResp {
                session_id: c.u32("session id")?,
                status: UdpStatus::from_code(c.varint("status")?),
                idle_timeout_ms: c.varint("idle timeout")?,
                remote: take_sockaddr_opt(&mut c)?,
            },
            FT_UDP_CLOSE => Frame::UdpClose {
                session_id: c.u32("session id")?,
                reason: CloseReason::from_code(c.varint("reason")?),
            },
            FT_PATH_BIND => Frame::PathBind {
                bundle: c
                    .bytes(BUNDLE_ID_LEN, "bundle id")?
                    .try_into()
                    .expect("BUNDLE_ID_LEN bytes"),
                path_index: c.varint("path index")?,
                scheduler: c.varint("scheduler")?,
            },
            FT_MP_CONNECT => Frame::MpConnect {
                flow_id: c.varint("flow id")?,
                addr: take_addr(&mut c)?,
            },
            FT_SUBFLOW => Frame::Subflow {
                flow_id: c.varint("flow id")?,
            },
            other => return Ok(Some((Frame::Unknown { frame_type: other }, total))),
        };
        // Padding: present in every known frame. Bytes after it are extensions, ignored.
        let pad = c.varint("padding length")?;
        if pad > c.buf.len() as u64 {
            return Err(DecodeError::Truncated("padding"));
        }
        Ok(Some((frame, total)))
    }
}

// ---------------------------------------------------------------------------------------------
// DATAGRAM header.

/// The 9-byte big-endian header on every DATAGRAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramHeader {
    /// The UDP session (from UDP_SESSION_OPEN).
    pub session_id: u32,
    /// Per-session, per-direction packet counter (wraps); groups fragments.
    pub packet_id: u16,
    /// Reserved, 0; ignored on receipt.
    pub flags: u8,
    /// Index of this fragment, `< frag_count`.
    pub frag_id: u8,
    /// Fragments in the packet, `>= 1`.
    pub frag_count: u8,
}

impl DatagramHeader {
    /// The header bytes.
    pub fn to_bytes(&self) -> [u8; DATAGRAM_HEADER_LEN] {
        let s = self.session_id.to_be_bytes();
        let p = self.packet_id.to_be_bytes();
        [
            s[0],
            s[1],
            s[2],
            s[3],
            p[0],
            p[1],
            self.flags,
            self.frag_id,
            self.frag_count,
        ]
    }

    /// Splits a DATAGRAM into its header and payload.
    pub fn decode(d: &[u8]) -> Result<(DatagramHeader, &[u8]), DecodeError> {
        if d.len() < DATAGRAM_HEADER_LEN {
            return Err(DecodeError::Truncated("datagram header"));
        }
        let h = DatagramHeader {
            session_id: u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
            packet_id: u16::from_be_bytes([d[4], d[5]]),
            flags: d[6],
            frag_id: d[7],
            frag_count: d[8],
        };
        if h.frag_count == 0 || h.frag_id >= h.frag_count {
            return Err(DecodeError::Invalid("fragment index"));
        }
        Ok((h, &d[DATAGRAM_HEADER_LEN..]))
    }
}

/// Why a packet could not be fragmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FragmentError {
    /// Larger than [`MAX_PACKET`].
    #[error("packet of {0} bytes exceeds the {MAX_PACKET}-byte limit")]
    TooLarge(usize),
    /// The connection's DATAGRAM size leaves no room, or needs more than 255 fragments.
    #[error("a {len}-byte packet does not fit 255 fragments of a {max_datagram}-byte DATAGRAM")]
    DatagramTooSmall {
        /// Packet length.
        len: usize,
        /// The connection's current maximum DATAGRAM size.
        max_datagram: usize,
    },
}

/// Splits `payload` into DATAGRAMs (header included) no larger than `max_datagram` bytes.
/// Fragments are equal-sized except the last, and a packet that fits goes unfragmented.
pub fn fragment(
    session_id: u32,
    packet_id: u16,
    payload: &[u8],
    max_datagram: usize,
) -> Result<Vec<Bytes>, FragmentError> {
    if payload.len() > MAX_PACKET {
        return Err(FragmentError::TooLarge(payload.len()));
    }
    let too_small = FragmentError::DatagramTooSmall {
        len: payload.len(),
        max_datagram,
    };
    let chunk = max_datagram
        .checked_sub(DATAGRAM_HEADER_LEN)
        .filter(|c| *c > 0)
        .ok_or(too_small)?;
    let count = payload.len().div_ceil(chunk).max(1);
    if count > MAX_FRAGMENTS {
        return Err(too_small);
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let part = &payload[(i * chunk).min(payload.len())..((i + 1) * chunk).min(payload.len())];
        let mut b = BytesMut::with_capacity(DATAGRAM_HEADER_LEN + part.len());
        b.put_slice(
            &DatagramHeader {
                session_id,
                packet_id,
                flags: 0,
                frag_id: i as u8,
                frag_count: count as u8,
            }
            .to_bytes(),
        );
        b.put_slice(part);
        out.push(b.freeze());
    }
    Ok(out)
}

/// One packet being reassembled.
#[derive(Debug)]
struct Slot {
    packet_id: u16,
    frag_count: u8,
    parts: Vec<Option<Bytes>>,
    received: usize,
    bytes: usize,
    started: Instant,
    last_used: u64,
}

/// What [`Reassembler::push`] did with a fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reassembled {
    /// A whole packet.
    Packet(Bytes),
    /// Stored; the packet is not complete yet.
    Pending,
    /// A fragment already held: ignored.
    Duplicate,
    /// The packet would exceed [`MAX_PACKET`]: the slot was dropped.
    Oversized,
}

/// Reassembles fragmented packets of one session and direction: [`REASSEMBLY_SLOTS`] packets in
/// progress, least recently used evicted, bounded at [`MAX_PACKET`] bytes each. No
/// retransmission: a packet missing a fragment is evicted or times out.
#[derive(Debug, Default)]
pub struct Reassembler {
    slots: VecDeque<Slot>,
    tick: u64,
    buffered: usize,
}

impl Reassembler {
    /// An empty reassembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Payload bytes held in incomplete packets (for a per-connection budget).
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Feeds one fragment (`header` already validated by [`DatagramHeader::decode`]).
    pub fn push(&mut self, now: Instant, header: &DatagramHeader, payload: &[u8]) -> Reassembled {
        if header.frag_count <= 1 {
            return Reassembled::Packet(Bytes::copy_from_slice(payload));
        }
        self.tick += 1;
        let tick = self.tick;
        // Expire stale slots first: their packets lost a fragment.
        let before = self.slots.len();
        self.slots
            .retain(|s| now.saturating_duration_since(s.started) < REASSEMBLY_TIMEOUT);
        if self.slots.len() != before {
            self.buffered = self.slots.iter().map(|s| s.bytes).sum();
        }
        let idx = match self
            .slots
            .iter()
            .position(|s| s.packet_id == header.packet_id)
        {
            // The same id with another fragment count is a new packet after the id wrapped.
            Some(i) if self.slots[i].frag_count != header.frag_count => {
                self.remove(i);
                self.insert(now, header, tick)
            }
            Some(i) => i,
            None => self.insert(now, header, tick),
        };
        let slot = &mut self.slots[idx];
        slot.last_used = tick;
        let part = &mut slot.parts[header.frag_id as usize];
        if part.is_some() {
            return Reassembled::Duplicate;
        }
        if slot.bytes + payload.len() > MAX_PACKET {
            self.remove(idx);
            return Reassembled::Oversized;
        }
        *part = Some(Bytes::copy_from_slice(payload));
        slot.received += 1;
        slot.bytes += payload.len();
        self.buffered += payload.len();
        if slot.received < slot.frag_count as usize {
            return Reassembled::Pending;
        }
        let slot = self.remove(idx);
        let mut out = BytesMut::with_capacity(slot.bytes);
        for p in slot.parts.into_iter().flatten() {
            out.put_slice(&p);
        }
        Reassembled::Packet(out.freeze())
    }

    fn insert(&mut self, now: Instant, header: &DatagramHeader, tick: u64) -> usize {
        if self.slots.len() >= REASSEMBLY_SLOTS {
            let lru = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i)
                .expect("slots is full, so not empty");
            self.remove(lru);
        }
        self.slots.push_back(Slot {
            packet_id: header.packet_id,
            frag_count: header.frag_count,
            parts: vec![None; header.frag_count as usize],
            received: 0,
            bytes: 0,
            started: now,
            last_used: tick,
        });
        self.slots.len() - 1
    }

    fn remove(&mut self, i: usize) -> Slot {
        let s = self.slots.remove(i).expect("index from position()");
        self.buffered -= s.bytes;
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Records on multipath TCP subflow streams.

/// Largest DATA record payload. Chunks are what the scheduler places on a path and what is
/// retransmitted on another one when a path dies: small enough to spread one flow over paths
/// finely, large enough that the 2-10 byte header costs nothing.
pub const MAX_CHUNK: usize = 64 * 1024;

const REC_DATA: u8 = 0x00;
const REC_ACK: u8 = 0x01;
const REC_FIN: u8 = 0x02;

/// One record on a subflow stream (after its MP_CONNECT/SUBFLOW frame). Both directions carry
/// them: DATA for the sender's byte stream, ACK and FIN about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Bytes `offset..offset + data.len()` of the sender's byte stream.
    Data {
        /// Byte offset in the flow (not in this subflow).
        offset: u64,
        /// 1..=[`MAX_CHUNK`] bytes.
        data: Bytes,
    },
    /// The receiver has every byte before `received` and has written every byte before
    /// `delivered` to its TCP socket (both cumulative, end to end, over all paths).
    /// `received` ends the sender's resend duty and frees the paths' room; `delivered` frees
    /// the flow window, so an application that stops reading holds only its own flow.
    Ack {
        /// Bytes written to TCP in order.
        delivered: u64,
        /// Bytes received in order (at least `delivered`).
        received: u64,
    },
    /// The sender's byte stream ends at `offset` (its TCP side sent FIN).
    Fin {
        /// Total length of the byte stream.
        offset: u64,
    },
}

impl Record {
    /// Appends the encoding.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Record::Data { offset, data } => {
                out.put_u8(REC_DATA);
                put_varint(out, *offset);
                put_varint(out, data.len() as u64);
                out.put_slice(data);
            }
            Record::Ack {
                delivered,
                received,
            } => {
                out.put_u8(REC_ACK);
                put_varint(out, *delivered);
                put_varint(out, *received);
            }
            Record::Fin { offset } => {
                out.put_u8(REC_FIN);
                put_varint(out, *offset);
            }
        }
    }

    /// Encoded size of a DATA record's header (what precedes its payload).
    pub fn data_header(offset: u64, len: usize) -> BytesMut {
        let mut b = BytesMut::with_capacity(17);
        b.put_u8(REC_DATA);
        put_varint(&mut b, offset);
        put_varint(&mut b, len as u64);
        b
    }

    /// Decodes the first record of `buf` (splitting it off), `Ok(None)` while more bytes are
    /// needed. DATA payloads are split off without copying.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Record>, DecodeError> {
        let Some(&ty) = buf.first() else {
            return Ok(None);
        };
        let rest = &buf[1..];
        let Some((a, n1)) = get_varint(rest) else {
            return Ok(None);
        };
        let r = match ty {
            REC_DATA => {
                let Some((len, n2)) = get_varint(&rest[n1..]) else {
                    return Ok(None);
                };
                if len == 0 || len > MAX_CHUNK as u64 {
                    return Err(DecodeError::TooLong {
                        field: "chunk",
                        len,
                        limit: MAX_CHUNK,
                    });
                }
                if a.checked_add(len).is_none_or(|end| end > VARINT_MAX) {
                    return Err(DecodeError::Invalid("chunk offset"));
                }
                let head = 1 + n1 + n2;
                if buf.len() < head + len as usize {
                    return Ok(None);
                }
                let _ = buf.split_to(head);
                Record::Data {
                    offset: a,
                    data: buf.split_to(len as usize).freeze(),
                }
            }
            REC_ACK => {
                let Some((received, n2)) = get_varint(&rest[n1..]) else {
                    return Ok(None);
                };
                if received < a {
                    return Err(DecodeError::Invalid("ack received below delivered"));
                }
                let _ = buf.split_to(1 + n1 + n2);
                Record::Ack {
                    delivered: a,
                    received,
                }
            }
            REC_FIN => {
                let _ = buf.split_to(1 + n1);
                Record::Fin { offset: a }
            }
            _ => return Err(DecodeError::Invalid("record type")),
        };
        Ok(Some(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn varint_snapshots() {
        for (v, hex) in [
            (37u64, "25"),
            (15293, "7bbd"),
            (494878333, "9d7f3e7d"),
            (151288809941952652, "c2197c5eff14e88c"),
        ] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(hex::encode(&b), hex);
            assert_eq!(get_varint(&b), Some((v, b.len())));
            assert_eq!(varint_len(v), b.len());
        }
    }

    #[test]
    fn datagram_header_snapshot() {
        let h = DatagramHeader {
            session_id: 0x01020304,
            packet_id: 0x0506,
            flags: 0,
            frag_id: 1,
            frag_count: 3,
        };
        assert_eq!(hex::encode(h.to_bytes()), "010203040506000103");
        let mut d = h.to_bytes().to_vec();
        d.extend_from_slice(b"xy");
        assert_eq!(DatagramHeader::decode(&d), Ok((h, &b"xy"[..])));
        assert!(DatagramHeader::decode(&d[..8]).is_err());
        d[7] = 3; // frag_id == frag_count
        assert!(DatagramHeader::decode(&d).is_err());
        d[8] = 0;
        d[7] = 0;
        assert!(DatagramHeader::decode(&d).is_err());
    }

    #[test]
    fn frame_snapshots() {
        let f = Frame::UdpOpen {
            session_id: 7,
            flags: 0,
            addr: TargetAddr::Ip("1.2.3.4:53".parse().expect("literal")),
            idle_timeout_ms: 30_000,
        };
        // type 05, len 17, id 00000007, flags 00, 01 01020304 0035, 30000 = 80007530, pad 00
        assert_eq!(
            hex::encode(f.to_bytes()),
            "05110000000700010102030400358000753000"
        );
        let f = Frame::AuthRequest {
            version: 1,
            client_id: "c".into(),
            token: b"tk".to_vec(),
            features: FEATURE_UDP,
        };
        assert_eq!(hex::encode(f.to_bytes()), "010801016302746b0100");
    }

    #[test]
    fn frames_skip_extensions_and_unknown_types() {
        // A known frame with padding and trailing extension bytes decodes; the trailer is skipped.
        let f = Frame::UdpClose {
            session_id: 9,
            reason: CloseReason::Idle,
        };
        let mut b = BytesMut::new();
        f.encode_padded(&mut b, 3);
        let mut raw = b.to_vec();
        raw[1] += 2; // two extension bytes after the padding
        raw.extend_from_slice(&[0xee, 0xee]);
        raw.extend_from_slice(&Frame::Unknown { frame_type: 0x30 }.to_bytes());
        let (got, n) = Frame::decode(&raw).expect("valid").expect("complete");
        assert_eq!(got, f);
        let (got, _) = Frame::decode(&raw[n..]).expect("valid").expect("complete");
        assert_eq!(got, Frame::Unknown { frame_type: 0x30 });
    }

    #[test]
    fn oversized_frame_rejected_early() {
        let mut b = BytesMut::new();
        put_varint(&mut b, 1);
        put_varint(&mut b, MAX_FRAME_BODY as u64 + 1);
        assert!(matches!(Frame::check(&b), Err(DecodeError::TooLong { .. })));
    }

    #[test]
    fn fragment_sizes_are_exact() {
        // 3,000 bytes at a 1,200-byte DATAGRAM: chunks of 1,191, 1,191 and 618.
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let frags = fragment(1, 2, &payload, 1200).expect("fits");
        let lens: Vec<usize> = frags.iter().map(|f| f.len()).collect();
        assert_eq!(lens, vec![1200, 1200, 627]);
        let mut r = Reassembler::new();
        let now = Instant::now();
        let mut out = None;
        for f in frags.iter().rev() {
            let (h, p) = DatagramHeader::decode(f).expect("valid");
            if let Reassembled::Packet(b) = r.push(now, &h, p) {
                out = Some(b);
            }
        }
        assert_eq!(out.as_deref(), Some(&payload[..]));
        assert_eq!(r.buffered_bytes(), 0);
        // Exactly a DATAGRAM's worth stays unfragmented; one more byte makes two fragments.
        assert_eq!(
            fragment(1, 2, &payload[..1191], 1200).expect("fits").len(),
            1
        );
        assert_eq!(
            fragment(1, 2, &payload[..1192], 1200).expect("fits").len(),
            2
        );
        assert_eq!(fragment(1, 2, &[], 1200).expect("fits").len(), 1);
        assert!(fragment(1, 2, &payload, 9).is_err());
        assert!(fragment(1, 2, &vec![0; MAX_PACKET + 1], 1200).is_err());
    }

    #[test]
    fn reassembly_lru_duplicates_and_timeout() {
        let now = Instant::now();
        let mut r = Reassembler::new();
        let h = |packet_id, frag_id| DatagramHeader {
            session_id: 1,
            packet_id,
            flags: 0,
            frag_id,
            frag_count: 2,
        };
        assert_eq!(r.push(now, &h(1, 0), b"a"), Reassembled::Pending);
        assert_eq!(r.push(now, &h(1, 0), b"a"), Reassembled::Duplicate);
        for id in 2..=5 {
            assert_eq!(r.push(now, &h(id, 0), b"b"), Reassembled::Pending);
        }
        // Packet 1 was least recently used and is gone: its second half starts a new slot.
        assert_eq!(r.push(now, &h(1, 1), b"c"), Reassembled::Pending);
        assert_eq!(
            r.push(now, &h(5, 1), b"d"),
            Reassembled::Packet(Bytes::from_static(b"bd"))
        );
        // After the timeout everything pending is dropped.
        let later = now + REASSEMBLY_TIMEOUT;
        assert_eq!(r.push(later, &h(4, 1), b"e"), Reassembled::Pending);
        assert_eq!(r.buffered_bytes(), 1);
    }

    fn arb_addr() -> impl Strategy<Value = TargetAddr> {
        prop_oneof![
            any::<(u32, u16)>()
                .prop_map(|(ip, p)| TargetAddr::Ip(SocketAddr::new(Ipv4Addr::from(ip).into(), p))),
            any::<(u128, u16)>()
                .prop_map(|(ip, p)| TargetAddr::Ip(SocketAddr::new(Ipv6Addr::from(ip).into(), p))),
            ("[a-z0-9.-]{1,255}", any::<u16>()).prop_map(|(d, p)| TargetAddr::Domain(d, p)),
        ]
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let sa = || {
            prop::option::of(
                any::<(u32, u16)>()
                    .prop_map(|(ip, p)| SocketAddr::new(Ipv4Addr::from(ip).into(), p)),
            )
        };
        prop_oneof![
            (
                0..VARINT_MAX,
                "[ -~]{0,64}",
                prop::collection::vec(any::<u8>(), 0..MAX_TOKEN_LEN),
                0..VARINT_MAX
            )
                .prop_map(|(version, client_id, token, features)| Frame::AuthRequest {
                    version,
                    client_id,
                    token,
                    features
                }),
            (0..3u64, 0..VARINT_MAX, 0..VARINT_MAX, 0..VARINT_MAX).prop_map(|(s, f, t, m)| {
                Frame::AuthResponse {
                    status: AuthStatus::from_code(s),
                    features: f,
                    udp_idle_timeout_ms: t,
                    max_udp_sessions: m,
                }
            }),
            arb_addr().prop_map(|addr| Frame::ConnectRequest { addr }),
            (0..9u64, sa()).prop_map(|(c, remote)| Frame::ConnectResponse {
                status: ConnectStatus::from_socks_code(c),
                remote
            }),
            (any::<u32>(), 0..VARINT_MAX, arb_addr(), 0..VARINT_MAX).prop_map(
                |(session_id, flags, addr, idle_timeout_ms)| Frame::UdpOpen {
                    session_id,
                    flags,
                    addr,
                    idle_timeout_ms
                }
            ),
            (any::<u32>(), 0..100u64, 0..VARINT_MAX, sa()).prop_map(|(id, s, t, remote)| {
                Frame::UdpResp {
                    session_id: id,
                    status: UdpStatus::from_code(s),
                    idle_timeout_ms: t,
                    remote,
                }
            }),
            (any::<u32>(), 0..100u64).prop_map(|(id, r)| Frame::UdpClose {
                session_id: id,
                reason: CloseReason::from_code(r)
            }),
            (any::<[u8; BUNDLE_ID_LEN]>(), 0..VARINT_MAX, 0..VARINT_MAX).prop_map(
                |(bundle, path_index, scheduler)| Frame::PathBind {
                    bundle,
                    path_index,
                    scheduler
                }
            ),
            (0..VARINT_MAX, arb_addr())
                .prop_map(|(flow_id, addr)| Frame::MpConnect { flow_id, addr }),
            (0..VARINT_MAX).prop_map(|flow_id| Frame::Subflow { flow_id }),
        ]
    }

    proptest! {
        #[test]
        fn frame_round_trip(f in arb_frame(), pad in 0usize..64) {
            let mut b = BytesMut::new();
            f.encode_padded(&mut b, pad);
            prop_assert_eq!(Frame::check(&b), Ok(Some(b.len())));
            let (g, n) = Frame::decode(&b).expect("valid").expect("complete");
            prop_assert_eq!(n, b.len());
            prop_assert_eq!(g, f);
            // Every strict prefix asks for more bytes, never errors or misparses.
            for cut in 0..b.len() {
                prop_assert_eq!(Frame::decode(&b[..cut]), Ok(None));
            }
        }

        #[test]
        fn frame_decode_never_panics(raw in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Some((_, n))) = Frame::decode(&raw) {
                prop_assert!(n <= raw.len());
            }
        }

        #[test]
        fn addr_round_trip(a in arb_addr()) {
            let mut b = BytesMut::new();
            a.encode(&mut b);
            prop_assert_eq!(b.len(), a.encoded_len());
            prop_assert_eq!(TargetAddr::decode(&b), Ok(Some((a.clone(), b.len()))));
            // A domain that looks like an IP address parses back as one: skip those.
            if !matches!(&a, TargetAddr::Domain(d, _) if d.parse::<IpAddr>().is_ok()) {
                let s = a.to_string();
                prop_assert_eq!(s.parse::<TargetAddr>().expect("own display parses"), a);
            }
        }

        #[test]
        fn header_round_trip(s: u32, p: u16, f: u8, count in 1u8..=255, id: u8) {
            let h = DatagramHeader { session_id: s, packet_id: p, flags: f, frag_id: id % count, frag_count: count };
            let b = h.to_bytes();
            prop_assert_eq!(DatagramHeader::decode(&b), Ok((h, &[][..])));
        }

        #[test]
        fn fragment_reassemble_round_trip(
            len in 0usize..=MAX_PACKET,
            max in 100usize..1500,
            seed: u64,
        ) {
            let payload: Vec<u8> = (0..len).map(|i| (i as u64 ^ seed) as u8).collect();
            match fragment(3, 4, &payload, max) {
                Ok(frags) => {
                    let mut order: Vec<usize> = (0..frags.len()).collect();
                    // A deterministic shuffle plus a duplicate (a whole unfragmented packet
                    // repeated is simply a second packet, so only fragments are duplicated).
                    order.sort_by_key(|i| (*i as u64).wrapping_mul(seed | 1) % 1009);
                    if frags.len() > 1 {
                        order.insert(1, order[0]);
                    }
                    let mut r = Reassembler::new();
                    let now = Instant::now();
                    let mut got = None;
                    for i in order {
                        prop_assert!(frags[i].len() <= max);
                        let (h, p) = DatagramHeader::decode(&frags[i]).expect("valid");
                        if let Reassembled::Packet(b) = r.push(now, &h, p) {
                            prop_assert!(got.is_none());
                            got = Some(b);
                        }
                    }
                    prop_assert_eq!(got.as_deref(), Some(&payload[..]));
                    prop_assert_eq!(r.buffered_bytes(), 0);
                }
                Err(_) => prop_assert!(len.div_ceil(max - DATAGRAM_HEADER_LEN) > MAX_FRAGMENTS),
            }
        }

        #[test]
        fn reassembly_stays_bounded(dgrams in prop::collection::vec(prop::collection::vec(any::<u8>(), 9..2000), 0..200)) {
            let mut r = Reassembler::new();
            let now = Instant::now();
            for d in &dgrams {
                if let Ok((h, p)) = DatagramHeader::decode(d) {
                    if let Reassembled::Packet(b) = r.push(now, &h, p) {
                        prop_assert!(b.len() <= MAX_PACKET);
                    }
                }
                prop_assert!(r.buffered_bytes() <= REASSEMBLY_SLOTS * MAX_PACKET);
                prop_assert!(r.slots.len() <= REASSEMBLY_SLOTS);
            }
        }
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (
                0..VARINT_MAX - MAX_CHUNK as u64,
                prop::collection::vec(any::<u8>(), 1..2000)
            )
                .prop_map(|(offset, d)| Record::Data {
                    offset,
                    data: Bytes::from(d)
                }),
            (0..VARINT_MAX, 0..VARINT_MAX).prop_map(|(a, b)| Record::Ack {
                delivered: a.min(b),
                received: a.max(b),
            }),
            (0..VARINT_MAX).prop_map(|offset| Record::Fin { offset }),
        ]
    }

    #[test]
    fn record_snapshots() {
        let mut b = BytesMut::new();
        Record::Data {
            offset: 64,
            data: Bytes::from_static(b"hi"),
        }
        .encode(&mut b);
        Record::Ack {
            delivered: 5,
            received: 66,
        }
        .encode(&mut b);
        Record::Fin { offset: 66 }.encode(&mut b);
        assert_eq!(hex::encode(&b), "00404002686901054042024042");
        let mut bad = BytesMut::from(&b"\x01\x05\x04"[..]);
        assert!(
            Record::decode(&mut bad).is_err(),
            "received below delivered"
        );
        let mut bad = BytesMut::from(&b"\x00\x00\x00"[..]);
        assert!(Record::decode(&mut bad).is_err(), "empty chunk");
        let mut bad = BytesMut::from(&b"\x07\x00"[..]);
        assert!(Record::decode(&mut bad).is_err(), "unknown type");
    }

    proptest! {
        #[test]
        fn record_round_trip(rs in prop::collection::vec(arb_record(), 1..8)) {
            let mut b = BytesMut::new();
            for r in &rs {
                r.encode(&mut b);
            }
            let whole = b.clone();
            for r in &rs {
                let got = Record::decode(&mut b).expect("valid");
                prop_assert_eq!(got.as_ref(), Some(r));
            }
            prop_assert!(b.is_empty());
            // A strict prefix asks for more bytes and consumes nothing.
            for cut in 0..whole.len().min(40) {
                let mut p = BytesMut::from(&whole[..cut]);
                if let Ok(None) = Record::decode(&mut p) {
                    prop_assert_eq!(p.len(), cut);
                }
            }
        }

        #[test]
        fn record_decode_never_panics(raw in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut b = BytesMut::from(&raw[..]);
            while let Ok(Some(_)) = Record::decode(&mut b) {}
        }
    }
}
