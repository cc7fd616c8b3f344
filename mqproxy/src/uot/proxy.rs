//! sing-box UDP-over-TCP over mqproxy: the server side of a CONNECT to the magic destinations,
//! and [`create_udp_proxy`], the client side through any SOCKS5 proxy that speaks UoT.
//!
//! The server applies the same destination policy as a normal CONNECT (no loopback, private or
//! link-local targets unless `--allow-private`), per packet for addressed streams, before any
//! datagram leaves.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tracing::{debug, trace};

use udp_over_tcp::singbox::{self, Address, DecodeError, Mode, PacketDecoder, Request, Version};

use crate::proto::TargetAddr;
use crate::{socks, AbortOnDrop};

/// The v2 request must arrive within this time after the CONNECT.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// DNS lookups for destinations.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Resolved names kept per addressed stream (and for how long): a DNS client sends to a handful
/// of names; the cap keeps a peer naming endless hosts from growing the map.
const DNS_CACHE: usize = 64;
const DNS_TTL: Duration = Duration::from_secs(60);
/// Datagrams gathered into one stream write when several are waiting (bytes).
const COALESCE: usize = 64 * 1024;
/// The sing reference server reads with 16 KiB buffers; we read up to this at a time.
const READ_CHUNK: usize = 64 * 1024;

/// What may go wrong serving or opening a UoT stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UotError {
    /// The peer sent bytes that are not UoT.
    #[error("malformed UoT stream: {0}")]
    Decode(#[from] DecodeError),
    /// The stream or a socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The v2 request did not arrive in time.
    #[error("no UoT request within {0:?}")]
    Timeout(Duration),
    /// The destination is refused by policy or does not resolve.
    #[error("destination {0} refused: private/loopback (see --allow-private) or unresolvable")]
    Destination(TargetAddr),
    /// The SOCKS5 proxy refused (reply code).
    #[error("SOCKS5 proxy refused the UoT CONNECT: {}", crate::udpsocks::reply_text(*.0))]
    Refused(u8),
    /// The SOCKS5 proxy answered something else than SOCKS5.
    #[error("SOCKS5 proxy sent a malformed reply")]
    Malformed,
    /// The stream has ended.
    #[error("the UoT stream ended")]
    Closed,
}

// The codec's address and mqproxy's have the same two cases; the codec's crate sits below
// mqproxy and cannot name mqproxy's type, so the two convert at this boundary.
impl From<Address> for TargetAddr {
    fn from(a: Address) -> Self {
        match a {
            Address::Ip(a) => TargetAddr::Ip(a),
            Address::Domain(d, p) => TargetAddr::Domain(d, p),
        }
    }
}

impl From<TargetAddr> for Address {
    fn from(a: TargetAddr) -> Self {
        match a {
            TargetAddr::Ip(a) => Address::Ip(a),
            TargetAddr::Domain(d, p) => Address::Domain(d, p),
        }
    }
}

/// Destination checks and limits applied by the server.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Allow loopback/private/link-local destinations (`--allow-private`).
    pub allow_private: bool,
    /// End the stream after this long without a packet either way.
    pub idle_timeout: Duration,
}

/// Resolves `addr` and keeps the addresses the policy allows.
async fn resolve(addr: &TargetAddr, policy: &Policy) -> Result<Vec<SocketAddr>, UotError> {
    let all: Vec<SocketAddr> = match addr {
        TargetAddr::Ip(a) => vec![*a],
        TargetAddr::Domain(h, p) => {
            match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((h.as_str(), *p))).await
            {
                Ok(Ok(it)) => it.collect(),
                _ => Vec::new(),
            }
        }
    };
    let ok = crate::policy::filter(all, policy.allow_private);
    if ok.is_empty() {
        debug!(%addr, "UoT destination refused by policy or DNS");
        return Err(UotError::Destination(addr.clone()));
    }
    Ok(ok)
}

fn unspecified_for(ip: IpAddr) -> SocketAddr {
    match ip {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Serves one UoT stream whose CONNECT has been accepted: `leftover` holds bytes already read
/// past the CONNECT. Returns when the stream ends, idles out or breaks the format.
pub async fn serve<R, W>(
    version: Version,
    rd: R,
    wr: W,
    leftover: BytesMut,
    policy: Policy,
) -> Result<(), UotError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut s = Accepted {
        rd,
        wr,
        leftover,
        policy,
    };
    match version {
        Version::V1 => {}
        Version::V2 => {
            let read_req = async {
                loop {
                    if let Some((req, n)) = Request::decode(&s.leftover)? {
                        let _ = s.leftover.split_to(n);
                        return Ok::<_, UotError>(req);
                    }
                    if s.rd.read_buf(&mut s.leftover).await? == 0 {
                        return Err(UotError::Closed);
                    }
                }
            };
            let req = tokio::time::timeout(REQUEST_TIMEOUT, read_req)
                .await
                .map_err(|_| UotError::Timeout(REQUEST_TIMEOUT))??;
            let destination = TargetAddr::from(req.destination);
            debug!(%destination, connect = req.is_connect, "UoT v2 request");
            if req.is_connect {
                let dest = resolve(&destination, &s.policy).await?[0];
                let sock = UdpSocket::bind(unspecified_for(dest.ip())).await?;
                sock.connect(dest).await?;
                return s.pump_connect(sock).await;
            }
        }
    }
    s.pump_addressed().await
}

/// A UoT stream past its CONNECT (and v2 request): the two halves, the bytes already read
/// past the header, and the destination policy. One of the pumps below consumes it.
struct Accepted<R, W> {
    rd: R,
    wr: W,
    leftover: BytesMut,
    policy: Policy,
}

/// Reads packets from the stream and hands each to `out`, until EOF or a format error.
async fn stream_packets<R: AsyncRead + Unpin>(
    rd: &mut R,
    mode: Mode,
    leftover: BytesMut,
    mut out: impl AsyncFnMutPacket,
) -> Result<(), UotError> {
    let mut dec = PacketDecoder::new(mode, leftover);
    loop {
        while let Some(p) = dec.next_packet()? {
            out.packet(p).await;
        }
        let b = dec.buffer();
        if b.capacity() - b.len() < READ_CHUNK / 4 {
            b.reserve(READ_CHUNK);
        }
        if rd.read_buf(b).await? == 0 {
            return Ok(());
        }
    }
}

/// A packet sink (a small trait instead of async closures, which need a newer compiler).
trait AsyncFnMutPacket {
    async fn packet(&mut self, p: singbox::Packet);
}

/// Writes datagrams from `recv` to the stream, gathering whatever else is already waiting.
async fn udp_to_stream(
    wr: &mut impl WriteAll,
    sock: &UdpSocket,
    mode: Mode,
    activity: &Mutex<Instant>,
) -> Result<(), UotError> {
    let mut buf = vec![0u8; 65_536];
    let mut out = BytesMut::with_capacity(COALESCE + 70_000);
    loop {
        recv_batch(sock, &mut buf, &mut out, |from, payload, out| {
            encode_reply(mode, from, payload, out)
        })
        .await?;
        *activity.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        wr.write_all(&out).await?;
        out.clear();
    }
}

/// Receives the next datagram from `sock` and whatever else is already waiting (up to
/// [`COALESCE`] bytes, so one write carries them: coalesced under load, one per frame when
/// idle), handing each to `encode` to append to `out`. Returns the first one's sender.
async fn recv_batch(
    sock: &UdpSocket,
    buf: &mut [u8],
    out: &mut BytesMut,
    mut encode: impl FnMut(SocketAddr, &[u8], &mut BytesMut),
) -> std::io::Result<SocketAddr> {
    let (n, first) = loop {
        let (n, from) = sock.recv_from(buf).await.or_else(ignore_icmp)?;
        if n != usize::MAX {
            break (n, from);
        }
    };
    encode(first, &buf[..n], out);
    while out.len() < COALESCE {
        match sock.try_recv_from(buf) {
            Ok((n, from)) => encode(from, &buf[..n], out),
            Err(_) => break,
        }
    }
    Ok(first)
}

/// ICMP errors (ECONNREFUSED on a connected socket) are reported on the next receive; they
/// must not end the stream. Returns a marker length the caller skips.
fn ignore_icmp(e: std::io::Error) -> Result<(usize, SocketAddr), std::io::Error> {
    if matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::HostUnreachable
            | std::io::ErrorKind::NetworkUnreachable
    ) {
        debug!(error = %e, "UDP error from the destination (ignored)");
        Ok((usize::MAX, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))))
    } else {
        Err(e)
    }
}

fn encode_reply(mode: Mode, from: SocketAddr, payload: &[u8], out: &mut BytesMut) {
    let src = Address::Ip(from);
    // Received datagrams are < 64 KiB, so this cannot fail.
    let _ = singbox::encode_packet(mode, Some(&src), payload, out);
}

async fn idle_watch(activity: &Mutex<Instant>, idle: Duration) {
    loop {
        let last = *activity.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

struct ConnectSink<'a> {
    sock: &'a UdpSocket,
    activity: &'a Mutex<Instant>,
}

impl AsyncFnMutPacket for ConnectSink<'_> {
    async fn packet(&mut self, p: singbox::Packet) {
        *self.activity.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        if let Err(e) = self.sock.send(&p.payload).await {
            debug!(error = %e, "UoT UDP send failed (ignored)");
        }
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Accepted<R, W> {
    /// Connect mode (v2): every packet goes to the one destination `sock` is connected to.
    async fn pump_connect(mut self, sock: UdpSocket) -> Result<(), UotError> {
        let activity = Mutex::new(Instant::now());
        let sink = ConnectSink {
            sock: &sock,
            activity: &activity,
        };
        let mut wr = Direct(self.wr);
        let replies = udp_to_stream(&mut wr, &sock, Mode::Connect, &activity);
        let idle = self.policy.idle_timeout;
        let from_stream = stream_packets(&mut self.rd, Mode::Connect, self.leftover, sink);
        run_stream(from_stream, replies, &activity, idle).await
    }

    /// Addressed mode (v1, and v2 without connect): each packet names its destination, sent
    /// from one socket per IP family.
    async fn pump_addressed(mut self) -> Result<(), UotError> {
        let v4 = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
        let v6 = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).await.ok();
        let activity = Mutex::new(Instant::now());
        let sink = AddressedSink {
            v4: &v4,
            v6: v6.as_ref(),
            policy: self.policy,
            dns: HashMap::new(),
            activity: &activity,
        };
        // Both sockets write to the one stream: share it behind an async lock.
        let wr = tokio::sync::Mutex::new(self.wr);
        let from_v4 =
            async { udp_to_stream(&mut LockedWriter(&wr), &v4, Mode::Addressed, &activity).await };
        let from_v6 = async {
            match &v6 {
                Some(s) => {
                    udp_to_stream(&mut LockedWriter(&wr), s, Mode::Addressed, &activity).await
                }
                None => std::future::pending().await,
            }
        };
        let replies = async {
            tokio::select! {
                r = from_v4 => r,
                r = from_v6 => r,
            }
        };
        let idle = self.policy.idle_timeout;
        let from_stream = stream_packets(&mut self.rd, Mode::Addressed, self.leftover, sink);
        run_stream(from_stream, replies, &activity, idle).await
    }
}

/// Runs a stream until it ends or breaks the format (`from_stream`), a reply cannot be
/// written (`replies`), or nothing moved either way for `idle`.
async fn run_stream(
    from_stream: impl Future<Output = Result<(), UotError>>,
    replies: impl Future<Output = Result<(), UotError>>,
    activity: &Mutex<Instant>,
    idle: Duration,
) -> Result<(), UotError> {
    tokio::select! {
        r = from_stream => r,
        r = replies => r,
        _ = idle_watch(activity, idle) => {
            debug!("UoT stream idle; closing");
            Ok(())
        }
    }
}

struct AddressedSink<'a> {
    v4: &'a UdpSocket,
    v6: Option<&'a UdpSocket>,
    policy: Policy,
    dns: HashMap<String, (Vec<SocketAddr>, Instant)>,
    activity: &'a Mutex<Instant>,
}

impl AsyncFnMutPacket for AddressedSink<'_> {
    async fn packet(&mut self, p: singbox::Packet) {
        *self.activity.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let Some(addr) = p.addr.map(TargetAddr::from) else {
            return;
        };
        let dest = match &addr {
            TargetAddr::Ip(a) if crate::policy::allowed(a.ip(), self.policy.allow_private) => {
                Some(*a)
            }
            TargetAddr::Ip(_) => None,
            TargetAddr::Domain(h, port) => {
                let fresh = self
                    .dns
                    .get(h)
                    .filter(|(_, t)| t.elapsed() < DNS_TTL)
                    .map(|(v, _)| v.clone());
                let addrs = match fresh {
                    Some(v) => v,
                    None => {
                        let v = resolve(&addr, &self.policy).await.unwrap_or_default();
                        if self.dns.len() >= DNS_CACHE {
                            self.dns.retain(|_, (_, t)| t.elapsed() < DNS_TTL);
                            if self.dns.len() >= DNS_CACHE {
                                self.dns.clear();
                            }
                        }
                        self.dns.insert(h.clone(), (v.clone(), Instant::now()));
                        v
                    }
                };
                addrs.first().map(|a| SocketAddr::new(a.ip(), *port))
            }
        };
        let Some(dest) = dest else {
            debug!(%addr, "UoT packet to a refused destination dropped");
            return;
        };
        let sock = match (dest, self.v6) {
            (SocketAddr::V6(_), Some(s)) => s,
            (SocketAddr::V6(_), None) => return,
            _ => self.v4,
        };
        trace!(%dest, len = p.payload.len(), "UoT out");
        if let Err(e) = sock.send_to(&p.payload, dest).await {
            debug!(%dest, error = %e, "UoT UDP send failed (ignored)");
        }
    }
}

/// Where [`udp_to_stream`] writes whole batches of packets.
trait WriteAll {
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()>;
}

/// A stream written by one task only.
struct Direct<W>(W);

impl<W: AsyncWrite + Unpin> WriteAll for Direct<W> {
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        AsyncWriteExt::write_all(&mut self.0, b).await
    }
}

/// A stream shared by two tasks: the lock is held per batch, so frames stay whole.
struct LockedWriter<'a, W>(&'a tokio::sync::Mutex<W>);

impl<W: AsyncWrite + Unpin> WriteAll for LockedWriter<'_, W> {
    async fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.0.lock().await.write_all(b).await
    }
}

/// A local UDP socket whose datagrams travel through a UoT v2 (connect) stream to a target.
/// Dropping it closes the stream.
#[derive(Debug)]
pub struct UdpProxy {
    local: SocketAddr,
    task: AbortOnDrop<Result<(), UotError>>,
}

impl UdpProxy {
    /// The local address to send datagrams to; replies come back from it to the latest sender.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Waits until the stream ends and returns why.
    pub async fn closed(mut self) -> Result<(), UotError> {
        match (&mut self.task.0).await {
            Ok(r) => r,
            Err(_) => Err(UotError::Closed),
        }
    }
}

/// Opens a UoT v2 connect stream to `target` through the SOCKS5 proxy at `socks` (an mqproxy
/// client's `--socks5` port, or any proxy whose server speaks sing-box UoT), binds a UDP
/// socket at `local` and forwards between them. Replies go to whoever sent to the local socket
/// most recently.
pub async fn create_udp_proxy(
    socks_proxy: SocketAddr,
    local: SocketAddr,
    target: TargetAddr,
) -> Result<UdpProxy, UotError> {
    let mut tcp = tokio::time::timeout(REQUEST_TIMEOUT, socks_connect_magic(socks_proxy))
        .await
        .map_err(|_| UotError::Timeout(REQUEST_TIMEOUT))??;
    let mut req = BytesMut::new();
    Request {
        is_connect: true,
        destination: target.into(),
    }
    .encode(&mut req);
    tcp.write_all(&req).await?;
    let sock = UdpSocket::bind(local).await?;
    let local = sock.local_addr()?;
    let task = AbortOnDrop(tokio::spawn(client_pump(tcp, sock)));
    Ok(UdpProxy { local, task })
}

async fn socks_connect_magic(proxy: SocketAddr) -> Result<TcpStream, UotError> {
    let mut tcp = TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(&[socks::VERSION, 1, socks::METHOD_NONE])
        .await?;
    let mut m = [0u8; 2];
    tcp.read_exact(&mut m).await?;
    if m != [socks::VERSION, socks::METHOD_NONE] {
        return Err(UotError::Malformed);
    }
    let magic = TargetAddr::Domain(singbox::MAGIC_V2.to_owned(), 0);
    tcp.write_all(&socks::encode_request(socks::CMD_CONNECT, &magic))
        .await?;
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await?;
    if head[0] != socks::VERSION {
        return Err(UotError::Malformed);
    }
    if head[1] != socks::REP_OK {
        return Err(UotError::Refused(head[1]));
    }
    let rest = match head[3] {
        crate::proto::ATYP_IPV4 => 4 + 2,
        crate::proto::ATYP_IPV6 => 16 + 2,
        crate::proto::ATYP_DOMAIN => {
            let mut l = [0u8; 1];
            tcp.read_exact(&mut l).await?;
            l[0] as usize + 2
        }
        _ => return Err(UotError::Malformed),
    };
    let mut skip = vec![0u8; rest];
    tcp.read_exact(&mut skip).await?;
    Ok(tcp)
}

struct ClientSink<'a> {
    sock: &'a UdpSocket,
    peer: &'a Mutex<Option<SocketAddr>>,
}

impl AsyncFnMutPacket for ClientSink<'_> {
    async fn packet(&mut self, p: singbox::Packet) {
        let peer = *self.peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(to) = peer {
            if let Err(e) = self.sock.send_to(&p.payload, to).await {
                debug!(%to, error = %e, "UoT reply not delivered locally");
            }
        }
    }
}

async fn client_pump(tcp: TcpStream, sock: UdpSocket) -> Result<(), UotError> {
    let (mut rd, mut wr) = tcp.into_split();
    let peer = Arc::new(Mutex::new(None));
    let sink = ClientSink {
        sock: &sock,
        peer: &peer,
    };
    let up = async {
        let mut buf = vec![0u8; 65_536];
        let mut out = BytesMut::with_capacity(COALESCE + 70_000);
        loop {
            // Replies go to whoever sent the first datagram of the batch.
            let from = recv_batch(&sock, &mut buf, &mut out, |_, payload, out| {
                let _ = singbox::encode_packet(Mode::Connect, None, payload, out);
            })
            .await?;
            *peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
            wr.write_all(&out).await?;
            out.clear();
        }
    };
    tokio::select! {
        r = stream_packets(&mut rd, Mode::Connect, BytesMut::new(), sink) => r.and(Err(UotError::Closed)),
        r = up => r,
    }
}

/// Serves a UoT CONNECT that arrived on an mqproxy stream: answers the CONNECT (the magic
/// destination is not a host to connect to) and runs [`serve`] on the stream.
pub async fn serve_mqproxy_stream(
    version: Version,
    mut send: quinn::SendStream,
    r: crate::transport::FrameReader,
    policy: Policy,
) -> Result<(), crate::transport::TransportError> {
    use crate::proto::{ConnectStatus, Frame};
    crate::transport::write_frame(
        &mut send,
        None,
        &Frame::ConnectResponse {
            status: ConnectStatus::Ok,
            remote: None,
        },
    )
    .await?;
    let (recv, leftover) = r.into_parts();
    match serve(version, recv, send, leftover, policy).await {
        Ok(()) => debug!(?version, "UoT stream done"),
        Err(e) => debug!(?version, error = %crate::logging::Escaped(&e), "UoT stream ended"),
    }
    Ok(())
}
