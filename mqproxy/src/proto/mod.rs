//! The mqproxy wire format, pure and sans-IO: QUIC varints, control frames, target addresses,
//! the 9-byte DATAGRAM header, fragmentation and reassembly. `PROTOCOL.md` is the prose version.
//!
//! One file per section: [`varint`] (RFC 9000 varints and the frame-body cursor), [`addr`]
//! (SOCKS5-layout target addresses), [`frame`] (control frames), [`datagram`] (the DATAGRAM
//! header, fragmentation, reassembly) and [`record`] (records on multipath subflow streams).
//! Everything is re-exported here, so `proto::X` names any of them.

pub mod addr;
pub mod datagram;
pub mod frame;
pub mod record;
pub mod varint;

pub use addr::*;
pub use datagram::*;
pub use frame::*;
pub use record::*;
pub use varint::*;

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

/// Application close codes of the proxy's QUIC connections.
pub mod close {
    /// Normal shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// The token was wrong (or the version unsupported).
    pub const AUTH_FAILED: u32 = 0x10;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 0x11;
    /// The client did not authenticate in time.
    pub const AUTH_TIMEOUT: u32 = 0x12;
}

#[cfg(test)]
mod tests;
