//! `netlab`: a NAT lab for integration tests. Two peers sit behind real Linux NATs (network
//! namespaces, veth pairs, nftables), with a relay host on a simulated public internet that uses
//! only the benchmark range 198.18.0.0/15; private networks use 100.64.0.0/10. Nothing leaves the
//! machine: the namespaces have no link to the host's network.
//!
//! ```no_run
//! use netlab::{Lab, LabConfig, MappingKind, NatType, Side};
//!
//! # fn main() -> anyhow::Result<()> {
//! netlab::require_lab!(Ok(()));
//! let lab = Lab::new(LabConfig::new(NatType::Symmetric, NatType::FullCone))?;
//! assert_eq!(lab.check_mapping(Side::A)?, MappingKind::EndpointDependent);
//! let relay = std::net::SocketAddrV4::new(lab.relay_ip(), 4433);
//! lab.run_in(&lab.peer_ns(Side::B), || {
//!     // Sockets made here live behind router B.
//!     let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
//!     sock.send_to(b"hello", relay)
//! })??;
//! # Ok(())
//! # }
//! ```
//!
//! Modules:
//! - [`lab`]: building a topology ([`Lab`], [`LabConfig`]), running code and processes in it, the
//!   NAT self-checks, rebinding and link control.
//! - [`multipath`]: a client with several shaped paths to one server ([`MultipathLab`]), for
//!   multipath tests and benchmarks.
//! - [`ipv6`]: which peers have IPv6 ([`Stack`]), its addressing plan in 2001:db8::/32 and the
//!   routers' stateful IPv6 firewall.
//! - [`nat`]: the NAT types and the nftables rules behind each.
//! - [`probe`]: the probe servers on the relay host and the client side of the self-checks, usable
//!   on a test's own sockets.
//! - [`wire`]: link shaping (delay, loss, rate) in user space.
//! - [`report`]: the self-checks' measurements and what each NAT type must measure.
//! - [`stack_check`]: the IP-family self-check (IPv4-only, dual-stack, IPv6-only peers, and the
//!   IPv6 firewall of each router type).
//! - `nft`: the builder of the nftables scripts.
//! - [`netns`]: namespace plumbing (names, creation, running code inside) that [`lab`],
//!   [`multipath`] and [`cleanup`] share.
//! - [`cleanup`]: removing leftovers of labs whose process died.
//! - `tools`: the external tools and the skip-or-fail precondition check ([`require_lab()`],
//!   [`require_lab!`]).
//! - `sys`: the system calls std does not wrap.
//! - `workers`: thread groups with one stop flag, stopped and joined on drop (probe servers,
//!   shaped links).

pub mod cleanup;
pub mod ipv6;
pub mod lab;
pub mod multipath;
pub mod nat;
pub mod netns;
mod nft;
pub mod probe;
pub mod report;
pub mod stack_check;
mod sys;
mod tools;
pub mod wire;
mod workers;

pub use ipv6::{Stack, RELAY_IP6};
pub use lab::{Lab, LabConfig, Side};
pub use multipath::MultipathLab;
pub use nat::NatType;
pub use netns::run_in_netns;
pub use probe::{
    FilteringKind, MappingKind, ProbeOptions, PROBE_ALT_PORT, PROBE_PORT, RELAY_IP, RELAY_IP2,
};
pub use report::{Expected, NatReport, UdpReport};
pub use stack_check::{StackReport, V6Observation};
pub use sys::{block_termination_signals, enter_netns, wait_for_termination};
pub use tools::{
    ignored_tests_requested, in_ci, lab_unavailable, require_lab, SkipReason, DEBIAN_PACKAGES,
};
pub use wire::LinkShape;
