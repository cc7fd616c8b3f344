//! The server's relay front end: waits for its client in a relay session instead of (or
//! beside) listening on a port.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use peer_sdk::{Peer, ServerTls};
use quinn::{TransportConfig, VarInt};
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use crate::defaults::{BACKOFF_MAX, BACKOFF_MIN};
use crate::proto::close;
use crate::relay_session::{describe, Live, PathMetrics, RelayTarget};
use crate::server::{self, ServerConfig, ServerError, ServerState};
use crate::tls::{self};
use crate::transport::{self};

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
    ctx: Arc<ServerState>,
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
        // Checked first: a server without a relay has no use for its certificate.
        if cfg.relay.is_none() {
            return Err(RelayServerError::NoRelay);
        }
        let (ctx, cert) = ServerState::new(cfg)?;
        let fingerprint = cert.fingerprint;
        let tls = tls::rustls_server_config(cert).map_err(ServerError::from)?;
        let mut s = Self::unregistered(ctx, tls, fingerprint)?;
        s.scrape = server::bind_metrics(s.ctx.cfg().metrics)?;
        s.first = Some(s.register().await?);
        Ok(s)
    }

    /// The relay front end of a server that also listens (`--listen` with `--relay`): it
    /// shares the listener's state, so a multipath client's relay path joins the bundle of its
    /// direct paths. Registers with the relay.
    pub(crate) async fn beside(
        ctx: Arc<ServerState>,
        tls: Arc<rustls::ServerConfig>,
        fingerprint: peer_sdk::Fingerprint,
    ) -> Result<Self, RelayServerError> {
        let mut s = Self::unregistered(ctx, tls, fingerprint)?;
        s.first = Some(s.register().await?);
        Ok(s)
    }

    /// The front end before its first registration, serving no metrics page of its own.
    fn unregistered(
        ctx: Arc<ServerState>,
        tls: Arc<rustls::ServerConfig>,
        fingerprint: peer_sdk::Fingerprint,
    ) -> Result<Self, RelayServerError> {
        let target = ctx.cfg().relay.clone().ok_or(RelayServerError::NoRelay)?;
        let transport = Arc::new(transport::transport_config(ctx.cfg().idle_timeout, true));
        Ok(RelayServer {
            ctx,
            target,
            tls,
            transport,
            fingerprint,
            peer_id: rand::random::<u64>() | 1,
            first: None,
            metrics: Arc::new(PathMetrics::default()),
            scrape: None,
        })
    }

    /// SHA-256 fingerprint of the certificate (what clients pin).
    pub fn fingerprint(&self) -> peer_sdk::Fingerprint {
        self.fingerprint
    }

    /// The proxy's counters.
    pub fn metrics(&self) -> Arc<server::ServerCounters> {
        self.ctx.metrics().clone()
    }

    /// Which path carries the current client's connection.
    pub fn path_metrics(&self) -> Arc<PathMetrics> {
        self.metrics.clone()
    }

    async fn register(&self) -> Result<Peer, peer_sdk::Error> {
        let peer = Peer::bind(self.target.options(self.peer_id, self.transport.clone())).await?;
        info!(
            relay = ?peer.status().relay,
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
                    warn!(relays = ?self.target.relays, session = %self.target.session, error = %e,
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
