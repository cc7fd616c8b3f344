//! `mqproxy`: a multipath QUIC proxy that carries SOCKS5 TCP and UDP ASSOCIATE over one QUIC
//! connection (UDP as QUIC DATAGRAMs), directly or through the `quic-relay` via `peer_sdk`.
//!
//! This crate is being built; see the project's issue tracker for the planned server, client,
//! `udpsocks` and UDP-over-TCP tools.

/// The peer SDK this proxy reaches its server through.
pub use peer_sdk;
