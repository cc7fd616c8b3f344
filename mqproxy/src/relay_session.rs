//! Reaching a server that has no open port: both ends register a session with a `quic-relay`
//! through `peer_sdk`, which hole-punches a direct path when the NATs allow it and carries the
//! QUIC connection through the relay when they do not. The proxy protocol on top is unchanged
//! (same ALPN, token authentication and certificate pinning); this module only supplies the
//! `quinn::Connection` and reports which path carries it.
//!
//! This module holds what both roles share: where they meet ([`RelayTarget`]), which path
//! carries the connection ([`PathMetrics`]) and a live connection's watcher; the client's
//! dialer is in `client::relay`, the server's front end in `server::relay`.

#![cfg(feature = "runtime")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use peer_sdk::proto::Token;
use peer_sdk::{Options, Path, PeerConnection, Status, Uuid};
use quinn::TransportConfig;
use tokio::sync::watch;
use tracing::{info, Instrument};

use crate::proto::close;
use crate::AbortOnDrop;

/// Where both ends meet: the relays, the session id they share, and the relay's token when it
/// requires one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// The relays' UDP addresses (at least one). peer-sdk tries them in the session's
    /// rendezvous-hash order, which both ends compute alike when they list the same relays,
    /// and fails over to the next when one dies or drains.
    pub relays: Vec<SocketAddr>,
    /// The other IP family's address of some of `relays`, as (address in `relays`, other
    /// address) pairs: a dual-stack end registers at both.
    pub relay_other_family: Vec<(SocketAddr, SocketAddr)>,
    /// The session both ends name (the server's "address").
    pub session: Uuid,
    /// The relay token (`--relay-token EXPIRY:HEX`), when the relay has `--secret-file`.
    pub token: Option<Token>,
}

impl RelayTarget {
    /// A target with one relay, no token.
    pub fn new(relay: SocketAddr, session: Uuid) -> Self {
        RelayTarget {
            relays: vec![relay],
            relay_other_family: Vec::new(),
            session,
            token: None,
        }
    }

    pub(crate) fn options(&self, peer_id: u64, transport: Arc<TransportConfig>) -> Options {
        // `relays` is never empty (the config refuses that); the first is only a placeholder
        // until the list replaces it.
        let first = self
            .relays
            .first()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut o = Options::new(first, self.session);
        o.relays = self.relays.clone();
        o.relay_other_family = self.relay_other_family.clone();
        o.token = self.token;
        // The same id across reconnects lets a new socket take over this end's slot in the
        // session at once instead of waiting for the relay to expire the old one.
        o.peer_id = Some(peer_id);
        o.transport = Some(transport);
        o
    }
}

/// Which path carries the proxy's connection, for either role.
#[derive(Debug, Default)]
pub struct PathMetrics {
    /// Gauge: 1 while the connection's packets go straight to the other end.
    pub direct: AtomicU64,
    /// Gauge: 1 while they go through the relay.
    pub relayed: AtomicU64,
    /// Connections established through peer-sdk.
    pub connections: AtomicU64,
    /// Of those, connections whose handshake finished on a direct path.
    pub connected_direct: AtomicU64,
    /// Path changes on live connections (direct → relay fallbacks and upgrades to direct).
    pub path_changes: AtomicU64,
    /// Sends (datagrams or GSO batches) on the direct path, summed over finished connections and updated
    /// at each path change of the live one.
    pub tx_direct: AtomicU64,
    /// Sends through the relay, likewise.
    pub tx_relay: AtomicU64,
}

impl PathMetrics {
    /// `"direct"`, `"relay"`, or `None` with no live connection.
    pub fn path(&self) -> Option<&'static str> {
        if self.direct.load(Ordering::Relaxed) == 1 {
            Some("direct")
        } else if self.relayed.load(Ordering::Relaxed) == 1 {
            Some("relay")
        } else {
            None
        }
    }

    pub(crate) fn set(&self, path: Option<Path>) {
        let (d, r) = match path {
            Some(Path::Direct(_)) => (1, 0),
            Some(Path::Relay | Path::RelayTcp) => (0, 1),
            None => (0, 0),
        };
        self.direct.store(d, Ordering::Relaxed);
        self.relayed.store(r, Ordering::Relaxed);
    }

    pub(crate) fn connected(&self, path: Path) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        if matches!(path, Path::Direct(_)) {
            self.connected_direct.fetch_add(1, Ordering::Relaxed);
        }
        self.set(Some(path));
    }

    /// Adds the finished connection's datagram counts and clears the gauges.
    pub(crate) fn finished(&self, pc: &PeerConnection) {
        let s = pc.socket_stats();
        self.tx_direct
            .fetch_add(s.tx_direct.load(Ordering::Relaxed), Ordering::Relaxed);
        self.tx_relay
            .fetch_add(s.tx_relay.load(Ordering::Relaxed), Ordering::Relaxed);
        info!(
            tx_direct = s.tx_direct.load(Ordering::Relaxed),
            tx_relay = s.tx_relay.load(Ordering::Relaxed),
            rx_direct = s.rx_direct.load(Ordering::Relaxed),
            rx_relay = s.rx_relay.load(Ordering::Relaxed),
            "peer connection finished: datagrams per path"
        );
        self.set(None);
    }
}

/// `direct` or `relay`, and the direct address when there is one, for log fields.
pub(crate) fn describe(path: Path) -> (&'static str, Option<SocketAddr>) {
    match path {
        Path::Direct(a) => ("direct", Some(a)),
        Path::Relay => ("relay", None),
        Path::RelayTcp => ("relay-tcp", None),
    }
}

/// Logs and counts every path change of a live connection until its status channel closes
/// (the caller aborts it when the connection is done).
async fn watch_path(mut rx: watch::Receiver<Status>, mut last: Path, metrics: Arc<PathMetrics>) {
    while rx.changed().await.is_ok() {
        let now = rx.borrow_and_update().path;
        if now == last {
            continue;
        }
        metrics.path_changes.fetch_add(1, Ordering::Relaxed);
        metrics.set(Some(now));
        let (path, direct_addr) = describe(now);
        info!(
            path,
            ?direct_addr,
            previous = last.kind(),
            "traffic moved to the {path} path"
        );
        last = now;
    }
}

/// A live peer connection and the task that watches its path.
#[derive(Debug)]
pub(crate) struct Live {
    // Declared first so it is dropped (aborted) before the connection.
    _watch: AbortOnDrop<()>,
    pub(crate) conn: PeerConnection,
}

impl Live {
    /// Stops watching, counts the connection's datagrams per path, and closes it with
    /// `reason`, waiting (at most a second) until the other end has been told.
    pub(crate) async fn close(self, metrics: &PathMetrics, reason: &'static [u8]) {
        let Live { _watch, conn } = self;
        drop(_watch);
        metrics.finished(&conn);
        let _ =
            tokio::time::timeout(Duration::from_secs(1), conn.close(close::SHUTDOWN, reason)).await;
    }

    pub(crate) fn new(conn: PeerConnection, metrics: &Arc<PathMetrics>) -> Live {
        let path = conn.path();
        metrics.connected(path);
        let watch =
            tokio::spawn(watch_path(conn.watch_status(), path, metrics.clone()).in_current_span());
        Live {
            _watch: AbortOnDrop(watch),
            conn,
        }
    }
}
