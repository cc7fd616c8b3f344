//! Reaching a server that has no open port: both ends register a session with a `quic-relay`
//! through `peer_sdk`, which hole-punches a direct path when the NATs allow it and carries the
//! QUIC connection through the relay when they do not. The proxy protocol on top is unchanged
//! (same ALPN, token authentication and certificate pinning); this module only supplies the
//! `quinn::Connection` and reports which path carries it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peer_sdk::proto::Token;
use peer_sdk::{ClientTls, Options, Path, Peer, PeerConnection, ServerTls, Status, Uuid};
use quinn::{TransportConfig, VarInt};
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use crate::client::{Client, ClientConfig, ClientError, BACKOFF_MAX, BACKOFF_MIN};
use crate::server::{self, Ctx, ServerConfig, ServerError};
use crate::tls::{self, ClientVerify};
use crate::transport::{self, close, Dialer, QuicDialer, TransportError};
use crate::AbortOnDrop;

/// How long a client waits for the server to be registered in the session before the attempt
/// fails (and is retried with backoff).
pub const PEER_WAIT: Duration = Duration::from_secs(10);

/// Where both ends meet: the relay, the session id they share, and the relay's token when it
/// requires one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// The relay's UDP address.
    pub relay: SocketAddr,
    /// The session both ends name (the server's "address").
    pub session: Uuid,
    /// The relay token (`--relay-token EXPIRY:HEX`), when the relay has `--secret-file`.
    pub token: Option<Token>,
}

impl RelayTarget {
    fn options(&self, peer_id: u64, transport: Arc<TransportConfig>) -> Options {
        let mut o = Options::new(self.relay, self.session);
        o.token = self.token;
        // The same id across reconnects lets a new socket take over this end's slot in the
        // session at once instead of waiting for the relay to expire the old one.
        o.peer_id = Some(peer_id);
        o.transport = Some(transport);
        o
    }
}

/// Why a relay token does not parse.
#[derive(Debug, thiserror::Error)]
#[error("expected EXPIRY:MAC (Unix seconds, ':', 64 hex digits), as minted for the relay's --secret-file")]
pub struct BadRelayToken;

/// Parses `EXPIRY:MAC`, the form `peer_sdk::proto::Token` travels in (`t=` on the wire).
pub fn parse_relay_token(s: &str) -> Result<Token, BadRelayToken> {
    let (expiry, mac) = s.trim().split_once(':').ok_or(BadRelayToken)?;
    let expiry = expiry.parse().map_err(|_| BadRelayToken)?;
    let mut m = [0u8; 32];
    hex::decode_to_slice(mac, &mut m).map_err(|_| BadRelayToken)?;
    Ok(Token { expiry, mac: m })
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

    fn set(&self, path: Option<Path>) {
        let (d, r) = match path {
            Some(Path::Direct(_)) => (1, 0),
            Some(Path::Relay | Path::RelayTcp) => (0, 1),
            None => (0, 0),
        };
        self.direct.store(d, Ordering::Relaxed);
        self.relayed.store(r, Ordering::Relaxed);
    }

    fn connected(&self, path: Path) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        if matches!(path, Path::Direct(_)) {
            self.connected_direct.fetch_add(1, Ordering::Relaxed);
        }
        self.set(Some(path));
    }

    /// Adds the finished connection's datagram counts and clears the gauges.
    fn finished(&self, pc: &PeerConnection) {
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
fn describe(path: Path) -> (&'static str, Option<SocketAddr>) {
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
struct Live {
    // Declared first so it is dropped (aborted) before the connection.
    _watch: AbortOnDrop<()>,
    conn: PeerConnection,
}

impl Live {
    /// Stops watching, counts the connection's datagrams per path, and closes it with
    /// `reason`, waiting (at most a second) until the other end has been told.
    async fn close(self, metrics: &PathMetrics, reason: &'static [u8]) {
        let Live { _watch, conn } = self;
        drop(_watch);
        metrics.finished(&conn);
        let _ =
            tokio::time::timeout(Duration::from_secs(1), conn.close(close::SHUTDOWN, reason)).await;
    }

    fn new(conn: PeerConnection, metrics: &Arc<PathMetrics>) -> Live {
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

/// Dials the server through the relay session (the client side of `--relay`). Each dial binds
/// a fresh socket and registers again, under the same peer id.
#[derive(Debug)]
pub struct RelayDialer {
    target: RelayTarget,
    tls: Arc<rustls::ClientConfig>,
    transport: Arc<TransportConfig>,
    peer_id: u64,
    current: Mutex<Option<Live>>,
    metrics: Arc<PathMetrics>,
}

impl RelayDialer {
    /// A dialer for `target`, verifying the server as `verify` says (a pin or `--insecure`;
    /// the relay path carries no server name, so CA verification does not apply).
    pub fn new(
        target: RelayTarget,
        verify: &ClientVerify,
        idle_timeout: Duration,
    ) -> Result<Self, ClientError> {
        Ok(RelayDialer {
            target,
            tls: tls::rustls_client_config(verify)?,
            transport: Arc::new(transport::transport_config(idle_timeout, true)),
            peer_id: rand::random::<u64>() | 1,
            current: Mutex::new(None),
            metrics: Arc::new(PathMetrics::default()),
        })
    }

    /// A dialer for the relay path of a multipath client: the path transport parameters
    /// (short keepalive and idle timeout, see [`transport::path_transport_config`]), so a
    /// relay path that dies is dropped as fast as a direct one.
    pub fn for_path(target: RelayTarget, verify: &ClientVerify) -> Result<Self, ClientError> {
        let mut d = RelayDialer::new(target, verify, crate::multipath::PATH_IDLE_TIMEOUT)?;
        d.transport = Arc::new(transport::path_transport_config());
        Ok(d)
    }

    /// Which path carries the connection.
    pub fn metrics(&self) -> Arc<PathMetrics> {
        self.metrics.clone()
    }

    fn replace(&self, new: Option<Live>) {
        let old = std::mem::replace(
            &mut *self.current.lock().unwrap_or_else(|p| p.into_inner()),
            new,
        );
        if let Some(old) = old {
            self.metrics.finished(&old.conn);
        }
    }
}

impl Dialer for RelayDialer {
    async fn dial(&self) -> Result<quinn::Connection, TransportError> {
        // The link only dials again once the previous connection is gone: drop it (its BYE
        // frees the session slot) before the new socket registers under the same peer id.
        self.replace(None);
        let mut opts = self.target.options(self.peer_id, self.transport.clone());
        opts.peer_timeout = PEER_WAIT;
        let pc = peer_sdk::connect(opts, ClientTls::Custom(self.tls.clone())).await?;
        let conn = pc.connection().clone();
        let (path, direct_addr) = describe(pc.path());
        info!(
            relay = %self.target.relay,
            session = %self.target.session,
            path,
            ?direct_addr,
            "reached the server through the relay session ({path} path)"
        );
        self.replace(Some(Live::new(pc, &self.metrics)));
        Ok(conn)
    }

    /// Sends the close (the client already closed the connection) and waits briefly until
    /// the server has it: a close lost at exit would leave the server waiting for its idle
    /// timeout before it takes the next client. Dropping the connection then sends the relay
    /// a BYE, which frees the session slot.
    async fn finish(&self) {
        let live = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(live) = live {
            live.close(&self.metrics, b"client shutting down").await;
        }
    }

    fn path_metrics(&self) -> Option<Arc<PathMetrics>> {
        Some(self.metrics.clone())
    }
}

impl Client<RelayDialer> {
    /// Binds the listeners for a client whose server is reached through `cfg.relay`.
    pub async fn bind_relay(cfg: ClientConfig) -> Result<Self, ClientError> {
        let target = cfg.relay.clone().ok_or(ClientError::NotConnected(
            "no relay configured (--relay)".into(),
        ))?;
        let dialer = RelayDialer::new(target, &cfg.verify, cfg.idle_timeout)?;
        Client::with_dialer(cfg, dialer).await
    }
}

/// One path of a multipath client: dialed straight from a local address (`--path`), or
/// through the relay session (`--relay` next to `--path`).
#[derive(Debug)]
pub enum PathDialer {
    /// `--path LOCAL_IP` to `--server`.
    Direct(QuicDialer),
    /// The relay session: hole-punched or relayed, as peer-sdk finds.
    Relay(Box<RelayDialer>),
}

impl Dialer for PathDialer {
    async fn dial(&self) -> Result<quinn::Connection, TransportError> {
        match self {
            PathDialer::Direct(d) => d.dial().await,
            PathDialer::Relay(d) => d.dial().await,
        }
    }

    async fn finish(&self) {
        match self {
            PathDialer::Direct(d) => d.finish().await,
            PathDialer::Relay(d) => d.finish().await,
        }
    }

    fn path_metrics(&self) -> Option<Arc<PathMetrics>> {
        match self {
            PathDialer::Direct(d) => d.path_metrics(),
            PathDialer::Relay(d) => d.path_metrics(),
        }
    }
}

impl Client<PathDialer> {
    /// Binds the listeners for a multipath client whose `--path`s reach `cfg.server` directly
    /// and whose last path goes through `cfg.relay` (the server runs `--listen` and `--relay`
    /// together). The relay path is one more path of the bundle: scheduled on like the others,
    /// and what remains when every direct path is cut.
    pub async fn bind_paths_with_relay(cfg: ClientConfig) -> Result<Self, ClientError> {
        let target = cfg.relay.clone().ok_or(ClientError::NotConnected(
            "no relay configured (--relay)".into(),
        ))?;
        let qc = tls::client_config(&cfg.verify)?;
        let mut dialers = cfg
            .paths
            .iter()
            .map(|ip| {
                QuicDialer::for_path(cfg.server.clone(), cfg.server_name.clone(), qc.clone(), *ip)
                    .map(PathDialer::Direct)
            })
            .collect::<Result<Vec<_>, _>>()?;
        dialers.push(PathDialer::Relay(Box::new(RelayDialer::for_path(
            target,
            &cfg.verify,
        )?)));
        Client::with_dialers(cfg, dialers).await
    }
}

/// Errors of the relay front end of the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayServerError {
    /// Certificate or configuration problems.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The relay could not be reached or refused the registration.
    #[error("registering with the relay: {0}")]
    Register(#[from] peer_sdk::Error),
    /// The configuration names no relay.
    #[error("no relay configured (--relay)")]
    NoRelay,
}

/// A server that waits for its client in a relay session instead of listening on a port
/// (`mqproxy server --relay`). One client at a time: a relay session pairs two peers. When
/// a client's connection ends, the server registers again and waits for the next one.
#[derive(Debug)]
pub struct RelayServer {
    ctx: Arc<Ctx>,
    target: RelayTarget,
    tls: Arc<rustls::ServerConfig>,
    transport: Arc<TransportConfig>,
    fingerprint: peer_sdk::Fingerprint,
    peer_id: u64,
    /// The first registration, made by [`RelayServer::bind`] so a wrong relay address or token
    /// fails at start.
    first: Option<Peer>,
    metrics: Arc<PathMetrics>,
    /// `--metrics`, when this front end serves the page (not beside a listener).
    scrape: Option<std::net::TcpListener>,
}

impl RelayServer {
    /// Loads the certificate and registers with the relay.
    pub async fn bind(cfg: ServerConfig) -> Result<Self, RelayServerError> {
        let target = cfg.relay.clone().ok_or(RelayServerError::NoRelay)?;
        let (ctx, cert) = Ctx::new(cfg)?;
        let fingerprint = cert.fingerprint;
        let tls = tls::rustls_server_config(cert).map_err(ServerError::from)?;
        let transport = Arc::new(transport::transport_config(ctx.cfg().idle_timeout, true));
        let peer_id = rand::random::<u64>() | 1;
        let mut s = RelayServer {
            ctx,
            target,
            tls,
            transport,
            fingerprint,
            peer_id,
            first: None,
            metrics: Arc::new(PathMetrics::default()),
            scrape: None,
        };
        s.scrape = server::bind_metrics(s.ctx.cfg().metrics)?;
        s.first = Some(s.register().await?);
        Ok(s)
    }

    /// The relay front end of a server that also listens (`--listen` with `--relay`): it
    /// shares the listener's state, so a multipath client's relay path joins the bundle of its
    /// direct paths. Registers with the relay.
    pub(crate) async fn beside(
        ctx: Arc<Ctx>,
        tls: Arc<rustls::ServerConfig>,
        fingerprint: peer_sdk::Fingerprint,
    ) -> Result<Self, RelayServerError> {
        let target = ctx.cfg().relay.clone().ok_or(RelayServerError::NoRelay)?;
        let transport = Arc::new(transport::transport_config(ctx.cfg().idle_timeout, true));
        let mut s = RelayServer {
            ctx,
            target,
            tls,
            transport,
            fingerprint,
            peer_id: rand::random::<u64>() | 1,
            first: None,
            metrics: Arc::new(PathMetrics::default()),
            scrape: None,
        };
        s.first = Some(s.register().await?);
        Ok(s)
    }

    /// SHA-256 fingerprint of the certificate (what clients pin).
    pub fn fingerprint(&self) -> peer_sdk::Fingerprint {
        self.fingerprint
    }

    /// The proxy's counters.
    pub fn metrics(&self) -> Arc<server::Metrics> {
        self.ctx.metrics().clone()
    }

    /// Which path carries the current client's connection.
    pub fn path_metrics(&self) -> Arc<PathMetrics> {
        self.metrics.clone()
    }

    async fn register(&self) -> Result<Peer, peer_sdk::Error> {
        let peer = Peer::bind(self.target.options(self.peer_id, self.transport.clone())).await?;
        info!(
            relay = %self.target.relay,
            session = %self.target.session,
            fingerprint = %self.fingerprint,
            observed = ?peer.status().observed,
            "registered with the relay; waiting for a client (it needs --relay, --session and \
             --server-cert-sha256 with these values)"
        );
        Ok(peer)
    }

    /// Serves one client after another until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let _scrape = self
            .ctx
            .serve_metrics(self.scrape.take(), Some(self.metrics.clone()));
        tokio::pin!(shutdown);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut failures = 0u32;
        let mut first = self.first.take();
        loop {
            let round = async {
                let peer = match first.take() {
                    Some(p) => p,
                    None => self.register().await?,
                };
                self.serve_one(peer, stop_rx.clone()).await
            };
            tokio::pin!(round);
            let r = tokio::select! {
                r = &mut round => r,
                _ = &mut shutdown => {
                    // Let the live connection (if any) tell its client before stopping.
                    let _ = stop_tx.send(true);
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut round).await;
                    break;
                }
            };
            let delay = match r {
                Ok(()) => {
                    failures = 0;
                    Duration::ZERO
                }
                // A client whose handshake failed (wrong pin, wrong ALPN) says nothing about
                // the relay: take the next one at once rather than backing off.
                Err(e @ peer_sdk::Error::Connection(_)) => {
                    warn!(session = %self.target.session, error = %e,
                        "a client's QUIC handshake failed; waiting for the next");
                    BACKOFF_MIN
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    warn!(relay = %self.target.relay, session = %self.target.session, error = %e,
                        "relay session failed; registering again");
                    BACKOFF_MIN
                        .saturating_mul(1 << failures.min(10))
                        .min(BACKOFF_MAX)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = &mut shutdown => break,
            }
        }
        info!("server stopped");
    }

    /// Accepts one client in the session and serves it until its connection ends.
    async fn serve_one(
        &self,
        peer: Peer,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), peer_sdk::Error> {
        let pc = tokio::select! {
            r = peer.accept(ServerTls::Custom(self.tls.clone())) => r?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let (path, direct_addr) = describe(pc.path());
        let remote = pc.status().peer;
        info!(
            ?remote,
            path,
            ?direct_addr,
            "client connected through the relay session ({path} path)"
        );
        let live = Live::new(pc, &self.metrics);
        let conn = live.conn.connection().clone();
        self.ctx
            .metrics()
            .connections
            .fetch_add(1, Ordering::Relaxed);
        // One connection at a time, so a --max-conns slot is always free.
        if let Some(permit) = self.ctx.try_permit() {
            let span = tracing::info_span!("conn", remote = ?remote, via = "relay session");
            tokio::select! {
                _ = server::serve_established(conn.clone(), self.ctx.clone(), permit).instrument(span) => {}
                _ = stop.wait_for(|s| *s) => {
                    conn.close(VarInt::from_u32(close::SHUTDOWN), b"server shutting down");
                }
            }
        }
        live.close(&self.metrics, b"connection over").await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn relay_token_round_trip(expiry: u64, mac: [u8; 32]) {
            let t = parse_relay_token(&format!("{expiry}:{}", hex::encode(mac))).expect("valid");
            prop_assert_eq!(t, Token { expiry, mac });
        }

        #[test]
        fn relay_token_parser_never_panics(s in ".{0,100}") {
            let _ = parse_relay_token(&s);
        }
    }

    #[test]
    fn relay_tokens_parse_and_bad_ones_are_refused() {
        let mac = "ab".repeat(32);
        let t = parse_relay_token(&format!("1700000000:{mac}")).expect("valid");
        assert_eq!(t.expiry, 1_700_000_000);
        assert_eq!(t.mac, [0xab; 32]);
        for bad in [
            "",
            "1700000000",
            "x:ab",
            &format!("1:{}", "ab".repeat(31)),
            &format!(":{mac}"),
        ] {
            assert!(parse_relay_token(bad).is_err(), "{bad:?} parsed");
        }
    }
}
