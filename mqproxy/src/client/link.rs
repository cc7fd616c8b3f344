//! The link to the server: the bundle of path connections (one without `--path`), each path's
//! supervision and redial, and the DATAGRAM dispatch to UDP sessions.

use super::*;

/// Where replies of one UDP session go.
#[derive(Debug, Clone)]
pub(super) struct Route {
    /// A non-blocking clone of the association's socket (see `udp::Session::sender` for why
    /// not tokio's `try_send_to`).
    pub(super) socket: Arc<std::net::UdpSocket>,
    pub(super) client: Arc<OnceLock<SocketAddr>>,
    /// The SOCKS UDP header for replies: the destination as the client named it.
    pub(super) header: Bytes,
    /// Reply packet ids already delivered (copies over a second path are dropped).
    pub(super) dup: Arc<Mutex<DupFilter>>,
}

/// The client's side of its bundle: the paths (one QUIC connection each; without `--path`
/// a bundle of one), UDP session routes and id counters. Lives as long as the client;
/// connections come and go underneath.
#[derive(Debug)]
pub(super) struct Bundle {
    pub(super) paths: Arc<PathTable>,
    /// Paths bound with PATH_BIND (`--path` given): TCP is striped, UDP sessions re-attach.
    pub(super) multipath: bool,
    pub(super) bundle_id: [u8; BUNDLE_ID_LEN],
    /// Whether the server relays UDP (from the last authentication).
    pub(super) udp: AtomicBool,
    pub(super) routes: Mutex<HashMap<u32, Route>>,
    pub(super) next_id: AtomicU32,
    pub(super) next_flow: AtomicU64,
}

impl Bundle {
    pub(super) fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Route>> {
        // Every critical section is one map call, so a poisoned map is still consistent.
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn alive(&self) -> bool {
        self.paths.live_count() > 0
    }

    pub(super) fn udp(&self) -> bool {
        self.udp.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub(super) enum LinkState {
    Connecting,
    Up,
    Down { error: String, refused: bool },
}

/// The connections to the server (one per path), each kept up by its own loop in
/// [`Link::supervise`].
#[derive(Debug)]
pub(super) struct Link<D> {
    pub(super) dialers: Vec<D>,
    pub(super) cfg: Arc<ClientConfig>,
    pub(super) conn: Arc<Bundle>,
    pub(super) state: watch::Sender<LinkState>,
    pub(super) metrics: Arc<ClientCounters>,
}

impl<D: Dialer> Link<D> {
    /// The client's Prometheus page: counters, per-path health, relay-session paths.
    pub(super) fn render_metrics(&self) -> String {
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

    pub(super) async fn get(&self) -> Result<Arc<Bundle>, ClientError> {
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
    pub(super) async fn supervise(self: Arc<Self>) {
        let mut paths = JoinSet::new();
        for index in 0..self.dialers.len() {
            paths.spawn(self.clone().supervise_path(index).in_current_span());
        }
        while paths.join_next().await.is_some() {}
    }

    pub(super) async fn supervise_path(self: Arc<Self>, index: usize) {
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

    pub(super) async fn connect_once(&self, index: usize) -> Result<Connection, ClientError> {
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
pub(super) fn is_timeout(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Transport(TransportError::Connection(quinn::ConnectionError::TimedOut))
    )
}

pub(super) fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return BACKOFF_MIN;
    }
    let base = BACKOFF_MIN
        .saturating_mul(1 << failures.min(10))
        .min(BACKOFF_MAX);
    base.mul_f64(rand::random_range(0.5..1.5))
}

impl RxSession for Route {
    fn dup_filter(&self) -> &Mutex<DupFilter> {
        &self.dup
    }
}

/// Routes DATAGRAMs from the server on one path to the SOCKS clients of their sessions.
/// Fragments of a packet always travel on one path, so reassembly is per path.
pub(super) async fn dispatch(c: std::sync::Weak<Bundle>, conn: Connection) {
    let mut rx = DatagramRx::new();
    while let Ok(d) = conn.read_datagram().await {
        let Some(c) = c.upgrade() else { return };
        // The client counts no DATAGRAM drops: the server's counters tell that story.
        let Received::Packet {
            session: route,
            payload,
            ..
        } = rx.receive(Instant::now(), &d, |id| c.routes().get(&id).cloned())
        else {
            continue;
        };
        let Some(to) = route.client.get() else {
            continue;
        };
        let mut out = BytesMut::with_capacity(route.header.len() + payload.len());
        out.put_slice(&route.header);
        out.put_slice(&payload);
        if let Err(e) = route.socket.send_to(&out, *to) {
            trace!(error = %e, "reply to SOCKS client dropped");
        }
    }
}
