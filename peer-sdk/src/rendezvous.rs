//! The driver: registers with the relay and keeps that registration (and the NAT mapping) alive
//! for the life of the connection, and punches, validates, monitors and falls back from the
//! direct path. One task per peer, owned by the [`crate::Peer`], stopped when it is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quic_relay::proto::{ErrReason, Extended, PeerId, Registration, Reply, Token};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::punch::{Kind, PunchKey};
use crate::socket::{Control, Path, PeerSocket};

/// First registration retry; doubles up to [`REG_RETRY_MAX`] (UDP loses datagrams).
const REG_RETRY_MIN: Duration = Duration::from_millis(200);
const REG_RETRY_MAX: Duration = Duration::from_secs(2);
/// No datagram from the peer (or the relay) for this long: register again now rather than at
/// the next keepalive, so a NAT rebinding or a relay restart heals within seconds.
const SILENCE_REREGISTER: Duration = Duration::from_secs(3);
/// At most one such extra registration per this interval.
const MIN_REREGISTER_GAP: Duration = Duration::from_secs(1);
/// Probe interval while trying to open a direct path.
const PUNCH_INTERVAL: Duration = Duration::from_millis(100);
/// Probe interval on a working direct path (keeps both NAT mappings open), and for background
/// attempts after the first window failed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// No probe reply on the direct path for this long: it is dead; fall back to the relay.
const DIRECT_DEAD: Duration = Duration::from_millis(3500);
/// Candidate peer addresses remembered (the relay's view plus sources of valid probes).
const MAX_CANDIDATES: usize = 8;
/// Probe nonces remembered to match replies against.
const MAX_NONCES: usize = 32;

/// What the driver knows; watch it through [`crate::Peer::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The relay acknowledged a registration.
    pub registered: bool,
    /// This peer's public address as the relay sees it.
    pub observed: Option<SocketAddr>,
    /// The other peer's public address as the relay sees it (once paired).
    pub peer: Option<SocketAddr>,
    /// The path datagrams to the peer take now.
    pub path: Path,
    /// The relay refused the last registration, and why.
    pub refused: Option<ErrReason>,
    /// Registrations sent so far (the first, retries and keepalives).
    pub registrations_sent: u64,
}

pub(crate) struct DriverConfig {
    pub tcp: crate::TcpFallback,
    pub tcp_after: Duration,
    pub session: Uuid,
    pub token: Option<Token>,
    pub peer_id: u64,
    pub keepalive: Duration,
    pub punch: bool,
    pub direct_timeout: Duration,
}

pub(crate) struct Driver {
    socket: Arc<PeerSocket>,
    control: mpsc::Receiver<Control>,
    cfg: DriverConfig,
    key: PunchKey,
    reg_bytes: Vec<u8>,
    status: watch::Sender<Status>,
    acked: bool,
    last_reg: Option<Instant>,
    reg_retry: Duration,
    candidates: Vec<SocketAddr>,
    nonces: Vec<u64>,
    peer_known_at: Option<Instant>,
    last_direct_reply: Option<Instant>,
    next_probe: Option<Instant>,
    /// When the first UDP registration went out (for [`crate::TcpFallback::Auto`]).
    first_reg: Option<Instant>,
    /// The TCP link to the relay, once the driver switched to it (for the rest of its life).
    tcp: Option<crate::AbortOnDrop>,
}

impl Driver {
    pub(crate) fn new(
        socket: Arc<PeerSocket>,
        control: mpsc::Receiver<Control>,
        cfg: DriverConfig,
    ) -> (Self, watch::Receiver<Status>) {
        let reg = Registration {
            session: cfg.session,
            extended: Some(Extended {
                peer: Some(PeerId(cfg.peer_id)),
                token: cfg.token,
                cookie: None,
            }),
        };
        let (status, rx) = watch::channel(Status {
            registered: false,
            observed: None,
            peer: None,
            path: Path::Relay,
            refused: None,
            registrations_sent: 0,
        });
        let d = Driver {
            key: PunchKey::new(cfg.session),
            reg_bytes: reg.encode(),
            socket,
            control,
            cfg,
            status,
            acked: false,
            last_reg: None,
            reg_retry: REG_RETRY_MIN,
            candidates: Vec::new(),
            nonces: Vec::new(),
            peer_known_at: None,
            last_direct_reply: None,
            next_probe: None,
            first_reg: None,
            tcp: None,
        };
        (d, rx)
    }

    pub(crate) async fn run(mut self) {
        if self.cfg.tcp == crate::TcpFallback::Always {
            self.start_tcp("forced by Options::tcp_fallback");
        }
        loop {
            let wake = self.next_wake();
            tokio::select! {
                c = self.control.recv() => match c {
                    Some(c) => self.on_control(c).await,
                    None => return, // the socket is gone
                },
                () = tokio::time::sleep_until(wake.into()) => self.on_timer().await,
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + PROBE_INTERVAL;
        let reg_due = match self.last_reg {
            None => now,
            Some(t) if !self.acked => t + self.reg_retry,
            Some(t) => (t + self.cfg.keepalive).min(
                (t + MIN_REREGISTER_GAP).max(self.socket.shared.last_rx() + SILENCE_REREGISTER),
            ),
        };
        wake = wake.min(reg_due);
        if let (None, false, crate::TcpFallback::Auto, Some(t)) =
            (&self.tcp, self.acked, self.cfg.tcp, self.first_reg)
        {
            wake = wake.min(t + self.cfg.tcp_after);
        }
        if let Some(p) = self.next_probe {
            wake = wake.min(p);
        }
        wake.max(now)
    }

    async fn send(&self, dst: SocketAddr, bytes: &[u8]) {
        if let Err(e) = self.socket.send_control(dst, bytes).await {
            debug!(%dst, error = %e, "control send failed");
        }
    }

    /// The relay path this driver uses: UDP, or TCP once it switched.
    fn relay_path(&self) -> Path {
        if self.tcp.is_some() {
            Path::RelayTcp
        } else {
            Path::Relay
        }
    }

    /// Switches to the relay's TCP port for good: registration, keepalives and QUIC go over
    /// one TCP connection from now on, and no direct path is punched (UDP is not getting
    /// through).
    fn start_tcp(&mut self, why: &str) {
        if self.tcp.is_some() {
            return;
        }
        let relay = self.socket.relay();
        info!(%relay, reason = why, "reaching the relay over TCP");
        self.tcp = Some(crate::AbortOnDrop(tokio::spawn(crate::relay_tcp::run(
            self.socket.clone(),
            relay,
            self.reg_bytes.clone(),
        ))));
        self.reg_retry = REG_RETRY_MIN;
        self.candidates.clear();
        self.next_probe = None;
        self.set_path(Path::RelayTcp);
    }

    /// Sends our registration again with the relay's cookie in it, on the path the ACK came by.
    async fn echo_cookie(&mut self, cookie: quic_relay::proto::Cookie) {
        let echo = Registration {
            session: self.cfg.session,
            extended: Some(Extended {
                peer: Some(PeerId(self.cfg.peer_id)),
                token: self.cfg.token,
                cookie: Some(cookie),
            }),
        }
        .encode();
        if self.tcp.is_some() {
            self.socket.send_tcp(&echo);
        } else {
            self.send(self.socket.relay(), &echo).await;
        }
    }

    async fn register(&mut self, now: Instant) {
        if self.tcp.is_some() {
            self.socket.send_tcp(&self.reg_bytes);
        } else {
            self.send(self.socket.relay(), &self.reg_bytes).await;
            self.first_reg.get_or_insert(now);
        }
        self.last_reg = Some(now);
        self.status.send_modify(|s| s.registrations_sent += 1);
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        if self.tcp.is_none()
            && !self.acked
            && self.cfg.tcp == crate::TcpFallback::Auto
            && self
                .first_reg
                .is_some_and(|t| now >= t + self.cfg.tcp_after)
        {
            self.start_tcp("no answer to UDP registrations");
            self.register(now).await;
        }
        match self.last_reg {
            None => self.register(now).await,
            Some(t) if !self.acked => {
                if now >= t + self.reg_retry {
                    self.reg_retry = (self.reg_retry * 2).min(REG_RETRY_MAX);
                    self.register(now).await;
                }
            }
            Some(t) => {
                let silent = now.saturating_duration_since(self.socket.shared.last_rx())
                    >= SILENCE_REREGISTER;
                if now >= t + self.cfg.keepalive || (silent && now >= t + MIN_REREGISTER_GAP) {
                    if silent {
                        debug!("no datagram from the peer for a while: registering again");
                    }
                    self.register(now).await;
                }
            }
        }
        self.punch_tick(now).await;
    }

    async fn punch_tick(&mut self, now: Instant) {
        if !self.cfg.punch || self.candidates.is_empty() || self.tcp.is_some() {
            self.next_probe = None;
            return;
        }
        if let Path::Direct(addr) = self.socket.shared.path() {
            let last = self.last_direct_reply.unwrap_or(now);
            if now.saturating_duration_since(last) > DIRECT_DEAD {
                info!(%addr, "direct path lost; falling back to the relay");
                self.set_path(self.relay_path());
            }
        }
        let due = self.next_probe.is_none_or(|p| now >= p);
        if !due {
            return;
        }
        let in_window = self
            .peer_known_at
            .is_some_and(|t| now < t + self.cfg.direct_timeout);
        let direct = matches!(self.socket.shared.path(), Path::Direct(_));
        let interval = if in_window && !direct {
            PUNCH_INTERVAL
        } else {
            PROBE_INTERVAL
        };
        self.next_probe = Some(now + interval);
        let nonce = self.new_nonce();
        let probe = self
            .key
            .packet(Kind::Probe, self.cfg.peer_id, nonce)
            .encode();
        let targets: Vec<SocketAddr> = match self.socket.shared.path() {
            // On a working direct path, keep just that one alive.
            Path::Direct(a) => vec![a],
            Path::Relay | Path::RelayTcp => self.candidates.clone(),
        };
        for dst in targets {
            self.send(dst, &probe).await;
        }
    }

    /// The relay pairs us with a peer at a new address: a new peer, or ours after a NAT
    /// rebinding. What we knew of direct paths may be stale (an old peer still answering
    /// probes would otherwise keep our traffic), so start over: relay path, fresh candidates,
    /// no outstanding nonces, and a new punching window.
    async fn new_peer_address(&mut self, p: SocketAddr, now: Instant) {
        if self.peer_known_at.is_some() {
            debug!(peer = %p, "the relay reports a new peer address; re-punching");
        }
        self.candidates.clear();
        self.nonces.clear();
        self.last_direct_reply = None;
        self.set_path(self.relay_path());
        if self.tcp.is_some() {
            self.peer_known_at = Some(now);
            return;
        }
        self.add_candidate(p);
        self.peer_known_at = Some(now);
        self.next_probe = Some(now);
        if self.cfg.punch {
            self.punch_tick(now).await;
        }
    }

    fn new_nonce(&mut self) -> u64 {
        let nonce: u64 = rand::random();
        if self.nonces.len() == MAX_NONCES {
            self.nonces.remove(0);
        }
        self.nonces.push(nonce);
        nonce
    }

    fn set_path(&mut self, path: Path) {
        if self.socket.shared.set_path(path) {
            self.status.send_modify(|s| s.path = path);
        }
    }

    fn add_candidate(&mut self, a: SocketAddr) {
        if !self.candidates.contains(&a) {
            if self.candidates.len() == MAX_CANDIDATES {
                self.candidates.pop();
            }
            self.candidates.insert(0, a);
        }
    }

    async fn on_control(&mut self, c: Control) {
        let now = Instant::now();
        match c {
            Control::Relay(Reply::Ack {
                observed,
                peer,
                cookie,
            }) => {
                if let Some(c) = cookie {
                    // The relay forwards nothing to us before we prove our address by echoing
                    // its cookie (relay PROTOCOL.md §12): at once, before anything else.
                    self.echo_cookie(c).await;
                }
                if !self.acked {
                    debug!(relay = %self.socket.relay(), ?observed, "registered with the relay");
                }
                self.acked = true;
                self.reg_retry = REG_RETRY_MIN;
                if let Some(p) = peer {
                    if self.status.borrow().peer != Some(p) {
                        self.new_peer_address(p, now).await;
                    }
                }
                self.status.send_modify(|s| {
                    s.registered = true;
                    s.refused = None;
                    s.observed = observed;
                    if peer.is_some() {
                        s.peer = peer;
                    }
                });
            }
            Control::Relay(Reply::Err(reason)) => {
                warn!(relay = %self.socket.relay(), reason = reason.map_or("unknown", ErrReason::as_str), "the relay refused the registration");
                if reason == Some(ErrReason::Rate) {
                    self.reg_retry = REG_RETRY_MAX;
                }
                self.status
                    .send_modify(|s| s.refused = Some(reason.unwrap_or(ErrReason::Malformed)));
            }
            Control::Punch { from, packet } => {
                if self.tcp.is_some()
                    || packet.sender == self.cfg.peer_id
                    || !self.key.verify(&packet)
                {
                    return; // our own, reflected; or forged
                }
                match packet.kind {
                    Kind::Probe => {
                        self.add_candidate(from);
                        let reply = self
                            .key
                            .packet(Kind::Reply, self.cfg.peer_id, packet.nonce)
                            .encode();
                        self.send(from, &reply).await;
                        // The peer probes from an address we are not using (its NAT rebound, or
                        // it is the symmetric side of a punch): probe back at once, so its
                        // reply can move us there without waiting for the next round.
                        if self.cfg.punch && self.socket.shared.path() != Path::Direct(from) {
                            let nonce = self.new_nonce();
                            let probe = self
                                .key
                                .packet(Kind::Probe, self.cfg.peer_id, nonce)
                                .encode();
                            self.send(from, &probe).await;
                        }
                    }
                    Kind::Reply => {
                        if !self.nonces.contains(&packet.nonce) {
                            return; // not an answer to a probe of ours (a replay)
                        }
                        self.last_direct_reply = Some(now);
                        if self.cfg.punch && self.socket.shared.path() != Path::Direct(from) {
                            info!(peer = %from, "direct path up");
                            self.set_path(Path::Direct(from));
                            self.next_probe = Some(now + PROBE_INTERVAL);
                        }
                    }
                }
            }
        }
    }
}
