//! The seam between the proxy and QUIC: how a client gets a `quinn::Connection` ([`Dialer`]:
//! direct here, through a relay session in [`crate::relay_session`]), the shared transport parameters,
//! and control-frame IO on streams.

#![cfg(feature = "runtime")]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, SendStream, TransportConfig, VarInt};

use crate::defaults::{
    CONNECTION_WINDOW, DATAGRAM_BUFFER, KEEPALIVE_MAX, MAX_STREAMS, MAX_UDP_PAYLOAD,
    PATH_INITIAL_RTT, STREAM_WINDOW, UDP_SOCKET_BUFFER,
};
use crate::proto::{self, DecodeError, Frame};
use crate::tls::TlsError;

mod big_packets;
use big_packets::BigPacketSocket;

/// Why a server or client could not start: its TLS configuration, or a socket it binds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Certificate or TLS configuration problems.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listening socket could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Errors moving frames over a stream or dialing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Reading a stream failed.
    #[error("reading stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing a stream failed.
    #[error("writing stream: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    TruncatedFrame,
    /// The peer sent bytes that are not a valid frame.
    #[error("bad frame from peer: {0}")]
    Decode(#[from] DecodeError),
    /// The connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Starting the connection failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The server address.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The server name did not resolve.
    #[error("resolving {host}: {reason}")]
    Resolve {
        /// The `HOST:PORT` given.
        host: String,
        /// Why.
        reason: String,
    },
    /// Binding the local UDP socket failed (for a `--path`, the address must be one of this
    /// host's).
    #[error("binding the client UDP socket: {0}")]
    Bind(std::io::Error),
    /// The peer took too long.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Reaching the server through the relay session failed.
    #[error("through the relay: {0}")]
    Relay(#[from] peer_sdk::Error),
}

/// Transport parameters both roles use. `keepalive` only matters on the client, which keeps
/// NAT bindings and the server's idle timer alive.
pub fn transport_config(idle_timeout: Duration, keepalive: bool) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(idle_timeout.try_into().ok());
    if keepalive {
        // The effective idle timeout is the smaller of both sides' and the server's is not
        // known here, so keepalives also go out at least every KEEPALIVE_MAX.
        t.keep_alive_interval(Some((idle_timeout / 3).min(KEEPALIVE_MAX)));
    }
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER);
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(u64::from(CONNECTION_WINDOW));
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Path MTU discovery up to MAX_UDP_PAYLOAD instead of quinn's 1,452, for paths that
    // carry bigger packets (loopback, jumbo-frame LANs): every per-packet cost (AEAD setup,
    // header protection, ACK bookkeeping, system calls) is then paid that many times less
    // often. On an ordinary 1,500-byte path nothing changes on the wire: quinn-udp sets DF,
    // so a bigger probe fails locally (EMSGSIZE, which it expects) or is lost on the way, and
    // the search settles below the path's limit as before, only after a few more probes.
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtud));
    t
}

/// Transport parameters of one path of a multipath client: keepalives every
/// [`PATH_KEEPALIVE`](crate::defaults::PATH_KEEPALIVE) and a
/// [`PATH_IDLE_TIMEOUT`](crate::defaults::PATH_IDLE_TIMEOUT), so a dead path is noticed and
/// dropped within about a second (the server's longer idle timeout does not matter: the
/// smaller of both sides' applies).
pub fn path_transport_config() -> TransportConfig {
    let mut t = transport_config(crate::defaults::PATH_IDLE_TIMEOUT, true);
    t.keep_alive_interval(Some(crate::defaults::PATH_KEEPALIVE));
    // A handshake gives up after three probe timeouts, and before the first RTT sample the
    // probe timeout follows this estimate: with the RFC 9002 default (333 ms) each redial of a
    // lost path takes ~3 s to fail, so a path that heals meanwhile waits that long to be used
    // again. 100 ms makes an attempt fail (and the next start) within ~1 s; a slower path
    // still connects, its first retransmissions are merely early.
    t.initial_rtt(PATH_INITIAL_RTT);
    t
}

/// A UDP socket for a QUIC endpoint, with [`UDP_SOCKET_BUFFER`] buffers where the kernel allows
/// (`SO_*BUFFORCE` with CAP_NET_ADMIN, else up to `net.core.[rw]mem_max`).
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack where the host allows it; failure just means IPv6 only.
        let _ = s.set_only_v6(false);
    }
    // Best effort: a smaller buffer only costs drops at high rates (logged below).
    let _ = netkit::sockopt::set_buffer(&s, netkit::sockopt::Buffer::Recv, UDP_SOCKET_BUFFER);
    let _ = netkit::sockopt::set_buffer(&s, netkit::sockopt::Buffer::Send, UDP_SOCKET_BUFFER);
    s.bind(&addr.into())?;
    let got = s.recv_buffer_size().unwrap_or(0);
    if got < UDP_SOCKET_BUFFER {
        tracing::debug!(
            asked = UDP_SOCKET_BUFFER,
            got,
            "smaller UDP receive buffer than asked; raise net.core.rmem_max for high rates"
        );
    }
    Ok(s.into())
}

/// A quinn endpoint on a [`bind_udp`] socket.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = bind_udp(addr)?;
    let mut config = quinn::EndpointConfig::default();
    // The largest packet this endpoint accepts and announces, so the peer's MTU discovery may
    // go past quinn's 1,472 default (see `transport_config`).
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = quinn::Runtime::wrap_udp_socket(&*runtime, socket)?;
    let socket = Arc::new(BigPacketSocket::new(socket, usize::from(MAX_UDP_PAYLOAD)));
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

/// Something that produces a QUIC connection to the server. The client asks it again after
/// every connection loss.
pub trait Dialer: Send + Sync + 'static {
    /// Opens a new connection (TLS done, not yet authenticated).
    fn dial(&self) -> impl Future<Output = Result<quinn::Connection, TransportError>> + Send;

    /// Called once at shutdown, after the connection was closed: lets the dialer flush the
    /// close to the server before the process exits.
    fn finish(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Which path a relay-session connection uses, for dialers that go through one.
    fn path_metrics(&self) -> Option<Arc<crate::relay_session::PathMetrics>> {
        None
    }
}

/// Dials the server directly over one local UDP socket.
#[derive(Debug)]
pub struct QuicDialer {
    endpoint: quinn::Endpoint,
    server: String,
    server_name: String,
    config: quinn::ClientConfig,
}

impl QuicDialer {
    /// A dialer for `server` (`HOST:PORT`), verifying it as `server_name`.
    pub fn new(
        server: String,
        server_name: String,
        mut config: quinn::ClientConfig,
        idle_timeout: Duration,
    ) -> Result<Self, TransportError> {
        config.transport_config(Arc::new(transport_config(idle_timeout, true)));
        // Bind the family of the server's literal address when it is one; otherwise IPv6
        // dual-stack covers both families where the host allows it.
        let bind: SocketAddr = match server.parse::<SocketAddr>() {
            Ok(SocketAddr::V4(_)) => "0.0.0.0:0".parse().expect("literal"),
            Ok(SocketAddr::V6(_)) => "[::]:0".parse().expect("literal"),
            Err(_) => "0.0.0.0:0".parse().expect("literal"),
        };
        Self::with_bind(server, server_name, config, bind)
    }

    /// A dialer for one path of a multipath client: its UDP socket is bound to `local` (an
    /// address of the interface the path leaves through) and it uses the path transport
    /// parameters ([`path_transport_config`]).
    pub fn for_path(
        server: String,
        server_name: String,
        mut config: quinn::ClientConfig,
        local: std::net::IpAddr,
    ) -> Result<Self, TransportError> {
        config.transport_config(Arc::new(path_transport_config()));
        Self::with_bind(server, server_name, config, SocketAddr::new(local, 0))
    }

    fn with_bind(
        server: String,
        server_name: String,
        config: quinn::ClientConfig,
        bind: SocketAddr,
    ) -> Result<Self, TransportError> {
        let endpoint = endpoint(bind, None).map_err(TransportError::Bind)?;
        Ok(QuicDialer {
            endpoint,
            server,
            server_name,
            config,
        })
    }
}

impl Dialer for QuicDialer {
    async fn dial(&self) -> Result<quinn::Connection, TransportError> {
        let resolve_err = |reason: String| TransportError::Resolve {
            host: self.server.clone(),
            reason,
        };
        let addr = tokio::net::lookup_host(&self.server)
            .await
            .map_err(|e| resolve_err(e.to_string()))?
            .find(|a| a.is_ipv4())
            .ok_or_else(|| resolve_err("no IPv4 address".into()))?;
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, &self.server_name)
            .map_err(|source| TransportError::Connect { addr, source })?;
        Ok(connecting.await?)
    }
}

/// Reads a stream's type varint and control frames, keeping bytes read past a frame so a
/// stream that switches to raw data (TCP CONNECT) loses nothing.
#[derive(Debug)]
pub struct FrameReader {
    /// The stream.
    pub recv: RecvStream,
    buf: BytesMut,
}

/// Read size for control-frame reads: frames are small.
const FRAME_READ_CHUNK: usize = 4096;

impl FrameReader {
    /// Wraps a stream.
    pub fn new(recv: RecvStream) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::new(),
        }
    }

    async fn fill(&mut self) -> Result<bool, TransportError> {
        let mut chunk = [0u8; FRAME_READ_CHUNK];
        match self.recv.read(&mut chunk).await? {
            Some(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The stream-type varint that starts every stream.
    pub async fn stream_type(&mut self) -> Result<u64, TransportError> {
        loop {
            if let Some((v, n)) = proto::get_varint(&self.buf) {
                self.buf.advance(n);
                return Ok(v);
            }
            if !self.fill().await? {
                return Err(TransportError::TruncatedFrame);
            }
        }
    }

    /// The next frame, skipping unknown frame types; `None` at a clean end of stream.
    pub async fn frame(&mut self) -> Result<Option<Frame>, TransportError> {
        loop {
            if let Some((f, n)) = Frame::decode(&self.buf)? {
                self.buf.advance(n);
                if matches!(f, Frame::Unknown { .. }) {
                    continue;
                }
                return Ok(Some(f));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(TransportError::TruncatedFrame)
                };
            }
        }
    }

    /// The stream and whatever was read past the last frame.
    pub fn into_parts(self) -> (RecvStream, BytesMut) {
        (self.recv, self.buf)
    }
}

/// Writes an optional stream-type varint and a frame in one write.
pub async fn write_frame(
    send: &mut SendStream,
    stream_type: Option<u64>,
    frame: &Frame,
) -> Result<(), TransportError> {
    let mut b = BytesMut::with_capacity(64);
    if let Some(t) = stream_type {
        proto::put_varint(&mut b, t);
    }
    frame.encode(&mut b);
    send.write_all(&b).await?;
    Ok(())
}

/// The first read buffer when splicing TCP into a stream: what an idle or slow connection
/// keeps (many of them must stay cheap).
const SPLICE_CHUNK_MIN: usize = 16 * 1024;
/// The largest read buffer, reached by doubling while reads fill the buffer (the sender is
/// ahead of us). At several Gbit/s a read then takes several of loopback's 64 KiB segments
/// at once: both mqproxy processes together make 28 % fewer system calls per byte than with
/// 64 KiB reads (27.5 against 38 per MB, `perf stat` over 3 GB downloads). Larger (1 MiB)
/// gained nothing more.
const SPLICE_CHUNK_MAX: usize = 256 * 1024;

/// Read buffers may grow past this size only with one of the [`LARGE_SPLICE_BUFFERS`] slots.
const SPLICE_CHUNK_PLAIN: usize = 64 * 1024;
/// Splices whose read buffer may grow past [`SPLICE_CHUNK_PLAIN`] at once, process-wide. A
/// flow waiting for QUIC flow control holds a filled buffer, so thousands of fast flows (a
/// connection may have 4096 streams) would each hold the largest one; the bulk transfers that
/// gain from large reads are few, and the others stay at the size every flow had before.
const LARGE_SPLICE_BUFFERS: usize = 64;
static LARGE_SPLICES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the [`LARGE_SPLICE_BUFFERS`] slots, given back on drop.
struct LargeSpliceSlot;

impl LargeSpliceSlot {
    fn take() -> Option<Self> {
        use std::sync::atomic::Ordering::Relaxed;
        LARGE_SPLICES
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < LARGE_SPLICE_BUFFERS).then_some(n + 1)
            })
            .ok()
            .map(|_| LargeSpliceSlot)
    }
}

impl Drop for LargeSpliceSlot {
    fn drop(&mut self) {
        LARGE_SPLICES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The next read buffer size: doubled after a read that filled the whole buffer (otherwise
/// kept), up to [`SPLICE_CHUNK_MAX`] for a splice holding a slot (taken here when first
/// needed) and up to [`SPLICE_CHUNK_PLAIN`] for the others.
fn next_splice_chunk(
    chunk: usize,
    read: usize,
    room: usize,
    slot: &mut Option<LargeSpliceSlot>,
) -> usize {
    if read < room {
        return chunk;
    }
    let next = (chunk * 2).min(SPLICE_CHUNK_MAX);
    if next <= SPLICE_CHUNK_PLAIN {
        return next;
    }
    if slot.is_none() {
        *slot = LargeSpliceSlot::take();
    }
    if slot.is_some() {
        next
    } else {
        chunk.min(SPLICE_CHUNK_PLAIN)
    }
}

/// Stream chunks gathered into one vectored TCP write.
const SPLICE_READ_CHUNKS: usize = 32;

/// Writes every byte of `chunks` with as few (vectored) writes as the socket allows; written
/// chunks are consumed (left empty or advanced).
async fn write_all_chunks<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut i = 0;
    while i < chunks.len() {
        let slices: Vec<std::io::IoSlice<'_>> = chunks[i..]
            .iter()
            .map(|c| std::io::IoSlice::new(c))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        drop(slices);
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < chunks.len() {
            let len = chunks[i].len();
            if n >= len {
                n -= len;
                chunks[i] = Bytes::new();
                i += 1;
            } else {
                chunks[i].advance(n);
                n = 0;
            }
        }
        // Skip chunks that were empty to begin with.
        while i < chunks.len() && chunks[i].is_empty() {
            i += 1;
        }
    }
    Ok(())
}

/// Copies bytes both ways between a TCP connection and a QUIC stream pair until both
/// directions end, keeping half-closes: a FIN on one side becomes a FIN (stream finish or TCP
/// shutdown) on the other; a TCP read error resets the stream. `leftover` is stream data read before
/// the splice started. Returns the bytes carried (TCP → stream, stream → TCP).
pub async fn splice(
    tcp: tokio::net::TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    leftover: BytesMut,
) -> (u64, u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.set_nodelay(true);
    let (mut tr, mut tw) = tcp.into_split();
    let up = async {
        // Reads land in a BytesMut whose filled part is handed to quinn as `Bytes`: no copy
        // between the TCP read and the QUIC send buffer.
        let mut chunk = SPLICE_CHUNK_MIN;
        let mut slot = None;
        let mut buf = BytesMut::with_capacity(chunk);
        let mut total = 0u64;
        loop {
            if buf.capacity() < chunk / 4 {
                buf.reserve(chunk);
            }
            let room = buf.capacity() - buf.len();
            match tr.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = send.finish();
                    break;
                }
                Ok(n) => {
                    chunk = next_splice_chunk(chunk, n, room, &mut slot);
                    if send.write_chunk(buf.split().freeze()).await.is_err() {
                        break;
                    }
                    total += n as u64;
                    // Let the connection driver packetise these bytes while they are still in
                    // cache. Without the yield this task kept reading while the TCP socket had
                    // data (up to the 32 MiB send window, or tokio's budget) before quinn
                    // copied any of it into a packet: the copies into and out of that backlog
                    // then missed the cache (in a bulk download the TCP read copy was 26 % of
                    // the server's CPU, 14 % with the yield; throughput +14 %, CPU per byte
                    // -9 %, interleaved A/B of 2 GB downloads).
                    tokio::task::yield_now().await;
                }
                Err(_) => {
                    let _ = send.reset(VarInt::from_u32(0));
                    break;
                }
            }
        }
        total
    };
    let down = async {
        let mut total = leftover.len() as u64;
        if !leftover.is_empty() && tw.write_all(&leftover).await.is_err() {
            let _ = recv.stop(VarInt::from_u32(0));
            return total;
        }
        // Everything quinn has ready, in one vectored write: one chunk per received STREAM
        // frame written alone made a syscall per ~6 KiB, a third of the client's CPU.
        let mut chunks: [Bytes; SPLICE_READ_CHUNKS] = std::array::from_fn(|_| Bytes::new());
        loop {
            match recv.read_chunks(&mut chunks).await {
                Ok(Some(n)) => {
                    let len: usize = chunks[..n].iter().map(Bytes::len).sum();
                    if write_all_chunks(&mut tw, &mut chunks[..n]).await.is_err() {
                        let _ = recv.stop(VarInt::from_u32(0));
                        break;
                    }
                    total += len as u64;
                }
                Ok(None) => {
                    let _ = tw.shutdown().await;
                    break;
                }
                // A reset stream ends this direction; the TCP side sees the write half close.
                Err(_) => break,
            }
        }
        total
    };
    tokio::join!(up, down)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// The read buffer grows only while reads fill it, up to the cap, and an idle or slow
    /// connection keeps the small one.
    #[test]
    fn splice_reads_grow_while_the_sender_is_ahead() {
        let grow = |slot: &mut Option<LargeSpliceSlot>| {
            let mut chunk = SPLICE_CHUNK_MIN;
            let mut sizes = vec![chunk];
            for _ in 0..6 {
                chunk = next_splice_chunk(chunk, chunk, chunk, slot);
                sizes.push(chunk);
            }
            sizes
        };
        // The only test touching the slots: take all but one, so the next splice gets the
        // last one and the one after it gets none.
        let taken: Vec<_> = std::iter::from_fn(LargeSpliceSlot::take).collect();
        assert_eq!(taken.len(), LARGE_SPLICE_BUFFERS, "the slots are capped");
        let mut held = taken;
        held.pop();
        let mut slot = None;
        assert_eq!(
            grow(&mut slot),
            [16, 32, 64, 128, 256, 256, 256].map(|k| k * 1024),
            "doubling to the cap with the last slot"
        );
        assert!(slot.is_some());
        let mut none = None;
        assert_eq!(
            grow(&mut none),
            [16, 32, 64, 64, 64, 64, 64].map(|k| k * 1024),
            "no slot left: 64 KiB, as before"
        );
        assert!(none.is_none());
        assert_eq!(
            next_splice_chunk(SPLICE_CHUNK_MIN, 1200, SPLICE_CHUNK_MIN, &mut None),
            SPLICE_CHUNK_MIN,
            "a partial read keeps the size"
        );
        // Slots come back when their splices end.
        drop(slot);
        drop(held);
        assert_eq!(LARGE_SPLICES.load(std::sync::atomic::Ordering::Relaxed), 0);
    }

    /// A pipe that takes at most 7 bytes per write exercises every partial-write branch:
    /// writes ending inside a chunk, at a chunk's end, and across empty chunks.
    #[tokio::test]
    async fn write_all_chunks_survives_partial_writes() {
        let (mut w, mut r) = tokio::io::duplex(7);
        let parts: Vec<&[u8]> = vec![b"hello ", b"", b"vectored", b" w", b"", b"orld!"];
        let expected: Vec<u8> = parts.concat();
        let mut chunks: Vec<Bytes> = parts.iter().map(|p| Bytes::copy_from_slice(p)).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.map(|_| got)
        });
        write_all_chunks(&mut w, &mut chunks).await.expect("write");
        drop(w);
        let got = reader.await.expect("join").expect("read");
        assert_eq!(got, expected);
        assert!(chunks.iter().all(Bytes::is_empty), "every chunk consumed");
    }

    #[tokio::test]
    async fn write_all_chunks_reports_a_closed_peer() {
        let (mut w, r) = tokio::io::duplex(4);
        drop(r);
        let mut chunks = [Bytes::from_static(b"data")];
        assert!(write_all_chunks(&mut w, &mut chunks).await.is_err());
    }
}
