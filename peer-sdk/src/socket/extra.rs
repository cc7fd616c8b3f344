//! The extra sockets of birthday punching ([`crate::rendezvous::birthday`]), owned by the
//! [`PeerSocket`]: opened on the driver's word, each with a small task that hands punch packets
//! to the driver tagged with the socket's number; the winner then carries Quinn's traffic to
//! the direct address (polled by [`PeerSocket`]'s `poll_recv` like the main socket), and the
//! others are closed.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use quinn::udp::UdpSocketState;
use tokio::sync::mpsc;
use tracing::{debug, trace};

use super::{Control, PeerSocket, Shared};
use crate::punch::PunchPacket;

/// One extra socket.
#[derive(Debug)]
pub(crate) struct Extra {
    pub(crate) index: u16,
    pub(crate) io: tokio::net::UdpSocket,
    pub(crate) state: UdpSocketState,
}

/// The extra sockets: at most [`crate::rendezvous::birthday::SOCKETS`], each with its reader
/// task until it wins or closes.
#[derive(Debug, Default)]
pub(crate) struct ExtraSockets {
    open: Mutex<Vec<(Arc<Extra>, crate::AbortOnDrop)>>,
    winner: Mutex<Option<Arc<Extra>>>,
}

impl ExtraSockets {
    /// The socket that won, carrying the direct path.
    pub(crate) fn winner(&self) -> Option<Arc<Extra>> {
        self.winner
            .lock()
            .expect("extra sockets lock poisoned")
            .clone()
    }

    fn get(&self, index: u16) -> Option<Arc<Extra>> {
        if let Some(w) = self.winner().filter(|w| w.index == index) {
            return Some(w);
        }
        self.open
            .lock()
            .expect("extra sockets lock poisoned")
            .iter()
            .find(|(e, _)| e.index == index)
            .map(|(e, _)| e.clone())
    }
}

/// Reads one extra socket until it is promoted or closed: punch packets go to the driver;
/// anything else is the peer's QUIC racing the promotion (the peer moved to this path as soon
/// as our answer reached it), handed to Quinn through the queue that also carries the relay's
/// TCP datagrams, so the handshake does not wait for a retransmission.
async fn read_extra(
    extra: Arc<Extra>,
    control: mpsc::Sender<Control>,
    quic: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
) {
    // Room for a full-size QUIC datagram (the path MTU stays below 1500 bytes).
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = match extra.io.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                trace!(socket = extra.index, error = %e, "extra socket receive error");
                continue;
            }
        };
        let Some(packet) = PunchPacket::decode(&buf[..n]) else {
            if quic.try_send(buf[..n].to_vec()).is_ok() {
                shared.stats.rx_direct.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        };
        shared.stats.control.fetch_add(1, Ordering::Relaxed);
        let c = Control::Punch {
            from: super::canonical(from),
            packet,
            via: Some(extra.index),
        };
        if control.try_send(c).is_err() {
            shared.stats.control_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl PeerSocket {
    /// Opens extra sockets numbered `from..to`, on any port of our socket's family (`from` 0:
    /// a new burst, closing any left first); returns how many are open (a host out of file
    /// descriptors opens fewer, and birthday punching works with what it has).
    pub(crate) fn open_extra(&self, from: u16, to: u16) -> u16 {
        if from == 0 {
            self.close_extra();
        }
        let any: SocketAddr = if self.v6 {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut open = self.extra.open.lock().expect("extra sockets lock poisoned");
        for index in from..to {
            let extra = match bind_extra(any, index) {
                Ok(e) => Arc::new(e),
                Err(e) => {
                    debug!(error = %e, opened = index, "cannot open more extra sockets");
                    break;
                }
            };
            let task = tokio::spawn(read_extra(
                extra.clone(),
                self.control_tx.clone(),
                self.tcp_in.clone(),
                self.shared.clone(),
            ));
            open.push((extra, crate::AbortOnDrop(task)));
        }
        u16::try_from(open.len()).unwrap_or(u16::MAX)
    }

    /// Extra socket `index` carries the direct path from now on; the others stay open (their
    /// readers hand Quinn what the peer still sends there) until [`PeerSocket::close_losers`].
    pub(crate) fn keep_extra(&self, index: u16) {
        let mut open = self.extra.open.lock().expect("extra sockets lock poisoned");
        let kept = open
            .iter()
            .position(|(e, _)| e.index == index)
            .map(|i| open.swap_remove(i));
        drop(open);
        if let Some((extra, reader)) = kept {
            // From here on Quinn's `poll_recv` reads it.
            drop(reader);
            *self
                .extra
                .winner
                .lock()
                .expect("extra sockets lock poisoned") = Some(extra);
            // Quinn's receive task waits on the sockets it polled last: wake it so it polls
            // the winner too.
            self.wake_receiver();
        }
    }

    /// Closes every extra socket but the winner.
    pub(crate) fn close_losers(&self) {
        // Dropping them closes the sockets and aborts their readers.
        self.extra
            .open
            .lock()
            .expect("extra sockets lock poisoned")
            .clear();
    }

    /// Closes every extra socket, the winner too (the direct path is void).
    pub(crate) fn close_extra(&self) {
        self.extra
            .open
            .lock()
            .expect("extra sockets lock poisoned")
            .clear();
        *self
            .extra
            .winner
            .lock()
            .expect("extra sockets lock poisoned") = None;
    }

    /// How many extra sockets are open (the winner included).
    pub fn extra_sockets(&self) -> usize {
        self.extra
            .open
            .lock()
            .expect("extra sockets lock poisoned")
            .len()
            + usize::from(self.extra.winner().is_some())
    }

    /// Sends a control datagram from extra socket `index`, with its own TTL when given. Does
    /// not wait: a full buffer loses it, like any probe.
    pub(crate) fn send_extra(
        &self,
        index: u16,
        dst: SocketAddr,
        bytes: &[u8],
        ttl: Option<u32>,
    ) -> std::io::Result<()> {
        let Some(extra) = self.extra.get(index) else {
            return Ok(()); // closed meanwhile
        };
        let dst = self.wire(dst);
        match ttl {
            Some(ttl) => super::send_with_ttl(&extra.io, dst, bytes, ttl),
            None => extra.io.try_send_to(bytes, dst).map(|_| ()),
        }
    }
}

fn bind_extra(any: SocketAddr, index: u16) -> std::io::Result<Extra> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(any),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if any.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&any.into())?;
    let std: std::net::UdpSocket = socket.into();
    let state = UdpSocketState::new((&std).into())?;
    let io = tokio::net::UdpSocket::from_std(std)?;
    Ok(Extra { index, io, state })
}
