//! The relay's TCP listener: peers whose network blocks UDP register and exchange datagrams
//! over TCP, each framed as `u16 big-endian length | datagram` (PROTOCOL.md §11).
//!
//! The frames carry exactly the UDP protocol (REG/ACK/ERR/BYE and data), so the one session
//! table ([`Relay`]) applies the same rules to both transports; a TCP member is keyed by its
//! connection ([`PeerAddr::tcp`]). TCP lives on a thread of its own with a small tokio runtime,
//! so the UDP loop never waits on a TCP socket: the two share the table behind a mutex that the
//! UDP loop takes once per batch, and datagrams for a TCP member go into that connection's
//! bounded write queue, dropped (and counted) when it is full.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::{SockAddr, Socket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::defaults;
use crate::frame::{encode_frame, FrameDecoder, FRAME_HEADER};
use crate::metrics::{Metrics, TcpCounters};
use crate::sessions::{Outcome, PeerAddr, Relay};

/// Limits and timeouts of the TCP listener.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Connections open at once, in total.
    pub max_connections: usize,
    /// Connections open at once from one IP.
    pub max_per_ip: usize,
    /// A connection that has not become a session member within this long is closed.
    pub handshake_timeout: Duration,
    /// A connection that sends nothing for this long is closed (its member leaves).
    pub idle_timeout: Duration,
    /// Frames queued for one connection before further ones are dropped.
    pub write_queue: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_connections: defaults::TCP_MAX_CONNECTIONS,
            max_per_ip: defaults::TCP_MAX_PER_IP,
            handshake_timeout: defaults::TCP_HANDSHAKE_TIMEOUT,
            idle_timeout: defaults::TCP_IDLE_TIMEOUT,
            write_queue: defaults::TCP_WRITE_QUEUE,
        }
    }
}

/// What the UDP loop and the TCP listener share: the session table and, for each open TCP
/// connection, the sender of its write queue.
#[derive(Debug)]
pub struct Core {
    /// The session table.
    pub relay: Relay,
    /// Write queue of each open connection, with the connection's serial number: a closing
    /// connection removes only its own entry, not a newer one from the same IP and port.
    tcp: HashMap<PeerAddr, (u64, mpsc::Sender<Vec<u8>>)>,
    next_serial: u64,
}

impl Core {
    /// A core around `relay`, with no TCP connection.
    pub fn new(relay: Relay) -> Self {
        Core {
            relay,
            tcp: HashMap::new(),
            next_serial: 0,
        }
    }

    /// Queues `datagram` (framed) for TCP member `dst`; drops and counts it when that
    /// connection's queue is full. Never blocks.
    pub fn send_tcp(&self, dst: PeerAddr, datagram: &[u8], counters: &TcpCounters) {
        let Some((_, tx)) = self.tcp.get(&dst) else {
            return; // closed a moment ago; its member is leaving
        };
        let mut frame = Vec::with_capacity(FRAME_HEADER + datagram.len());
        encode_frame(datagram, &mut frame);
        if tx.try_send(frame).is_err() {
            counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Locks the shared core. A panic elsewhere while holding it leaves the table consistent
/// (every mutation completes before returning), so a poisoned lock is taken over.
pub fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything a connection task needs.
struct Ctx {
    core: Arc<Mutex<Core>>,
    udp: Socket,
    udp_v6: bool,
    cfg: TcpConfig,
    metrics: Arc<Metrics>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Runs the TCP listener on this thread until one of the `stop` flags is set (noticed within
/// [`defaults::IDLE_WAKE`]); every connection is closed before it returns.
pub(crate) fn run(
    listener: std::net::TcpListener,
    core: Arc<Mutex<Core>>,
    udp: Socket,
    udp_v6: bool,
    cfg: TcpConfig,
    metrics: Arc<Metrics>,
    stop: [&AtomicBool; 2],
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot start the TCP listener's runtime; TCP disabled");
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot register the TCP listener; TCP disabled");
                return;
            }
        };
        let ctx = Arc::new(Ctx {
            core,
            udp,
            udp_v6,
            cfg,
            metrics,
            per_ip: Mutex::new(HashMap::new()),
        });
        accept_loop(listener, ctx, stop).await;
    });
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>, stop: [&AtomicBool; 2]) {
    let permits = Arc::new(Semaphore::new(ctx.cfg.max_connections));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(defaults::IDLE_WAKE);
    let counters = &ctx.metrics.tcp;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if stop.iter().any(|f| f.load(Ordering::Relaxed)) {
                    break;
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        warn!(error = %e, "TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    counters.refused_total_limit.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "TCP connection refused: --tcp-max-connections reached");
                    continue; // dropping the stream closes it
                };
                let Some(ip_slot) = IpSlot::take(&ctx, peer.ip()) else {
                    counters.refused_ip_limit.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "TCP connection refused: --tcp-max-per-ip reached");
                    continue;
                };
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                counters.open.fetch_add(1, Ordering::Relaxed);
                tasks.spawn(connection(stream, peer, ctx.clone(), permit, ip_slot));
            }
        }
    }
    let open = tasks.len();
    tasks.shutdown().await;
    if open > 0 {
        counters
            .closed_shutdown
            .fetch_add(open as u64, Ordering::Relaxed);
        info!(open, "closed TCP connections at shutdown");
    }
}

/// One connection counted against its IP; released on drop.
struct IpSlot {
    ctx: Arc<Ctx>,
    ip: IpAddr,
}

impl IpSlot {
    fn take(ctx: &Arc<Ctx>, ip: IpAddr) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        let mut m = ctx.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= ctx.cfg.max_per_ip {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            ctx: ctx.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.ctx.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    Peer,
    Malformed,
    HandshakeTimeout,
    Idle,
}

/// Removes the connection from the core (its member leaves the session) when the task ends,
/// however it ends (including being cancelled at shutdown).
struct Registration {
    ctx: Arc<Ctx>,
    key: PeerAddr,
    serial: u64,
}

impl Registration {
    fn new(ctx: &Arc<Ctx>, key: PeerAddr, tx: mpsc::Sender<Vec<u8>>) -> Self {
        let mut core = lock(&ctx.core);
        let serial = core.next_serial;
        core.next_serial += 1;
        if let Some((_, old)) = core.tcp.insert(key, (serial, tx)) {
            // The previous connection from this address is closing as we speak: the
            // member (if any) is now this connection's, and registers anew.
            drop(old);
            core.relay.disconnect(key);
        }
        Registration {
            ctx: ctx.clone(),
            key,
            serial,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut core = lock(&self.ctx.core);
        if core
            .tcp
            .get(&self.key)
            .is_some_and(|(s, _)| *s == self.serial)
        {
            core.tcp.remove(&self.key);
            core.relay.disconnect(self.key);
        }
        self.ctx.metrics.tcp.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    _permit: OwnedSemaphorePermit,
    _ip_slot: IpSlot,
) {
    // Every frame is written whole in one call; Nagle would hold small frames (ACKs, QUIC acks)
    // back for a delayed ACK from the other side, ~40-200 ms per round trip.
    let _ = stream.set_nodelay(true);
    let key = PeerAddr::tcp(peer);
    let (tx, rx) = mpsc::channel(ctx.cfg.write_queue.max(1));
    let _registration = Registration::new(&ctx, key, tx);
    debug!(%peer, "TCP connection");
    let (rd, wr) = stream.into_split();
    // Reads and writes are independent: a slow reader on the far side fills this queue, and
    // the UDP loop drops rather than waits.
    let writer = writer(wr, rx, &ctx.metrics.tcp);
    let reader = reader(rd, key, &ctx);
    let close = tokio::select! {
        c = reader => c,
        () = writer => Close::Peer,
    };
    let c = &ctx.metrics.tcp;
    let counter = match close {
        Close::Peer => &c.closed_peer,
        Close::Malformed => &c.closed_malformed,
        Close::HandshakeTimeout => &c.closed_handshake_timeout,
        Close::Idle => &c.closed_idle,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    debug!(%peer, reason = ?close, "TCP connection closed");
}

/// Writes queued frames, several per system call when they pile up.
async fn writer(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    counters: &TcpCounters,
) {
    let mut buf = Vec::with_capacity(64 << 10);
    while let Some(first) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(&first);
        let mut n = 1;
        while buf.len() < 64 << 10 {
            match rx.try_recv() {
                Ok(f) => {
                    buf.extend_from_slice(&f);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        counters.frames_out.fetch_add(n, Ordering::Relaxed);
    }
}

/// Reads frames and feeds each to the session table as a datagram from `key`.
async fn reader(mut rd: tokio::net::tcp::OwnedReadHalf, key: PeerAddr, ctx: &Ctx) -> Close {
    let started = Instant::now();
    let mut decoder = FrameDecoder::new();
    let mut chunk = vec![0u8; 16 << 10];
    let mut member = false;
    let mut sends: Vec<(PeerAddr, Vec<u8>)> = Vec::new();
    loop {
        let deadline = if member {
            ctx.cfg.idle_timeout
        } else {
            ctx.cfg.handshake_timeout.saturating_sub(started.elapsed())
        };
        let n = match tokio::time::timeout(deadline, rd.read(&mut chunk)).await {
            Err(_) if member => return Close::Idle,
            Err(_) => return Close::HandshakeTimeout,
            Ok(Ok(0)) | Ok(Err(_)) => return Close::Peer,
            Ok(Ok(n)) => n,
        };
        decoder.extend(&chunk[..n]);
        loop {
            let datagram = match decoder.next_frame() {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => {
                    debug!(peer = %key, error = %e, "closing TCP connection");
                    return Close::Malformed;
                }
            };
            ctx.metrics.tcp.frames_in.fetch_add(1, Ordering::Relaxed);
            let mut core = lock(&ctx.core);
            let now = Instant::now();
            match core.relay.handle(now, key, datagram) {
                Outcome::Forward(dst) if dst.is_tcp() => {
                    core.send_tcp(dst, datagram, &ctx.metrics.tcp)
                }
                Outcome::Forward(dst) => sends.push((dst, datagram.to_vec())),
                _ => {}
            }
            while let Some(t) = core.relay.poll_transmit() {
                if t.dst.is_tcp() {
                    core.send_tcp(t.dst, t.payload.as_bytes(), &ctx.metrics.tcp);
                } else {
                    sends.push((t.dst, t.payload.as_bytes().to_vec()));
                }
            }
            member = member || core.relay.is_member(key);
            drop(core);
            for (dst, bytes) in sends.drain(..) {
                send_udp(ctx, dst, &bytes);
            }
        }
        if !member && started.elapsed() >= ctx.cfg.handshake_timeout {
            return Close::HandshakeTimeout;
        }
    }
}

/// Sends a datagram from the relay's UDP socket without blocking: a full send buffer drops it.
fn send_udp(ctx: &Ctx, dst: PeerAddr, bytes: &[u8]) {
    let addr = dst.to_socket_addr();
    let addr = match (ctx.udp_v6, addr.ip()) {
        (true, IpAddr::V4(v4)) => SocketAddr::new(v4.to_ipv6_mapped().into(), addr.port()),
        (false, IpAddr::V6(_)) => return, // an IPv4 socket cannot reach it (nor could it have sent)
        _ => addr,
    };
    if let Err(e) = ctx
        .udp
        .send_to_with_flags(bytes, &SockAddr::from(addr), libc::MSG_DONTWAIT)
    {
        if e.kind() != io::ErrorKind::Interrupted {
            ctx.metrics
                .tcp
                .udp_send_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
