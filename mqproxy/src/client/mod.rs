//! The mqproxy client: SOCKS5 (CONNECT and UDP ASSOCIATE) and HTTP CONNECT listeners whose
//! traffic rides an authenticated QUIC connection to the server (one per path with `--path`),
//! each re-established with jittered backoff whenever it drops.

#![cfg(feature = "runtime")]

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

use crate::datagram_rx::{DatagramRx, Received, RxSession};
use crate::defaults::{
    AUTH_RESPONSE_TIMEOUT, BACKOFF_MAX, BACKOFF_MIN, CONNECT_RESPONSE_TIMEOUT, CONNECT_WAIT,
    INGRESS_HANDSHAKE_TIMEOUT, MAX_HANDSHAKE, MAX_INGRESS_CONNECTIONS,
    MAX_SESSIONS_PER_ASSOCIATION, PATH_BACKOFF_MAX, REFUSED_HOLD,
};
use crate::multipath::sched::{DupFilter, Scheduler, MAX_PATHS};
use crate::multipath::{self, FlowError, PathReport, PathTable, Subflow};
use crate::proto::close;
use crate::proto::{
    self, AuthStatus, ConnectStatus, Frame, TargetAddr, UdpStatus, BUNDLE_ID_LEN,
    FEATURE_MULTIPATH, FEATURE_UDP, UDP_FLAG_ATTACH,
};
use crate::socks::{self, SocksError};
use crate::tls::{self, ClientVerify, TlsError};
use crate::transport::{self, Dialer, FrameReader, QuicDialer, StartError, TransportError};
use crate::AbortOnDrop;

mod ingress;
mod link;
pub mod relay;
mod udp;

pub use ingress::IngressError;
use ingress::*;
use link::*;
use udp::*;

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
    /// TLS configuration, or a listener that could not be bound.
    #[error(transparent)]
    Start(#[from] StartError),
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

impl From<TlsError> for ClientError {
    fn from(e: TlsError) -> Self {
        ClientError::Start(e.into())
    }
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
pub struct ClientCounters {
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
                .map_err(|source| ClientError::Start(StartError::Bind { addr, source }))
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
        let conn = Arc::new(Bundle {
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
                metrics: Arc::new(ClientCounters::default()),
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
    pub fn metrics(&self) -> Arc<ClientCounters> {
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
            tasks.spawn(
                netkit::prometheus::serve(l, render, std::future::pending()).in_current_span(),
            );
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
            let Some((tcp, peer)) =
                netkit::accept::or_pause(accepted, Duration::from_millis(50)).await
            else {
                continue;
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
