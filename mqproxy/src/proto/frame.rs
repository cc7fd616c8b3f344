//! Control frames: the stream-type prefixes' bodies (auth, connect, UDP session, multipath).

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};

use super::*;

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
    pub(super) fn code(self) -> u64 {
        match self {
            AuthStatus::Ok => 0,
            AuthStatus::BadToken => 1,
            AuthStatus::BadVersion => 2,
            AuthStatus::Other(c) => c,
        }
    }
    pub(super) fn from_code(c: u64) -> Self {
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
    pub(super) fn code(self) -> u64 {
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
    pub(super) fn from_code(c: u64) -> Self {
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
    pub(super) fn code(self) -> u64 {
        match self {
            CloseReason::Idle => 0,
            CloseReason::SocketError => 1,
            CloseReason::Shutdown => 2,
            CloseReason::Other(c) => c,
        }
    }
    pub(super) fn from_code(c: u64) -> Self {
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
