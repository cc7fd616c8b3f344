//! The client's way through a relay session: [`RelayDialer`] (the whole connection, or one
//! path of a multipath client via [`PathDialer`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use peer_sdk::ClientTls;
use quinn::TransportConfig;
use tracing::info;

use super::{Client, ClientConfig, ClientError};
use crate::defaults::PEER_WAIT;
use crate::relay_session::{describe, Live, PathMetrics, RelayTarget};
use crate::tls::{self, ClientVerify};
use crate::transport::{self, Dialer, QuicDialer, TransportError};

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
        let mut d = RelayDialer::new(target, verify, crate::defaults::PATH_IDLE_TIMEOUT)?;
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
            relay = ?pc.status().relay,
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
