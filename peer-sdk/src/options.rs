//! How to reach the peer: [`Options`] (relays, session, timeouts, strategy) and the choices in
//! it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quic_relay::proto::Token;
use uuid::Uuid;

use crate::tls;

/// When to use which path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Punch a direct path first (up to [`Options::direct_timeout`]), the relay otherwise; keep
    /// trying direct in the background, and fall back to the relay if direct dies.
    #[default]
    Auto,
    /// Only ever use the relay.
    RelayOnly,
}

/// Whether to reach the relay over TCP (its port number, length-prefixed datagrams) when UDP
/// does not get through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpFallback {
    /// Register over UDP; if the relay has not answered within
    /// [`Options::tcp_fallback_after`], switch to TCP for the life of this peer.
    #[default]
    Auto,
    /// UDP only.
    Never,
    /// TCP from the start (no UDP to the relay, no hole punching).
    Always,
}

/// How to reach the peer.
#[derive(Debug, Clone)]
pub struct Options {
    /// The relays, tried in [`Options::relay_order`] (the session's rendezvous hash, the same
    /// for both peers). A peer registers with the first that answers; when that relay stops
    /// answering later (it died, or its host went away), the peer moves to the next one in the
    /// same order, and so does the other peer: a relayed connection moves with them, about 4 s
    /// after its relay died, without the application noticing (same `quinn::Connection`).
    pub relays: Vec<SocketAddr>,
    /// The session both peers name.
    pub session: Uuid,
    /// A relay token, when the relay requires one (`--secret-file`).
    pub token: Option<Token>,
    /// Local address to bind; default: any address and port, IPv6 and IPv4 (dual-stack) where
    /// the host allows it, so that IPv6 direct paths work whatever the relay's family.
    pub bind: Option<SocketAddr>,
    /// Re-registration interval for the life of the connection (≤ 25 s keeps NAT mappings).
    pub keepalive: Duration,
    /// How long to wait for the relay to acknowledge the registration.
    pub register_timeout: Duration,
    /// How long to wait for the other peer to register the session.
    pub peer_timeout: Duration,
    /// How long to try hole punching before using the relay.
    pub direct_timeout: Duration,
    /// Direct first, or relay only.
    pub strategy: Strategy,
    /// ALPN protocol for the built-in TLS configurations.
    pub alpn: Vec<u8>,
    /// This peer's id at the relay (random when `None`). Keep it across reconnects to the same
    /// session so a new socket takes over this peer's old slot at once.
    pub peer_id: Option<u64>,
    /// QUIC transport parameters; the default keeps the connection alive across a relay
    /// restart or NAT rebinding (keepalive 5 s, idle timeout 60 s).
    pub transport: Option<Arc<quinn::TransportConfig>>,
    /// Whether to fall back to TCP to the relay when UDP gets no answer (default: yes). The
    /// connection then reports [`Path::RelayTcp`](crate::Path::RelayTcp).
    pub tcp_fallback: TcpFallback,
    /// How long UDP registrations may go unanswered before [`TcpFallback::Auto`] tries TCP.
    /// Keep it below [`Options::register_timeout`].
    pub tcp_fallback_after: Duration,
    /// The other IP family's address of relays in [`Options::relays`], as pairs (address in
    /// `relays`, the same relay's address in the other family). A dual-stack peer registers at
    /// both (the second as its *alternate address*, relay PROTOCOL.md §3.3), so that the relay
    /// tells the other peer both of its public addresses, and probes both of the other peer's.
    /// A host with a route to only one of the two uses that one.
    pub relay_other_family: Vec<(SocketAddr, SocketAddr)>,
    /// Birthday punching and the port prediction sweep (default: on). When exactly one side's
    /// NAT maps per destination ("symmetric") and no direct path is up yet, that side opens up
    /// to 256 extra sockets and the other probes up to 1600 ports of its IP address at 1000
    /// per second, once per pairing; connecting waits up to 2.5 s for it
    /// ([`crate::rendezvous::birthday`] has the method and the budget). When both do, each
    /// side opens 64 new flows to predicted ports of the other (≤ 256 probes per side,
    /// [`crate::rendezvous::sweep`]), which gets two sequential NATs direct. Off: such pairs
    /// use the relay.
    pub birthday: bool,
}

impl Options {
    /// Defaults for `relay` and `session`.
    pub fn new(relay: SocketAddr, session: Uuid) -> Self {
        Options {
            relays: vec![relay],
            session,
            token: None,
            bind: None,
            keepalive: Duration::from_secs(10),
            register_timeout: Duration::from_secs(10),
            peer_timeout: Duration::from_secs(60),
            direct_timeout: Duration::from_millis(1000),
            strategy: Strategy::Auto,
            alpn: tls::DEFAULT_ALPN.to_vec(),
            peer_id: None,
            transport: None,
            tcp_fallback: TcpFallback::Auto,
            // Six UDP registrations (0.2 + 0.4 + 0.8 + 1.6 s of backoff): a lossy but working
            // UDP path answers one of them.
            tcp_fallback_after: Duration::from_millis(2500),
            relay_other_family: Vec::new(),
            birthday: true,
        }
    }

    /// The same relay's address in the other IP family ([`Options::relay_other_family`]).
    pub fn other_family_of(&self, relay: SocketAddr) -> Option<SocketAddr> {
        self.relay_other_family
            .iter()
            .find(|(a, _)| *a == relay)
            .map(|&(_, b)| b)
    }

    /// The relays in the order both peers try them: highest rendezvous (HRW) hash of
    /// (session, relay) first, so two peers with the same list pick the same relay.
    pub fn relay_order(&self) -> Vec<SocketAddr> {
        use sha2::{Digest, Sha256};
        let mut r = self.relays.clone();
        r.sort_by_cached_key(|a| {
            let h = Sha256::new()
                .chain_update(self.session.as_bytes())
                .chain_update(a.to_string())
                .finalize();
            std::cmp::Reverse(<[u8; 32]>::from(h))
        });
        r.dedup();
        r
    }

    pub(crate) fn transport(&self) -> Arc<quinn::TransportConfig> {
        self.transport.clone().unwrap_or_else(|| {
            let mut t = quinn::TransportConfig::default();
            t.keep_alive_interval(Some(Duration::from_secs(5)));
            t.max_idle_timeout(Some(
                Duration::from_secs(60)
                    .try_into()
                    .expect("60 s fits a VarInt"),
            ));
            Arc::new(t)
        })
    }
}
