//! `netkit`: the socket plumbing the workspace's binaries share, so each is written once.
//!
//! Modules:
//! - [`send`] (Linux): [`SendBatch`], datagrams to many destinations in one `sendmmsg(2)`,
//!   runs of equal-size datagrams to one destination as one UDP GSO message, with the fallback
//!   when the kernel or the device refuses GSO. Blocking or non-blocking sockets. Given as a
//!   list, or pushed one datagram at a time ([`Pending`]) by a loop that decides as it goes.
//! - `logging` (feature `logging`): the binaries' subscriber: stderr, `RUST_LOG`, colours only
//!   on a terminal and without `NO_COLOR`.
//! - [`accept`] and [`prometheus`] need feature `tokio` (default); the rest is runtime-free.
//! - [`accept`]: the pause after a failed `accept`, so that accept loops do not spin.
//! - [`prometheus`]: a deliberately small HTTP/1.1 responder for the Prometheus text format
//!   (`GET /metrics`), bounded in connections, time and request size; one read-only page does
//!   not justify an HTTP stack in the build.
//! - [`slots`]: places counted per key under a per-key and a total cap, given back on drop
//!   (connections per IP, sessions per client).
//! - [`resolve`]: which of a name's addresses to use (IPv4 first); pure.
//! - [`sockopt`] (Linux): integer socket options, and buffers forced past the sysctl limit.
//! - [`syscall`] (Linux): `recvmmsg`/`sendmmsg` as bare system calls, made inline.

#[cfg(target_os = "linux")]
pub mod send;
#[cfg(target_os = "linux")]
pub use send::{Dest, Pending, SendBatch, SendStats};

#[cfg(feature = "tokio")]
pub mod accept;
#[cfg(feature = "logging")]
pub mod logging;
#[cfg(feature = "tokio")]
pub mod prometheus;
pub mod resolve;
pub mod slots;
#[cfg(target_os = "linux")]
pub mod sockopt;
#[cfg(target_os = "linux")]
pub mod syscall;
