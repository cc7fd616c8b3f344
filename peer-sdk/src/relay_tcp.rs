//! The TCP way to the relay, for networks that block UDP: one connection to the relay's TCP
//! port (the same port number as its UDP) carrying the registration, its keepalives and the
//! QUIC packets as `u16 length | datagram` frames (the relay's PROTOCOL.md §11).
//!
//! It lives under the [`PeerSocket`] wrapper: Quinn keeps sending to the virtual peer and
//! reading from the socket, and the wrapper routes through this connection on
//! [`crate::Path::RelayTcp`]. A broken connection is re-opened with backoff, and the
//! registration is sent first on every new one (the relay removes a TCP member whose
//! connection closed), so a relay restart heals like it does over UDP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quic_relay::frame::{encode_frame, FrameDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::socket::PeerSocket;

/// Connect attempts give up after this long (a black-holed SYN otherwise waits minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lasted this long was healthy: the next failure starts the backoff over.
const HEALTHY: Duration = Duration::from_secs(10);

/// Keeps a TCP connection to `relay` open for as long as the task runs (the driver owns it).
pub(crate) async fn run(socket: Arc<PeerSocket>, relay: SocketAddr, registration: Vec<u8>) {
    let Some(mut out) = socket.take_tcp_queue() else {
        warn!("the TCP link to the relay is already running");
        return;
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(relay)).await {
            Ok(Ok(stream)) => {
                info!(%relay, "connected to the relay over TCP");
                let why = serve(stream, &socket, &mut out, &registration).await;
                warn!(%relay, reason = why, "TCP connection to the relay lost; reconnecting");
            }
            Ok(Err(e)) => debug!(%relay, error = %e, "TCP connect to the relay failed"),
            Err(_) => debug!(%relay, "TCP connect to the relay timed out"),
        }
        if started.elapsed() >= HEALTHY {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Runs one connection until it fails; returns why.
async fn serve(
    stream: TcpStream,
    socket: &PeerSocket,
    out: &mut mpsc::Receiver<Vec<u8>>,
    registration: &[u8],
) -> &'static str {
    // One write per frame (or per batch of frames): without NODELAY, Nagle holds small frames
    // back for the relay's delayed ACK, tens of milliseconds per round trip.
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut first = Vec::with_capacity(registration.len() + 2);
    encode_frame(registration, &mut first);
    if wr.write_all(&first).await.is_err() {
        return "write failed";
    }
    let reader = async {
        let mut decoder = FrameDecoder::new();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let n = match rd.read(&mut chunk).await {
                Ok(0) => return "closed by the relay",
                Ok(n) => n,
                Err(_) => return "read failed",
            };
            decoder.extend(&chunk[..n]);
            loop {
                match decoder.next_frame() {
                    Ok(Some(d)) => socket.deliver_tcp(d),
                    Ok(None) => break,
                    Err(_) => return "malformed frame from the relay",
                }
            }
        }
    };
    // Reads and writes run independently; frames that pile up while a write is in progress
    // go out together in the next one.
    let writer = async {
        let mut buf = Vec::with_capacity(64 << 10);
        while let Some(frame) = out.recv().await {
            buf.clear();
            buf.extend_from_slice(&frame);
            while buf.len() < 64 << 10 {
                match out.try_recv() {
                    Ok(f) => buf.extend_from_slice(&f),
                    Err(_) => break,
                }
            }
            if wr.write_all(&buf).await.is_err() {
                return "write failed";
            }
        }
        "the socket is gone"
    };
    tokio::select! {
        why = reader => why,
        why = writer => why,
    }
}
