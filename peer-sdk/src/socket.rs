//! The one UDP socket a peer uses for everything, and the `quinn::AsyncUdpSocket` wrapper that
//! lets Quinn share it with relay registration and hole punching.
//!
//! Why one socket: the NAT mapping that the relay and the peer know belongs to a socket. Handing
//! Quinn a second socket on the same port loses that traffic to whichever socket the kernel
//! picks (for a *connected* socket: always that one; see the crate docs), and closing the
//! registration socket first leaves a gap the NAT may not survive.
//!
//! Why a wrapper: Quinn drops datagrams that are not QUIC and would never see relay replies or
//! punch packets; and plain QUIC cannot change the *server's* address under a live connection.
//! So Quinn talks to one stable, virtual peer address, and the wrapper maps it to the path in use
//! (the relay, or the hole-punched direct address) on every send, and maps every datagram from
//! the peer (through either path) back to it.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use quic_relay::proto::Reply;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, trace};

use crate::punch::{self, PunchPacket};
use crate::Error;

mod extra;
#[cfg(test)]
mod tests;

/// The address Quinn believes the peer has. Never put on the wire: the wrapper replaces it with
/// the relay's or the direct path's address. Loopback, so that even a bug could not leak traffic
/// off the machine.
pub const VIRTUAL_PEER: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 255, 255, 254)), 1);

/// Receive and send buffers: a QUIC flow at a few hundred Mbit/s needs more than the default.
const SOCKET_BUFFER_BYTES: usize = 2 << 20;

/// Frames queued for the TCP connection to the relay (and datagrams received from it for
/// Quinn): a few round trips of a fast flow. Beyond it datagrams are dropped, which QUIC's
/// congestion control reads as loss, rather than buffered without bound.
pub(crate) const TCP_QUEUE: usize = 512;

/// Control datagrams queued for the driver; it reads them within milliseconds, and excess ones
/// (a flood of fake punches) are dropped rather than buffered.
const CONTROL_QUEUE: usize = 256;

/// Which way datagrams to the peer go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Through the relay.
    Relay,
    /// Straight to the peer's (hole-punched) address.
    Direct(SocketAddr),
    /// Through the relay over a TCP connection to its port, because UDP to the relay got no
    /// answer (see [`crate::TcpFallback`]).
    RelayTcp,
}

impl Path {
    /// `"direct"`, `"relay"` or `"relay-tcp"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Path::Relay => "relay",
            Path::Direct(_) => "direct",
            Path::RelayTcp => "relay-tcp",
        }
    }
}

/// A control datagram for the driver.
#[derive(Debug)]
pub(crate) enum Control {
    /// A relay reply; `alt`: to our registration of the other IP family (relay PROTOCOL.md
    /// §3.3), from the relay's address in that family.
    Relay { reply: Reply, alt: bool },
    /// The peer's local candidates, forwarded by the relay (authenticated by the driver).
    Candidates(Vec<u8>),
    /// A punch packet, received on the one socket (`via` `None`) or on an extra (birthday)
    /// socket.
    Punch {
        from: SocketAddr,
        packet: PunchPacket,
        via: Option<u16>,
    },
}

/// Counters, readable while the connection runs.
#[derive(Debug, Default)]
pub struct SocketStats {
    /// Datagrams from the peer through the relay.
    pub rx_relay: AtomicU64,
    /// Datagrams from the peer's direct address.
    pub rx_direct: AtomicU64,
    /// Datagrams (or GSO batches) sent through the relay.
    pub tx_relay: AtomicU64,
    /// Datagrams (or GSO batches) sent on the direct path.
    pub tx_direct: AtomicU64,
    /// Relay replies and punch packets taken out of Quinn's stream.
    pub control: AtomicU64,
    /// Control datagrams dropped because the driver's queue was full.
    pub control_dropped: AtomicU64,
    /// Datagrams from the peer through the relay's TCP connection.
    pub rx_relay_tcp: AtomicU64,
    /// Datagrams sent through the relay's TCP connection.
    pub tx_relay_tcp: AtomicU64,
    /// Datagrams not sent (or not delivered to Quinn) because a TCP queue was full; QUIC
    /// treats them as lost and slows down.
    pub tcp_dropped: AtomicU64,
}

#[derive(Debug)]
struct PathState {
    path: Path,
    /// The extra (birthday) socket a direct path runs through, if not the main one.
    via: Option<u16>,
    /// The relay in use (it changes when the peer fails over to another relay).
    relay: SocketAddr,
    /// Last datagram from the peer on any path, or a relay reply: silence means the path broke.
    last_rx: Instant,
}

/// State shared by the wrapper (Quinn's side) and the driver (registration and punching).
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<PathState>,
    pub(crate) stats: SocketStats,
}

impl Shared {
    pub(crate) fn path(&self) -> Path {
        self.state.lock().expect("path lock poisoned").path
    }

    /// Sets the path, and the extra socket a direct path runs through (`None`: the main one).
    pub(crate) fn set_path(&self, path: Path, via: Option<u16>) -> bool {
        let mut s = self.state.lock().expect("path lock poisoned");
        let changed = s.path != path || s.via != via;
        s.path = path;
        s.via = via;
        changed
    }

    /// The path, its extra socket and the relay in use, read together for one send.
    fn route(&self) -> (Path, Option<u16>, SocketAddr) {
        let s = self.state.lock().expect("path lock poisoned");
        (s.path, s.via, s.relay)
    }

    fn relay(&self) -> SocketAddr {
        self.state.lock().expect("path lock poisoned").relay
    }

    pub(crate) fn last_rx(&self) -> Instant {
        self.state.lock().expect("path lock poisoned").last_rx
    }

    fn touch(&self) {
        self.state.lock().expect("path lock poisoned").last_rx = Instant::now();
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The peer's UDP socket, shared by Quinn and the driver.
#[derive(Debug)]
pub struct PeerSocket {
    io: tokio::net::UdpSocket,
    inner: UdpSocketState,
    /// The same relay's address in the other IP family, registered as this peer's alternate
    /// address (relay PROTOCOL.md §3.3), when the host has both families.
    relay_alt: Option<SocketAddr>,
    v6: bool,
    pub(crate) shared: Arc<Shared>,
    control_tx: mpsc::Sender<Control>,
    /// Frames for the TCP connection to the relay (used on [`Path::RelayTcp`]).
    tcp_out: mpsc::Sender<Vec<u8>>,
    /// Its receiving end, taken by the TCP task when it starts.
    tcp_out_rx: Mutex<Option<mpsc::Receiver<Vec<u8>>>>,
    /// Datagrams from the peer that came over TCP, for Quinn.
    tcp_in: mpsc::Sender<Vec<u8>>,
    tcp_in_rx: Mutex<mpsc::Receiver<Vec<u8>>>,
    /// Birthday punching's extra sockets, and the one that won.
    extra: extra::ExtraSockets,
    /// The waker of Quinn's last `poll_recv`, to make it poll a newly won birthday socket.
    recv_waker: Mutex<Option<std::task::Waker>>,
}

impl PeerSocket {
    /// Builds the socket with socket2 (`SO_REUSEADDR` and `SO_REUSEPORT`, so an application may
    /// share the port; see the crate docs for what that implies), bound to `bind`.
    pub(crate) fn bind(
        bind: SocketAddr,
        relay: SocketAddr,
        relay_alt: Option<SocketAddr>,
    ) -> Result<(Arc<Self>, mpsc::Receiver<Control>), Error> {
        let map = |what: &'static str| {
            move |source| Error::Socket {
                addr: bind,
                what,
                source,
            }
        };
        let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
            .map_err(map("create"))?;
        if bind.is_ipv6() {
            // Dual-stack, so an IPv6-bound peer can still reach an IPv4 relay.
            socket.set_only_v6(false).map_err(map("IPV6_V6ONLY"))?;
        }
        let share = |socket: &Socket| -> Result<(), Error> {
            socket
                .set_reuse_address(true)
                .map_err(map("SO_REUSEADDR"))?;
            #[cfg(unix)]
            socket.set_reuse_port(true).map_err(map("SO_REUSEPORT"))?;
            Ok(())
        };
        // Port 0 takes the sharing flags only after the bind: Linux's pick of a free UDP port
        // skips only the ports it would refuse, and it does not refuse one that sockets with
        // both flags (the same user's) hold, so two peers of one process could be handed the
        // same port and steal each other's datagrams (18 shared ports in 1,000 such binds,
        // measured). Set after the bind, the flags still let a later socket share the port. A
        // fixed port sets them first: it may be one the application already shares.
        if bind.port() != 0 {
            share(&socket)?;
        }
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
        socket.set_nonblocking(true).map_err(map("O_NONBLOCK"))?;
        socket.bind(&bind.into()).map_err(map("bind"))?;
        if bind.port() == 0 {
            share(&socket)?;
        }
        Self::from_std(socket.into(), relay, relay_alt)
    }

    /// Wraps a socket the application already holds (non-blocking is set here). The NAT mapping
    /// it owns is kept: nothing is closed or rebound.
    pub(crate) fn from_std(
        socket: std::net::UdpSocket,
        relay: SocketAddr,
        relay_alt: Option<SocketAddr>,
    ) -> Result<(Arc<Self>, mpsc::Receiver<Control>), Error> {
        let local = socket.local_addr().map_err(|source| Error::Socket {
            addr: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
            what: "getsockname",
            source,
        })?;
        let map = |what: &'static str| {
            move |source| Error::Socket {
                addr: local,
                what,
                source,
            }
        };
        socket.set_nonblocking(true).map_err(map("O_NONBLOCK"))?;
        if local.is_ipv4() && relay.is_ipv6() {
            return Err(Error::AddressFamily { local, relay });
        }
        let inner = UdpSocketState::new((&socket).into()).map_err(map("configure"))?;
        let io = tokio::net::UdpSocket::from_std(socket).map_err(map("register with tokio"))?;
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let shared = Arc::new(Shared {
            state: Mutex::new(PathState {
                path: Path::Relay,
                via: None,
                relay: canonical(relay),
                last_rx: Instant::now(),
            }),
            stats: SocketStats::default(),
        });
        let (tcp_out, tcp_out_rx) = mpsc::channel(TCP_QUEUE);
        let (tcp_in, tcp_in_rx) = mpsc::channel(TCP_QUEUE);
        let s = PeerSocket {
            io,
            inner,
            // An IPv4-only socket cannot reach an IPv6 address.
            relay_alt: relay_alt
                .map(canonical)
                .filter(|a| local.is_ipv6() || a.is_ipv4()),
            v6: local.is_ipv6(),
            shared,
            control_tx,
            tcp_out,
            tcp_out_rx: Mutex::new(Some(tcp_out_rx)),
            tcp_in,
            tcp_in_rx: Mutex::new(tcp_in_rx),
            extra: extra::ExtraSockets::default(),
            recv_waker: Mutex::new(None),
        };
        Ok((Arc::new(s), control_rx))
    }

    /// `a` as this socket's family wants it (IPv4 peers as IPv4-mapped on an IPv6 socket).
    fn wire(&self, a: SocketAddr) -> SocketAddr {
        match (self.v6, a.ip()) {
            (true, IpAddr::V4(v4)) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
            _ => a,
        }
    }

    /// The address Quinn uses for the peer, in this socket's family.
    pub fn virtual_peer(&self) -> SocketAddr {
        self.wire(VIRTUAL_PEER)
    }

    /// The address of the relay in use.
    pub fn relay(&self) -> SocketAddr {
        self.shared.relay()
    }

    /// Whether this socket can send to `relay` (an IPv4-only socket cannot reach IPv6).
    pub(crate) fn can_reach(&self, relay: SocketAddr) -> bool {
        self.v6 || canonical(relay).is_ipv4()
    }

    /// Uses `relay` from now on, for registrations and relayed datagrams alike (a failover).
    pub(crate) fn set_relay(&self, relay: SocketAddr) {
        self.shared.state.lock().expect("path lock poisoned").relay = canonical(relay);
    }

    /// The relay's address in the other IP family, where this peer registers its alternate
    /// address; `None` when it has none (or cannot reach it).
    pub fn relay_alt(&self) -> Option<SocketAddr> {
        self.relay_alt
    }

    /// Sends a control datagram (registration, punch) from the shared socket.
    pub(crate) async fn send_control(&self, dst: SocketAddr, bytes: &[u8]) -> io::Result<()> {
        self.io.send_to(bytes, self.wire(dst)).await.map(|_| ())
    }

    /// Sends a control datagram (a punch probe) with its own TTL (hop limit), leaving the
    /// socket's default for everything else, Quinn's packets included. Does not wait: a full
    /// send buffer loses it, like any probe. Where the platform has no per-datagram TTL the
    /// datagram is not sent (the full-TTL probes that follow still are).
    pub(crate) fn send_control_with_ttl(
        &self,
        dst: SocketAddr,
        bytes: &[u8],
        ttl: u32,
    ) -> io::Result<()> {
        send_with_ttl(&self.io, self.wire(dst), bytes, ttl)
    }

    /// Sends a control datagram without waiting (from `Drop`); a full buffer loses it.
    pub(crate) fn try_send_control(&self, dst: SocketAddr, bytes: &[u8]) {
        let _ = self.io.try_send_to(bytes, self.wire(dst));
    }

    /// Queues one datagram (framed) for the TCP connection to the relay; a full queue drops
    /// it (counted). Returns whether it was queued.
    pub(crate) fn send_tcp(&self, datagram: &[u8]) -> bool {
        let mut frame = Vec::with_capacity(datagram.len() + quic_relay::frame::FRAME_HEADER);
        quic_relay::frame::encode_frame(datagram, &mut frame);
        if self.tcp_out.try_send(frame).is_err() {
            self.shared
                .stats
                .tcp_dropped
                .fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The queue of frames for the TCP connection; `None` once a TCP task took it.
    pub(crate) fn take_tcp_queue(&self) -> Option<mpsc::Receiver<Vec<u8>>> {
        self.tcp_out_rx
            .lock()
            .expect("tcp queue lock poisoned")
            .take()
    }

    /// A datagram that came from the relay over TCP: a relay reply goes to the driver, anything
    /// else is the peer's and goes to Quinn.
    pub(crate) fn deliver_tcp(&self, datagram: &[u8]) {
        self.shared.touch();
        if let Some(reply) = Reply::parse(datagram) {
            self.shared.stats.control.fetch_add(1, Ordering::Relaxed);
            if self
                .control_tx
                .try_send(Control::Relay { reply, alt: false })
                .is_err()
            {
                self.shared
                    .stats
                    .control_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        if self.tcp_in.try_send(datagram.to_vec()).is_err() {
            self.shared
                .stats
                .tcp_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.shared
            .stats
            .rx_relay_tcp
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Moves datagrams that came over TCP into Quinn's buffers, one per buffer.
    fn poll_recv_tcp(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<usize> {
        let mut rx = self.tcp_in_rx.lock().expect("tcp queue lock poisoned");
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let next = if n == 0 {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(d)) => d,
                    _ => return Poll::Pending,
                }
            } else {
                match rx.try_recv() {
                    Ok(d) => d,
                    Err(_) => break,
                }
            };
            let len = next.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&next[..len]);
            meta[n] = RecvMeta {
                addr: self.virtual_peer(),
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        Poll::Ready(n)
    }

    /// Takes relay replies and punch packets out of a received buffer (GRO: several datagrams of
    /// `stride` bytes each), hands them to the driver, and returns the bytes left for Quinn.
    /// `via`: the extra socket it came in on (`None`: the main one).
    fn demux(
        &self,
        from: SocketAddr,
        buf: &mut [u8],
        len: usize,
        stride: usize,
        via: Option<u16>,
    ) -> usize {
        let from = canonical(from);
        // The relay only ever talks to the main socket.
        let alt = via.is_none() && self.relay_alt == Some(from);
        let from_relay = via.is_none() && from == self.shared.relay() || alt;
        let stride = if stride == 0 { len } else { stride };
        let mut write = 0;
        let mut read = 0;
        let mut data = 0u64;
        while read < len {
            let end = (read + stride).min(len);
            let seg = &buf[read..end];
            let control = if from_relay {
                Reply::parse(seg)
                    .map(|reply| Control::Relay { reply, alt })
                    .or_else(|| {
                        crate::candidates::Candidates::looks_like(seg)
                            .then(|| Control::Candidates(seg.to_vec()))
                    })
            } else {
                PunchPacket::decode(seg).map(|packet| Control::Punch { from, packet, via })
            };
            match control {
                Some(c) => {
                    self.shared.stats.control.fetch_add(1, Ordering::Relaxed);
                    trace!(%from, ?c, "control datagram");
                    if self.control_tx.try_send(c).is_err() {
                        self.shared
                            .stats
                            .control_dropped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                None => {
                    // Keep it for Quinn; close the gap a removed control datagram left, which
                    // keeps every segment but the last `stride` long, as GRO requires.
                    if write != read {
                        buf.copy_within(read..end, write);
                    }
                    write += end - read;
                    data += 1;
                }
            }
            read = end;
        }
        if data > 0 || from_relay {
            self.shared.touch();
        }
        let counter = if from_relay {
            &self.shared.stats.rx_relay
        } else {
            &self.shared.stats.rx_direct
        };
        counter.fetch_add(data, Ordering::Relaxed);
        write
    }
}

impl AsyncUdpSocket for PeerSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller {
            socket: self,
            fut: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if canonical(transmit.destination) != VIRTUAL_PEER {
            // Quinn only ever talks to the virtual peer; anything else is a bug, and sending it
            // to a real address could reach a stranger.
            debug!(dst = %transmit.destination, "dropping a transmit to a non-peer address");
            return Ok(());
        }
        let (path, via, relay) = self.shared.route();
        if let (Path::Direct(a), Some(w)) = (path, self.extra.winner()) {
            if via == Some(w.index) {
                // Still the direct path, through the birthday socket that won: counted as such,
                // so path statistics (mqproxy's tx_direct) see it.
                self.send_quinn(&w.io, &w.state, a, transmit)?;
                self.shared.stats.tx_direct.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        let (dst, counter) = match path {
            Path::Direct(a) => (a, &self.shared.stats.tx_direct),
            Path::Relay => (relay, &self.shared.stats.tx_relay),
            Path::RelayTcp => {
                // A GSO batch is several datagrams of `segment_size` bytes: one frame each.
                let seg = transmit
                    .segment_size
                    .unwrap_or(transmit.contents.len())
                    .max(1);
                for d in transmit.contents.chunks(seg) {
                    if self.send_tcp(d) {
                        self.shared
                            .stats
                            .tx_relay_tcp
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Dropped datagrams are lost packets to QUIC, never an error.
                return Ok(());
            }
        };
        self.send_quinn(&self.io, &self.inner, dst, transmit)?;
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        {
            let mut w = self.recv_waker.lock().expect("waker lock poisoned");
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        // Datagrams that came over TCP (or raced a birthday socket's promotion) first; the UDP
        // socket's readiness is polled below either way, so both wake this task.
        if let Poll::Ready(n) = self.poll_recv_tcp(cx, bufs, meta) {
            return Poll::Ready(Ok(n));
        }
        // Then the birthday socket that won, if any (its readiness is polled, so it wakes
        // this task too).
        if let Some(w) = self.extra.winner() {
            if let Poll::Ready(r) =
                self.poll_recv_on(&w.io, &w.state, Some(w.index), cx, bufs, meta)
            {
                return Poll::Ready(r);
            }
        }
        self.poll_recv_on(&self.io, &self.inner, None, cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.gro_segments()
    }
}

type WritableFuture = Pin<Box<dyn std::future::Future<Output = io::Result<()>> + Send + Sync>>;

/// Waits for the socket to become writable, for one Quinn task.
struct Poller {
    socket: Arc<PeerSocket>,
    fut: Option<WritableFuture>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller").finish_non_exhaustive()
    }
}

impl UdpPoller for Poller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.fut.is_none() {
            let socket = self.socket.clone();
            // The socket Quinn's next send goes out on: the birthday winner while the direct
            // path runs through it, the main socket otherwise.
            self.fut = Some(Box::pin(async move {
                match socket.extra.winner() {
                    Some(w) if socket.shared.route().1 == Some(w.index) => w.io.writable().await,
                    _ => socket.io.writable().await,
                }
            }));
        }
        let fut = self.fut.as_mut().expect("set above");
        let r = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        Poll::Ready(r)
    }
}

impl PeerSocket {
    /// Wakes Quinn's receive task (it then polls every socket in use again).
    fn wake_receiver(&self) {
        if let Some(w) = self
            .recv_waker
            .lock()
            .expect("waker lock poisoned")
            .as_ref()
        {
            w.wake_by_ref();
        }
    }

    /// Sends one of Quinn's transmits to `dst` from `io` (the main socket, or the birthday
    /// socket that won).
    fn send_quinn(
        &self,
        io: &tokio::net::UdpSocket,
        state: &UdpSocketState,
        dst: SocketAddr,
        transmit: &Transmit<'_>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: self.wire(dst),
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            // Quinn picks the source address it saw the virtual peer's datagrams arrive at; the
            // real destination changes under it (relay, public, LAN, IPv6), so let the kernel
            // route each datagram from the right address, as it does for the registrations.
            src_ip: None,
        };
        io.try_io(Interest::WRITABLE, || state.send(io.into(), &t))
    }

    /// Receives into Quinn's buffers from `io` (`via`: which extra socket it is, if one),
    /// taking the control datagrams out.
    fn poll_recv_on(
        &self,
        io: &tokio::net::UdpSocket,
        state: &UdpSocketState,
        via: Option<u16>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(io.poll_recv_ready(cx))?;
            let Ok(n) = io.try_io(Interest::READABLE, || state.recv(io.into(), bufs, meta)) else {
                continue;
            };
            let peer = self.virtual_peer();
            for (m, buf) in meta.iter_mut().zip(bufs.iter_mut()).take(n) {
                // Zero length is what Quinn skips: a buffer that held only control datagrams.
                m.len = self.demux(m.addr, buf, m.len, m.stride, via);
                m.addr = peer;
            }
            return Poll::Ready(Ok(n));
        }
    }
}

/// Sends `bytes` to `dst` (in the socket's family) from `io` with its own TTL (hop limit),
/// leaving the socket's default for everything else. Does not wait: a full send buffer loses
/// it, like any probe. Where the platform has no per-datagram TTL the datagram is not sent.
fn send_with_ttl(
    io: &tokio::net::UdpSocket,
    dst: SocketAddr,
    bytes: &[u8],
    ttl: u32,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let v4 = canonical(dst).is_ipv4();
        let (level, kind) = if v4 {
            (libc::IPPROTO_IP, libc::IP_TTL)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
        };
        let value = libc::c_int::try_from(ttl.clamp(1, 255)).expect("1..=255 fits");
        // One control message holding one int, in a buffer aligned for `cmsghdr`.
        let mut buf = [0u64; 8];
        let value_len = std::mem::size_of::<libc::c_int>() as u32;
        // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
        let (space, len, data_off) = unsafe {
            (
                libc::CMSG_SPACE(value_len) as usize,
                libc::CMSG_LEN(value_len) as usize,
                libc::CMSG_LEN(0) as usize,
            )
        };
        debug_assert!(space <= std::mem::size_of_val(&buf));
        // SAFETY: an all-zero cmsghdr is valid (plain integers and padding).
        let mut hdr: libc::cmsghdr = unsafe { std::mem::zeroed() };
        hdr.cmsg_len = len as _;
        hdr.cmsg_level = level;
        hdr.cmsg_type = kind;
        let base = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` is 64 bytes, aligned for cmsghdr (8), and `space` (the header plus
        // the int, padded) fits in it, as asserted above; both writes stay inside it.
        unsafe {
            std::ptr::write(base.cast::<libc::cmsghdr>(), hdr);
            std::ptr::write_unaligned(base.add(data_off).cast::<libc::c_int>(), value);
        }
        // SAFETY: `buf` outlives `control`, and nothing writes `buf` while it is borrowed.
        let control = unsafe { std::slice::from_raw_parts(base.cast_const(), space) };
        let addr = socket2::SockAddr::from(dst);
        let iov = [io::IoSlice::new(bytes)];
        let msg = socket2::MsgHdr::new()
            .with_addr(&addr)
            .with_buffers(&iov)
            .with_control(control);
        let sock = socket2::SockRef::from(io);
        io.try_io(Interest::WRITABLE, || sock.sendmsg(&msg, 0))
            .map(|_| ())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (dst, bytes, ttl);
        Ok(())
    }
}

/// Is this datagram one of ours rather than QUIC? Exposed for tests of the demultiplexer.
#[doc(hidden)]
pub fn is_control(from_relay: bool, datagram: &[u8]) -> bool {
    if from_relay {
        Reply::parse(datagram).is_some()
    } else {
        punch::PunchPacket::decode(datagram).is_some()
    }
}
