//! The relay's socket loop: reads datagrams in batches, feeds them to the [`Relay`] state
//! machine, and writes what it decides, also in batches.
//!
//! One thread owns the socket and the session table: no lock, no atomic and no allocation per
//! datagram. On Linux each wake-up is one `recvmmsg` and one `sendmmsg`; forwarded datagrams are
//! sent straight out of the receive buffers. With UDP GRO a sender's GSO burst arrives as one
//! buffer and, its segments judged one by one, usually leaves as one GSO send. The thread blocks in `recvmmsg` with a short
//! timeout ([`defaults::IDLE_WAKE`]) so that timers, metrics and shutdown are served when idle.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::defaults;
use crate::metrics::Metrics;
use crate::sessions::{Outcome, PeerAddr, Relay, RelayConfig};
use crate::tcp::{self, Core, TcpConfig};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Creating the socket failed (e.g. IPv6 disabled for an IPv6 `--bind`).
    #[error("cannot create a UDP socket for {addr}: {source}")]
    Socket {
        /// The address the socket was for.
        addr: SocketAddr,
        /// The system's error.
        source: io::Error,
    },
    /// Binding failed: most often the port is taken by another process.
    #[error("cannot bind UDP {addr}: {source}{hint}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The system's error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A socket option could not be set.
    #[error("cannot configure the UDP socket on {addr} ({what}): {source}")]
    Configure {
        /// The socket's address.
        addr: SocketAddr,
        /// Which option.
        what: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// The relay thread could not be started.
    #[error("cannot start the relay thread: {0}")]
    Thread(io::Error),
    /// The TCP listener could not be set up on the relay's port.
    #[error("cannot listen on TCP {addr} ({what}): {source}{hint}")]
    Tcp {
        /// The address asked for.
        addr: SocketAddr,
        /// Which step failed.
        what: &'static str,
        /// The system's error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
}

/// A bound relay, ready to run.
#[derive(Debug)]
pub struct Server {
    socket: UdpSocket,
    local_addr: SocketAddr,
    /// The session table, shared with the TCP listener (when there is one).
    core: Arc<Mutex<Core>>,
    tcp: Option<(std::net::TcpListener, TcpConfig)>,
    metrics: Arc<Metrics>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sets a buffer size, falling back to the privileged `*BUFFORCE` option when the kernel's
/// `rmem_max`/`wmem_max` caps the plain one (a relay started as root gets what it asked for).
fn set_buffer(socket: &Socket, bytes: usize, recv: bool) -> io::Result<usize> {
    if recv {
        socket.set_recv_buffer_size(bytes)?;
    } else {
        socket.set_send_buffer_size(bytes)?;
    }
    #[cfg(target_os = "linux")]
    {
        // The kernel reports twice the usable size; compare against what was asked.
        let got = if recv {
            socket.recv_buffer_size()?
        } else {
            socket.send_buffer_size()?
        };
        if got < bytes {
            let opt = if recv {
                libc::SO_RCVBUFFORCE
            } else {
                libc::SO_SNDBUFFORCE
            };
            let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
            // Refused without CAP_NET_ADMIN: the plain size set above stays.
            let _ = netkit::sockopt::set_int(socket, libc::SOL_SOCKET, opt, val);
        }
    }
    if recv {
        socket.recv_buffer_size()
    } else {
        socket.send_buffer_size()
    }
}

/// How many ports [`Server::bind_with_tcp`] tries for port 0 before giving up: each pick's TCP
/// twin is taken with a chance of (TCP sockets on the host) / (ephemeral ports), so a few
/// picks make a failure practically impossible while a real error still surfaces at once.
pub const PORT_PICKS: u32 = 20;

impl Server {
    /// Binds the relay socket on `addr`. `[::]` is dual-stack (IPv4 and IPv6); on a host with
    /// IPv6 disabled it falls back to `0.0.0.0` with a warning.
    pub fn bind(addr: SocketAddr, cfg: RelayConfig, buffer_bytes: usize) -> Result<Self, Error> {
        let socket = match Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        {
            Ok(s) => s,
            Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
                warn!(error = %e, "IPv6 unavailable; listening on IPv4 only");
                return Self::bind(
                    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()),
                    cfg,
                    buffer_bytes,
                );
            }
            Err(source) => return Err(Error::Socket { addr, source }),
        };
        let configure =
            |what, r: io::Result<()>| r.map_err(|source| Error::Configure { addr, what, source });
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            configure("IPV6_V6ONLY off (dual-stack)", socket.set_only_v6(false))?;
        }
        socket.bind(&addr.into()).map_err(|source| Error::Bind {
            addr,
            hint: if source.kind() == io::ErrorKind::AddrInUse {
                " (another process, perhaps another quic-relay, holds this port: stop it or choose another --port)"
            } else if source.kind() == io::ErrorKind::PermissionDenied {
                " (ports below 1024 need CAP_NET_BIND_SERVICE: choose a port >= 1024)"
            } else {
                ""
            },
            source,
        })?;
        let rcv = set_buffer(&socket, buffer_bytes, true).map_err(|source| Error::Configure {
            addr,
            what: "SO_RCVBUF",
            source,
        })?;
        let snd = set_buffer(&socket, buffer_bytes, false).map_err(|source| Error::Configure {
            addr,
            what: "SO_SNDBUF",
            source,
        })?;
        if rcv < buffer_bytes {
            warn!(
                requested = buffer_bytes,
                granted = rcv,
                "receive buffer smaller than requested: bursts may be dropped; raise net.core.rmem_max"
            );
        }
        configure(
            "SO_RCVTIMEO",
            socket.set_read_timeout(Some(defaults::IDLE_WAKE)),
        )?;
        let socket: UdpSocket = socket.into();
        let local_addr = socket.local_addr().map_err(|source| Error::Configure {
            addr,
            what: "getsockname",
            source,
        })?;
        info!(%local_addr, recv_buffer = rcv, send_buffer = snd, "relay socket bound");
        let mut relay = Relay::new(cfg, Instant::now());
        relay.set_wall_clock(unix_now());
        Ok(Server {
            socket,
            local_addr,
            core: Arc::new(Mutex::new(Core::new(relay))),
            tcp: None,
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// [`Server::bind`], then with `tcp` [`Server::with_tcp`]: UDP and TCP on one port. Asked
    /// for port 0, the kernel picks a free *UDP* port, whose TCP twin may be held by any TCP
    /// socket (an outgoing connection's ephemeral port is enough): then it picks again, up to
    /// [`PORT_PICKS`] times, instead of failing a start that a retry would have made.
    pub fn bind_with_tcp(
        addr: SocketAddr,
        cfg: RelayConfig,
        buffer_bytes: usize,
        tcp: Option<TcpConfig>,
    ) -> Result<Self, Error> {
        let Some(tcp) = tcp else {
            return Self::bind(addr, cfg, buffer_bytes);
        };
        let mut picks = 1;
        loop {
            let server = Self::bind(addr, cfg.clone(), buffer_bytes)?;
            match server.with_tcp(tcp.clone()) {
                Err(Error::Tcp { ref source, .. })
                    if addr.port() == 0
                        && source.kind() == io::ErrorKind::AddrInUse
                        && picks < PORT_PICKS =>
                {
                    picks += 1;
                }
                done => return done,
            }
        }
    }

    /// Also accepts TCP on the same address and port (PROTOCOL.md §11), for peers whose
    /// networks block UDP. The listener runs on a thread of its own next to the UDP loop.
    pub fn with_tcp(mut self, cfg: TcpConfig) -> Result<Self, Error> {
        let addr = self.local_addr;
        let err = |what: &'static str| {
            move |source: io::Error| Error::Tcp {
                addr,
                what,
                hint: if source.kind() == io::ErrorKind::AddrInUse {
                    " (another process holds this TCP port: stop it, or run with --no-tcp)"
                } else {
                    ""
                },
                source,
            }
        };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(err("socket"))?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            socket.set_only_v6(false).map_err(err("IPV6_V6ONLY off"))?;
        }
        // A restarted relay must not wait out TIME_WAIT of its old connections.
        socket
            .set_reuse_address(true)
            .map_err(err("SO_REUSEADDR"))?;
        socket.bind(&addr.into()).map_err(err("bind"))?;
        socket.listen(1024).map_err(err("listen"))?;
        socket.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
        info!(%addr, "relay TCP listener bound");
        self.tcp = Some((socket.into(), cfg));
        Ok(self)
    }

    /// The address the relay listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The metrics this server publishes.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Runs the loop on this thread (and the TCP listener, if any, on a second one) until
    /// `shutdown` is set (noticed within [`defaults::IDLE_WAKE`]). Publishes final metrics
    /// before returning.
    pub fn run(mut self, shutdown: &AtomicBool) {
        let tcp = self.tcp.take();
        // Set when the UDP loop ends, however it ends: a panic there must not leave the scope
        // waiting for a TCP thread that only watches `shutdown`. The TCP thread is woken by
        // the notification rather than polling the flags: idle, it does not wake at all.
        let udp_done = (AtomicBool::new(false), tokio::sync::Notify::new());
        struct SetOnDrop<'a>(&'a (AtomicBool, tokio::sync::Notify));
        impl Drop for SetOnDrop<'_> {
            fn drop(&mut self) {
                self.0 .0.store(true, Ordering::Relaxed);
                // A permit is kept if the TCP thread is not waiting yet.
                self.0 .1.notify_one();
            }
        }
        std::thread::scope(|scope| {
            let udp_done = &udp_done;
            if let Some((listener, cfg)) = tcp {
                match self.socket.try_clone() {
                    Ok(udp) => {
                        let core = self.core.clone();
                        let metrics = self.metrics.clone();
                        let v6 = self.local_addr.is_ipv6();
                        let spawned = std::thread::Builder::new()
                            .name("quic-relay-tcp".into())
                            .spawn_scoped(scope, move || {
                                tcp::run(
                                    listener,
                                    core,
                                    udp.into(),
                                    v6,
                                    cfg,
                                    metrics,
                                    tcp::Stop {
                                        flags: [shutdown, &udp_done.0],
                                        wake: &udp_done.1,
                                    },
                                )
                            });
                        if let Err(e) = spawned {
                            warn!(error = %e, "cannot start the TCP thread; TCP disabled");
                        }
                    }
                    Err(e) => warn!(error = %e, "cannot share the UDP socket; TCP disabled"),
                }
            }
            let _done = SetOnDrop(udp_done);
            #[cfg(target_os = "linux")]
            linux::run(&mut self, shutdown);
            #[cfg(not(target_os = "linux"))]
            portable::run(&mut self, shutdown);
        });
        let core = tcp::lock(&self.core);
        self.metrics.publish(core.relay.stats());
        let s = core.relay.stats();
        info!(
            sessions = core.relay.session_count(),
            forwarded = s.forwarded_packets,
            "relay stopped"
        );
    }

    /// Drain mode from the start ([`ServerHandle::set_draining`]).
    pub fn set_draining(&self, on: bool) {
        crate::tcp::lock(&self.core).relay.set_draining(on);
    }

    /// Runs the loop on a thread of its own; the handle stops it.
    pub fn spawn(self) -> Result<ServerHandle, Error> {
        let shutdown = Arc::new(AtomicBool::new(false));
        let local_addr = self.local_addr;
        let metrics = self.metrics.clone();
        let core = self.core.clone();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let flag = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("quic-relay".into())
            .spawn(move || {
                // Dropped when the loop returns or unwinds: either way the owner hears of it.
                let _done = done_tx;
                self.run(&flag);
            })
            .map_err(Error::Thread)?;
        Ok(ServerHandle {
            shutdown,
            core,
            thread: Some(thread),
            local_addr,
            metrics,
            done: done_rx,
        })
    }

    /// Called after each batch: timers, the wall clock, and metrics, when they are due. The
    /// check is inlined into the loop, the work (ten times a second) is not.
    #[inline(always)]
    fn maybe_tick(metrics: &Metrics, now: Instant, core: &mut Core) {
        if now >= core.relay.poll_timeout() {
            Self::tick(metrics, now, core);
        }
    }

    #[inline(never)]
    fn tick(metrics: &Metrics, now: Instant, core: &mut Core) {
        core.relay.set_wall_clock(unix_now());
        core.relay.handle_timeout(now);
        metrics.publish(core.relay.stats());
    }
}

/// Owns a running relay thread. Dropping it stops the relay and waits for the thread.
#[derive(Debug)]
pub struct ServerHandle {
    shutdown: Arc<AtomicBool>,
    /// The session table, for drain mode.
    core: Arc<Mutex<Core>>,
    thread: Option<JoinHandle<()>>,
    local_addr: SocketAddr,
    metrics: Arc<Metrics>,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl ServerHandle {
    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Drain mode on or off (PROTOCOL.md §5.2): while on, registrations for new sessions are
    /// refused with `ERR moved`, and existing sessions go on until they end.
    pub fn set_draining(&self, on: bool) {
        crate::tcp::lock(&self.core).relay.set_draining(on);
        info!(draining = on, "drain mode");
    }

    /// Whether the relay is draining.
    pub fn draining(&self) -> bool {
        crate::tcp::lock(&self.core).relay.draining()
    }

    /// Completes when the relay thread has ended (after [`ServerHandle::shutdown`], or by a
    /// panic, which should never happen and is worth exiting for).
    pub async fn exited(&mut self) {
        let _ = (&mut self.done).await;
    }

    /// Stops the relay and waits for its thread. Returns `false` if the thread panicked.
    pub fn shutdown(mut self) -> bool {
        self.stop()
    }

    fn stop(&mut self) -> bool {
        self.shutdown.store(true, Ordering::Relaxed);
        self.thread.take().is_none_or(|t| t.join().is_ok())
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(target_os = "linux")]
mod linux;
#[cfg(not(target_os = "linux"))]
mod portable;
