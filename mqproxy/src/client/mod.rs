//! The mqproxy client: SOCKS5 (CONNECT and UDP ASSOCIATE) and HTTP CONNECT listeners whose
//! traffic rides an authenticated QUIC connection to the server (one per path with `--path`),
//! each re-established with jittered backoff whenever it drops.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use quinn::{Connection, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, trace, warn, Instrument};

use crate::defaults::{
    AUTH_RESPONSE_TIMEOUT, BACKOFF_MAX, BACKOFF_MIN, CONNECT_RESPONSE_TIMEOUT, CONNECT_WAIT,
    INGRESS_HANDSHAKE_TIMEOUT, MAX_HANDSHAKE, MAX_INGRESS_CONNECTIONS,
    MAX_SESSIONS_PER_ASSOCIATION, PATH_BACKOFF_MAX, REASSEMBLY_BUDGET, REFUSED_HOLD,
};
use crate::multipath::sched::{DupFilter, Scheduler, MAX_PATHS};
use crate::multipath::{self, FlowError, PathReport, PathTable, Subflow};
use crate::proto::close;
use crate::proto::{
    self, AuthStatus, ConnectStatus, DatagramHeader, Frame, Reassembled, Reassembler, TargetAddr,
    UdpStatus, BUNDLE_ID_LEN, FEATURE_MULTIPATH, FEATURE_UDP, UDP_FLAG_ATTACH,
};
use crate::socks::{self, SocksError};
use crate::tls::{self, ClientVerify, TlsError};
use crate::transport::{self, Dialer, FrameReader, QuicDialer, TransportError};
use crate::AbortOnDrop;

pub mod relay;

pub use relay::{PathDialer, RelayDialer};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server `HOST:PORT`.
    pub server: String,
    /// Name to verify (and send as SNI).
    pub server_name: String,
    /// The shared secret.
    pub token: Vec<u8>,
    /// SOCKS5 listen address.
    pub socks5: SocketAddr,
    /// HTTP CONNECT listen address.
    pub http: Option<SocketAddr>,
    /// How to verify the server.
    pub verify: ClientVerify,
    /// QUIC idle timeout (keepalives every third of it, at most 5 s apart).
    pub idle_timeout: Duration,
    /// UDP idle timeout to ask for (the server caps it); `None`: the server's.
    pub udp_idle_timeout: Option<Duration>,
    /// Require this SOCKS5 username and password (RFC 1929).
    pub socks_auth: Option<(Vec<u8>, Vec<u8>)>,
    /// Name sent to the server, for its logs.
    pub client_id: String,
    /// Reach the server through this relay session instead of `server` (see
    /// [`crate::relay_session`]); `server` then only names it in logs.
    pub relay: Option<crate::relay_session::RelayTarget>,
    /// Local addresses to reach the server from, one QUIC connection (path) each; empty: one
    /// path from any address.
    pub paths: Vec<std::net::IpAddr>,
    /// How traffic is spread over the paths.
    pub scheduler: Scheduler,
    /// Serve Prometheus metrics here (`GET /metrics`).
    pub metrics: Option<SocketAddr>,
}

impl ClientConfig {
    /// Defaults for everything but the server, token and verification.
    pub fn new(server: impl Into<String>, token: impl Into<Vec<u8>>, verify: ClientVerify) -> Self {
        ClientConfig {
            server: server.into(),
            server_name: tls::SELF_SIGNED_NAME.into(),
            token: token.into(),
            socks5: "127.0.0.1:1080".parse().expect("literal"),
            http: None,
            verify,
            idle_timeout: crate::defaults::DEFAULT_IDLE_TIMEOUT,
            udp_idle_timeout: None,
            socks_auth: None,
            client_id: format!("mqproxy/{}", env!("CARGO_PKG_VERSION")),
            relay: None,
            paths: Vec::new(),
            scheduler: Scheduler::default(),
            metrics: None,
        }
    }
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Talking to the server failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The server refused our token (or protocol version).
    #[error("the server refused authentication ({0:?}): check --token")]
    AuthRefused(AuthStatus),
    /// The server answered authentication with something else.
    #[error("unexpected answer to authentication")]
    AuthProtocol,
    /// No connection to the server within [`CONNECT_WAIT`].
    #[error("no connection to the server: {0}")]
    NotConnected(String),
    /// `--path` was given but the server does not bind paths together.
    #[error("the server does not support multipath (upgrade it, or run without --path)")]
    NoMultipath,
    /// Too many or no paths.
    #[error("{0} paths: between 1 and {MAX_PATHS} are supported")]
    Paths(usize),
}

/// Read access to a client's path health, for logs, metrics and tests.
#[derive(Debug, Clone)]
pub struct PathsHandle(Arc<PathTable>);

impl PathsHandle {
    /// Health of every connected path.
    pub fn reports(&self) -> Vec<PathReport> {
        self.0.reports()
    }
}

/// Counters (and gauges, marked) of a running client.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections to the server that authenticated.
    pub connections: AtomicU64,
    /// Gauge: UDP associations open.
    pub associations_open: AtomicU64,
    /// Gauge: UDP sessions open (routes registered).
    pub udp_sessions_open: AtomicU64,
    /// UDP sessions opened.
    pub udp_sessions_total: AtomicU64,
    /// UDP packets dropped (bad SOCKS header, FRAG ≠ 0, foreign source, limits, too large).
    pub udp_dropped: AtomicU64,
    /// TCP CONNECTs (SOCKS and HTTP) requested.
    pub tcp_connects: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Where replies of one UDP session go.
#[derive(Debug, Clone)]
struct Route {
    /// A non-blocking clone of the association's socket (see `udp::Session::sender` for why
    /// not tokio's `try_send_to`).
    socket: Arc<std::net::UdpSocket>,
    client: Arc<OnceLock<SocketAddr>>,
    /// The SOCKS UDP header for replies: the destination as the client named it.
    header: Bytes,
    /// Reply packet ids already delivered (copies over a second path are dropped).
    dup: Arc<Mutex<DupFilter>>,
}

/// The client's side of its bundle: the paths (one QUIC connection each; without `--path`
/// a bundle of one), UDP session routes and id counters. Lives as long as the client;
/// connections come and go underneath.
#[derive(Debug)]
struct Conn {
    paths: Arc<PathTable>,
    /// Paths bound with PATH_BIND (`--path` given): TCP is striped, UDP sessions re-attach.
    multipath: bool,
    bundle_id: [u8; BUNDLE_ID_LEN],
    /// Whether the server relays UDP (from the last authentication).
    udp: AtomicBool,
    routes: Mutex<HashMap<u32, Route>>,
    next_id: AtomicU32,
    next_flow: AtomicU64,
}

impl Conn {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Route>> {
        // Every critical section is one map call, so a poisoned map is still consistent.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn alive(&self) -> bool {
        self.paths.live_count() > 0
    }

    fn udp(&self) -> bool {
        self.udp.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
enum LinkState {
    Connecting,
    Up,
    Down { error: String, refused: bool },
}

/// The connections to the server (one per path), each kept up by its own loop in
/// [`Link::supervise`].
#[derive(Debug)]
struct Link<D> {
    dialers: Vec<D>,
    cfg: Arc<ClientConfig>,
    conn: Arc<Conn>,
    state: watch::Sender<LinkState>,
    metrics: Arc<Metrics>,
}

impl<D: Dialer> Link<D> {
    /// The client's Prometheus page: counters, per-path health, relay-session paths.
    fn render_metrics(&self) -> String {
        use crate::metrics::{Exposition, Kind};
        let m = &self.metrics;
        let mut e = Exposition::default();
        e.single(
            "mqproxy_client_connections_total",
            Kind::Counter,
            "Connections to the server that authenticated (each path's, each redial).",
            &m.connections,
        );
        e.single(
            "mqproxy_client_udp_associations",
            Kind::Gauge,
            "SOCKS5 UDP associations open.",
            &m.associations_open,
        );
        e.single(
            "mqproxy_client_udp_sessions",
            Kind::Gauge,
            "UDP sessions open.",
            &m.udp_sessions_open,
        );
        e.single(
            "mqproxy_client_udp_sessions_total",
            Kind::Counter,
            "UDP sessions opened.",
            &m.udp_sessions_total,
        );
        e.single(
            "mqproxy_client_udp_dropped_total",
            Kind::Counter,
            "UDP packets dropped (bad SOCKS header, fragments, foreign source, limits, too large).",
            &m.udp_dropped,
        );
        e.single(
            "mqproxy_client_tcp_connects_total",
            Kind::Counter,
            "TCP CONNECTs (SOCKS5 and HTTP) requested.",
            &m.tcp_connects,
        );
        let paths: Vec<_> = self
            .conn
            .paths
            .reports()
            .into_iter()
            .map(|r| {
                let local = self
                    .cfg
                    .paths
                    .get(r.index)
                    .map_or_else(|| "relay-session".to_owned(), |ip| ip.to_string());
                let local = if self.cfg.paths.is_empty() && self.cfg.relay.is_none() {
                    "any".to_owned()
                } else {
                    local
                };
                (vec![("path", r.index.to_string()), ("local", local)], r)
            })
            .collect();
        e.paths(&paths);
        e.unwritten();
        let relay: Vec<_> = self
            .dialers
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.path_metrics().map(|m| (i.to_string(), m)))
            .collect();
        if !relay.is_empty() {
            e.relay_paths(&relay);
        }
        e.finish()
    }

    async fn get(&self) -> Result<Arc<Conn>, ClientError> {
        let mut rx = self.state.subscribe();
        let wait = async {
            loop {
                match &*rx.borrow_and_update() {
                    LinkState::Up if self.conn.alive() => return Ok(self.conn.clone()),
                    LinkState::Down {
                        error,
                        refused: true,
                    } => return Err(ClientError::NotConnected(error.clone())),
                    _ => {}
                }
                if rx.changed().await.is_err() {
                    return Err(ClientError::NotConnected("client stopping".into()));
                }
            }
        };
        match tokio::time::timeout(CONNECT_WAIT, wait).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::NotConnected(match &*self.state.borrow() {
                LinkState::Down { error, .. } => error.clone(),
                _ => "timed out".into(),
            })),
        }
    }

    /// Keeps every path connected: one loop per path, each redialing with backoff.
    async fn supervise(self: Arc<Self>) {
        let mut paths = JoinSet::new();
        for index in 0..self.dialers.len() {
            paths.spawn(self.clone().supervise_path(index).in_current_span());
        }
        while paths.join_next().await.is_some() {}
    }

    async fn supervise_path(self: Arc<Self>, index: usize) {
        let mut failures = 0u32;
        let multipath = self.conn.multipath;
        let local = self.cfg.paths.get(index).map(|ip| ip.to_string());
        loop {
            match self.connect_once(index).await {
                Ok(c) => {
                    failures = 0;
                    inc(&self.metrics.connections);
                    info!(server = %self.cfg.server, path = index, local = ?local, udp = self.conn.udp(), "connected and authenticated");
                    let (path, monitor) = self.conn.paths.insert(index, c.clone());
                    self.state.send_replace(LinkState::Up);
                    let disp = dispatch(Arc::downgrade(&self.conn), c.clone());
                    tokio::join!(monitor, disp);
                    self.conn.paths.remove(&path);
                    let e = c.closed().await;
                    if multipath {
                        warn!(path = index, local = ?local, error = %crate::logging::Escaped(&e), "path lost; redialing it");
                    } else {
                        warn!(error = %crate::logging::Escaped(&e), "connection to the server lost; reconnecting");
                    }
                    if !self.conn.alive() {
                        self.state.send_replace(LinkState::Down {
                            error: e.to_string(),
                            refused: false,
                        });
                    }
                }
                Err(e) => {
                    let refused =
                        matches!(e, ClientError::AuthRefused(_) | ClientError::NoMultipath);
                    if refused {
                        tracing::error!(server = %self.cfg.server, path = index, error = %crate::logging::Escaped(&e), "authentication refused");
                    } else if multipath && failures > 0 && !failures.is_multiple_of(30) {
                        // A cut path is retried every second or so: say so once, then now and then.
                        debug!(server = %self.cfg.server, path = index, local = ?local, error = %crate::logging::Escaped(&e), failures, "connecting to the server failed again");
                    } else {
                        warn!(server = %self.cfg.server, path = index, local = ?local, error = %crate::logging::Escaped(&e), failures, "connecting to the server failed");
                    }
                    if !self.conn.alive() {
                        self.state.send_replace(LinkState::Down {
                            error: e.to_string(),
                            refused,
                        });
                    }
                    failures = failures.saturating_add(1);
                    if multipath && is_timeout(&e) {
                        // The server did not answer: the path is still cut. The attempt itself
                        // took about a second, so try again right away; a healed path is
                        // then back within about a second (each attempt costs a few packets).
                        tokio::time::sleep(BACKOFF_MIN.mul_f64(rand::random_range(0.5..1.0))).await;
                        continue;
                    }
                }
            }
            let wait = backoff(failures);
            // A path of a bundle is redialed sooner: the other paths carry the traffic
            // meanwhile, and a path that returns should be used again within seconds.
            let wait = if multipath {
                wait.min(PATH_BACKOFF_MAX)
            } else {
                wait
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn connect_once(&self, index: usize) -> Result<Connection, ClientError> {
        let conn = self.dialers[index].dial().await?;
        let auth = async {
            let (mut send, recv) = conn.open_bi().await.map_err(TransportError::from)?;
            let req = Frame::AuthRequest {
                version: proto::VERSION,
                client_id: self.cfg.client_id.clone(),
                token: self.cfg.token.clone(),
                features: FEATURE_UDP,
            };
            let mut b = BytesMut::new();
            proto::put_varint(&mut b, proto::STREAM_AUTH);
            req.encode(&mut b);
            if self.conn.multipath {
                Frame::PathBind {
                    bundle: self.conn.bundle_id,
                    path_index: index as u64,
                    scheduler: self.cfg.scheduler.code(),
                }
                .encode(&mut b);
            }
            send.write_all(&b).await.map_err(TransportError::from)?;
            let _ = send.finish();
            Ok::<_, ClientError>(FrameReader::new(recv).frame().await)
        };
        let resp = match tokio::time::timeout(AUTH_RESPONSE_TIMEOUT, auth).await {
            Err(_) => return Err(TransportError::Timeout("AUTH_RESPONSE").into()),
            Ok(r) => r?,
        };
        let resp = match resp {
            Ok(r) => r,
            // The server may close before its response is read; the close code says why.
            Err(e) => {
                if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason() {
                    if c.error_code == VarInt::from_u32(close::AUTH_FAILED) {
                        return Err(ClientError::AuthRefused(AuthStatus::BadToken));
                    }
                }
                return Err(e.into());
            }
        };
        match resp {
            Some(Frame::AuthResponse {
                status: AuthStatus::Ok,
                features,
                udp_idle_timeout_ms,
                ..
            }) => {
                debug!(features, udp_idle_timeout_ms, path = index, "authenticated");
                if self.conn.multipath && features & FEATURE_MULTIPATH == 0 {
                    conn.close(VarInt::from_u32(close::SHUTDOWN), b"multipath unsupported");
                    return Err(ClientError::NoMultipath);
                }
                self.conn
                    .udp
                    .store(features & FEATURE_UDP != 0, Ordering::Relaxed);
                Ok(conn)
            }
            Some(Frame::AuthResponse { status, .. }) => {
                conn.close(VarInt::from_u32(close::SHUTDOWN), b"");
                Err(ClientError::AuthRefused(status))
            }
            _ => {
                conn.close(
                    VarInt::from_u32(close::PROTOCOL_ERROR),
                    b"expected AUTH_RESPONSE",
                );
                Err(ClientError::AuthProtocol)
            }
        }
    }
}

/// Whether a dial failed because the server never answered (rather than refusing or erroring).
fn is_timeout(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Transport(TransportError::Connection(quinn::ConnectionError::TimedOut))
    )
}

fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return BACKOFF_MIN;
    }
    let base = BACKOFF_MIN
        .saturating_mul(1 << failures.min(10))
        .min(BACKOFF_MAX);
    base.mul_f64(rand::random_range(0.5..1.5))
}

/// Routes DATAGRAMs from the server on one path to the SOCKS clients of their sessions.
/// Fragments of a packet always travel on one path, so reassembly is per path.
async fn dispatch(c: std::sync::Weak<Conn>, conn: Connection) {
    let mut reassembly: HashMap<u32, Reassembler> = HashMap::new();
    let mut reassembly_bytes = 0usize;
    while let Ok(d) = conn.read_datagram().await {
        let Some(c) = c.upgrade() else { return };
        let Ok((h, payload)) = DatagramHeader::decode(&d) else {
            continue;
        };
        let Some(route) = c.routes().get(&h.session_id).cloned() else {
            if let Some(r) = reassembly.remove(&h.session_id) {
                reassembly_bytes -= r.buffered_bytes();
            }
            continue;
        };
        let packet;
        let payload = if h.frag_count == 1 {
            payload
        } else {
            if reassembly_bytes + payload.len() > REASSEMBLY_BUDGET {
                continue;
            }
            let r = reassembly.entry(h.session_id).or_default();
            let before = r.buffered_bytes();
            let out = r.push(Instant::now(), &h, payload);
            reassembly_bytes = reassembly_bytes + r.buffered_bytes() - before;
            match out {
                Reassembled::Packet(p) => {
                    packet = p;
                    &packet[..]
                }
                _ => continue,
            }
        };
        if !route
            .dup
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accept(h.packet_id)
        {
            continue;
        }
        let Some(to) = route.client.get() else {
            continue;
        };
        let mut out = BytesMut::with_capacity(route.header.len() + payload.len());
        out.put_slice(&route.header);
        out.put_slice(payload);
        if let Err(e) = route.socket.send_to(&out, *to) {
            trace!(error = %e, "reply to SOCKS client dropped");
        }
    }
}

/// A bound client, ready to [`Client::run`].
#[derive(Debug)]
pub struct Client<D = QuicDialer> {
    socks: TcpListener,
    http: Option<TcpListener>,
    metrics: Option<TcpListener>,
    link: Arc<Link<D>>,
}

impl Client<QuicDialer> {
    /// Binds the listeners and prepares the QUIC endpoints, one per `--path` (connecting
    /// starts in `run`). `cfg.relay` is not used here: see [`Client::bind_relay`] and
    /// [`Client::bind_paths_with_relay`].
    pub async fn bind(cfg: ClientConfig) -> Result<Self, ClientError> {
        let qc = tls::client_config(&cfg.verify)?;
        let dialers = if cfg.paths.is_empty() {
            vec![QuicDialer::new(
                cfg.server.clone(),
                cfg.server_name.clone(),
                qc,
                cfg.idle_timeout,
            )?]
        } else {
            cfg.paths
                .iter()
                .map(|ip| {
                    QuicDialer::for_path(
                        cfg.server.clone(),
                        cfg.server_name.clone(),
                        qc.clone(),
                        *ip,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        Client::with_dialers(cfg, dialers).await
    }
}

impl<D: Dialer> Client<D> {
    /// Binds the listeners; connections to the server come from `dialer`.
    pub async fn with_dialer(cfg: ClientConfig, dialer: D) -> Result<Self, ClientError> {
        Self::with_dialers(cfg, vec![dialer]).await
    }

    /// Binds the listeners; path `i`'s connections come from `dialers[i]`. More than one
    /// dialer (or any `cfg.paths`) makes a multipath client.
    pub async fn with_dialers(cfg: ClientConfig, dialers: Vec<D>) -> Result<Self, ClientError> {
        if dialers.is_empty() || dialers.len() > MAX_PATHS {
            return Err(ClientError::Paths(dialers.len()));
        }
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ClientError::Bind { addr, source })
        };
        let socks = bind(cfg.socks5).await?;
        let http = match cfg.http {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let metrics = match cfg.metrics {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let (state, _) = watch::channel(LinkState::Connecting);
        let multipath = dialers.len() > 1 || !cfg.paths.is_empty();
        let conn = Arc::new(Conn {
            paths: Arc::new(PathTable::new(cfg.scheduler)),
            multipath,
            bundle_id: rand::random(),
            udp: AtomicBool::new(false),
            routes: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            next_flow: AtomicU64::new(1),
        });
        if multipath {
            conn.paths.detect_silence();
            info!(paths = ?cfg.paths, scheduler = %cfg.scheduler, "multipath client");
        }
        Ok(Client {
            socks,
            http,
            metrics,
            link: Arc::new(Link {
                dialers,
                conn,
                cfg: Arc::new(cfg),
                state,
                metrics: Arc::new(Metrics::default()),
            }),
        })
    }

    /// The SOCKS5 listener's address.
    pub fn socks_addr(&self) -> SocketAddr {
        self.socks
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The HTTP CONNECT listener's address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
            .as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
    }

    /// The address of the `--metrics` page, if one is served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The client's counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.link.metrics.clone()
    }

    /// A handle to the health of the client's paths (RTT, loss, bytes, state).
    pub fn paths(&self) -> PathsHandle {
        PathsHandle(self.link.conn.paths.clone())
    }

    /// Serves until `shutdown` completes; every task is stopped on return.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut tasks = JoinSet::new();
        tasks.spawn(self.link.clone().supervise().in_current_span());
        if let Some(l) = self.metrics.take() {
            if let Ok(a) = l.local_addr() {
                info!(metrics = %a, "serving Prometheus metrics at /metrics");
            }
            let link = self.link.clone();
            let render = Arc::new(move || link.render_metrics());
            tasks.spawn(crate::metrics::serve(l, render, std::future::pending()).in_current_span());
        }
        let slots = Arc::new(Semaphore::new(MAX_INGRESS_CONNECTIONS));
        info!(socks5 = %self.socks_addr(), http = ?self.http_addr(), server = %self.link.cfg.server, "client running");
        loop {
            let (accepted, http) = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                r = self.socks.accept() => (r, false),
                r = accept_opt(self.http.as_ref()) => (r, true),
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                debug!(%peer, "too many client connections; closing");
                continue;
            };
            let link = self.link.clone();
            let span = tracing::debug_span!("ingress", %peer);
            tasks.spawn(
                async move {
                    let _permit = permit;
                    let r = if http {
                        serve_http(tcp, &link).await
                    } else {
                        serve_socks(tcp, peer, &link).await
                    };
                    if let Err(e) = r {
                        debug!(error = %crate::logging::Escaped(&e), "client connection ended");
                    }
                }
                .instrument(span),
            );
        }
        for p in self.link.conn.paths.all() {
            p.conn
                .close(VarInt::from_u32(close::SHUTDOWN), b"client shutting down");
        }
        tasks.shutdown().await;
        for d in &self.link.dialers {
            d.finish().await;
        }
        info!("client stopped");
    }
}

/// Accepts on an optional listener (pending forever without one); cancel-safe.
async fn accept_opt(l: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Ingress errors (logged at debug: they concern one SOCKS client).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngressError {
    /// Socket IO.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Protocol violation by the SOCKS/HTTP client.
    #[error(transparent)]
    Socks(#[from] SocksError),
    /// The client was too slow.
    #[error("handshake timed out")]
    Timeout,
    /// The client closed mid-handshake.
    #[error("client closed during the handshake")]
    Closed,
    /// The handshake message is too long.
    #[error("handshake message too long")]
    TooLong,
    /// Wrong SOCKS username or password.
    #[error("wrong SOCKS username or password")]
    BadCredentials,
}

/// Reads from `tcp` into `buf` until `parse` yields a message; consumes its bytes.
async fn read_msg<T>(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    limit: usize,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, SocksError>,
) -> Result<T, IngressError> {
    let fut = async {
        loop {
            if let Some((v, n)) = parse(buf)? {
                let _ = buf.split_to(n);
                return Ok(v);
            }
            if buf.len() >= limit {
                return Err(IngressError::TooLong);
            }
            if tcp.read_buf(buf).await? == 0 {
                return Err(IngressError::Closed);
            }
        }
    };
    tokio::time::timeout(INGRESS_HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| IngressError::Timeout)?
}

async fn serve_socks<D: Dialer>(
    mut tcp: TcpStream,
    peer: SocketAddr,
    link: &Link<D>,
) -> Result<(), IngressError> {
    let mut buf = BytesMut::with_capacity(512);
    let methods = read_msg(&mut tcp, &mut buf, MAX_HANDSHAKE, socks::parse_greeting).await?;
    let wanted = if link.cfg.socks_auth.is_some() {
        socks::METHOD_USERPASS
    } else {
        socks::METHOD_NONE
    };
    if !methods.contains(&wanted) {
        tcp.write_all(&[socks::VERSION, socks::METHOD_UNACCEPTABLE])
            .await?;
        return Ok(());
    }
    tcp.write_all(&[socks::VERSION, wanted]).await?;
    if let Some((user, pass)) = &link.cfg.socks_auth {
        let (u, p) = read_msg(&mut tcp, &mut buf, MAX_HANDSHAKE, socks::parse_userpass).await?;
        let ok = &u == user && &p == pass;
        tcp.write_all(&[0x01, if ok { 0 } else { 1 }]).await?;
        if !ok {
            return Err(IngressError::BadCredentials);
        }
    }
    let req = match read_msg(&mut tcp, &mut buf, MAX_HANDSHAKE, socks::parse_request).await {
        Ok(r) => r,
        Err(IngressError::Socks(SocksError::AddressType(t))) => {
            let reply =
                socks::encode_reply(socks::REP_ADDRESS_TYPE_NOT_SUPPORTED, socks::UNSPECIFIED);
            tcp.write_all(&reply).await?;
            return Err(SocksError::AddressType(t).into());
        }
        Err(e) => return Err(e),
    };
    match req.command {
        socks::CMD_CONNECT => {
            inc(&link.metrics.tcp_connects);
            match open_connect(link, &req.addr).await {
                Ok(opened) => {
                    tcp.write_all(&socks::encode_reply(socks::REP_OK, socks::UNSPECIFIED))
                        .await?;
                    splice_with(tcp, buf, opened).await
                }
                Err(status) => {
                    debug!(addr = %req.addr, ?status, "CONNECT refused");
                    tcp.write_all(&socks::encode_reply(
                        status.socks_code(),
                        socks::UNSPECIFIED,
                    ))
                    .await?;
                    Ok(())
                }
            }
        }
        socks::CMD_UDP_ASSOCIATE => udp_associate(tcp, peer, req.addr, link).await,
        _ => {
            let reply = socks::encode_reply(socks::REP_COMMAND_NOT_SUPPORTED, socks::UNSPECIFIED);
            tcp.write_all(&reply).await?;
            Ok(())
        }
    }
}

/// A server-side TCP connection, ready to carry bytes.
enum Opened {
    /// Single path: one CONNECT stream.
    Stream(SendStream, FrameReader),
    /// Multipath: a striped flow and the subflow it was opened on.
    Flow(Arc<Conn>, u64, Subflow),
}

/// Sends bytes the client sent after its request, then splices (or runs the striped flow).
async fn splice_with(tcp: TcpStream, early: BytesMut, opened: Opened) -> Result<(), IngressError> {
    let (mut send, reader) = match opened {
        Opened::Stream(send, reader) => (send, reader),
        Opened::Flow(c, flow_id, first) => {
            run_client_flow(tcp, c, flow_id, first, early.freeze()).await;
            return Ok(());
        }
    };
    if !early.is_empty() && send.write_all(&early).await.is_err() {
        return Ok(());
    }
    let (recv, leftover) = reader.into_parts();
    let (up, down) = transport::splice(tcp, send, recv, leftover).await;
    debug!(bytes_up = up, bytes_down = down, "CONNECT done");
    Ok(())
}

/// Carries one TCP connection as a striped flow: opens a SUBFLOW on every other path, now
/// and whenever a path (re)connects, while the flow runs.
async fn run_client_flow(tcp: TcpStream, c: Arc<Conn>, flow_id: u64, first: Subflow, early: Bytes) {
    let (more_tx, more_rx) = mpsc::channel(MAX_PATHS);
    let first_id = c.paths.get(first.path).map(|p| p.generation);
    let opener = AbortOnDrop(tokio::spawn(
        open_subflows(c.clone(), flow_id, first.path, first_id, more_tx).in_current_span(),
    ));
    match multipath::run_flow(tcp, c.paths.clone(), first, more_rx, early).await {
        Ok((up, down)) => debug!(
            flow = flow_id,
            bytes_up = up,
            bytes_down = down,
            "flow done"
        ),
        // The application ending its side is ordinary; the proxy giving up on a flow is not.
        Err(e @ (FlowError::Tcp(_) | FlowError::PeerReset)) => {
            debug!(flow = flow_id, error = %crate::logging::Escaped(&e), "flow ended by one side")
        }
        Err(e) => {
            warn!(flow = flow_id, error = %crate::logging::Escaped(&e), "flow failed; its TCP connection was reset")
        }
    }
    drop(opener);
}

async fn open_subflows(
    c: Arc<Conn>,
    flow_id: u64,
    first_path: usize,
    first_id: Option<u64>,
    more: mpsc::Sender<Subflow>,
) {
    // The connection (generation) each path's subflow was opened on.
    let mut opened: [Option<u64>; MAX_PATHS] = [None; MAX_PATHS];
    opened[first_path] = first_id;
    let mut changes = c.paths.subscribe();
    loop {
        for p in c.paths.all() {
            let id = p.generation;
            if opened[p.index] == Some(id) || p.conn.close_reason().is_some() {
                continue;
            }
            opened[p.index] = Some(id);
            let open = async {
                let (mut send, recv) = p.conn.open_bi().await.map_err(TransportError::from)?;
                transport::write_frame(
                    &mut send,
                    Some(proto::STREAM_SUBFLOW),
                    &Frame::Subflow { flow_id },
                )
                .await?;
                Ok::<_, TransportError>((send, recv))
            };
            match open.await {
                Ok((send, recv)) => {
                    let sub = Subflow {
                        path: p.index,
                        send,
                        recv,
                        leftover: BytesMut::new(),
                    };
                    if more.send(sub).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    debug!(flow = flow_id, path = p.index, error = %crate::logging::Escaped(&e), "opening a subflow failed")
                }
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Opens a CONNECT stream (a striped flow when multipath) and waits for the server's answer.
async fn open_connect<D: Dialer>(
    link: &Link<D>,
    addr: &TargetAddr,
) -> Result<Opened, ConnectStatus> {
    let c = link.get().await.map_err(|e| {
        debug!(error = %e, "no server connection for CONNECT");
        ConnectStatus::GeneralFailure
    })?;
    let path = c.paths.best().ok_or(ConnectStatus::GeneralFailure)?;
    let flow_id = c.next_flow.fetch_add(1, Ordering::Relaxed);
    let attempt = async {
        let (mut send, recv) = path.conn.open_bi().await.map_err(TransportError::from)?;
        if c.multipath {
            let req = Frame::MpConnect {
                flow_id,
                addr: addr.clone(),
            };
            transport::write_frame(&mut send, Some(proto::STREAM_MP_CONNECT), &req).await?;
        } else {
            let req = Frame::ConnectRequest { addr: addr.clone() };
            transport::write_frame(&mut send, Some(proto::STREAM_CONNECT_TCP), &req).await?;
        }
        let mut r = FrameReader::new(recv);
        let resp = r.frame().await?;
        Ok::<_, TransportError>((send, r, resp))
    };
    match tokio::time::timeout(CONNECT_RESPONSE_TIMEOUT, attempt).await {
        Ok(Ok((send, r, Some(Frame::ConnectResponse { status, .. })))) => {
            if status != ConnectStatus::Ok {
                Err(status)
            } else if c.multipath {
                Ok(Opened::Flow(c, flow_id, Subflow::new(path.index, send, r)))
            } else {
                Ok(Opened::Stream(send, r))
            }
        }
        Ok(Ok(_)) => Err(ConnectStatus::GeneralFailure),
        Ok(Err(e)) => {
            debug!(error = %crate::logging::Escaped(&e), "CONNECT stream failed");
            Err(ConnectStatus::GeneralFailure)
        }
        Err(_) => Err(ConnectStatus::TtlExpired),
    }
}

async fn serve_http<D: Dialer>(mut tcp: TcpStream, link: &Link<D>) -> Result<(), IngressError> {
    let mut buf = BytesMut::with_capacity(1024);
    let addr = match read_msg(
        &mut tcp,
        &mut buf,
        socks::MAX_HTTP_HEAD + 4,
        socks::parse_http_connect,
    )
    .await
    {
        Ok(a) => a,
        Err(IngressError::Socks(SocksError::HttpMethod(m))) => {
            tcp.write_all(
                b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
            return Err(SocksError::HttpMethod(m).into());
        }
        Err(IngressError::Socks(e)) => {
            tcp.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
            return Err(e.into());
        }
        Err(e) => return Err(e),
    };
    inc(&link.metrics.tcp_connects);
    match open_connect(link, &addr).await {
        Ok(opened) => {
            tcp.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            splice_with(tcp, buf, opened).await
        }
        Err(status) => {
            let line: &[u8] = match status {
                ConnectStatus::NotAllowed => b"403 Forbidden",
                ConnectStatus::TtlExpired => b"504 Gateway Timeout",
                ConnectStatus::GeneralFailure => b"503 Service Unavailable",
                _ => b"502 Bad Gateway",
            };
            let mut resp = b"HTTP/1.1 ".to_vec();
            resp.extend_from_slice(line);
            resp.extend_from_slice(b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            tcp.write_all(&resp).await?;
            Ok(())
        }
    }
}

/// A non-blocking std clone of a tokio UDP socket (same kernel socket).
fn sock_clone(s: &UdpSocket) -> std::io::Result<std::net::UdpSocket> {
    let fd = socket2::SockRef::from(s).try_clone()?;
    Ok(fd.into())
}

/// Removes a session's route (and its gauge) when the session task ends.
struct RouteGuard {
    conn: Arc<Conn>,
    id: u32,
    metrics: Arc<Metrics>,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.conn.routes().remove(&self.id);
        self.metrics
            .udp_sessions_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// One destination of an association.
struct Entry {
    id: u32,
    conn: Arc<Conn>,
    packet_id: u16,
    refused_until: Option<Instant>,
}

/// How a session task ended.
struct SessionEnd {
    id: u32,
    dest: TargetAddr,
    refused: bool,
}

async fn udp_associate<D: Dialer>(
    mut tcp: TcpStream,
    peer: SocketAddr,
    hint: TargetAddr,
    link: &Link<D>,
) -> Result<(), IngressError> {
    let fail = |code| socks::encode_reply(code, socks::UNSPECIFIED);
    let conn = match link.get().await {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "no server connection for UDP ASSOCIATE");
            tcp.write_all(&fail(socks::REP_GENERAL_FAILURE)).await?;
            return Ok(());
        }
    };
    if !conn.udp() {
        debug!("server relays no UDP; UDP ASSOCIATE refused");
        tcp.write_all(&fail(socks::REP_COMMAND_NOT_SUPPORTED))
            .await?;
        return Ok(());
    }
    // Bind where the client reached us, so BND.ADDR is an address it can send to.
    let local_ip = tcp.local_addr()?.ip();
    let sock = match UdpSocket::bind((local_ip, 0)).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(error = %e, "binding the UDP relay socket failed");
            tcp.write_all(&fail(socks::REP_GENERAL_FAILURE)).await?;
            return Ok(());
        }
    };
    let bound = sock.local_addr()?;
    let sender = Arc::new(sock_clone(&sock)?);
    tcp.write_all(&socks::encode_reply(socks::REP_OK, bound))
        .await?;
    // Only the TCP client's IP may use the association; a port given in the request
    // pins the port too. The first matching datagram then locks the exact address.
    let expected_port = match hint {
        TargetAddr::Ip(a) if a.port() != 0 => Some(a.port()),
        _ => None,
    };
    debug!(%bound, "UDP association open");
    link.metrics
        .associations_open
        .fetch_add(1, Ordering::Relaxed);
    let mut a = Association {
        link,
        sock,
        sender,
        peer_ip: peer.ip(),
        expected_port,
        client: Arc::new(OnceLock::new()),
        sessions: HashMap::new(),
        tasks: JoinSet::new(),
        conn,
    };
    let r = a.run(&mut tcp).await;
    link.metrics
        .associations_open
        .fetch_sub(1, Ordering::Relaxed);
    debug!(sessions = a.sessions.len(), "UDP association closed");
    r
}

struct Association<'a, D> {
    link: &'a Link<D>,
    sock: Arc<UdpSocket>,
    sender: Arc<std::net::UdpSocket>,
    peer_ip: std::net::IpAddr,
    expected_port: Option<u16>,
    client: Arc<OnceLock<SocketAddr>>,
    sessions: HashMap<TargetAddr, Entry>,
    /// Session tasks: dropping the association aborts them, which finishes their streams and
    /// so tears the server's sessions down.
    tasks: JoinSet<SessionEnd>,
    conn: Arc<Conn>,
}

impl<D: Dialer> Association<'_, D> {
    async fn run(&mut self, tcp: &mut TcpStream) -> Result<(), IngressError> {
        let mut buf = vec![0u8; proto::MAX_PACKET + 512];
        let mut ctl = [0u8; 64];
        loop {
            tokio::select! {
                // RFC 1928 §7: the association ends when its TCP connection does.
                r = tcp.read(&mut ctl) => match r {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => continue,
                },
                r = self.sock.recv_from(&mut buf) => {
                    let (n, src) = r?;
                    self.on_packet(&buf[..n], src).await;
                }
                Some(end) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    let Ok(end) = end else { continue };
                    if let Some(e) = self.sessions.get_mut(&end.dest) {
                        if e.id == end.id {
                            if end.refused {
                                e.refused_until = Some(Instant::now() + REFUSED_HOLD);
                            } else {
                                self.sessions.remove(&end.dest);
                            }
                        }
                    }
                }
            }
        }
    }

    fn drop_packet(&self, why: &'static str) {
        inc(&self.link.metrics.udp_dropped);
        trace!(why, "UDP packet dropped");
    }

    async fn on_packet(&mut self, d: &[u8], src: SocketAddr) {
        if src.ip() != self.peer_ip || self.expected_port.is_some_and(|p| p != src.port()) {
            return self.drop_packet("foreign source");
        }
        if *self.client.get_or_init(|| src) != src {
            return self.drop_packet("not the locked client address");
        }
        let pkt = match socks::parse_udp(d) {
            Ok(p) => p,
            Err(_) => return self.drop_packet("bad SOCKS UDP header"),
        };
        if pkt.frag != 0 {
            return self.drop_packet("FRAG != 0");
        }
        let now = Instant::now();
        let stale = match self.sessions.get(&pkt.addr) {
            None => true,
            Some(e) => !e.conn.alive() || e.refused_until.is_some_and(|t| now >= t),
        };
        if stale {
            self.sessions.remove(&pkt.addr);
            if !self.open_session(&pkt.addr).await {
                return;
            }
        }
        let e = self
            .sessions
            .get_mut(&pkt.addr)
            .expect("inserted above or present");
        if e.refused_until.is_some() {
            return self.drop_packet("destination refused by the server");
        }
        let pid = e.packet_id;
        e.packet_id = e.packet_id.wrapping_add(1);
        if let Err(why) = e.conn.paths.send_packet(e.id, pid, pkt.payload).await {
            self.drop_packet(why);
        }
    }

    async fn open_session(&mut self, dest: &TargetAddr) -> bool {
        if self.sessions.len() >= MAX_SESSIONS_PER_ASSOCIATION {
            self.drop_packet("session limit");
            return false;
        }
        if !self.conn.alive() {
            match self.link.get().await {
                Ok(c) if c.udp() => self.conn = c,
                _ => {
                    self.drop_packet("no server connection");
                    return false;
                }
            }
        }
        let conn = self.conn.clone();
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let header = socks::encode_udp_header(dest);
        conn.routes().insert(
            id,
            Route {
                socket: self.sender.clone(),
                client: self.client.clone(),
                header: header.freeze(),
                dup: Arc::new(Mutex::new(DupFilter::default())),
            },
        );
        let m = &self.link.metrics;
        m.udp_sessions_open.fetch_add(1, Ordering::Relaxed);
        inc(&m.udp_sessions_total);
        let guard = RouteGuard {
            conn: conn.clone(),
            id,
            metrics: m.clone(),
        };
        let idle_ms = self
            .link
            .cfg
            .udp_idle_timeout
            .map_or(0, |d| d.as_millis() as u64);
        let dest2 = dest.clone();
        self.tasks.spawn(
            async move {
                let refused = run_session(guard, dest2.clone(), idle_ms).await;
                SessionEnd {
                    id,
                    dest: dest2,
                    refused,
                }
            }
            .in_current_span(),
        );
        self.sessions.insert(
            dest.clone(),
            Entry {
                id,
                conn,
                packet_id: 0,
                refused_until: None,
            },
        );
        true
    }
}

/// A UDP session's signalling stream: OPEN, RESP, then held open until either side ends it.
/// When the stream dies with its path (multipath), the session is re-attached over another
/// path (same id, flag ATTACH): the server keeps its socket, so the destination sees no change.
/// Returns whether the server refused the session.
async fn run_session(guard: RouteGuard, dest: TargetAddr, idle_ms: u64) -> bool {
    let id = guard.id;
    let c = guard.conn.clone();
    let mut flags = 0;
    let mut attempts = 0u32;
    loop {
        let Some(path) = c.paths.wait_best(CONNECT_WAIT).await else {
            debug!(session = id, "no path to (re-)open the UDP session on");
            return false;
        };
        let path_lost = || c.multipath && path.conn.close_reason().is_some();
        let open = Frame::UdpOpen {
            session_id: id,
            flags,
            addr: dest.clone(),
            idle_timeout_ms: idle_ms,
        };
        let start = async {
            let (mut send, recv) = path.conn.open_bi().await.map_err(TransportError::from)?;
            transport::write_frame(&mut send, Some(proto::STREAM_UDP_SESSION), &open).await?;
            Ok::<_, TransportError>((send, FrameReader::new(recv)))
        };
        let retry = |attempts: &mut u32| {
            *attempts += 1;
            *attempts <= 5
        };
        let (_send, mut r) = match start.await {
            Ok(x) => x,
            Err(e) if path_lost() && retry(&mut attempts) => {
                debug!(session = id, error = %crate::logging::Escaped(&e), "path lost while opening the UDP session; retrying");
                flags = UDP_FLAG_ATTACH;
                continue;
            }
            Err(e) => {
                debug!(session = id, error = %crate::logging::Escaped(&e), "opening UDP session failed");
                return false;
            }
        };
        match r.frame().await {
            Ok(Some(Frame::UdpResp {
                status: UdpStatus::Ok,
                idle_timeout_ms,
                remote,
                ..
            })) => {
                attempts = 0;
                debug!(session = id, %dest, ?remote, idle_timeout_ms, path = path.index, attach = flags != 0, "UDP session open")
            }
            Ok(Some(Frame::UdpResp { status, .. })) => {
                debug!(session = id, %dest, ?status, "UDP session refused by the server");
                return true;
            }
            _ if path_lost() && retry(&mut attempts) => {
                flags = UDP_FLAG_ATTACH;
                continue;
            }
            other => {
                debug!(session = id, ?other, "UDP session stream ended before RESP");
                return false;
            }
        }
        // Wait for UDP_CLOSE and the end of the stream. `_send` stays open until then: dropping
        // it would finish the stream, which the server reads as the end of the session.
        loop {
            match r.frame().await {
                Ok(Some(Frame::UdpClose { reason, .. })) => {
                    debug!(session = id, ?reason, "UDP session closed by the server");
                }
                Ok(Some(_)) => {}
                Err(_) if path_lost() => {
                    debug!(
                        session = id,
                        path = path.index,
                        "UDP session lost its signalling path; re-attaching"
                    );
                    flags = UDP_FLAG_ATTACH;
                    break;
                }
                Ok(None) | Err(_) => return false,
            }
        }
    }
}
