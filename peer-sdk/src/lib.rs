//! `peer_sdk`: a QUIC connection to a peer behind a NAT, hole-punched when possible, through a
//! [`quic-relay`](quic_relay) when not.
//!
//! Both peers name the same relay and session id (e.g. from `quic-relay session`). The
//! listener accepts with a self-signed [`Identity`]; the dialer pins its fingerprint, which the
//! application hands it out of band like the session id. The listening side:
//!
//! ```no_run
//! # async fn listener() -> Result<(), Box<dyn std::error::Error>> {
//! use peer_sdk::{Identity, Options, ServerTls, Uuid};
//! let relay = "127.0.0.1:4433".parse()?;
//! let session: Uuid = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b".parse()?;
//! let identity = Identity::generate()?;
//! println!("pin: {}", identity.fingerprint()); // give this to the dialer
//! let conn = peer_sdk::accept(Options::new(relay, session), ServerTls::Identity(identity)).await?;
//! let (mut send, mut recv) = conn.accept_bi().await?;
//! tokio::io::copy(&mut recv, &mut send).await?; // echo one stream
//! send.finish()?;
//! # Ok(()) }
//! ```
//!
//! The dialing side:
//!
//! ```no_run
//! # async fn dialer() -> Result<(), Box<dyn std::error::Error>> {
//! use peer_sdk::{ClientTls, Fingerprint, Options, Uuid};
//! let relay = "127.0.0.1:4433".parse()?;
//! let session: Uuid = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b".parse()?;
//! let pin: Fingerprint = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".parse()?;
//! let conn = peer_sdk::connect(Options::new(relay, session), ClientTls::Pinned(pin)).await?;
//! println!("connected over the {} path", conn.path().kind()); // "direct", "relay" or "relay-tcp"
//! let (mut send, mut recv) = conn.open_bi().await?;
//! send.write_all(b"hello, peer").await?;
//! send.finish()?;
//! println!("{:?}", recv.read_to_end(1024).await?);
//! conn.close(0, b"done").await;
//! # Ok(()) }
//! ```
//!
//! A runnable version of both, with flags, is `examples/echo.rs` (`echo listen`, `echo dial`).
//! A relay that requires tokens takes one in [`Options::token`] (`quic-relay token` mints it).
//!
//! **Progress and timeouts.** The SDK logs each step through `tracing` at `info` (registering
//! with which relay, registered, waiting for the peer, punching, the path chosen, falling back to
//! TCP) and gives up with [`Error::RelayUnreachable`] when the relay has not answered within
//! [`Options::register_timeout`] (10 s by default), and [`Error::PeerTimeout`] when the dialer's
//! peer has not joined within [`Options::peer_timeout`] (60 s). The listener waits for its
//! dialer without a limit.
//!
//! How it works:
//! - **One socket, no gap.** The SDK builds one UDP socket ([`socket`]), registers with the relay
//!   from it, and hands that same socket to a Quinn endpoint through a wrapper, so the NAT mapping
//!   the relay (and the peer) know is the one QUIC uses. Nothing is closed or rebound.
//! - **Keepalive for the life of the connection** ([`rendezvous`]): the registration is repeated
//!   every [`Options::keepalive`] (≤ 25 s) and at once after 3 s without a datagram from the
//!   peer, so a relay restart or a NAT rebinding heals without the application noticing.
//! - **Hole punching** ([`punch`], [`rendezvous`]): both peers learn each other's public address
//!   from the relay (and their interface addresses, [`candidates`], through it) and send
//!   authenticated probes; a reply proves a direct path. The first probe of each side has a TTL
//!   of 2, so it opens the sender's own NAT mapping without reaching the other router (which
//!   could otherwise move the other side's mapping); full probes start 100 ms after the relay's
//!   notice. IPv6 paths are preferred, then the LAN, then public IPv4. Quinn sees one stable peer
//!   address ([`socket::VIRTUAL_PEER`]); the wrapper sends to the direct address or to the relay,
//!   so traffic moves between paths under a live `quinn::Connection`.
//! - **Birthday punching** ([`rendezvous::birthday`]): when one side's NAT maps per destination
//!   ("symmetric") and the other filters by address and port, the hard side opens up to 256
//!   extra sockets and the easy side probes up to 1600 ports of its IP (the ports after the
//!   relay-observed one first, for sequential NATs), 1000 per second, once per pairing, as
//!   soon as the peer's candidates show one side hard. The socket wrapper owns the extra
//!   sockets, moves Quinn's traffic to the one that won and closes the rest; connecting waits
//!   up to 2.5 s for it. When both NATs map per destination, a port prediction sweep
//!   ([`rendezvous::sweep`]) gets two sequential ones direct: each side opens 64 new flows to
//!   the ports the other side's next flows will target (≤ 256 probes per side).
//!   [`Options::birthday`] turns both off.
//! - **TCP when UDP is blocked**: if the relay does not answer UDP registrations within
//!   [`Options::tcp_fallback_after`], the SDK registers over a TCP connection to the relay's port
//!   and carries the QUIC packets on it as length-prefixed datagrams, under the same
//!   `quinn::Connection` ([`Path::RelayTcp`]; [`TcpFallback`] disables or forces it).
//! - **Relay failover**: with several [`Options::relays`], a peer whose relay stops answering
//!   moves to the next in [`Options::relay_order`] (both peers share it), registrations and
//!   relayed traffic alike, under the same `quinn::Connection` ([`Status::relay`]).
//! - **Verified TLS** ([`tls`]): the dialer pins the listener's certificate fingerprint, or the
//!   application passes its own rustls configuration. There is no skip-verify mode.
//!
//! **Sharing the port.** The socket sets `SO_REUSEADDR` and `SO_REUSEPORT` so that an
//! application may bind another socket to the same port (e.g. a legacy keepalive socket); on
//! port 0 it sets them after the bind, so that two peers never get the same port. Linux
//! then delivers each incoming datagram to *one* of the sockets: a *connected* socket always gets
//! every datagram of its 4-tuple, and among unconnected sockets a hash of the 4-tuple picks one.
//! All relayed traffic comes from one 4-tuple (the relay's), so a second socket on the port will
//! steal all of it, or none: do not keep one open. Use [`Peer::from_socket`] to hand the SDK a
//! socket the application already holds instead.

#![warn(missing_docs)]

pub mod candidates;
mod driver;
mod error;
mod options;
pub mod punch;
mod relay_tcp;
pub mod rendezvous;
pub mod socket;
pub mod tls;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

// The workspace README's Rust snippets compile as doc tests of this crate.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
use std::sync::Arc;
use std::time::Duration;

pub use quic_relay::proto;
pub use quinn;
use tokio::sync::watch;
use tracing::info;
pub use uuid::Uuid;

use crate::driver::{Driver, DriverConfig};
pub use crate::error::Error;
pub use crate::options::{Options, Strategy, TcpFallback};
pub use crate::rendezvous::Status;
use crate::socket::PeerSocket;
pub use crate::socket::{Path, SocketStats};
pub use crate::tls::{ClientTls, Fingerprint, Identity, ServerTls};

/// A spawned task's handle that aborts the task when dropped, so no task (a peer's driver,
/// or any task of a crate built on this one) outlives its owner.
#[derive(Debug)]
pub struct AbortOnDrop<T = ()>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A registered peer: the socket, its Quinn endpoint and its driver. Make one with
/// [`Peer::bind`] or [`Peer::from_socket`], then [`Peer::connect`] or [`Peer::accept`].
#[derive(Debug)]
pub struct Peer {
    endpoint: quinn::Endpoint,
    socket: Arc<PeerSocket>,
    status: watch::Receiver<Status>,
    opts: Options,
    peer_id: u64,
    _driver: AbortOnDrop,
}

impl Drop for Peer {
    /// Tells the relay this peer is gone (`BYE`, best effort, twice against loss), so the
    /// session can take a new peer at once instead of after the silent-member timeout.
    fn drop(&mut self) {
        let bye = quic_relay::proto::Bye {
            session: self.opts.session,
            peer: Some(quic_relay::proto::PeerId(self.peer_id)),
        }
        .encode();
        if self.socket.shared.path() == Path::RelayTcp {
            // Best effort: the relay also removes a TCP member when its connection closes,
            // which happens as the driver (and its TCP task) is dropped.
            self.socket.send_tcp(&bye);
        } else {
            for _ in 0..2 {
                self.socket.try_send_control(self.socket.relay(), &bye);
            }
        }
    }
}

impl Peer {
    /// Binds a new socket and registers with the relay (trying each of [`Options::relays`] in
    /// [`Options::relay_order`]). Must run inside a tokio runtime.
    pub async fn bind(opts: Options) -> Result<Peer, Error> {
        let order = opts.relay_order();
        let mut last = None;
        for (i, &listed) in order.iter().enumerate() {
            // The relay's address in the other family serves when this host has no route to
            // the listed one, and as our alternate registration when it has both.
            let (relay, alt) = match opts.other_family_of(listed) {
                Some(other) if !routable(listed) && routable(other) => (other, None),
                Some(other) if routable(other) => (listed, Some(other)),
                _ => (listed, None),
            };
            // A relay address of a family this host has no route for (an IPv4 address on an
            // IPv6-only host, say) is skipped at once while others remain: waiting for its
            // registration to time out would only delay the one that works.
            if i + 1 < order.len() && !routable(relay) {
                info!(%relay, "no route to this relay address; trying the next");
                continue;
            }
            let (socket, control) = match opts.bind {
                Some(bind) => PeerSocket::bind(bind, relay, alt)?,
                // Dual-stack when the host allows it, so that IPv6 direct paths are possible
                // whatever the relay's family; IPv4 otherwise.
                None => {
                    PeerSocket::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0), relay, alt)
                        .or_else(|e| match relay {
                        SocketAddr::V4(_) => PeerSocket::bind(
                            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
                            relay,
                            alt,
                        ),
                        SocketAddr::V6(_) => Err(e),
                    })?
                }
            };
            // Failover goes on from here in the shared order, wrapping around.
            let failover: Vec<SocketAddr> = order[i..].iter().chain(&order[..i]).copied().collect();
            match Self::start(socket, control, opts.clone(), failover).await {
                Ok(p) => return Ok(p),
                Err(e @ Error::RelayUnreachable { .. }) if order.len() > 1 => {
                    info!(%relay, "relay unreachable, trying the next");
                    last = Some(e);
                }
                // A draining relay (maintenance) sends new sessions on: both peers get the same
                // answer and move to the same next relay.
                Err(
                    e @ Error::Refused {
                        reason: Some(proto::ErrReason::Moved),
                        ..
                    },
                ) if order.len() > 1 => {
                    info!(%relay, "the relay is draining; trying the next");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::RelayUnreachable {
            relay: SocketAddr::from(([0, 0, 0, 0], 0)),
            waited: Duration::ZERO,
        }))
    }

    /// Uses a socket the application already holds (and whose NAT mapping it wants to keep),
    /// with the first relay in [`Options::relay_order`]. The socket is not closed or rebound:
    /// the registration, the keepalives, the punching and QUIC all use it.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), peer_sdk::Error> {
    /// use peer_sdk::{ClientTls, Options, Peer, Uuid};
    /// let socket = std::net::UdpSocket::bind("0.0.0.0:5000").unwrap();
    /// let relay = "198.18.0.1:4433".parse().unwrap();
    /// let peer = Peer::from_socket(socket, Options::new(relay, Uuid::from_u128(1))).await?;
    /// println!("registered; the relay sees us at {:?}", peer.status().observed);
    /// let pin = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".parse()?;
    /// let conn = peer.connect(ClientTls::Pinned(pin)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn from_socket(socket: std::net::UdpSocket, opts: Options) -> Result<Peer, Error> {
        let relay = *opts.relay_order().first().ok_or(Error::RelayUnreachable {
            relay: SocketAddr::from(([0, 0, 0, 0], 0)),
            waited: Duration::ZERO,
        })?;
        let alt = opts.other_family_of(relay);
        let (socket, control) = PeerSocket::from_std(socket, relay, alt)?;
        let order = opts.relay_order();
        Self::start(socket, control, opts, order).await
    }

    /// Starts the driver on `socket`, registered with the first of `relays` and failing over
    /// to the others in turn.
    async fn start(
        socket: Arc<PeerSocket>,
        control: tokio::sync::mpsc::Receiver<socket::Control>,
        opts: Options,
        relays: Vec<SocketAddr>,
    ) -> Result<Peer, Error> {
        // Only relays this socket can send to, and that this host has a route to.
        let relays: Vec<SocketAddr> = relays
            .into_iter()
            .enumerate()
            .filter(|&(i, r)| i == 0 || (socket.can_reach(r) && routable(r)))
            .map(|(_, r)| r)
            .collect();
        // Quinn's endpoint reads the socket from now on: the wrapper passes relay replies and
        // punches to the driver, so the endpoint must exist before the first registration.
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(Error::Endpoint)?;
        // Zero is not a valid peer id on the wire.
        let peer_id = opts
            .peer_id
            .filter(|p| *p != 0)
            .unwrap_or_else(|| rand::random::<u64>() | 1);
        let (driver, status) = Driver::new(
            socket.clone(),
            control,
            DriverConfig {
                tcp: opts.tcp_fallback,
                tcp_after: opts.tcp_fallback_after,
                session: opts.session,
                token: opts.token,
                peer_id,
                keepalive: opts.keepalive,
                punch: opts.strategy == Strategy::Auto,
                direct_timeout: opts.direct_timeout,
                relays,
                local: if opts.strategy == Strategy::Auto {
                    quinn::AsyncUdpSocket::local_addr(&*socket)
                        .map(candidates::gather)
                        .unwrap_or_default()
                } else {
                    Vec::new()
                },
                alt_relay: socket.relay_alt().is_some(),
                local_port: quinn::AsyncUdpSocket::local_addr(&*socket).map_or(0, |a| a.port()),
                birthday: opts.birthday,
            },
        );
        let driver = AbortOnDrop(tokio::spawn(driver.run()));
        let mut peer = Peer {
            endpoint,
            socket,
            status,
            opts,
            peer_id,
            _driver: driver,
        };
        peer.wait_registered().await?;
        Ok(peer)
    }

    async fn wait_registered(&mut self) -> Result<(), Error> {
        let relay = self.socket.relay();
        let waited = self.opts.register_timeout;
        info!(
            %relay,
            session = %self.opts.session,
            timeout = ?waited,
            "registering with the relay"
        );
        let r = tokio::time::timeout(
            waited,
            self.status
                .wait_for(|s| s.registered || s.refused.is_some()),
        )
        .await;
        match r {
            Err(_) | Ok(Err(_)) => Err(Error::RelayUnreachable { relay, waited }),
            Ok(Ok(s)) if !s.registered => Err(Error::Refused {
                relay,
                reason: s.refused,
            }),
            Ok(Ok(s)) => {
                info!(%relay, observed = ?s.observed, "registered with the relay");
                Ok(())
            }
        }
    }

    /// Waits for the other peer, then (with [`Strategy::Auto`]) for a direct path, up to
    /// [`Options::direct_timeout`].
    async fn wait_paths(&mut self) -> Result<(), Error> {
        let session = self.opts.session;
        let waited = self.opts.peer_timeout;
        if self.status.borrow().peer.is_none() {
            info!(%session, timeout = ?waited, "waiting for the peer to join the session");
        }
        let peer = tokio::time::timeout(waited, self.status.wait_for(|s| s.peer.is_some()))
            .await
            .map_err(|_| Error::PeerTimeout { session, waited })?
            .map_err(|_| Error::EndpointClosed)?
            .peer;
        // Over TCP nothing is punched: do not wait for a direct path.
        if self.opts.strategy == Strategy::Auto && self.socket.shared.path() != Path::RelayTcp {
            info!(
                peer = ?peer,
                timeout = ?self.opts.direct_timeout,
                "the peer joined; punching a direct path"
            );
            let _ = tokio::time::timeout(
                self.opts.direct_timeout,
                self.status.wait_for(|s| matches!(s.path, Path::Direct(_))),
            )
            .await;
            // Birthday punching under way: its budget is spent within a few seconds, and a
            // direct path is worth the wait (it is the pairs that would relay otherwise).
            let birthday = |s: &Status| s.birthday.is_some_and(|b| !b.finished);
            if birthday(&self.status.borrow()) {
                info!("birthday punching under way; waiting for it");
                let _ = tokio::time::timeout(
                    rendezvous::birthday::LIFETIME,
                    self.status
                        .wait_for(|s| matches!(s.path, Path::Direct(_)) || !birthday(s)),
                )
                .await;
            }
        } else {
            info!(peer = ?peer, "the peer joined");
        }
        info!(
            path = self.socket.shared.path().kind(),
            "path chosen; QUIC handshake"
        );
        Ok(())
    }

    /// What the driver knows now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.endpoint.local_addr().map_err(Error::Endpoint)
    }

    /// Dials the peer (the listener runs [`Peer::accept`]).
    pub async fn connect(mut self, tls: ClientTls) -> Result<PeerConnection, Error> {
        self.wait_paths().await?;
        let mut config = tls::client_config(&tls, &self.opts.alpn)?;
        config.transport_config(self.opts.transport());
        let connecting =
            self.endpoint
                .connect_with(config, self.socket.virtual_peer(), tls::SERVER_NAME)?;
        let connection = connecting.await?;
        Ok(self.connected(connection, "connected to the peer"))
    }

    /// Waits for the peer to dial in.
    pub async fn accept(self, tls: ServerTls) -> Result<PeerConnection, Error> {
        let mut config = tls::server_config(&tls, &self.opts.alpn)?;
        config.transport_config(self.opts.transport());
        self.endpoint.set_server_config(Some(config));
        info!(session = %self.opts.session, "waiting for the peer to dial in");
        let incoming = self.endpoint.accept().await.ok_or(Error::EndpointClosed)?;
        let connection = incoming.await?;
        Ok(self.connected(connection, "peer connected"))
    }

    /// The connection, with the path it started on (logged as `event`).
    fn connected(self, connection: quinn::Connection, event: &str) -> PeerConnection {
        let path = self.socket.shared.path();
        info!(path = path.kind(), session = %self.opts.session, "{event}");
        PeerConnection {
            connection,
            peer: self,
            path_at_connect: path,
        }
    }
}

/// Whether this host has a route to `relay` (a UDP `connect` on a throwaway socket: no packet is
/// sent).
fn routable(relay: SocketAddr) -> bool {
    let any: SocketAddr = match relay {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(any)
        .and_then(|s| s.connect(relay))
        .is_ok()
}

/// A QUIC connection to the peer. Derefs to [`quinn::Connection`]; keep it alive as long as the
/// connection is used (it owns the socket, the endpoint and the keepalive driver).
#[derive(Debug)]
pub struct PeerConnection {
    connection: quinn::Connection,
    peer: Peer,
    path_at_connect: Path,
}

impl std::ops::Deref for PeerConnection {
    type Target = quinn::Connection;
    fn deref(&self) -> &quinn::Connection {
        &self.connection
    }
}

impl PeerConnection {
    /// The Quinn connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    /// The path datagrams to the peer take now.
    pub fn path(&self) -> Path {
        self.peer.socket.shared.path()
    }

    /// The path in use when the handshake completed.
    pub fn path_at_connect(&self) -> Path {
        self.path_at_connect
    }

    /// Registration and path state.
    pub fn status(&self) -> Status {
        self.peer.status()
    }

    /// Watches registration and path changes.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.peer.status.clone()
    }

    /// Per-path datagram counters.
    pub fn socket_stats(&self) -> &SocketStats {
        &self.peer.socket.shared.stats
    }

    /// Closes the connection and waits until the peer has been told (bounded by the idle
    /// timeout).
    pub async fn close(self, code: u32, reason: &[u8]) {
        self.connection.close(code.into(), reason);
        self.peer.endpoint.wait_idle().await;
    }
}

/// Dials the peer: direct when hole punching works, the relay otherwise.
pub async fn connect(opts: Options, tls: ClientTls) -> Result<PeerConnection, Error> {
    Peer::bind(opts).await?.connect(tls).await
}

/// Accepts the peer's connection: direct when hole punching works, the relay otherwise.
///
/// ```no_run
/// # async fn demo() -> Result<(), peer_sdk::Error> {
/// use peer_sdk::{Identity, Options, ServerTls, Uuid};
/// let identity = Identity::generate()?;
/// // Hand this to the dialer out of band, with the session id.
/// println!("pin: {}", identity.fingerprint());
/// let relay = "198.18.0.1:4433".parse().unwrap();
/// let conn = peer_sdk::accept(Options::new(relay, Uuid::from_u128(1)), ServerTls::Identity(identity)).await?;
/// while let Ok((mut send, mut recv)) = conn.accept_bi().await {
///     tokio::spawn(async move { tokio::io::copy(&mut recv, &mut send).await });
/// }
/// # Ok(()) }
/// ```
pub async fn accept(opts: Options, tls: ServerTls) -> Result<PeerConnection, Error> {
    Peer::bind(opts).await?.accept(tls).await
}

/// Dials the peer through the relay only.
pub async fn connect_via_relay(mut opts: Options, tls: ClientTls) -> Result<PeerConnection, Error> {
    opts.strategy = Strategy::RelayOnly;
    connect(opts, tls).await
}

/// Accepts the peer's connection through the relay only.
pub async fn accept_via_relay(mut opts: Options, tls: ServerTls) -> Result<PeerConnection, Error> {
    opts.strategy = Strategy::RelayOnly;
    accept(opts, tls).await
}
