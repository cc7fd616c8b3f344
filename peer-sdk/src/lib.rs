//! `peer_sdk`: what applications call to get a QUIC connection to a peer behind a NAT.
//!
//! The SDK keeps the NAT mapping alive on the very socket Quinn uses, tries a hole-punched
//! direct path, and falls back to the `quic-relay` rendezvous relay when punching fails. It
//! shares the relay's wire format through `quic_relay::proto`, so the two cannot drift apart.
//!
//! This crate is being built; see the project's issue tracker for its planned API
//! (`connect_via_relay`, `connect`/`accept`).

/// The relay wire format this SDK speaks (re-exported so applications need one dependency).
pub use quic_relay::proto;
