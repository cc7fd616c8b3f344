//! The relay's TCP listener: peers whose network blocks UDP register and exchange datagrams
//! over TCP, each framed as `u16 big-endian length | datagram` (PROTOCOL.md §11).
//!
//! The frames carry exactly the UDP protocol (REG/ACK/ERR/BYE and data), so the one session
//! table ([`Relay`]) applies the same rules to both transports; a TCP member is keyed by its
//! connection ([`PeerAddr::tcp`]). TCP lives on a thread of its own with a small tokio runtime,
//! so the UDP loop never waits on a TCP socket: the two share the table behind a mutex that the
//! UDP loop takes once per batch, and datagrams for a TCP member go into that connection's
//! write queue, bounded in frames and in bytes, with one byte budget for all queues together;
//! a frame that does not fit is dropped (and counted).
//!
//! Fairness: a connection that is not a session member (not yet, or no longer) is closed after
//! the handshake timeout whatever it sends, and at the connection cap the longest-idle
//! non-member makes room for a newcomer.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use netkit::slots::{Slot, Slots};
use socket2::{SockAddr, Socket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
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
    /// Bytes queued for one connection before further frames are dropped.
    pub write_queue_bytes: usize,
    /// Bytes queued for all connections together before further frames are dropped.
    pub queue_budget_bytes: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_connections: defaults::TCP_MAX_CONNECTIONS,
            max_per_ip: defaults::TCP_MAX_PER_IP,
            handshake_timeout: defaults::TCP_HANDSHAKE_TIMEOUT,
            idle_timeout: defaults::TCP_IDLE_TIMEOUT,
            write_queue: defaults::TCP_WRITE_QUEUE,
            write_queue_bytes: defaults::TCP_WRITE_QUEUE_BYTES,
            queue_budget_bytes: defaults::TCP_QUEUE_BUDGET_BYTES,
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
    /// connection removes only its own entry, not a newer one from the same address.
    tcp: HashMap<PeerAddr, (u64, Queue)>,
    next_serial: u64,
    /// Bytes one connection's queue may hold.
    queue_bytes: usize,
    /// Bytes all queues together may hold (counted in [`TcpCounters::queued_bytes`]).
    budget_bytes: usize,
    /// When the exhausted budget was last logged, in milliseconds since `epoch`.
    budget_logged: AtomicU64,
    epoch: Instant,
}

/// The sending side of one connection's write queue and the bytes in it.
#[derive(Debug, Clone)]
struct Queue {
    tx: mpsc::Sender<Vec<u8>>,
    bytes: Arc<AtomicUsize>,
}

impl Core {
    /// A core around `relay`, with no TCP connection.
    pub fn new(relay: Relay) -> Self {
        Core {
            relay,
            tcp: HashMap::new(),
            next_serial: 0,
            queue_bytes: defaults::TCP_WRITE_QUEUE_BYTES,
            budget_bytes: defaults::TCP_QUEUE_BUDGET_BYTES,
            budget_logged: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Queues `datagram` (framed) for TCP member `dst`; drops and counts it when that
    /// connection's queue or the budget of all queues is full. Never blocks.
    pub fn send_tcp(&self, dst: PeerAddr, datagram: &[u8], counters: &TcpCounters) {
        let Some((_, q)) = self.tcp.get(&dst) else {
            return; // closed a moment ago; its member is leaving
        };
        let size = FRAME_HEADER + datagram.len();
        if q.bytes.load(Ordering::Relaxed) + size > self.queue_bytes {
            counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Only this thread adds (under the core's lock); writers only subtract, so the check
        // cannot be overtaken.
        if counters.queued_bytes.load(Ordering::Relaxed) as usize + size > self.budget_bytes {
            counters.dropped_budget.fetch_add(1, Ordering::Relaxed);
            self.log_budget_full(counters);
            return;
        }
        let mut frame = Vec::with_capacity(size);
        encode_frame(datagram, &mut frame);
        q.bytes.fetch_add(size, Ordering::Relaxed);
        counters
            .queued_bytes
            .fetch_add(size as u64, Ordering::Relaxed);
        if q.tx.try_send(frame).is_err() {
            q.bytes.fetch_sub(size, Ordering::Relaxed);
            counters
                .queued_bytes
                .fetch_sub(size as u64, Ordering::Relaxed);
            counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Logs the exhausted budget once per [`defaults::TCP_BUDGET_LOG_INTERVAL`] at most.
    fn log_budget_full(&self, counters: &TcpCounters) {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.budget_logged.load(Ordering::Relaxed);
        let interval = defaults::TCP_BUDGET_LOG_INTERVAL.as_millis() as u64;
        if (last == 0 || now >= last + interval)
            && self
                .budget_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(
                budget_bytes = self.budget_bytes,
                dropped_total = counters.dropped_budget.load(Ordering::Relaxed),
                "TCP write queues hold --tcp-queue-budget-bytes: dropping frames to TCP members \
                 (members that do not read, or too many slow ones)"
            );
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
    /// Connections per IP (per /64 for IPv6), capped at `cfg.max_per_ip`; the total is
    /// capped by `conns`.
    per_ip: Arc<Slots<IpAddr>>,
    /// The relay's local addresses connections arrived on, numbered for [`PeerAddr::tcp_via`].
    locals: Mutex<Vec<IpAddr>>,
    /// Open connections by accept serial, for choosing one to close at the cap.
    conns: Mutex<HashMap<u64, (Arc<ConnState>, AbortHandle)>>,
    epoch: Instant,
}

/// What the accept loop needs to know of a connection to pick one to close at the cap.
#[derive(Debug, Default)]
struct ConnState {
    /// When it last sent anything, in milliseconds since the listener started.
    last_rx: AtomicU64,
    /// Whether it is a session member now.
    member: AtomicBool,
}

/// Most distinct local addresses the listener tells apart (a host has a handful; a u8 index).
const MAX_LOCAL_ADDRS: usize = 255;

impl Ctx {
    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The index of local address `ip` (registered on first sight), or `None` past
    /// [`MAX_LOCAL_ADDRS`].
    fn local_index(&self, ip: IpAddr) -> Option<u8> {
        let ip = ip.to_canonical();
        let mut l = self.locals.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = l.iter().position(|a| *a == ip) {
            return Some(i as u8);
        }
        if l.len() >= MAX_LOCAL_ADDRS {
            return None;
        }
        l.push(ip);
        Some((l.len() - 1) as u8)
    }

    /// Closes the longest-idle connection that is not a session member, to make room.
    /// Returns whether there was one.
    fn evict_idle_non_member(&self) -> bool {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let victim = conns
            .iter()
            .filter(|(_, (st, _))| !st.member.load(Ordering::Relaxed))
            .min_by_key(|(_, (st, _))| st.last_rx.load(Ordering::Relaxed))
            .map(|(&k, _)| k);
        match victim.and_then(|k| conns.remove(&k)) {
            Some((_, abort)) => {
                abort.abort();
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from [`Ctx::conns`] when its task ends, however it ends.
struct Listed {
    ctx: Arc<Ctx>,
    serial: u64,
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut conns = self.ctx.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.remove(&self.serial);
    }
}

/// When the TCP listener stops: once either flag is set, noticed when `wake` is notified (the
/// UDP loop does as it ends, which it does within [`defaults::IDLE_WAKE`] of a shutdown) or
/// at the next tick while connections are open.
pub(crate) struct Stop<'a> {
    pub(crate) flags: [&'a AtomicBool; 2],
    pub(crate) wake: &'a tokio::sync::Notify,
}

/// Runs the TCP listener on this thread until it is told to [`Stop`]; every connection is
/// closed before it returns.
pub(crate) fn run(
    listener: std::net::TcpListener,
    core: Arc<Mutex<Core>>,
    udp: Socket,
    udp_v6: bool,
    cfg: TcpConfig,
    metrics: Arc<Metrics>,
    stop: Stop<'_>,
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
    {
        let mut c = lock(&core);
        c.queue_bytes = cfg.write_queue_bytes;
        c.budget_bytes = cfg.queue_budget_bytes;
    }
    runtime.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot register the TCP listener; TCP disabled");
                return;
            }
        };
        let per_ip = Arc::new(Slots::new(usize::MAX, cfg.max_per_ip));
        let ctx = Arc::new(Ctx {
            core,
            udp,
            udp_v6,
            cfg,
            metrics,
            per_ip,
            locals: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        });
        accept_loop(listener, ctx, stop).await;
    });
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>, stop: Stop<'_>) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(defaults::IDLE_WAKE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let counters = &ctx.metrics.tcp;
    let mut next_serial: u64 = 0;
    let mut trim = Trim::default();
    let stopped = || stop.flags.iter().any(|f| f.load(Ordering::Relaxed));
    loop {
        // The tick serves the trim, which has work only while connections are open or after
        // they queued megabytes: with neither, the thread sleeps until an event. At low rates
        // an idle 10 Hz tick was a few percent of the relay's instructions per datagram.
        let ticking = !tasks.is_empty() || trim.pending();
        tokio::select! {
            () = stop.wake.notified() => {
                if stopped() {
                    break;
                }
            }
            _ = tick.tick(), if ticking => {
                if stopped() {
                    break;
                }
                trim.maybe(counters);
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let Some((stream, peer)) =
                    netkit::accept::or_pause(accepted, Duration::from_millis(50)).await
                else {
                    continue;
                };
                let open = ctx.conns.lock().unwrap_or_else(|p| p.into_inner()).len();
                if open >= ctx.cfg.max_connections {
                    // Room for a newcomer comes from a connection that is no member (idle
                    // handshakes, leftovers after BYE), never from a member.
                    if !ctx.evict_idle_non_member() {
                        counters.refused_total_limit.fetch_add(1, Ordering::Relaxed);
                        debug!(%peer, "TCP connection refused: --tcp-max-connections reached");
                        continue; // dropping the stream closes it
                    }
                    counters.closed_evicted.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "closed the longest-idle non-member TCP connection to make room");
                }
                let Some(ip_slot) = take_ip_slot(&ctx, peer.ip()) else {
                    counters.refused_ip_limit.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, "TCP connection refused: --tcp-max-per-ip reached");
                    continue;
                };
                let local = match stream.local_addr().ok().and_then(|l| ctx.local_index(l.ip())) {
                    Some(i) => i,
                    None => {
                        counters.refused_total_limit.fetch_add(1, Ordering::Relaxed);
                        warn!(%peer, "TCP connection refused: too many distinct local addresses");
                        continue;
                    }
                };
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                counters.open.fetch_add(1, Ordering::Relaxed);
                let serial = next_serial;
                next_serial += 1;
                let state = Arc::new(ConnState {
                    last_rx: AtomicU64::new(ctx.millis()),
                    member: AtomicBool::new(false),
                });
                let listed = Listed { ctx: ctx.clone(), serial };
                let abort = tasks.spawn(connection(
                    stream,
                    PeerAddr::tcp_via(local, peer),
                    peer,
                    ctx.clone(),
                    state.clone(),
                    (listed, ip_slot),
                ));
                // The task has not run yet (one thread): it is listed before it can unlist.
                ctx.conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(serial, (state, abort));
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

/// Returns freed queue memory to the operating system. Frames are up to 64 KiB, below the
/// allocator's mmap threshold, so after a flood to non-reading members the heap would keep its
/// peak size; trimming once the queues have emptied gives it back.
#[derive(Default)]
struct Trim {
    /// The most bytes queued since the last trim.
    peak: u64,
    last: Option<Instant>,
}

impl Trim {
    /// Worth it only after megabytes were queued; at most once a second (it walks the heap).
    const MIN_PEAK: u64 = 4 << 20;
    const INTERVAL: Duration = Duration::from_secs(1);

    /// Whether a trim may still be due: megabytes were queued since the last one.
    fn pending(&self) -> bool {
        self.peak >= Self::MIN_PEAK
    }

    fn maybe(&mut self, counters: &TcpCounters) {
        let queued = counters.queued_bytes.load(Ordering::Relaxed);
        self.peak = self.peak.max(queued);
        if self.peak >= Self::MIN_PEAK
            && queued < self.peak / 4
            && self.last.is_none_or(|t| t.elapsed() >= Self::INTERVAL)
        {
            self.last = Some(Instant::now());
            self.peak = queued;
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim has no preconditions; it only releases free heap pages.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// A connection's place in [`Ctx::per_ip`], keyed by its IP as the session table keys it
/// (IPv4 as itself, IPv6 by its /64); `None` when that IP holds all its places.
fn take_ip_slot(ctx: &Ctx, ip: IpAddr) -> Option<Slot<IpAddr>> {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let ip = IpAddr::V6(crate::sessions::ip_limit_key(v6.octets()).into()).to_canonical();
    ctx.per_ip.acquire(ip).ok()
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
    fn new(ctx: &Arc<Ctx>, key: PeerAddr, queue: Queue) -> Self {
        let mut core = lock(&ctx.core);
        let serial = core.next_serial;
        core.next_serial += 1;
        if let Some((_, old)) = core.tcp.insert(key, (serial, queue)) {
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

/// Gives the bytes still queued for a closed connection back to the budget. Dropped after the
/// connection's [`Registration`], so nothing is queued for it any more.
struct Unqueue {
    ctx: Arc<Ctx>,
    bytes: Arc<AtomicUsize>,
}

impl Drop for Unqueue {
    fn drop(&mut self) {
        let left = self.bytes.swap(0, Ordering::Relaxed);
        self.ctx
            .metrics
            .tcp
            .queued_bytes
            .fetch_sub(left as u64, Ordering::Relaxed);
    }
}

async fn connection(
    stream: TcpStream,
    key: PeerAddr,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    state: Arc<ConnState>,
    _slots: (Listed, Slot<IpAddr>),
) {
    // Every frame is written whole in one call; Nagle would hold small frames (ACKs, QUIC acks)
    // back for a delayed ACK from the other side, ~40-200 ms per round trip.
    let _ = stream.set_nodelay(true);
    let (tx, rx) = mpsc::channel(ctx.cfg.write_queue.max(1));
    let bytes = Arc::new(AtomicUsize::new(0));
    // Declared before the registration, so dropped after it (locals drop in reverse order).
    let _unqueue = Unqueue {
        ctx: ctx.clone(),
        bytes: bytes.clone(),
    };
    let _registration = Registration::new(
        &ctx,
        key,
        Queue {
            tx,
            bytes: bytes.clone(),
        },
    );
    debug!(%peer, "TCP connection");
    let (rd, wr) = stream.into_split();
    // Reads and writes are independent: a slow reader on the far side fills this queue, and
    // the UDP loop drops rather than waits.
    let writer = writer(wr, rx, &bytes, &ctx.metrics.tcp);
    let reader = reader(rd, key, &ctx, &state);
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
    queued: &AtomicUsize,
    counters: &TcpCounters,
) {
    let mut buf = Vec::with_capacity(64 << 10);
    let taken = |f: &Vec<u8>| {
        queued.fetch_sub(f.len(), Ordering::Relaxed);
        counters
            .queued_bytes
            .fetch_sub(f.len() as u64, Ordering::Relaxed);
    };
    while let Some(first) = rx.recv().await {
        taken(&first);
        buf.clear();
        buf.extend_from_slice(&first);
        let mut n = 1;
        while buf.len() < 64 << 10 {
            match rx.try_recv() {
                Ok(f) => {
                    taken(&f);
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
///
/// A connection that is not a session member, from its start or since it stopped being one
/// (`BYE`, its session expired), is closed once that has lasted the handshake timeout,
/// whatever it sends meanwhile: only membership earns the idle timeout.
async fn reader(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    key: PeerAddr,
    ctx: &Ctx,
    state: &ConnState,
) -> Close {
    let mut decoder = FrameDecoder::new();
    let mut chunk = vec![0u8; 16 << 10];
    let mut non_member_since = Some(Instant::now());
    // As of the last complete frame.
    let mut member = false;
    let mut sends: Vec<(PeerAddr, Vec<u8>)> = Vec::new();
    loop {
        let deadline = match non_member_since {
            None => ctx.cfg.idle_timeout,
            Some(t) => ctx.cfg.handshake_timeout.saturating_sub(t.elapsed()),
        };
        let n = match tokio::time::timeout(deadline, rd.read(&mut chunk)).await {
            Err(_) if non_member_since.is_some() => return Close::HandshakeTimeout,
            Err(_) if lock(&ctx.core).relay.is_member(key) => return Close::Idle,
            // It stopped being a member while silent: as for any non-member.
            Err(_) => return Close::HandshakeTimeout,
            Ok(Ok(0)) | Ok(Err(_)) => return Close::Peer,
            Ok(Ok(n)) => n,
        };
        state.last_rx.store(ctx.millis(), Ordering::Relaxed);
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
            member = core.relay.is_member(key);
            drop(core);
            for (dst, bytes) in sends.drain(..) {
                send_udp(ctx, dst, &bytes);
            }
        }
        if member {
            non_member_since = None;
        } else {
            let since = *non_member_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= ctx.cfg.handshake_timeout {
                return Close::HandshakeTimeout;
            }
        }
        state.member.store(member, Ordering::Relaxed);
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
