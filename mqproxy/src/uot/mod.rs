//! UDP over TCP: the `udp-over-tcp` tool (three framings, both roles) and sing-box UoT.
//!
//! - [`framing`]: the tool's wire framings (`plain`, `flow`, `mullvad`); pure.
//! - [`singbox`]: sing-box UoT v1/v2 requests and packets; pure.
//! - [`psk`]: the optional pre-shared-key handshake that authenticates a tunnel.
//! - [`tunnel`]: the tool's socket loops (listen/connect, reconnection, per-flow sockets).
//! - [`proxy`]: sing-box UoT served by `mqproxy server`, and [`create_udp_proxy`], which opens
//!   such a stream through a SOCKS5 proxy and presents it as a local UDP socket.

pub mod framing;
#[cfg(feature = "runtime")]
mod mmsg;
#[cfg(feature = "runtime")]
pub mod proxy;
#[cfg(feature = "runtime")]
pub mod psk;
pub mod singbox;
#[cfg(feature = "runtime")]
pub mod tunnel;

#[cfg(feature = "runtime")]
pub use proxy::{create_udp_proxy, UdpProxy};
