//! UDP over TCP: the `udp-over-tcp` tool's framings and sing-box UoT.
//!
//! - [`framing`]: the tool's wire framings (`plain`, `flow`, `mullvad`); pure.
//! - [`singbox`]: sing-box UoT v1/v2 requests and packets; pure.

pub mod framing;
pub mod singbox;
