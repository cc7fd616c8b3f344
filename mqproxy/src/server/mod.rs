//! The mqproxy server: accepts QUIC connections, authenticates them (token compared in
//! constant time, DATAGRAMs before that dropped), then serves TCP CONNECT streams and UDP
//! sessions under the destination policy (no loopback, private or link-local targets unless
//! allowed).

#![cfg(feature = "runtime")]

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use sha2::{Digest, Sha256};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, trace, warn, Instrument};

use crate::datagram_rx::{DatagramRx, Received};
use crate::defaults::{
    AUTH_TIMEOUT, BUNDLE_GRACE, CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNS,
    DEFAULT_UDP_IDLE_TIMEOUT, DNS_TIMEOUT, EVENT_QUEUE, HANDSHAKE_TIMEOUT, MAX_FLOWS,
    STREAM_HEADER_TIMEOUT, UDP_BATCH,
};
use crate::multipath::sched::{Scheduler, MAX_PATHS};
use crate::multipath::{self, FlowError, PathTable, Subflow};
use crate::proto::close;
use crate::proto::{
    self, AuthStatus, CloseReason, ConnectStatus, Frame, TargetAddr, UdpStatus, BUNDLE_ID_LEN,
    FEATURE_MULTIPATH, FEATURE_UDP, UDP_FLAG_ATTACH,
};
use crate::tls::{self, ServerCert};
use crate::transport::{self, FrameReader, TransportError};
use crate::udp::{PreOpenBuffer, Session, SessionTable};

mod auth;
mod bundle;
mod counters;
pub mod relay;
mod streams;

use auth::*;
use bundle::*;
pub use counters::ServerCounters;
use counters::*;
use streams::*;

pub use relay::{RelayServer, RelayServerError};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The shared secret clients present.
    pub token: Vec<u8>,
    /// Longest a UDP session may stay silent (clients may ask for less).
    pub udp_idle_timeout: Duration,
    /// Whether UDP is relayed at all (`--no-udp` clears it).
    pub udp_enabled: bool,
    /// Where the certificate comes from.
    pub cert: ServerCert,
    /// Connections allowed between handshake and authentication.
    pub max_conns: usize,
    /// UDP sessions per connection.
    pub max_udp_sessions: usize,
    /// UDP sessions of the whole process; `None` derives it from `RLIMIT_NOFILE` (see
    /// [`crate::udp::derive_total_cap`]).
    pub max_udp_sessions_total: Option<usize>,
    /// UDP sessions of all connections from one client address (an IPv6 /64).
    pub max_udp_sessions_per_client: usize,
    /// Allow loopback, private and link-local destinations.
    pub allow_private: bool,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Wait for clients in this relay session instead of listening on `listen` (see
    /// [`relay::RelayServer`]).
    pub relay: Option<crate::relay_session::RelayTarget>,
    /// With `relay`: listen on `listen` as well, both front ends sharing one state (see
    /// [`Server::relay_front`]).
    pub also_listen: bool,
    /// Serve Prometheus metrics here (`GET /metrics`).
    pub metrics: Option<SocketAddr>,
}

impl ServerConfig {
    /// Defaults for everything but the address, token and certificate.
    pub fn new(listen: SocketAddr, token: impl Into<Vec<u8>>, cert: ServerCert) -> Self {
        ServerConfig {
            listen,
            token: token.into(),
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            udp_enabled: true,
            cert,
            max_conns: DEFAULT_MAX_CONNS,
            max_udp_sessions: crate::defaults::DEFAULT_MAX_SESSIONS,
            max_udp_sessions_total: None,
            max_udp_sessions_per_client: crate::defaults::DEFAULT_MAX_SESSIONS_PER_CLIENT,
            allow_private: false,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            relay: None,
            also_listen: false,
            metrics: None,
        }
    }
}

/// Server start-up errors: certificate problems, or the listening socket (the client's
/// `ClientError::Start` wraps the same type).
pub type ServerError = transport::StartError;

pub(crate) struct ServerState {
    /// Multipath bundles by id; an entry lives while a path connection (or the grace period
    /// after the last one) holds it, and dead entries are pruned on every insert, so the map
    /// is bounded by the authenticated connections.
    bundles: Mutex<HashMap<[u8; BUNDLE_ID_LEN], std::sync::Weak<Bundle>>>,
    /// The bundles of single-path connections, for their path metrics. Each insertion prunes
    /// the ended ones, so it holds about as many entries as connections are open.
    solo: Mutex<Vec<std::sync::Weak<Bundle>>>,
    cfg: ServerConfig,
    /// SHA-256 of the token, so comparison time does not depend on where tokens differ or on
    /// their lengths.
    token_digest: [u8; 32],
    metrics: Arc<ServerCounters>,
    unauthenticated: Arc<Semaphore>,
    /// UDP sessions across connections: process-wide and per client address.
    udp_budget: Arc<crate::udp::UdpBudget>,
}

/// A bound server.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    metrics: Option<std::net::TcpListener>,
    /// The relay front end's path gauges, when one runs beside (for the metrics page).
    relay_paths: Option<Arc<crate::relay_session::PathMetrics>>,
    ctx: Arc<ServerState>,
    fingerprint: peer_sdk::tls::Fingerprint,
    /// The TLS configuration, for a relay front end beside the listener.
    tls: Arc<rustls::ServerConfig>,
}

impl ServerState {
    /// Loads the certificate (logging the fingerprint clients pin) and builds the shared state
    /// of both front ends: the UDP listener ([`Server`]) and the relay
    /// ([`relay::RelayServer`]).
    pub(crate) fn new(
        cfg: ServerConfig,
    ) -> Result<(Arc<ServerState>, tls::LoadedCert), ServerError> {
        let cert = tls::load_server_cert(&cfg.cert)?;
        let fingerprint = cert.fingerprint;
        match &cfg.cert {
            ServerCert::SelfSigned(dir) => info!(
                %fingerprint,
                path = %dir.join(tls::CERT_FILE).display(),
                created = cert.created,
                "self-signed certificate; clients pin it with --server-cert-sha256"
            ),
            ServerCert::Files { cert: path, .. } => {
                info!(%fingerprint, path = %path.display(), "certificate loaded")
            }
        }
        let token_digest = Sha256::digest(&cfg.token).into();
        let max_total = match cfg.max_udp_sessions_total {
            Some(n) => n,
            None => {
                let (n, nofile) = crate::udp::derive_total_cap();
                info!(
                    max_udp_sessions_total = n,
                    nofile, "UDP session cap derived from the descriptor limit"
                );
                n
            }
        };
        let metrics = Arc::new(ServerCounters::default());
        metrics
            .udp_sessions_limit
            .store(max_total as u64, Ordering::Relaxed);
        let ctx = Arc::new(ServerState {
            udp_budget: Arc::new(crate::udp::UdpBudget::new(
                max_total,
                cfg.max_udp_sessions_per_client,
            )),
            bundles: Mutex::new(HashMap::new()),
            solo: Mutex::new(Vec::new()),
            unauthenticated: Arc::new(Semaphore::new(cfg.max_conns)),
            cfg,
            token_digest,
            metrics,
        });
        Ok((ctx, cert))
    }

    /// The server's counters.
    pub(crate) fn metrics(&self) -> &Arc<ServerCounters> {
        &self.metrics
    }

    /// The settings.
    pub(crate) fn cfg(&self) -> &ServerConfig {
        &self.cfg
    }

    /// A slot among the `--max-conns` connections allowed to authenticate at once.
    pub(crate) fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.unauthenticated.clone().try_acquire_owned().ok()
    }
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState").finish_non_exhaustive()
    }
}

impl Server {
    /// Loads or creates the certificate and binds the UDP socket.
    pub fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        let (ctx, cert) = ServerState::new(cfg)?;
        let fingerprint = cert.fingerprint;
        let rustls = tls::rustls_server_config(cert)?;
        let mut sc = tls::server_config_from(rustls.clone())?;
        sc.transport_config(Arc::new(transport::transport_config(
            ctx.cfg.idle_timeout,
            false,
        )));
        let listen = ctx.cfg.listen;
        let endpoint =
            transport::endpoint(listen, Some(sc)).map_err(|source| ServerError::Bind {
                addr: listen,
                source,
            })?;
        let metrics = bind_metrics(ctx.cfg.metrics)?;
        Ok(Server {
            endpoint,
            metrics,
            relay_paths: None,
            ctx,
            fingerprint,
            tls: rustls,
        })
    }

    /// Also waits for clients in the configured relay session (`--listen` with `--relay`):
    /// registers with the relay and returns that front end, which shares this server's
    /// state (a multipath client's relay path joins its direct paths' bundle). Run both.
    pub async fn relay_front(&mut self) -> Result<relay::RelayServer, relay::RelayServerError> {
        let front =
            relay::RelayServer::beside(self.ctx.clone(), self.tls.clone(), self.fingerprint)
                .await?;
        self.relay_paths = Some(front.path_metrics());
        Ok(front)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// The address of the `--metrics` page, if one is served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// SHA-256 fingerprint of the certificate.
    pub fn fingerprint(&self) -> peer_sdk::tls::Fingerprint {
        self.fingerprint
    }

    /// The server's counters.
    pub fn metrics(&self) -> Arc<ServerCounters> {
        self.ctx.metrics.clone()
    }

    /// Serves until `shutdown` completes, then closes every connection.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let _metrics = self
            .ctx
            .serve_metrics(self.metrics.take(), self.relay_paths.take());
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        info!(listen = %self.local_addr(), udp = self.ctx.cfg.udp_enabled, "server running");
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let remote = incoming.remote_address();
                    // Address validation first: an Initial from an address that has not
                    // echoed a Retry token gets a stateless Retry and no slot, so Initials
                    // from spoofed or silent sources cannot hold --max-conns slots.
                    if !incoming.remote_address_validated() && incoming.may_retry() {
                        inc(&self.ctx.metrics.retries);
                        if let Err(e) = incoming.retry() {
                            debug!(%remote, error = %e, "sending a Retry failed");
                        }
                        continue;
                    }
                    match self.ctx.unauthenticated.clone().try_acquire_owned() {
                        Ok(permit) => {
                            inc(&self.ctx.metrics.connections);
                            let ctx = self.ctx.clone();
                            conns.spawn(
                                serve_connection(incoming, ctx, permit)
                                    .instrument(tracing::info_span!("conn", %remote)),
                            );
                        }
                        Err(_) => {
                            inc(&self.ctx.metrics.refused_max_conns);
                            debug!(%remote, "refused: --max-conns connections are authenticating");
                            incoming.refuse();
                        }
                    }
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        self.endpoint
            .close(VarInt::from_u32(close::SHUTDOWN), b"server shutting down");
        conns.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        info!("server stopped");
    }
}

async fn serve_connection(
    incoming: quinn::Incoming,
    ctx: Arc<ServerState>,
    permit: OwnedSemaphorePermit,
) {
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %crate::logging::Escaped(&e), "handshake failed");
            return;
        }
    };
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(error = %crate::logging::Escaped(&e), "handshake failed");
            return;
        }
        Err(_) => {
            debug!("handshake timed out");
            return;
        }
    };
    serve_established(conn, ctx, permit).await
}

/// Authenticates a connection whose handshake is done, then serves it until it ends. `permit`
/// (a `--max-conns` slot) is released once authentication is over.
pub(crate) async fn serve_established(
    conn: Connection,
    ctx: Arc<ServerState>,
    permit: OwnedSemaphorePermit,
) {
    let m = ctx.metrics.clone();
    let auth = tokio::select! {
        r = tokio::time::timeout(AUTH_TIMEOUT, authenticate(&conn, &ctx)) => r,
        _ = drop_datagrams(&conn, &m) => return,
    };
    drop(permit);
    let (client_id, bind) = match auth {
        Ok(Ok(a)) => (a.client_id, a.bind),
        Ok(Err(AuthFailure::Refused { status, client_id })) => {
            inc(&m.auth_failures);
            warn!(
                ?client_id,
                ?status,
                "authentication refused: wrong token or version; closing the connection"
            );
            conn.close(
                VarInt::from_u32(close::AUTH_FAILED),
                b"authentication failed",
            );
            return;
        }
        Ok(Err(AuthFailure::Protocol(what))) => {
            inc(&m.auth_failures);
            warn!(
                error = what,
                "authentication failed: protocol error; closing the connection"
            );
            conn.close(VarInt::from_u32(close::PROTOCOL_ERROR), what.as_bytes());
            return;
        }
        Ok(Err(AuthFailure::Transport(e))) => {
            debug!(error = %crate::logging::Escaped(&e), "connection ended during authentication");
            return;
        }
        Err(_) => {
            inc(&m.auth_failures);
            warn!("authentication timed out; closing the connection");
            conn.close(
                VarInt::from_u32(close::AUTH_TIMEOUT),
                b"authentication timeout",
            );
            return;
        }
    };
    inc(&m.authenticated);
    inc(&m.connections_open);
    let (bundle, index) = match bind {
        Some((id, index, scheduler)) => {
            inc(&m.paths_bound);
            let b = ctx.bundle(id);
            b.paths.set_scheduler(scheduler);
            b.paths.detect_silence();
            info!(?client_id, path = index, %scheduler, bundle = %hex_id(&id), "client authenticated (multipath)");
            (b, index)
        }
        None => {
            info!(?client_id, "client authenticated");
            let b = Arc::new(Bundle::new(None, &ctx));
            let mut solo = locked(&ctx.solo);
            solo.retain(|w| w.strong_count() > 0);
            solo.push(Arc::downgrade(&b));
            drop(solo);
            (b, 0)
        }
    };
    let _holder = BundleHold::new(bundle.clone());
    let (path, monitor) = bundle.paths.insert(index, conn.clone());
    bundle.spawn(monitor);
    let reason = ConnLoop::new(conn.clone(), ctx.clone(), bundle.clone(), index)
        .run()
        .await;
    bundle.paths.remove(&path);
    dec(&m.connections_open);
    info!(?client_id, path = index, ?reason, "connection closed");
    if bundle.id.is_some() && bundle.paths.live_count() == 0 {
        // Keep the bundle (its sessions and flows) a while for a path to come back.
        let mut changes = bundle.paths.subscribe();
        let back = async {
            while changes.changed().await.is_ok() {
                if bundle.paths.live_count() > 0 {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(BUNDLE_GRACE, back).await;
    }
}

/// Default directory for the kept self-signed certificate: systemd's `$STATE_DIRECTORY`,
/// else `$XDG_STATE_HOME/mqproxy`, else `~/.local/state/mqproxy`, else `./mqproxy-state`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("mqproxy");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/state/mqproxy");
    }
    PathBuf::from("mqproxy-state")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(&[1; 32], &[1; 32]));
        let mut b = [1; 32];
        b[31] = 0;
        assert!(!ct_eq(&[1; 32], &b));
    }
}
