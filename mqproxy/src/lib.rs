//! `mqproxy`: a QUIC proxy that carries SOCKS5 TCP CONNECT, HTTP CONNECT and SOCKS5 UDP
//! ASSOCIATE over QUIC (UDP as QUIC DATAGRAMs), after the original C mqproxy: one connection,
//! or one per network path with `--path` (multipath: TCP striped, UDP scheduled per packet).
//!
//! Modules, lowest first; a module imports only modules above it in this list (pure ones need
//! no runtime and do no IO):
//! - [`defaults`]: every timeout and limit with its reason; pure.
//! - [`proto`]: the wire format (varints, target addresses, control frames, the DATAGRAM
//!   header with fragmentation and reassembly, subflow records, close codes); pure.
//!   `PROTOCOL.md` beside `Cargo.toml` describes it in prose.
//! - [`socks`]: SOCKS5 (RFC 1928, RFC 1929) and HTTP CONNECT parsing; pure.
//! - [`policy`]: the destination policy every server-side front end applies; pure.
//! - [`multipath::sched`]: scheduling, reorder and send buffers, the UDP duplicate filter; pure.
//! - [`datagram_rx`]: the DATAGRAM receive pipeline both roles run (decode, reassembly within
//!   a budget, duplicate filter); pure.
//! - [`logging`]: the binaries' log setup and escaping of peer-chosen text.
//! - [`tls`]: server certificates (kept self-signed or from files) and client verification.
//! - [`udp`]: the server's UDP session table, pre-OPEN buffer, budget and idle timing.
//! - [`udpsocks`]: a minimal SOCKS5 UDP ASSOCIATE client (the `udpsocks` tool).
//! - [`relay_session`]: what both roles share about a `quic-relay` session (`--relay`,
//!   `--session`): where they meet, which path carries the connection.
//! - [`transport`]: the seam between the proxy and QUIC (dialing, frame IO on streams, and the
//!   endpoint socket that lets QUIC packets grow to 65,000 bytes where the path allows).
//! - [`multipath`]: the path table of a bundle ([`multipath::table`]) and striped TCP flows
//!   ([`multipath::flow`]).
//! - [`metrics`]: Prometheus text of the counters and per-path health (`--metrics ADDR`).
//! - [`uot`]: sing-box UDP over TCP (server side and [`uot::create_udp_proxy`]) on the
//!   `udp_over_tcp` crate's codec (that crate also holds the `udp-over-tcp` tool).
//! - [`server`]: the QUIC server: `auth`, `bundle` (paths and the DATAGRAM loop), `streams`
//!   (TCP CONNECT, UDP sessions, striped flows), `counters`, and the `relay` front end.
//! - [`client`]: the SOCKS5/HTTP listener side: `link` (the bundle of path connections,
//!   reconnection, DATAGRAM dispatch), `ingress` (SOCKS/HTTP, TCP), `udp` (UDP ASSOCIATE),
//!   and the `relay` dialer.
//! - [`config`]: command-line and TOML options for both roles.
//!
//! Everything but `defaults`, `proto`, `socks`, `policy`, `multipath::sched` and
//! `datagram_rx` needs the default `runtime` feature: the other modules open with
//! `#![cfg(feature = "runtime")]`, so the list below stays one line a module.

pub mod alloc;
pub mod client;
pub mod config;
pub mod datagram_rx;
pub mod defaults;
pub mod logging;
pub mod metrics;
pub mod multipath;
pub mod policy;
pub mod proto;
pub mod relay_session;
pub mod server;
pub mod socks;
pub mod tls;
pub mod transport;
pub mod udp;
pub mod udpsocks;
pub mod uot;

#[cfg(feature = "runtime")]
/// The peer SDK the relay mode ([`relay_session`]) reaches its server through.
pub use peer_sdk;

#[cfg(feature = "runtime")]
/// Spawned-task handle that aborts the task when dropped (peer-sdk's), so no task outlives
/// its owner.
pub use peer_sdk::AbortOnDrop;
