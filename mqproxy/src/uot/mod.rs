//! sing-box UDP-over-TCP in mqproxy: the server side (`mqproxy server` answers a CONNECT to the
//! magic destinations) and [`create_udp_proxy`], on the pure codec of the `udp_over_tcp` crate,
//! which also holds the `udp-over-tcp` tool.
//!
//! - [`singbox`]: the codec (re-exported), with [`singbox::magic_version`] on mqproxy's
//!   [`TargetAddr`](crate::proto::TargetAddr); pure.
//! - [`proxy`]: sing-box UoT served by `mqproxy server`, and [`create_udp_proxy`], which opens
//!   such a stream through a SOCKS5 proxy and presents it as a local UDP socket.

#![cfg(feature = "runtime")]

pub mod proxy;

pub use proxy::{create_udp_proxy, UdpProxy};

/// sing-box UoT v1/v2 requests and packets: `udp_over_tcp::singbox`, with
/// [`magic_version`](singbox::magic_version) taking the destination of a CONNECT as mqproxy
/// parsed it.
pub mod singbox {
    pub use udp_over_tcp::singbox::*;

    use crate::proto::TargetAddr;

    /// The UoT version if a CONNECT to `addr` is one to the magic destinations (a name, compared
    /// case-insensitively; the port is not checked, as sing does not check it either).
    pub fn magic_version(addr: &TargetAddr) -> Option<Version> {
        match addr {
            TargetAddr::Domain(host, _) => udp_over_tcp::singbox::magic_version(host),
            TargetAddr::Ip(_) => None,
        }
    }
}
