//! The `udp-over-tcp` tool's socket loops: UDP ingress into a shared frame queue, one TCP
//! connection at a time (listen or connect), frames back out to UDP.
//!
//! Shape, chosen against the faults measured in the original tools:
//! - UDP ingress tasks only append frames to a byte-bounded [`FrameQueue`]; a full queue drops
//!   the datagram (counted) instead of stalling anything.
//! - The TCP writer swaps the queue out and writes it whole: one write per frame when idle,
//!   coalesced under load, with TCP_NODELAY (no Nagle + delayed-ACK stall).
//! - The TCP reader runs in its own task, so neither direction waits for the other.
//! - A reset, refused or out-of-step connection ends only that connection: the connector
//!   reconnects with backoff, the listener accepts the next one. Nothing in here panics on input.
//! - UDP send errors (an ICMP port unreachable surfacing as ECONNREFUSED) are counted, never fatal.
//! - `--udp-bind auto` keeps one UDP socket per client flow, each with its own receive task (so
//!   replies go out the moment they arrive), capped at [`MAX_FLOWS`] and expired after idling.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinSet;
use tracing::{debug, info, trace, warn};

use crate::framing::{self, Decoder, Framing, MAX_DATAGRAM};
use crate::{mmsg, psk};

mod config;
mod queue;
mod sockets;

pub use config::{
    parse_endpoint, parse_tcp_connect, parse_udp_bind, parse_udp_sendto, TcpRole, TunnelConfig,
    TunnelError, UdpBind, UdpSendTo,
};
pub use queue::FrameQueue;
use sockets::any_of;
pub(crate) use sockets::bind_udp;
pub use sockets::configure_tcp;

/// Bytes of frames waiting for the TCP writer. 4 MiB holds ~3,400 datagrams of 1200 B, i.e.
/// ~34 ms at 100,000/s: enough to ride out a scheduling hiccup on a busy two-core host, small
/// enough that a dead connection does not queue seconds of stale datagrams.
pub const QUEUE_BYTES: usize = 4 << 20;
/// Kernel receive buffer asked for on UDP sockets: every drop the original tools suffered under
/// load happened at their UDP ingress socket with the ~208 KiB default.
pub const UDP_RECV_BUFFER: usize = 8 << 20;
/// Per-flow sockets at most (`--udp-bind auto`); the oldest idle flow makes room for a new one.
pub const MAX_FLOWS: usize = 4096;
/// Idle time after which a flow's socket is closed: the fork's 10 minutes.
pub const FLOW_IDLE: Duration = Duration::from_secs(600);
/// How often flows are checked for expiry.
const FLOW_SWEEP: Duration = Duration::from_secs(10);
/// TCP connect attempts give up after this long (then back off and retry).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A `--psk` handshake must finish within this time, so strangers cannot hold slots.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent `--psk` handshakes on the listener. A newcomer over the cap evicts the oldest
/// pending one instead of being refused, so idle connections cannot keep the real peer out:
/// its handshake takes one round trip, and 64 newer connections would have to arrive within
/// it to evict it. Each pending handshake is a task and a socket, a few KiB.
pub const MAX_HANDSHAKES: usize = 64;
/// Pending `--psk` handshakes per source address (an IPv6 /64); a fifth from the same address
/// evicts that address's oldest. Loopback tests and a NATed peer share one address, so this
/// is not 1; 4 leaves room for a reconnect overlapping a dying attempt.
pub const MAX_HANDSHAKES_PER_IP: usize = 4;
/// Reconnect backoff: first delay, then doubling up to the cap.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The TCP reader reads at least this much at a time.
const READ_CHUNK: usize = 128 * 1024;

/// Counters, all monotonic except `flows_open`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Datagrams received on UDP and queued for the tunnel.
    pub udp_in: AtomicU64,
    /// Datagrams taken from the tunnel and sent on UDP.
    pub udp_out: AtomicU64,
    /// Datagrams dropped because the frame queue was full (no connection, or a slow one).
    pub dropped_queue_full: AtomicU64,
    /// UDP sends that failed (ICMP errors, no route, ...); the tunnel carries on.
    pub udp_send_errors: AtomicU64,
    /// Frames that had to be dropped (no flow source, a flow the table has no room for).
    pub dropped_frames: AtomicU64,
    /// Connections ended because the peer broke the framing (e.g. a length over the limit).
    pub framing_errors: AtomicU64,
    /// TCP connections that carried the tunnel.
    pub connections: AtomicU64,
    /// Connections refused by the `--psk` handshake (or that failed during it).
    pub auth_failures: AtomicU64,
    /// Pending `--psk` handshakes closed to make room for a newer connection.
    pub handshakes_evicted: AtomicU64,
    /// Failed connect attempts.
    pub connect_failures: AtomicU64,
    /// Gauge: per-flow sockets open.
    pub flows_open: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Flow {
    socket: Arc<UdpSocket>,
    /// Milliseconds since the tunnel started, at the last datagram either way.
    last: Arc<AtomicU64>,
    _task: JoinSet<()>,
}

/// Where datagrams leaving the tunnel go out.
enum Egress {
    /// The one UDP socket, with its batched sender's buffers.
    Fixed(Arc<UdpSocket>, Box<mmsg::Sender>),
    Flows(HashMap<SocketAddr, Flow>),
}

struct Shared {
    cfg: TunnelConfig,
    queue: FrameQueue,
    metrics: Arc<Metrics>,
    epoch: Instant,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// A bound, not yet running tunnel.
#[derive(Debug)]
pub struct Tunnel {
    shared: Arc<Shared>,
    udp: Option<(Arc<UdpSocket>, mmsg::Sender)>,
    listener: Option<TcpListener>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("cfg", &self.cfg).finish()
    }
}

impl Tunnel {
    /// Checks the options and binds the UDP socket (and the TCP listener).
    pub async fn bind(cfg: TunnelConfig) -> Result<Tunnel, TunnelError> {
        let flow = cfg.framing == Framing::Flow;
        if cfg.udp_bind == UdpBind::Auto && !flow {
            return Err(TunnelError::BadOptions(
                "--udp-bind auto needs --framing flow: only flow frames name the client a reply belongs to",
            ));
        }
        if matches!(cfg.udp_sendto, UdpSendTo::AutoPort(_)) && !flow {
            return Err(TunnelError::BadOptions(
                "--udp-sendto IP:auto needs --framing flow: only flow frames carry the source port",
            ));
        }
        let udp = match cfg.udp_bind {
            UdpBind::Addr(a) => {
                let bind_err = |source| TunnelError::Bind {
                    what: "UDP",
                    addr: a,
                    source,
                };
                let u = bind_udp(a, cfg.udp_recv_buffer).map_err(bind_err)?;
                let sender = mmsg::Sender::for_socket(&u).map_err(bind_err)?;
                Some((Arc::new(u), sender))
            }
            UdpBind::Auto => None,
        };
        let listener = match &cfg.tcp {
            TcpRole::Listen(a) => {
                Some(
                    TcpListener::bind(a)
                        .await
                        .map_err(|source| TunnelError::Bind {
                            what: "TCP",
                            addr: *a,
                            source,
                        })?,
                )
            }
            TcpRole::Connect(_) => None,
        };
        let queue = FrameQueue::new(cfg.framing, cfg.queue_bytes);
        Ok(Tunnel {
            shared: Arc::new(Shared {
                cfg,
                queue,
                metrics: Arc::default(),
                epoch: Instant::now(),
            }),
            udp,
            listener,
        })
    }

    /// The bound UDP address (`None` with `--udp-bind auto`).
    pub fn udp_local_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|(u, _)| u.local_addr().ok())
    }

    /// The TCP listening address (`None` when connecting).
    pub fn tcp_local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// Runs until `shutdown` completes. Never returns early on network errors.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let sh = self.shared;
        let _ingress = self
            .udp
            .as_ref()
            .map(|(u, _)| spawn_owned(udp_ingress(u.clone(), sh.clone(), None)));
        let egress = Arc::new(tokio::sync::Mutex::new(match self.udp {
            Some((u, sender)) => Egress::Fixed(u, Box::new(sender)),
            None => Egress::Flows(HashMap::new()),
        }));
        let main = async {
            match self.listener {
                Some(l) => listen_loop(l, sh.clone(), egress).await,
                None => connect_loop(sh.clone(), egress).await,
            }
        };
        tokio::select! {
            _ = shutdown => info!("shutting down"),
            _ = main => {}
        }
    }
}

/// Receives datagrams on `sock` and queues them. `flow`: the flow key to frame them with (per-
/// flow sockets) instead of the datagram's own source, and its activity stamp.
async fn udp_ingress(
    sock: Arc<UdpSocket>,
    sh: Arc<Shared>,
    flow: Option<(SocketAddr, Arc<AtomicU64>)>,
) {
    let m = &sh.metrics;
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ECONNREFUSED and friends report an earlier send's ICMP error: not fatal.
                debug!(error = %e, "UDP receive error (ignored)");
                continue;
            }
        };
        let source = match &flow {
            Some((key, last)) => {
                last.store(sh.now_ms(), Ordering::Relaxed);
                *key
            }
            None => from,
        };
        trace!(%from, len = n, "UDP in");
        if sh.queue.push(source, &buf[..n]) {
            inc(&m.udp_in);
        } else {
            inc(&m.dropped_queue_full);
        }
    }
}

async fn connect_loop(sh: Arc<Shared>, egress: Arc<tokio::sync::Mutex<Egress>>) {
    let TcpRole::Connect(target) = &sh.cfg.tcp else {
        return;
    };
    let m = &sh.metrics;
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempt = async {
            let mut s = TcpStream::connect(target.as_str()).await?;
            configure_tcp(&s)?;
            if let Some(k) = &sh.cfg.psk {
                psk::connector(&mut s, k).await.map_err(|e| match e {
                    psk::PskError::Io(e) => e,
                    other => std::io::Error::new(std::io::ErrorKind::PermissionDenied, other),
                })?;
            }
            Ok::<_, std::io::Error>(s)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(s)) => {
                backoff = BACKOFF_MIN;
                let peer = s.peer_addr().ok();
                info!(%target, ?peer, "tunnel connected");
                let why = serve_connection(s, sh.clone(), egress.clone().lock_owned().await).await;
                warn!(%target, reason = %why, "tunnel connection ended; reconnecting");
                tokio::time::sleep(BACKOFF_MIN).await;
                continue;
            }
            Ok(Err(e)) => {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    inc(&m.auth_failures);
                }
                inc(&m.connect_failures);
                warn!(%target, error = %e, retry_in = ?backoff, "connect failed");
            }
            Err(_) => {
                inc(&m.connect_failures);
                warn!(%target, retry_in = ?backoff, "connect timed out");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// The address a pending handshake counts under: IPv4 (IPv4-mapped IPv6 too) as is, IPv6 by
/// its /64, since one host commonly holds a whole /64 (mqproxy's UDP budget keys clients alike).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX)).into(),
        v4 => v4,
    }
}

/// Pending listener handshakes in arrival order: which to evict for a newcomer. Pure.
#[derive(Debug, Default)]
pub struct PendingHandshakes {
    q: std::collections::VecDeque<(u64, std::net::IpAddr)>,
    next: u64,
}

impl PendingHandshakes {
    /// Admits a connection from `ip`: its id, and the id of the pending handshake to close to
    /// make room (that address's oldest when it has [`MAX_HANDSHAKES_PER_IP`], else the
    /// oldest of all when there are [`MAX_HANDSHAKES`]).
    pub fn admit(&mut self, ip: std::net::IpAddr) -> (u64, Option<u64>) {
        let key = client_key(ip);
        let mine = self.q.iter().filter(|(_, k)| *k == key).count();
        let victim = if mine >= MAX_HANDSHAKES_PER_IP {
            self.q.iter().position(|(_, k)| *k == key)
        } else if self.q.len() >= MAX_HANDSHAKES {
            Some(0)
        } else {
            None
        };
        let evicted = victim.and_then(|i| self.q.remove(i)).map(|(id, _)| id);
        let id = self.next;
        self.next += 1;
        self.q.push_back((id, key));
        (id, evicted)
    }

    /// A handshake ended (either way).
    pub fn done(&mut self, id: u64) {
        self.q.retain(|(i, _)| *i != id);
    }

    /// Handshakes pending.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
}

async fn listen_loop(l: TcpListener, sh: Arc<Shared>, egress: Arc<tokio::sync::Mutex<Egress>>) {
    let m = &sh.metrics;
    let mut handshakes: JoinSet<(u64, Option<(TcpStream, SocketAddr)>)> = JoinSet::new();
    let mut pending = PendingHandshakes::default();
    let mut aborts: std::collections::HashMap<u64, tokio::task::AbortHandle> =
        std::collections::HashMap::new();
    let mut current: Option<JoinSet<()>> = None;
    loop {
        tokio::select! {
            accepted = l.accept() => {
                let Some((s, peer)) =
                    netkit::accept::or_pause(accepted, Duration::from_millis(100)).await
                else {
                    continue;
                };
                let (id, evicted) = pending.admit(peer.ip());
                if let Some(old) = evicted.and_then(|old| aborts.remove(&old)) {
                    old.abort();
                    inc(&m.handshakes_evicted);
                    debug!(%peer, "handshake slots full; closed the oldest pending handshake");
                }
                let psk = sh.cfg.psk.clone();
                let sh2 = sh.clone();
                let abort = handshakes.spawn(async move {
                    (id, async move {
                    let mut s = s;
                    if let Err(e) = configure_tcp(&s) {
                        debug!(%peer, error = %e, "TCP_NODELAY failed");
                    }
                    if let Some(k) = psk {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, psk::listener(&mut s, &k)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                inc(&sh2.metrics.auth_failures);
                                warn!(%peer, error = %e, "refused a connection");
                                return None;
                            }
                            Err(_) => {
                                inc(&sh2.metrics.auth_failures);
                                warn!(%peer, "refused a connection: --psk handshake timed out");
                                return None;
                            }
                        }
                    }
                    Some((s, peer))
                    }.await)
                });
                aborts.insert(id, abort);
            }
            Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                // An aborted (evicted) handshake was already removed from both tables.
                let Ok((id, done)) = done else { continue };
                pending.done(id);
                aborts.remove(&id);
                let Some((s, peer)) = done else { continue };
                if current.take().is_some() {
                    info!(%peer, "a new connection replaces the tunnel");
                } else {
                    info!(%peer, "tunnel connected");
                }
                let sh2 = sh.clone();
                let eg = egress.clone();
                current = Some(spawn_owned(async move {
                    let why = serve_connection(s, sh2, eg.lock_owned().await).await;
                    warn!(%peer, reason = %why, "tunnel connection ended; waiting for the peer");
                }));
                let _ = m;
            }
        }
    }
}

/// Carries the tunnel over one connection until it breaks; returns why it ended.
async fn serve_connection(
    s: TcpStream,
    sh: Arc<Shared>,
    egress: OwnedMutexGuard<Egress>,
) -> String {
    inc(&sh.metrics.connections);
    let stale = sh.queue.clear();
    if stale > 0 {
        debug!(
            bytes = stale,
            "dropped frames queued while no connection was up"
        );
    }
    let (rd, wr) = s.into_split();
    let reader = spawn_owned(read_loop(rd, sh.clone(), egress));
    tokio::select! {
        r = reader_result(reader) => r,
        w = write_loop(wr, &sh) => w,
    }
}

async fn reader_result(mut t: JoinSet<String>) -> String {
    match t.join_next().await {
        Some(Ok(s)) => s,
        Some(Err(e)) => format!("reader task failed: {e}"),
        None => "reader task missing".to_owned(),
    }
}

/// Spawns `task` as the only member of a set: dropping the set aborts the task, so no task
/// outlives what owns it (the tunnel, a connection, a flow).
fn spawn_owned<T: Send + 'static>(task: impl Future<Output = T> + Send + 'static) -> JoinSet<T> {
    let mut set = JoinSet::new();
    set.spawn(task);
    set
}

async fn write_loop(mut wr: OwnedWriteHalf, sh: &Shared) -> String {
    let mut out = BytesMut::new();
    loop {
        sh.queue.take(&mut out).await;
        if let Err(e) = wr.write_all(&out).await {
            return format!("write: {e}");
        }
        out.clear();
    }
}

async fn read_loop(
    mut rd: OwnedReadHalf,
    sh: Arc<Shared>,
    mut egress: OwnedMutexGuard<Egress>,
) -> String {
    let m = &sh.metrics;
    let mut dec = Decoder::new(sh.cfg.framing);
    let mut batch: Vec<(SocketAddr, bytes::Bytes)> = Vec::with_capacity(mmsg::BATCH);
    // Sweep at least twice per idle period, so a flow lives at most 1.5x --flow-idle.
    let mut sweep = tokio::time::interval(
        FLOW_SWEEP
            .min(sh.cfg.flow_idle / 2)
            .max(Duration::from_millis(10)),
    );
    loop {
        let buf = dec.buffer();
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        let n = tokio::select! {
            r = rd.read_buf(buf) => match r {
                Ok(0) => return "closed by the peer".into(),
                Ok(n) => n,
                Err(e) => return format!("read: {e}"),
            },
            _ = sweep.tick() => {
                expire_flows(&mut egress, &sh);
                continue;
            }
        };
        trace!(bytes = n, "TCP in");
        let mut broken = None;
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => match (&*egress, sh.cfg.udp_sendto) {
                    // The common case: gather this read's datagrams for one sendmmsg.
                    (Egress::Fixed(..), UdpSendTo::Addr(a)) => batch.push((a, f.payload)),
                    _ => send_out(&mut egress, &sh, f).await,
                },
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        if let (Egress::Fixed(sock, sender), false) = (&mut *egress, batch.is_empty()) {
            let st = sender.send_all(sock, &batch).await;
            m.udp_out.fetch_add(st.sent, Ordering::Relaxed);
            m.udp_send_errors.fetch_add(st.failed, Ordering::Relaxed);
            batch.clear();
        }
        if let Some(e) = broken {
            inc(&m.framing_errors);
            return format!("peer broke the {} framing: {e}", sh.cfg.framing);
        }
    }
}

async fn send_out(egress: &mut Egress, sh: &Arc<Shared>, f: framing::Frame) {
    let m = &sh.metrics;
    let dest = match (sh.cfg.udp_sendto, f.source) {
        (UdpSendTo::Addr(a), _) => a,
        (UdpSendTo::AutoPort(ip), Some(src)) => SocketAddr::new(ip, src.port()),
        (UdpSendTo::AutoPort(_), None) => {
            inc(&m.dropped_frames);
            return;
        }
    };
    let sock = match egress {
        Egress::Fixed(s, _) => s.clone(),
        Egress::Flows(flows) => {
            let Some(key) = f.source else {
                inc(&m.dropped_frames);
                return;
            };
            match flow_socket(flows, key, dest, sh) {
                Some(s) => s,
                None => {
                    inc(&m.dropped_frames);
                    return;
                }
            }
        }
    };
    match sock.send_to(&f.payload, dest).await {
        Ok(_) => inc(&m.udp_out),
        Err(e) => {
            inc(&m.udp_send_errors);
            debug!(%dest, error = %e, "UDP send failed (the tunnel carries on)");
        }
    }
}

/// The socket of flow `key`, created (and its receive task started) on first use.
fn flow_socket(
    flows: &mut HashMap<SocketAddr, Flow>,
    key: SocketAddr,
    dest: SocketAddr,
    sh: &Arc<Shared>,
) -> Option<Arc<UdpSocket>> {
    let now = sh.now_ms();
    if let Some(f) = flows.get(&key) {
        f.last.store(now, Ordering::Relaxed);
        return Some(f.socket.clone());
    }
    if flows.len() >= MAX_FLOWS {
        // Make room by closing the least recently active flow.
        let oldest = flows
            .iter()
            .min_by_key(|(_, f)| f.last.load(Ordering::Relaxed))
            .map(|(k, _)| *k)?;
        flows.remove(&oldest);
        sh.metrics.flows_open.fetch_sub(1, Ordering::Relaxed);
        debug!(flow = %oldest, "flow table full; closed the least recently used flow");
    }
    let sock = match bind_udp(any_of(dest.ip()), sh.cfg.udp_recv_buffer) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(flow = %key, error = %e, "cannot open a flow socket");
            return None;
        }
    };
    let last = Arc::new(AtomicU64::new(now));
    let task = spawn_owned(udp_ingress(
        sock.clone(),
        sh.clone(),
        Some((key, last.clone())),
    ));
    info!(flow = %key, local = ?sock.local_addr().ok(), "new flow");
    inc(&sh.metrics.flows_open);
    flows.insert(
        key,
        Flow {
            socket: sock.clone(),
            last,
            _task: task,
        },
    );
    Some(sock)
}

fn expire_flows(egress: &mut Egress, sh: &Shared) {
    let Egress::Flows(flows) = egress else {
        return;
    };
    let idle = sh.cfg.flow_idle.as_millis() as u64;
    let now = sh.now_ms();
    let before = flows.len();
    flows.retain(|k, f| {
        let keep = now.saturating_sub(f.last.load(Ordering::Relaxed)) < idle;
        if !keep {
            debug!(flow = %k, "flow expired");
        }
        keep
    });
    let gone = (before - flows.len()) as u64;
    sh.metrics.flows_open.fetch_sub(gone, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_handshakes_evict_the_oldest_instead_of_refusing() {
        let mut p = PendingHandshakes::default();
        let a: std::net::IpAddr = "198.18.0.1".parse().expect("lit");
        let ids: Vec<u64> = (0..MAX_HANDSHAKES_PER_IP)
            .map(|_| {
                let (id, ev) = p.admit(a);
                assert_eq!(ev, None);
                id
            })
            .collect();
        // A further one from the same address evicts that address's oldest.
        let (_, ev) = p.admit(a);
        assert_eq!(ev, Some(ids[0]));
        assert_eq!(p.len(), MAX_HANDSHAKES_PER_IP);
        // Many addresses: the total cap evicts the oldest of all.
        let others: Vec<u64> = (0..MAX_HANDSHAKES - MAX_HANDSHAKES_PER_IP)
            .map(|i| p.admit(std::net::IpAddr::from([198, 18, 1, i as u8])).0)
            .collect();
        assert_eq!(p.len(), MAX_HANDSHAKES);
        let (newest, ev) = p.admit("198.18.2.1".parse().expect("lit"));
        assert_eq!(ev, Some(ids[1]));
        assert_eq!(p.len(), MAX_HANDSHAKES);
        // One /64 is one address.
        let v6 = |s: &str| -> std::net::IpAddr { s.parse().expect("lit") };
        for i in 0..MAX_HANDSHAKES_PER_IP {
            p.admit(v6(&format!("2001:db8::{}", i + 1)));
        }
        let before = p.len();
        let (_, ev) = p.admit(v6("2001:db8::ffff"));
        assert!(ev.is_some());
        assert_eq!(p.len(), before);
        for id in others.into_iter().chain([newest]) {
            p.done(id);
        }
        assert!(p.len() < MAX_HANDSHAKES);
    }

    #[test]
    fn endpoints_follow_the_original_defaults() {
        let any = std::net::Ipv4Addr::UNSPECIFIED.into();
        assert_eq!(
            parse_endpoint("7878", any).ok(),
            Some("0.0.0.0:7878".parse().expect("lit"))
        );
        assert_eq!(
            parse_udp_bind("9999").ok(),
            Some(UdpBind::Addr("0.0.0.0:9999".parse().expect("lit")))
        );
        assert_eq!(parse_udp_bind("auto").ok(), Some(UdpBind::Auto));
        assert_eq!(
            parse_udp_sendto("8888").ok(),
            Some(UdpSendTo::Addr("127.0.0.1:8888".parse().expect("lit")))
        );
        assert_eq!(
            parse_udp_sendto("10.0.0.2:auto").ok(),
            Some(UdpSendTo::AutoPort("10.0.0.2".parse().expect("lit")))
        );
        assert_eq!(
            parse_udp_sendto("[::1]:auto").ok(),
            Some(UdpSendTo::AutoPort("::1".parse().expect("lit")))
        );
        assert_eq!(
            parse_tcp_connect("7878").ok().as_deref(),
            Some("127.0.0.1:7878")
        );
        assert_eq!(
            parse_tcp_connect("host.example:7878").ok().as_deref(),
            Some("host.example:7878")
        );
        for bad in ["", "x", "1.2.3.4", "70000", "host:"] {
            assert!(parse_udp_bind(bad).is_err(), "{bad}");
        }
        assert!(parse_tcp_connect("nope").is_err());
        assert!(parse_udp_sendto("x:auto").is_err());
    }

    #[test]
    fn queue_is_bounded_and_drops() {
        let q = FrameQueue::new(Framing::Plain, 100);
        let src: SocketAddr = "127.0.0.1:1".parse().expect("lit");
        assert!(q.push(src, &[1; 90]));
        assert!(!q.push(src, &[1; 10]), "94 + 14 > 100");
        assert!(q.push(src, &[1; 2]));
        assert_eq!(q.clear(), 94 + 6);
    }

    #[tokio::test]
    async fn nodelay_is_set() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let s = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        configure_tcp(&s).expect("set");
        assert!(s.nodelay().expect("get"));
    }
}
