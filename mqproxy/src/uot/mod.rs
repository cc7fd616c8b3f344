//! UDP over TCP: the `udp-over-tcp` tool (three framings, both roles) and sing-box UoT.
//!
//! - [`framing`]: the tool's wire framings (`plain`, `flow`, `mullvad`); pure.
//! - [`singbox`]: sing-box UoT v1/v2 requests and packets; pure.
//! - [`psk`]: the optional pre-shared-key handshake that authenticates a tunnel.
//! - [`tunnel`]: the tool's socket loops (listen/connect, reconnection, per-flow sockets).

pub mod framing;
#[cfg(feature = "runtime")]
pub mod psk;
pub mod singbox;
#[cfg(feature = "runtime")]
pub mod tunnel;
