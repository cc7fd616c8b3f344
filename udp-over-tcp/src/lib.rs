//! `udp_over_tcp`: UDP datagrams over one TCP connection. The `udp-over-tcp` binary is a drop-in
//! for the original tool (same flags and defaults; three framings; both roles), and the sing-box
//! UoT codec here is what `mqproxy server` speaks to sing-box clients.
//!
//! Modules:
//! - [`framing`]: the tool's wire framings (`plain`, `flow`, `mullvad`) and an incremental
//!   decoder; pure, no IO.
//! - [`singbox`]: sing-box UoT v1/v2 requests and packets; pure, no IO.
//! - [`psk`]: the optional pre-shared-key handshake that authenticates a tunnel (async IO on the
//!   stream it is given).
//! - [`tunnel`]: the tool's socket loops: listen/connect with reconnection, per-flow sockets,
//!   bounded queues.
//! - `mmsg` (private): the tunnel's egress on `netkit::SendBatch` (batched `sendmmsg`, UDP
//!   GSO).
//!
//! Everything but `framing` and `singbox` needs the default `runtime` feature.

pub mod framing;
#[cfg(feature = "runtime")]
mod mmsg;
#[cfg(feature = "runtime")]
pub mod psk;
pub mod singbox;
#[cfg(feature = "runtime")]
pub mod tunnel;
