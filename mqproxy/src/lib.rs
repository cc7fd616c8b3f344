//! `mqproxy`: a QUIC proxy that carries SOCKS5 TCP CONNECT, HTTP CONNECT and SOCKS5 UDP
//! ASSOCIATE over QUIC (UDP as QUIC DATAGRAMs), after the original C mqproxy: one connection,
//! or one per network path with `--path` (multipath: TCP striped, UDP scheduled per packet).
//!
//! Modules:
//! - [`proto`]: the wire format (control frames, the DATAGRAM header, fragmentation and
//!   reassembly); pure, no IO. `PROTOCOL.md` beside `Cargo.toml` describes it in prose.
//! - [`socks`]: SOCKS5 (RFC 1928, RFC 1929) and HTTP CONNECT parsing; pure.
//! - [`transport`]: the seam between the proxy and QUIC (dialing, frame IO on streams).
//! - [`tls`]: server certificates (kept self-signed or from files) and client verification.
//! - [`server`]: the QUIC server: authentication, TCP CONNECT, UDP sessions.
//! - [`policy`]: the destination policy every server-side front end applies; pure.
//! - [`udp`]: the server's UDP session table, pre-OPEN buffer and idle timing.
//! - [`paths`]: multipath scheduling, the reorder and send buffers of striped TCP flows and
//!   the UDP duplicate filter; pure.
//! - [`multipath`]: the path table of a bundle (a QUIC connection per path, health
//!   monitors), per-packet UDP scheduling and striped TCP flows.
//! - [`client`]: the SOCKS5/HTTP listener side, with reconnection.
//! - [`relay_session`]: both roles through a `quic-relay` session (`--relay`, `--session`) for a
//!   server with no open port: hole-punched direct path when possible, relayed otherwise.
//! - [`udpsocks`]: a minimal SOCKS5 UDP ASSOCIATE client (the `udpsocks` tool).
//! - [`config`]: command-line and TOML options for both roles.
//! - [`logging`]: the binaries' log setup (colours only to a terminal, `NO_COLOR`) and
//!   escaping of peer-chosen text.
//! - [`metrics`]: Prometheus text of the counters and per-path health (`--metrics ADDR`).
//! - [`uot`]: UDP over TCP: the `udp-over-tcp` tool's framings and socket loops, and sing-box
//!   UoT (server side and [`uot::create_udp_proxy`]).
//!
//! Everything but `proto`, `socks`, `policy` and the pure `uot` codecs needs the default `runtime` feature.

#[cfg(feature = "runtime")]
pub mod client;
#[cfg(feature = "runtime")]
pub mod config;
pub mod defaults;
#[cfg(feature = "runtime")]
pub mod logging;
#[cfg(feature = "runtime")]
pub mod metrics;
pub mod multipath;
pub mod policy;
pub mod proto;
#[cfg(feature = "runtime")]
pub mod relay_session;
#[cfg(feature = "runtime")]
pub mod server;
pub mod socks;
#[cfg(feature = "runtime")]
pub mod tls;
#[cfg(feature = "runtime")]
pub mod transport;
#[cfg(feature = "runtime")]
pub mod udp;
#[cfg(feature = "runtime")]
pub mod udpsocks;
pub mod uot;

#[cfg(feature = "runtime")]
/// The peer SDK the relay mode ([`relay_session`]) reaches its server through.
pub use peer_sdk;

#[cfg(feature = "runtime")]
/// Spawned-task handle that aborts the task when dropped, so no task outlives its owner.
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

#[cfg(feature = "runtime")]
impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
