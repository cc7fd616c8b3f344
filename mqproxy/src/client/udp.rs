//! SOCKS5 UDP ASSOCIATE: each association's destinations as UDP sessions over DATAGRAMs.

use super::*;

/// A non-blocking std clone of a tokio UDP socket (same kernel socket).
pub(super) fn sock_clone(s: &UdpSocket) -> std::io::Result<std::net::UdpSocket> {
    let fd = socket2::SockRef::from(s).try_clone()?;
    Ok(fd.into())
}

/// Removes a session's route (and its gauge) when the session task ends.
pub(super) struct RouteGuard {
    pub(super) conn: Arc<Bundle>,
    pub(super) id: u32,
    pub(super) metrics: Arc<ClientCounters>,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        self.conn.routes().remove(&self.id);
        self.metrics
            .udp_sessions_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// One destination of an association.
pub(super) struct Entry {
    pub(super) id: u32,
    pub(super) conn: Arc<Bundle>,
    pub(super) packet_id: u16,
    pub(super) refused_until: Option<Instant>,
}

/// How a session task ended.
pub(super) struct SessionEnd {
    pub(super) id: u32,
    pub(super) dest: TargetAddr,
    pub(super) refused: bool,
}

pub(super) async fn udp_associate<D: Dialer>(
    mut tcp: TcpStream,
    peer: SocketAddr,
    hint: TargetAddr,
    link: &Link<D>,
) -> Result<(), IngressError> {
    let fail = |code| socks::encode_reply(code, socks::UNSPECIFIED);
    let conn = match link.get().await {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "no server connection for UDP ASSOCIATE");
            tcp.write_all(&fail(socks::REP_GENERAL_FAILURE)).await?;
            return Ok(());
        }
    };
    if !conn.udp() {
        debug!("server relays no UDP; UDP ASSOCIATE refused");
        tcp.write_all(&fail(socks::REP_COMMAND_NOT_SUPPORTED))
            .await?;
        return Ok(());
    }
    // Bind where the client reached us, so BND.ADDR is an address it can send to.
    let local_ip = tcp.local_addr()?.ip();
    let sock = match UdpSocket::bind((local_ip, 0)).await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(error = %e, "binding the UDP relay socket failed");
            tcp.write_all(&fail(socks::REP_GENERAL_FAILURE)).await?;
            return Ok(());
        }
    };
    let bound = sock.local_addr()?;
    let sender = Arc::new(sock_clone(&sock)?);
    tcp.write_all(&socks::encode_reply(socks::REP_OK, bound))
        .await?;
    // Only the TCP client's IP may use the association; a port given in the request
    // pins the port too. The first matching datagram then locks the exact address.
    let expected_port = match hint {
        TargetAddr::Ip(a) if a.port() != 0 => Some(a.port()),
        _ => None,
    };
    debug!(%bound, "UDP association open");
    link.metrics
        .associations_open
        .fetch_add(1, Ordering::Relaxed);
    let mut a = Association {
        link,
        sock,
        sender,
        peer_ip: peer.ip(),
        expected_port,
        client: Arc::new(OnceLock::new()),
        sessions: HashMap::new(),
        tasks: JoinSet::new(),
        conn,
    };
    let r = a.run(&mut tcp).await;
    link.metrics
        .associations_open
        .fetch_sub(1, Ordering::Relaxed);
    debug!(sessions = a.sessions.len(), "UDP association closed");
    r
}

pub(super) struct Association<'a, D> {
    pub(super) link: &'a Link<D>,
    pub(super) sock: Arc<UdpSocket>,
    pub(super) sender: Arc<std::net::UdpSocket>,
    pub(super) peer_ip: std::net::IpAddr,
    pub(super) expected_port: Option<u16>,
    pub(super) client: Arc<OnceLock<SocketAddr>>,
    pub(super) sessions: HashMap<TargetAddr, Entry>,
    /// Session tasks: dropping the association aborts them, which finishes their streams and
    /// so tears the server's sessions down.
    pub(super) tasks: JoinSet<SessionEnd>,
    pub(super) conn: Arc<Bundle>,
}

impl<D: Dialer> Association<'_, D> {
    pub(super) async fn run(&mut self, tcp: &mut TcpStream) -> Result<(), IngressError> {
        let mut buf = vec![0u8; proto::MAX_PACKET + 512];
        let mut ctl = [0u8; 64];
        loop {
            tokio::select! {
                // RFC 1928 §7: the association ends when its TCP connection does.
                r = tcp.read(&mut ctl) => match r {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => continue,
                },
                r = self.sock.recv_from(&mut buf) => {
                    let (n, src) = r?;
                    self.on_packet(&buf[..n], src).await;
                }
                Some(end) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    let Ok(end) = end else { continue };
                    if let Some(e) = self.sessions.get_mut(&end.dest) {
                        if e.id == end.id {
                            if end.refused {
                                e.refused_until = Some(Instant::now() + REFUSED_HOLD);
                            } else {
                                self.sessions.remove(&end.dest);
                            }
                        }
                    }
                }
            }
        }
    }

    pub(super) fn drop_packet(&self, why: &'static str) {
        inc(&self.link.metrics.udp_dropped);
        trace!(why, "UDP packet dropped");
    }

    pub(super) async fn on_packet(&mut self, d: &[u8], src: SocketAddr) {
        if src.ip() != self.peer_ip || self.expected_port.is_some_and(|p| p != src.port()) {
            return self.drop_packet("foreign source");
        }
        if *self.client.get_or_init(|| src) != src {
            return self.drop_packet("not the locked client address");
        }
        let pkt = match socks::parse_udp(d) {
            Ok(p) => p,
            Err(_) => return self.drop_packet("bad SOCKS UDP header"),
        };
        if pkt.frag != 0 {
            return self.drop_packet("FRAG != 0");
        }
        let now = Instant::now();
        let stale = match self.sessions.get(&pkt.addr) {
            None => true,
            Some(e) => !e.conn.alive() || e.refused_until.is_some_and(|t| now >= t),
        };
        if stale {
            self.sessions.remove(&pkt.addr);
            if !self.open_session(&pkt.addr).await {
                return;
            }
        }
        let e = self
            .sessions
            .get_mut(&pkt.addr)
            .expect("inserted above or present");
        if e.refused_until.is_some() {
            return self.drop_packet("destination refused by the server");
        }
        let pid = e.packet_id;
        e.packet_id = e.packet_id.wrapping_add(1);
        if let Err(why) = e.conn.paths.send_packet(e.id, pid, pkt.payload).await {
            self.drop_packet(why);
        }
    }

    pub(super) async fn open_session(&mut self, dest: &TargetAddr) -> bool {
        if self.sessions.len() >= MAX_SESSIONS_PER_ASSOCIATION {
            self.drop_packet("session limit");
            return false;
        }
        if !self.conn.alive() {
            match self.link.get().await {
                Ok(c) if c.udp() => self.conn = c,
                _ => {
                    self.drop_packet("no server connection");
                    return false;
                }
            }
        }
        let conn = self.conn.clone();
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let header = socks::encode_udp_header(dest);
        conn.routes().insert(
            id,
            Route {
                socket: self.sender.clone(),
                client: self.client.clone(),
                header: header.freeze(),
                dup: Arc::new(Mutex::new(DupFilter::default())),
            },
        );
        let m = &self.link.metrics;
        m.udp_sessions_open.fetch_add(1, Ordering::Relaxed);
        inc(&m.udp_sessions_total);
        let guard = RouteGuard {
            conn: conn.clone(),
            id,
            metrics: m.clone(),
        };
        let idle_ms = self
            .link
            .cfg
            .udp_idle_timeout
            .map_or(0, |d| d.as_millis() as u64);
        let dest2 = dest.clone();
        self.tasks.spawn(
            async move {
                let refused = run_session(guard, dest2.clone(), idle_ms).await;
                SessionEnd {
                    id,
                    dest: dest2,
                    refused,
                }
            }
            .in_current_span(),
        );
        self.sessions.insert(
            dest.clone(),
            Entry {
                id,
                conn,
                packet_id: 0,
                refused_until: None,
            },
        );
        true
    }
}

/// A UDP session's signalling stream: OPEN, RESP, then held open until either side ends it.
/// When the stream dies with its path (multipath), the session is re-attached over another
/// path (same id, flag ATTACH): the server keeps its socket, so the destination sees no change.
/// Returns whether the server refused the session.
pub(super) async fn run_session(guard: RouteGuard, dest: TargetAddr, idle_ms: u64) -> bool {
    let id = guard.id;
    let c = guard.conn.clone();
    let mut flags = 0;
    let mut attempts = 0u32;
    loop {
        let Some(path) = c.paths.wait_best(CONNECT_WAIT).await else {
            debug!(session = id, "no path to (re-)open the UDP session on");
            return false;
        };
        let path_lost = || c.multipath && path.conn.close_reason().is_some();
        let open = Frame::UdpOpen {
            session_id: id,
            flags,
            addr: dest.clone(),
            idle_timeout_ms: idle_ms,
        };
        let start = async {
            let (mut send, recv) = path.conn.open_bi().await.map_err(TransportError::from)?;
            transport::write_frame(&mut send, Some(proto::STREAM_UDP_SESSION), &open).await?;
            Ok::<_, TransportError>((send, FrameReader::new(recv)))
        };
        let retry = |attempts: &mut u32| {
            *attempts += 1;
            *attempts <= 5
        };
        let (_send, mut r) = match start.await {
            Ok(x) => x,
            Err(e) if path_lost() && retry(&mut attempts) => {
                debug!(session = id, error = %crate::logging::Escaped(&e), "path lost while opening the UDP session; retrying");
                flags = UDP_FLAG_ATTACH;
                continue;
            }
            Err(e) => {
                debug!(session = id, error = %crate::logging::Escaped(&e), "opening UDP session failed");
                return false;
            }
        };
        match r.frame().await {
            Ok(Some(Frame::UdpResp {
                status: UdpStatus::Ok,
                idle_timeout_ms,
                remote,
                ..
            })) => {
                attempts = 0;
                debug!(session = id, %dest, ?remote, idle_timeout_ms, path = path.index, attach = flags != 0, "UDP session open")
            }
            Ok(Some(Frame::UdpResp { status, .. })) => {
                debug!(session = id, %dest, ?status, "UDP session refused by the server");
                return true;
            }
            _ if path_lost() && retry(&mut attempts) => {
                flags = UDP_FLAG_ATTACH;
                continue;
            }
            other => {
                debug!(session = id, ?other, "UDP session stream ended before RESP");
                return false;
            }
        }
        // Wait for UDP_CLOSE and the end of the stream. `_send` stays open until then: dropping
        // it would finish the stream, which the server reads as the end of the session.
        loop {
            match r.frame().await {
                Ok(Some(Frame::UdpClose { reason, .. })) => {
                    debug!(session = id, ?reason, "UDP session closed by the server");
                }
                Ok(Some(_)) => {}
                Err(_) if path_lost() => {
                    debug!(
                        session = id,
                        path = path.index,
                        "UDP session lost its signalling path; re-attaching"
                    );
                    flags = UDP_FLAG_ATTACH;
                    break;
                }
                Ok(None) | Err(_) => return false,
            }
        }
    }
}
