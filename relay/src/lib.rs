//! `quic-relay`: a UDP rendezvous relay for peers that cannot reach each other directly.
//!
//! Two peers send `REG:<session-uuid>\n`; once both registered, the relay forwards every other
//! datagram from one to the other. It carries QUIC (or anything else over UDP) without looking
//! inside. `PROTOCOL.md` beside this crate's manifest specifies the wire format.
//!
//! Modules:
//! - [`proto`]: the wire format (registrations, replies, tokens). Pure; the only part compiled
//!   with `default-features = false, features = ["proto"]`, which is what the SDK uses.
//! - [`sessions`]: the session table as a sans-IO state machine (datagram in, action out).
//! - [`server`]: the socket loop (batched `recvmmsg`/`sendmmsg`) driving the state machine.
//! - [`frame`]: the framing of datagrams on TCP (`u16` length prefix). Pure, like `proto`.
//! - [`tcp`]: the TCP listener for peers whose UDP is blocked (length-prefixed datagrams).
//! - [`metrics`]: counters published by the loop and served as Prometheus text.
//! - [`config`]: command-line and environment configuration.
//! - [`defaults`]: every timeout and size, documented in one place.

#![cfg_attr(docsrs, feature(doc_cfg))]

// With no feature at all the crate is empty (it still compiles, so `--no-default-features`
// is a valid starting point for picking features).
#[cfg(feature = "proto")]
pub mod frame;
#[cfg(feature = "proto")]
pub mod proto;

#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod defaults;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod sessions;
#[cfg(feature = "server")]
pub mod tcp;
