//! The SDK's error type: every failure names what was tried and what to check.

use std::net::SocketAddr;
use std::time::Duration;

use quic_relay::proto::ErrReason;
use uuid::Uuid;

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The UDP socket could not be created or configured.
    #[error("UDP socket {addr}: {what}: {source}")]
    Socket {
        /// The address involved.
        addr: SocketAddr,
        /// Which step failed.
        what: &'static str,
        /// The system's error.
        source: std::io::Error,
    },
    /// An IPv4 socket cannot reach an IPv6 relay.
    #[error("socket {local} is IPv4 but the relay {relay} is IPv6: bind an IPv6 socket")]
    AddressFamily {
        /// The socket's address.
        local: SocketAddr,
        /// The relay's.
        relay: SocketAddr,
    },
    /// No relay answered a registration in time.
    #[error(
        "no reply from relay {relay} within {waited:?}: is it running, and is UDP (or TCP, same port) to it allowed?"
    )]
    RelayUnreachable {
        /// The relay tried.
        relay: SocketAddr,
        /// How long.
        waited: Duration,
    },
    /// The relay refused the registration.
    #[error("relay {relay} refused the registration: {}", reason.map_or("unknown reason", ErrReason::as_str))]
    Refused {
        /// The relay.
        relay: SocketAddr,
        /// Its reason (`None` if this version does not know the word).
        reason: Option<ErrReason>,
    },
    /// The other peer did not register the session in time.
    #[error("the other peer did not join session {session} within {waited:?}")]
    PeerTimeout {
        /// The session.
        session: Uuid,
        /// How long.
        waited: Duration,
    },
    /// TLS configuration failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// A fingerprint is not 64 hex digits.
    #[error("bad certificate fingerprint {0:?}: expected 64 hex digits (SHA-256)")]
    BadFingerprint(String),
    /// The Quinn endpoint could not be created.
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    /// Starting the QUIC handshake failed.
    #[error("QUIC connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC handshake failed (e.g. the certificate did not match the pin).
    #[error("QUIC connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The endpoint was closed before a peer connected.
    #[error("the endpoint closed before a peer connected")]
    EndpointClosed,
}
