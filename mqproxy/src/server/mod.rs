//! The mqproxy server: accepts QUIC connections, authenticates them (token compared in
//! constant time, DATAGRAMs before that dropped), then serves TCP CONNECT streams and UDP
//! sessions under the destination policy (no loopback, private or link-local targets unless
//! allowed).

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

use crate::defaults::{
    AUTH_TIMEOUT, BUNDLE_GRACE, CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNS,
    DEFAULT_UDP_IDLE_TIMEOUT, DNS_TIMEOUT, EVENT_QUEUE, HANDSHAKE_TIMEOUT, MAX_FLOWS,
    REASSEMBLY_BUDGET, STREAM_HEADER_TIMEOUT, UDP_BATCH,
};
use crate::multipath::sched::{Scheduler, MAX_PATHS};
use crate::multipath::{self, FlowError, PathTable, Subflow};
use crate::proto::close;
use crate::proto::{
    self, AuthStatus, CloseReason, ConnectStatus, DatagramHeader, Frame, Reassembled, Reassembler,
    TargetAddr, UdpStatus, BUNDLE_ID_LEN, FEATURE_MULTIPATH, FEATURE_UDP, UDP_FLAG_ATTACH,
};
use crate::tls::{self, ServerCert, TlsError};
use crate::transport::{self, FrameReader, TransportError};
use crate::udp::{PreOpenBuffer, SessionTable};

pub mod relay;

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

/// Server start-up errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Certificate problems.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listening socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Counters (and gauges, marked) of a running server.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections accepted for handshake.
    pub connections: AtomicU64,
    /// Connections refused because `--max-conns` were authenticating.
    pub refused_max_conns: AtomicU64,
    /// QUIC Initials answered with a Retry (address not validated yet); they hold no slot.
    pub retries: AtomicU64,
    /// Connections that authenticated.
    pub authenticated: AtomicU64,
    /// Connections refused for a wrong token or version.
    pub auth_failures: AtomicU64,
    /// Gauge: connections currently open.
    pub connections_open: AtomicU64,
    /// TCP CONNECT streams served.
    pub tcp_streams: AtomicU64,
    /// Gauge: UDP sessions open (each holds one UDP socket).
    pub udp_sessions_open: AtomicU64,
    /// UDP sessions opened.
    pub udp_sessions_total: AtomicU64,
    /// UDP sessions refused (any status).
    pub udp_sessions_refused: AtomicU64,
    /// UDP sessions refused with SESSION_LIMIT: the connection's, the client's or the
    /// process-wide cap was reached.
    pub udp_sessions_refused_limit: AtomicU64,
    /// Gauge: the process-wide UDP session cap in force.
    pub udp_sessions_limit: AtomicU64,
    /// DATAGRAMs dropped before authentication.
    pub datagrams_before_auth: AtomicU64,
    /// DATAGRAMs dropped: malformed, unknown session, full buffers.
    pub datagrams_dropped: AtomicU64,
    /// UDP packets relayed client → destination.
    pub udp_packets_out: AtomicU64,
    /// UDP packets relayed destination → client.
    pub udp_packets_in: AtomicU64,
    /// Connections that joined a multipath bundle (PATH_BIND).
    pub paths_bound: AtomicU64,
    /// Striped (multipath) TCP flows served.
    pub tcp_flows: AtomicU64,
    /// UDP packets that arrived twice (over two paths) and were delivered once.
    pub udp_duplicates: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

pub(crate) struct Ctx {
    /// Multipath bundles by id; an entry lives while a path connection (or the grace period
    /// after the last one) holds it, and dead entries are pruned on every insert, so the map
    /// is bounded by the authenticated connections.
    bundles: Mutex<HashMap<[u8; BUNDLE_ID_LEN], std::sync::Weak<Bundle>>>,
    cfg: ServerConfig,
    /// SHA-256 of the token, so comparison time does not depend on where tokens differ or on
    /// their lengths.
    token_digest: [u8; 32],
    metrics: Arc<Metrics>,
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
    ctx: Arc<Ctx>,
    fingerprint: peer_sdk::tls::Fingerprint,
    /// The TLS configuration, for a relay front end beside the listener.
    tls: Arc<rustls::ServerConfig>,
}

impl Ctx {
    /// Loads the certificate (logging the fingerprint clients pin) and builds the shared state
    /// of both front ends: the UDP listener ([`Server`]) and the relay
    /// ([`relay::RelayServer`]).
    pub(crate) fn new(cfg: ServerConfig) -> Result<(Arc<Ctx>, tls::LoadedCert), ServerError> {
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
        let metrics = Arc::new(Metrics::default());
        metrics
            .udp_sessions_limit
            .store(max_total as u64, Ordering::Relaxed);
        let ctx = Arc::new(Ctx {
            udp_budget: Arc::new(crate::udp::UdpBudget::new(
                max_total,
                cfg.max_udp_sessions_per_client,
            )),
            bundles: Mutex::new(HashMap::new()),
            unauthenticated: Arc::new(Semaphore::new(cfg.max_conns)),
            cfg,
            token_digest,
            metrics,
        });
        Ok((ctx, cert))
    }

    /// The server's counters.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
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

impl Ctx {
    /// The server's Prometheus page: counters, and the health of every multipath bundle's
    /// paths; `relay` adds the relay-session path gauges.
    pub(crate) fn render_metrics(
        &self,
        relay: Option<&Arc<crate::relay_session::PathMetrics>>,
    ) -> String {
        use crate::metrics::{Exposition, Kind};
        let m = &self.metrics;
        let mut e = Exposition::default();
        let c = Kind::Counter;
        let counters: [(&str, Kind, &str, &AtomicU64); 19] = [
            (
                "mqproxy_server_connections_total",
                c,
                "Connections accepted for handshake.",
                &m.connections,
            ),
            (
                "mqproxy_server_refused_max_conns_total",
                c,
                "Connections refused because --max-conns were authenticating.",
                &m.refused_max_conns,
            ),
            (
                "mqproxy_server_retries_total",
                c,
                "QUIC Initials answered with a Retry to validate the client's address.",
                &m.retries,
            ),
            (
                "mqproxy_server_authenticated_total",
                c,
                "Connections that authenticated.",
                &m.authenticated,
            ),
            (
                "mqproxy_server_auth_failures_total",
                c,
                "Connections refused for a wrong token or version.",
                &m.auth_failures,
            ),
            (
                "mqproxy_server_connections",
                Kind::Gauge,
                "Connections open.",
                &m.connections_open,
            ),
            (
                "mqproxy_server_tcp_streams_total",
                c,
                "TCP CONNECT streams served.",
                &m.tcp_streams,
            ),
            (
                "mqproxy_server_udp_sessions",
                Kind::Gauge,
                "UDP sessions open (one UDP socket each).",
                &m.udp_sessions_open,
            ),
            (
                "mqproxy_server_udp_sessions_total",
                c,
                "UDP sessions opened.",
                &m.udp_sessions_total,
            ),
            (
                "mqproxy_server_udp_sessions_refused_total",
                c,
                "UDP sessions refused.",
                &m.udp_sessions_refused,
            ),
            (
                "mqproxy_server_udp_sessions_refused_limit_total",
                c,
                "UDP sessions refused with SESSION_LIMIT (per connection, per client or process-wide cap).",
                &m.udp_sessions_refused_limit,
            ),
            (
                "mqproxy_server_udp_sessions_limit",
                Kind::Gauge,
                "Process-wide cap on UDP sessions.",
                &m.udp_sessions_limit,
            ),
            (
                "mqproxy_server_datagrams_before_auth_total",
                c,
                "DATAGRAMs dropped before authentication.",
                &m.datagrams_before_auth,
            ),
            (
                "mqproxy_server_datagrams_dropped_total",
                c,
                "DATAGRAMs dropped: malformed, unknown session, full buffers.",
                &m.datagrams_dropped,
            ),
            (
                "mqproxy_server_udp_packets_out_total",
                c,
                "UDP packets relayed client to destination.",
                &m.udp_packets_out,
            ),
            (
                "mqproxy_server_udp_packets_in_total",
                c,
                "UDP packets relayed destination to client.",
                &m.udp_packets_in,
            ),
            (
                "mqproxy_server_paths_bound_total",
                c,
                "Connections that joined a multipath bundle.",
                &m.paths_bound,
            ),
            (
                "mqproxy_server_tcp_flows_total",
                c,
                "Striped (multipath) TCP flows served.",
                &m.tcp_flows,
            ),
            (
                "mqproxy_server_udp_duplicates_total",
                c,
                "UDP packets that arrived over two paths and were delivered once.",
                &m.udp_duplicates,
            ),
        ];
        for (name, kind, help, v) in counters {
            e.single(name, kind, help, v);
        }
        let bundles: Vec<(String, Arc<Bundle>)> = locked(&self.bundles)
            .iter()
            .filter_map(|(id, w)| w.upgrade().map(|b| (hex_id(&id[..4]), b)))
            .collect();
        let paths: Vec<_> = bundles
            .iter()
            .flat_map(|(id, b)| {
                b.paths.reports().into_iter().map(move |r| {
                    let labels = vec![
                        ("bundle", id.clone()),
                        ("path", r.index.to_string()),
                        ("remote", r.addr.to_string()),
                    ];
                    (labels, r)
                })
            })
            .collect();
        e.paths(&paths);
        e.unwritten();
        if let Some(r) = relay {
            e.relay_paths(&[("relay-session".to_owned(), r.clone())]);
        }
        e.finish()
    }

    /// Serves the metrics page on `--metrics`, if set, until the returned task is dropped.
    pub(crate) fn serve_metrics(
        self: &Arc<Self>,
        listener: Option<std::net::TcpListener>,
        relay: Option<Arc<crate::relay_session::PathMetrics>>,
    ) -> Option<crate::AbortOnDrop<()>> {
        let l = listener?;
        let l = match l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
        {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "metrics listener unusable");
                return None;
            }
        };
        if let Ok(a) = l.local_addr() {
            info!(metrics = %a, "serving Prometheus metrics at /metrics");
        }
        let ctx = self.clone();
        let render = Arc::new(move || ctx.render_metrics(relay.as_ref()));
        Some(crate::AbortOnDrop(tokio::spawn(
            crate::metrics::serve(l, render, std::future::pending()).in_current_span(),
        )))
    }
}

/// Binds `--metrics` at start, so a taken port fails there.
pub(crate) fn bind_metrics(
    addr: Option<SocketAddr>,
) -> Result<Option<std::net::TcpListener>, ServerError> {
    addr.map(|a| {
        std::net::TcpListener::bind(a).map_err(|source| ServerError::Bind { addr: a, source })
    })
    .transpose()
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").finish_non_exhaustive()
    }
}

impl Server {
    /// Loads or creates the certificate and binds the UDP socket.
    pub fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        let (ctx, cert) = Ctx::new(cfg)?;
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
    pub fn metrics(&self) -> Arc<Metrics> {
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

/// Drops (and counts) DATAGRAMs until the connection ends; runs while authenticating.
async fn drop_datagrams(conn: &Connection, metrics: &Metrics) {
    while conn.read_datagram().await.is_ok() {
        inc(&metrics.datagrams_before_auth);
    }
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct Authenticated {
    client_id: String,
    /// PATH_BIND: (bundle id, path index, scheduler).
    bind: Option<([u8; BUNDLE_ID_LEN], usize, Scheduler)>,
}

async fn authenticate(conn: &Connection, ctx: &Ctx) -> Result<Authenticated, AuthFailure> {
    let (mut send, recv) = conn.accept_bi().await.map_err(TransportError::from)?;
    let mut r = FrameReader::new(recv);
    if r.stream_type().await? != proto::STREAM_AUTH {
        return Err(AuthFailure::Protocol("first stream is not an auth stream"));
    }
    let Some(Frame::AuthRequest {
        version,
        client_id,
        token,
        ..
    }) = r.frame().await?
    else {
        return Err(AuthFailure::Protocol("expected AUTH_REQUEST"));
    };
    // A multipath client follows with PATH_BIND; older clients finish the stream instead.
    let bind = match r.frame().await? {
        Some(Frame::PathBind {
            bundle,
            path_index,
            scheduler,
        }) => {
            if path_index >= MAX_PATHS as u64 {
                return Err(AuthFailure::Protocol("path index out of range"));
            }
            Some((bundle, path_index as usize, Scheduler::from_code(scheduler)))
        }
        _ => None,
    };
    let digest: [u8; 32] = Sha256::digest(&token).into();
    let status = if version != proto::VERSION {
        AuthStatus::BadVersion
    } else if !ct_eq(&digest, &ctx.token_digest) {
        AuthStatus::BadToken
    } else {
        AuthStatus::Ok
    };
    let mut features = if ctx.cfg.udp_enabled { FEATURE_UDP } else { 0 };
    if bind.is_some() {
        features |= FEATURE_MULTIPATH;
    }
    let resp = Frame::AuthResponse {
        status,
        features,
        udp_idle_timeout_ms: ctx.cfg.udp_idle_timeout.as_millis() as u64,
        max_udp_sessions: ctx.cfg.max_udp_sessions as u64,
    };
    transport::write_frame(&mut send, None, &resp).await?;
    let _ = send.finish();
    if status == AuthStatus::Ok {
        return Ok(Authenticated { client_id, bind });
    }
    // Let the response reach the client before the close discards it.
    let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    Err(AuthFailure::Refused { status, client_id })
}

enum AuthFailure {
    Transport(TransportError),
    Protocol(&'static str),
    Refused {
        status: AuthStatus,
        client_id: String,
    },
}

impl From<TransportError> for AuthFailure {
    fn from(e: TransportError) -> Self {
        AuthFailure::Transport(e)
    }
}

async fn serve_connection(incoming: quinn::Incoming, ctx: Arc<Ctx>, permit: OwnedSemaphorePermit) {
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
    ctx: Arc<Ctx>,
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
            (Arc::new(Bundle::new(None, &ctx)), 0)
        }
    };
    let _holder = Holder::new(bundle.clone());
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

/// One path connection's hold on its bundle. The bundle's tasks hold the bundle too (a
/// cycle), so when the last holder goes (its connection and grace period over, or the server
/// shutting down and aborting it) the tasks are aborted, which frees the bundle.
struct Holder(Arc<Bundle>);

impl Holder {
    fn new(b: Arc<Bundle>) -> Self {
        b.holders.fetch_add(1, Ordering::Relaxed);
        Holder(b)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if self.0.holders.fetch_sub(1, Ordering::Relaxed) == 1 {
            locked(&self.0.tasks).abort_all();
        }
    }
}

fn hex_id(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything one client has on the server: its paths (one connection each; a single-path
/// client is a bundle of one), UDP sessions and striped TCP flows. Session and flow tasks
/// belong to the bundle, not to the connection whose stream started them, so they survive
/// the loss of that path; dropping the bundle aborts them.
struct Bundle {
    id: Option<[u8; BUNDLE_ID_LEN]>,
    paths: Arc<PathTable>,
    table: Arc<SessionTable>,
    tasks: Mutex<JoinSet<()>>,
    /// Striped flows: where SUBFLOW streams of each go.
    flows: Mutex<HashMap<u64, mpsc::Sender<Subflow>>>,
    /// UDP sessions: where a re-attached signalling stream goes.
    attach: Mutex<HashMap<u32, mpsc::Sender<(SendStream, FrameReader)>>>,
    /// Each path loop's session-event queue (pre-OPEN delivery and reassembly cleanup).
    events: Mutex<Vec<mpsc::Sender<SessionEvent>>>,
    /// Live [`Holder`]s.
    holders: std::sync::atomic::AtomicUsize,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map or set call: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Bundle {
    fn new(id: Option<[u8; BUNDLE_ID_LEN]>, ctx: &Ctx) -> Self {
        Bundle {
            id,
            paths: Arc::new(PathTable::new(Scheduler::default())),
            table: Arc::new(SessionTable::new(ctx.cfg.max_udp_sessions)),
            tasks: Mutex::new(JoinSet::new()),
            flows: Mutex::new(HashMap::new()),
            attach: Mutex::new(HashMap::new()),
            events: Mutex::new(Vec::new()),
            holders: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        let mut t = locked(&self.tasks);
        while t.try_join_next().is_some() {}
        t.spawn(f.in_current_span());
    }

    fn broadcast(&self, ev: impl Fn() -> SessionEvent) {
        locked(&self.events)
            .retain(|tx| !matches!(tx.try_send(ev()), Err(mpsc::error::TrySendError::Closed(_))));
    }
}

impl Ctx {
    /// The bundle `id`, created on first use.
    fn bundle(&self, id: [u8; BUNDLE_ID_LEN]) -> Arc<Bundle> {
        let mut map = locked(&self.bundles);
        if let Some(b) = map.get(&id).and_then(|w| w.upgrade()) {
            return b;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let b = Arc::new(Bundle::new(Some(id), self));
        map.insert(id, Arc::downgrade(&b));
        b
    }
}

/// Open/close notices from UDP session tasks to their connection loop.
#[derive(Debug)]
enum SessionEvent {
    Opened(u32),
    Closed(u32),
}

thread_local! {
    /// Receive buffer for UDP sockets: one per thread instead of 64 KiB per session.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; proto::MAX_PACKET]);
}

/// One authenticated connection (one path of its bundle): accepts streams and dispatches
/// DATAGRAMs. Fragments of a packet always travel on one path, so reassembly is per path.
struct ConnLoop {
    conn: Connection,
    ctx: Arc<Ctx>,
    bundle: Arc<Bundle>,
    index: usize,
    table: Arc<SessionTable>,
    reassembly: HashMap<u32, Reassembler>,
    reassembly_bytes: usize,
    pre_open: PreOpenBuffer,
}

impl ConnLoop {
    fn new(conn: Connection, ctx: Arc<Ctx>, bundle: Arc<Bundle>, index: usize) -> Self {
        ConnLoop {
            table: bundle.table.clone(),
            bundle,
            index,
            conn,
            ctx,
            reassembly: HashMap::new(),
            reassembly_bytes: 0,
            pre_open: PreOpenBuffer::default(),
        }
    }

    async fn run(mut self) -> String {
        let (events_tx, mut events_rx) = mpsc::channel(EVENT_QUEUE);
        locked(&self.bundle.events).push(events_tx);
        loop {
            let pre_open_deadline = self.pre_open.next_deadline();
            tokio::select! {
                r = self.conn.accept_bi() => match r {
                    Ok((send, recv)) => {
                        let stream = StreamCtx {
                            ctx: self.ctx.clone(),
                            bundle: self.bundle.clone(),
                            index: self.index,
                            client: self.conn.remote_address().ip(),
                        };
                        // Owned by the bundle: a UDP session or striped flow outlives this path.
                        self.bundle.spawn(stream.serve(send, recv));
                    }
                    Err(e) => return e.to_string(),
                },
                r = self.conn.read_datagram() => match r {
                    Ok(d) => self.on_datagram(Instant::now(), d),
                    Err(e) => return e.to_string(),
                },
                Some(ev) = events_rx.recv() => match ev {
                    SessionEvent::Opened(id) => {
                        let now = Instant::now();
                        for d in self.pre_open.take(id) {
                            self.on_datagram(now, d);
                        }
                    }
                    SessionEvent::Closed(id) => {
                        if let Some(r) = self.reassembly.remove(&id) {
                            self.reassembly_bytes -= r.buffered_bytes();
                        }
                    }
                },
                _ = sleep_until_opt(pre_open_deadline), if pre_open_deadline.is_some() => {
                    let n = self.pre_open.expire(Instant::now());
                    self.ctx.metrics.datagrams_dropped.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    }

    fn on_datagram(&mut self, now: Instant, d: Bytes) {
        let m = &self.ctx.metrics;
        let (h, payload) = match DatagramHeader::decode(&d) {
            Ok(x) => x,
            Err(e) => {
                inc(&m.datagrams_dropped);
                trace!(error = %e, "bad DATAGRAM");
                return;
            }
        };
        let Some(session) = self.table.get(h.session_id) else {
            if !self.pre_open.push(now, h.session_id, d.clone()) {
                inc(&m.datagrams_dropped);
            }
            return;
        };
        session.activity.touch(now);
        let packet;
        let payload = if h.frag_count == 1 {
            payload
        } else {
            let r = self.reassembly.entry(h.session_id).or_default();
            if self.reassembly_bytes + payload.len() > REASSEMBLY_BUDGET {
                inc(&m.datagrams_dropped);
                return;
            }
            let before = r.buffered_bytes();
            let out = r.push(now, &h, payload);
            self.reassembly_bytes = self.reassembly_bytes + r.buffered_bytes() - before;
            match out {
                Reassembled::Packet(p) => {
                    packet = p;
                    &packet[..]
                }
                Reassembled::Pending => return,
                Reassembled::Duplicate | Reassembled::Oversized => {
                    inc(&m.datagrams_dropped);
                    return;
                }
            }
        };
        if !locked(&session.dup).accept(h.packet_id) {
            inc(&m.udp_duplicates);
            return;
        }
        match session.sender.send(payload) {
            Ok(_) => inc(&m.udp_packets_out),
            // Full socket buffer: UDP is lossy; dropping beats stalling every session.
            Err(e) => {
                inc(&m.datagrams_dropped);
                trace!(error = %e, session = h.session_id, "UDP send failed");
            }
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// What a stream task needs.
struct StreamCtx {
    ctx: Arc<Ctx>,
    bundle: Arc<Bundle>,
    /// The path the stream arrived on.
    index: usize,
    /// The address of that path's client, for the per-client UDP session cap.
    client: IpAddr,
}

impl StreamCtx {
    async fn serve(self, mut send: SendStream, recv: RecvStream) {
        let mut r = FrameReader::new(recv);
        let ty = match tokio::time::timeout(STREAM_HEADER_TIMEOUT, r.stream_type()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                debug!(error = %crate::logging::Escaped(&e), "stream ended before its type");
                return;
            }
            Err(_) => {
                debug!("stream type timed out");
                let _ = send.reset(VarInt::from_u32(0));
                return;
            }
        };
        let res = match ty {
            proto::STREAM_CONNECT_TCP => self.tcp_connect(send, r).await,
            proto::STREAM_UDP_SESSION => self.udp_session(send, r).await,
            proto::STREAM_MP_CONNECT if self.bundle.id.is_some() => self.mp_connect(send, r).await,
            proto::STREAM_SUBFLOW if self.bundle.id.is_some() => self.subflow(send, r).await,
            other => {
                debug!(stream_type = other, "unknown stream type; resetting");
                let _ = send.reset(VarInt::from_u32(0));
                let _ = r.recv.stop(VarInt::from_u32(0));
                Ok(())
            }
        };
        if let Err(e) = res {
            debug!(error = %crate::logging::Escaped(&e), "stream failed");
        }
    }

    async fn tcp_connect(
        &self,
        mut send: SendStream,
        mut r: FrameReader,
    ) -> Result<(), TransportError> {
        let addr = match tokio::time::timeout(STREAM_HEADER_TIMEOUT, r.frame()).await {
            Ok(Ok(Some(Frame::ConnectRequest { addr }))) => addr,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(TransportError::Timeout("CONNECT_REQUEST")),
            Ok(Ok(_)) => {
                let _ = send.reset(VarInt::from_u32(0));
                return Err(TransportError::Decode(proto::DecodeError::Invalid(
                    "first frame of a CONNECT stream",
                )));
            }
        };
        inc(&self.ctx.metrics.tcp_streams);
        if let Some(version) = crate::uot::singbox::magic_version(&addr) {
            let policy = crate::uot::proxy::Policy {
                allow_private: self.ctx.cfg.allow_private,
                idle_timeout: self.ctx.cfg.udp_idle_timeout,
            };
            return crate::uot::proxy::serve_mqproxy_stream(version, send, r, policy).await;
        }
        let (status, tcp) = match self.connect_target(&addr).await {
            Ok(tcp) => (ConnectStatus::Ok, Some(tcp)),
            Err(status) => (status, None),
        };
        let remote = tcp.as_ref().and_then(|t| t.peer_addr().ok());
        debug!(%addr, ?status, "CONNECT");
        transport::write_frame(&mut send, None, &Frame::ConnectResponse { status, remote }).await?;
        let Some(tcp) = tcp else {
            let _ = send.finish();
            return Ok(());
        };
        let (recv, leftover) = r.into_parts();
        let (up, down) = transport::splice(tcp, send, recv, leftover).await;
        debug!(%addr, bytes_to_target = down, bytes_from_target = up, "CONNECT done");
        Ok(())
    }

    async fn connect_target(&self, addr: &TargetAddr) -> Result<TcpStream, ConnectStatus> {
        let addrs = self.resolve(addr).await.map_err(|s| match s {
            UdpStatus::PolicyDenied => ConnectStatus::NotAllowed,
            _ => ConnectStatus::HostUnreachable,
        })?;
        let mut last = ConnectStatus::HostUnreachable;
        for a in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => {
                    last = match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => ConnectStatus::Refused,
                        std::io::ErrorKind::NetworkUnreachable => ConnectStatus::NetworkUnreachable,
                        std::io::ErrorKind::HostUnreachable => ConnectStatus::HostUnreachable,
                        std::io::ErrorKind::TimedOut => ConnectStatus::TtlExpired,
                        _ => ConnectStatus::GeneralFailure,
                    }
                }
                Err(_) => last = ConnectStatus::TtlExpired,
            }
        }
        Err(last)
    }

    /// Resolves a destination and applies the policy before any socket exists.
    async fn resolve(&self, addr: &TargetAddr) -> Result<Vec<SocketAddr>, UdpStatus> {
        let all: Vec<SocketAddr> = match addr {
            TargetAddr::Ip(a) => vec![*a],
            TargetAddr::Domain(host, port) => {
                match tokio::time::timeout(
                    DNS_TIMEOUT,
                    tokio::net::lookup_host((host.as_str(), *port)),
                )
                .await
                {
                    Ok(Ok(it)) => it.collect(),
                    _ => return Err(UdpStatus::DnsFailed),
                }
            }
        };
        if all.is_empty() {
            return Err(UdpStatus::DnsFailed);
        }
        let allowed = crate::policy::filter(all, self.ctx.cfg.allow_private);
        if allowed.is_empty() {
            debug!(%addr, "destination refused by policy");
            return Err(UdpStatus::PolicyDenied);
        }
        Ok(allowed)
    }

    async fn udp_session(
        &self,
        mut send: SendStream,
        mut r: FrameReader,
    ) -> Result<(), TransportError> {
        let m = &self.ctx.metrics;
        let (session_id, addr, requested_ms, flags) =
            match tokio::time::timeout(STREAM_HEADER_TIMEOUT, r.frame()).await {
                Ok(Ok(Some(Frame::UdpOpen {
                    session_id,
                    addr,
                    idle_timeout_ms,
                    flags,
                }))) => (session_id, addr, idle_timeout_ms, flags),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(TransportError::Timeout("UDP_SESSION_OPEN")),
                Ok(Ok(_)) => {
                    let _ = send.reset(VarInt::from_u32(0));
                    return Err(TransportError::Decode(proto::DecodeError::Invalid(
                        "first frame of a UDP session stream",
                    )));
                }
            };
        let limit_ms = self.ctx.cfg.udp_idle_timeout.as_millis() as u64;
        let idle_ms = if requested_ms == 0 {
            limit_ms
        } else {
            requested_ms.min(limit_ms)
        };
        if flags & UDP_FLAG_ATTACH != 0 && self.bundle.id.is_some() {
            // The session's signalling stream died with its path: hand this one to the
            // session task. A session that has meanwhile ended is opened afresh below.
            let tx = locked(&self.bundle.attach).get(&session_id).cloned();
            if let Some(tx) = tx {
                debug!(
                    session = session_id,
                    path = self.index,
                    "UDP session re-attached"
                );
                let _ = tx.send((send, r)).await;
                return Ok(());
            }
        }
        let opened = self.open_socket(session_id, &addr).await;
        let (status, socket, remote) = match opened {
            Ok((s, sender, remote, slot)) => (UdpStatus::Ok, Some((s, sender, slot)), Some(remote)),
            Err(status) => (status, None, None),
        };
        let resp = Frame::UdpResp {
            session_id,
            status,
            idle_timeout_ms: idle_ms,
            remote,
        };
        let Some((socket, sender, _slot)) = socket else {
            inc(&m.udp_sessions_refused);
            if status == UdpStatus::SessionLimit {
                inc(&m.udp_sessions_refused_limit);
            }
            debug!(session = session_id, %addr, ?status, "UDP session refused");
            transport::write_frame(&mut send, None, &resp).await?;
            let _ = send.finish();
            return Ok(());
        };
        let session = match self.bundle.table.insert(session_id, socket, sender) {
            Ok(s) => s,
            Err(status) => {
                inc(&m.udp_sessions_refused);
                if status == UdpStatus::SessionLimit {
                    inc(&m.udp_sessions_refused_limit);
                }
                let resp = Frame::UdpResp {
                    session_id,
                    status,
                    idle_timeout_ms: idle_ms,
                    remote: None,
                };
                transport::write_frame(&mut send, None, &resp).await?;
                let _ = send.finish();
                return Ok(());
            }
        };
        // From here the guard undoes the registration however the task ends (including abort).
        let (attach_tx, mut attach_rx) = mpsc::channel(1);
        locked(&self.bundle.attach).insert(session_id, attach_tx);
        let _guard = SessionGuard {
            id: session_id,
            bundle: self.bundle.clone(),
            metrics: m.clone(),
        };
        inc(&m.udp_sessions_open);
        inc(&m.udp_sessions_total);
        debug!(session = session_id, %addr, idle_ms, "UDP session open");
        transport::write_frame(&mut send, None, &resp).await?;
        self.bundle.broadcast(|| SessionEvent::Opened(session_id));
        let idle = Duration::from_millis(idle_ms);
        let mut packet_id: u16 = 0;
        let multipath = self.bundle.id.is_some();
        let mut stream = Some((send, r));
        let reason = loop {
            let deadline = session.activity.idle_deadline(idle);
            tokio::select! {
                f = next_frame(&mut stream) => match f {
                    Ok(Some(_)) => continue,
                    // The stream died with its path: a multipath session lives on and waits
                    // for the client to re-attach it over another path.
                    Err(e) if multipath && connection_lost(&e) => {
                        debug!(session = session_id, "UDP session lost its signalling path");
                        stream = None;
                    }
                    // The client finished or reset the stream: the session is over.
                    Ok(None) | Err(_) => break None,
                },
                Some((mut s2, r2)) = attach_rx.recv() => {
                    let resp = Frame::UdpResp { session_id, status: UdpStatus::Ok, idle_timeout_ms: idle_ms, remote };
                    if transport::write_frame(&mut s2, None, &resp).await.is_ok() {
                        stream = Some((s2, r2));
                    }
                }
                ready = session.socket.readable() => {
                    if let Err(e) = ready {
                        debug!(error = %e, "UDP socket failed");
                        break Some(CloseReason::SocketError);
                    }
                    self.forward_replies(session_id, &session, &mut packet_id).await;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if Instant::now() >= session.activity.idle_deadline(idle) {
                        break Some(CloseReason::Idle);
                    }
                }
            }
        };
        debug!(session = session_id, ?reason, "UDP session closed");
        if let (Some(reason), Some((mut send, _))) = (reason, stream) {
            let _ =
                transport::write_frame(&mut send, None, &Frame::UdpClose { session_id, reason })
                    .await;
            let _ = send.finish();
        }
        Ok(())
    }

    /// A striped TCP flow: MP_CONNECT, CONNECT_RESPONSE, then records on this stream and on
    /// SUBFLOW streams the client opens on its other paths.
    async fn mp_connect(
        &self,
        mut send: SendStream,
        mut r: FrameReader,
    ) -> Result<(), TransportError> {
        let (flow_id, addr) = match tokio::time::timeout(STREAM_HEADER_TIMEOUT, r.frame()).await {
            Ok(Ok(Some(Frame::MpConnect { flow_id, addr }))) => (flow_id, addr),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(TransportError::Timeout("MP_CONNECT")),
            Ok(Ok(_)) => {
                let _ = send.reset(VarInt::from_u32(0));
                return Err(TransportError::Decode(proto::DecodeError::Invalid(
                    "first frame of an MP_CONNECT stream",
                )));
            }
        };
        inc(&self.ctx.metrics.tcp_flows);
        let (mut status, tcp) = match self.connect_target(&addr).await {
            Ok(tcp) => (ConnectStatus::Ok, Some(tcp)),
            Err(status) => (status, None),
        };
        let (more_tx, more_rx) = mpsc::channel(MAX_PATHS);
        if tcp.is_some() {
            let mut flows = locked(&self.bundle.flows);
            if flows.len() >= MAX_FLOWS || flows.contains_key(&flow_id) {
                status = ConnectStatus::GeneralFailure;
            } else {
                flows.insert(flow_id, more_tx);
            }
        }
        let remote = tcp.as_ref().and_then(|t| t.peer_addr().ok());
        debug!(%addr, flow = flow_id, ?status, "MP_CONNECT");
        transport::write_frame(&mut send, None, &Frame::ConnectResponse { status, remote }).await?;
        let (Some(tcp), ConnectStatus::Ok) = (tcp, status) else {
            let _ = send.finish();
            return Ok(());
        };
        struct Unregister<'a>(&'a Bundle, u64);
        impl Drop for Unregister<'_> {
            fn drop(&mut self) {
                locked(&self.0.flows).remove(&self.1);
            }
        }
        let _unregister = Unregister(&self.bundle, flow_id);
        let first = Subflow::new(self.index, send, r);
        match multipath::run_flow(tcp, self.bundle.paths.clone(), first, more_rx, Bytes::new())
            .await
        {
            Ok((up, down)) => {
                debug!(%addr, flow = flow_id, bytes_from_target = up, bytes_to_target = down, "flow done")
            }
            Err(e @ (FlowError::Tcp(_) | FlowError::PeerReset)) => {
                debug!(%addr, flow = flow_id, error = %crate::logging::Escaped(&e), "flow ended by one side")
            }
            Err(e) => {
                warn!(%addr, flow = flow_id, error = %crate::logging::Escaped(&e), "flow failed; its TCP connection was reset")
            }
        }
        Ok(())
    }

    /// A further subflow of a striped flow, on the path this stream arrived on.
    async fn subflow(&self, send: SendStream, mut r: FrameReader) -> Result<(), TransportError> {
        let flow_id = match tokio::time::timeout(STREAM_HEADER_TIMEOUT, r.frame()).await {
            Ok(Ok(Some(Frame::Subflow { flow_id }))) => flow_id,
            Ok(Err(e)) => return Err(e),
            _ => return Err(TransportError::Timeout("SUBFLOW")),
        };
        let tx = locked(&self.bundle.flows).get(&flow_id).cloned();
        let sub = Subflow::new(self.index, send, r);
        match tx {
            Some(tx) => {
                let _ = tx.send(sub).await;
            }
            None => {
                // Finished, not reset: a subflow that arrives just after its flow completed
                // must not look like an abort to the client.
                debug!(
                    flow = flow_id,
                    "SUBFLOW for an unknown (ended) flow; finishing it"
                );
                let mut sub = sub;
                let _ = sub.send.finish();
                let _ = sub.recv.stop(VarInt::from_u32(0));
            }
        }
        Ok(())
    }

    /// Forwards up to [`UDP_BATCH`] waiting packets from the destination to the client, each
    /// on the path the scheduler picks.
    async fn forward_replies(&self, id: u32, session: &crate::udp::Session, packet_id: &mut u16) {
        let m = &self.ctx.metrics;
        let mut buf = SCRATCH.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if buf.len() < proto::MAX_PACKET {
            buf = vec![0; proto::MAX_PACKET];
        }
        for _ in 0..UDP_BATCH {
            let n = match session.socket.try_recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // ICMP errors (port unreachable) surface on connected sockets: not fatal.
                Err(e) => {
                    trace!(error = %e, "UDP receive error");
                    continue;
                }
            };
            let pid = *packet_id;
            *packet_id = packet_id.wrapping_add(1);
            session.activity.touch(Instant::now());
            match self.bundle.paths.send_packet(id, pid, &buf[..n]).await {
                Ok(()) => inc(&m.udp_packets_in),
                Err(why) => {
                    inc(&m.datagrams_dropped);
                    trace!(why, "reply not relayed");
                }
            }
        }
        SCRATCH.with(|b| *b.borrow_mut() = buf);
    }

    async fn open_socket(
        &self,
        id: u32,
        addr: &TargetAddr,
    ) -> Result<
        (
            Arc<UdpSocket>,
            std::net::UdpSocket,
            SocketAddr,
            crate::udp::BudgetSlot,
        ),
        UdpStatus,
    > {
        if !self.ctx.cfg.udp_enabled {
            return Err(UdpStatus::UdpDisabled);
        }
        self.bundle.table.precheck(id)?;
        // The process-wide and per-client caps, before any descriptor is taken.
        let slot = self.ctx.udp_budget.acquire(self.client).map_err(|why| {
            debug!(session = id, client = %self.client, ?why, "UDP session refused: session cap reached");
            UdpStatus::SessionLimit
        })?;
        // Policy and DNS first: no socket exists for a destination that is refused.
        let target = self.resolve(addr).await?[0];
        let bind: SocketAddr = if target.is_ipv4() {
            (IpAddr::from([0u8; 4]), 0).into()
        } else {
            (IpAddr::from([0u16; 8]), 0).into()
        };
        let failed = |e: std::io::Error| {
            debug!(error = %e, %target, "UDP socket setup failed");
            UdpStatus::SocketFailed
        };
        let sock = std::net::UdpSocket::bind(bind).map_err(failed)?;
        sock.connect(target).map_err(failed)?;
        sock.set_nonblocking(true).map_err(failed)?;
        let sender = sock.try_clone().map_err(failed)?;
        let sock = UdpSocket::from_std(sock).map_err(failed)?;
        Ok((Arc::new(sock), sender, target, slot))
    }
}

/// Removes a session from its bundle and metrics when its task ends.
struct SessionGuard {
    id: u32,
    bundle: Arc<Bundle>,
    metrics: Arc<Metrics>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.bundle.table.remove(self.id);
        locked(&self.bundle.attach).remove(&self.id);
        dec(&self.metrics.udp_sessions_open);
        let id = self.id;
        self.bundle.broadcast(|| SessionEvent::Closed(id));
    }
}

/// The next frame of an optional signalling stream (pending without one).
async fn next_frame(
    stream: &mut Option<(SendStream, FrameReader)>,
) -> Result<Option<Frame>, TransportError> {
    match stream {
        Some((_, r)) => r.frame().await,
        None => std::future::pending().await,
    }
}

/// Whether a stream error means the connection (the path) is gone, not the stream.
fn connection_lost(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::Connection(_)
            | TransportError::Read(quinn::ReadError::ConnectionLost(_))
            | TransportError::Write(quinn::WriteError::ConnectionLost(_))
    )
}

/// The destination policy moved to [`crate::policy`]; kept here for existing callers.
pub use crate::policy::is_forbidden;

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
