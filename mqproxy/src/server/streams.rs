//! What a client's streams ask for: TCP CONNECT, UDP sessions, striped TCP flows and subflows.

use super::*;

thread_local! {
    /// Receive buffer for UDP sockets: one per thread instead of 64 KiB per session.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; proto::MAX_PACKET]);
}

/// What a stream task needs.
pub(super) struct StreamCtx {
    pub(super) ctx: Arc<ServerState>,
    pub(super) bundle: Arc<Bundle>,
    /// The path the stream arrived on.
    pub(super) index: usize,
    /// The address of that path's client, for the per-client UDP session cap.
    pub(super) client: IpAddr,
}

impl StreamCtx {
    pub(super) async fn serve(self, mut send: SendStream, recv: RecvStream) {
        let mut r = FrameReader::new(recv);
        let ty = match tokio::time::timeout(STREAM_HEADER_TIMEOUT, r.stream_type()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                debug!(error = %crate::logging::Escaped(&e), "stream ended before its type");
                return;
            }
            Err(_) => {
                debug!("stream type timed out");
                let _ = send.reset(VarInt::from_u32(0));
                return;
            }
        };
        let res = match ty {
            proto::STREAM_CONNECT_TCP => self.tcp_connect(send, r).await,
            proto::STREAM_UDP_SESSION => self.udp_session(send, r).await,
            proto::STREAM_MP_CONNECT if self.bundle.id.is_some() => self.mp_connect(send, r).await,
            proto::STREAM_SUBFLOW if self.bundle.id.is_some() => self.subflow(send, r).await,
            other => {
                debug!(stream_type = other, "unknown stream type; resetting");
                let _ = send.reset(VarInt::from_u32(0));
                let _ = r.recv.stop(VarInt::from_u32(0));
                Ok(())
            }
        };
        if let Err(e) = res {
            debug!(error = %crate::logging::Escaped(&e), "stream failed");
        }
    }

    pub(super) async fn tcp_connect(
        &self,
        mut send: SendStream,
        mut r: FrameReader,
    ) -> Result<(), TransportError> {
        let addr = first_frame(
            &mut send,
            &mut r,
            "CONNECT_REQUEST",
            "first frame of a CONNECT stream",
            |f| match f {
                Frame::ConnectRequest { addr } => Some(addr),
                _ => None,
            },
        )
        .await?;
        inc(&self.ctx.metrics.tcp_streams);
        if let Some(version) = crate::uot::singbox::magic_version(&addr) {
            let policy = crate::uot::proxy::Policy {
                allow_private: self.ctx.cfg.allow_private,
                idle_timeout: self.ctx.cfg.udp_idle_timeout,
            };
            return crate::uot::proxy::serve_mqproxy_stream(version, send, r, policy).await;
        }
        let (status, tcp) = match self.connect_target(&addr).await {
            Ok(tcp) => (ConnectStatus::Ok, Some(tcp)),
            Err(status) => (status, None),
        };
        let remote = tcp.as_ref().and_then(|t| t.peer_addr().ok());
        debug!(%addr, ?status, "CONNECT");
        transport::write_frame(&mut send, None, &Frame::ConnectResponse { status, remote }).await?;
        let Some(tcp) = tcp else {
            let _ = send.finish();
            return Ok(());
        };
        let (recv, leftover) = r.into_parts();
        let (up, down) = transport::splice(tcp, send, recv, leftover).await;
        debug!(%addr, bytes_to_target = down, bytes_from_target = up, "CONNECT done");
        Ok(())
    }

    pub(super) async fn connect_target(
        &self,
        addr: &TargetAddr,
    ) -> Result<TcpStream, ConnectStatus> {
        let addrs = self.resolve(addr).await.map_err(|s| match s {
            UdpStatus::PolicyDenied => ConnectStatus::NotAllowed,
            _ => ConnectStatus::HostUnreachable,
        })?;
        let mut last = ConnectStatus::HostUnreachable;
        for a in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(a)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => {
                    last = match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => ConnectStatus::Refused,
                        std::io::ErrorKind::NetworkUnreachable => ConnectStatus::NetworkUnreachable,
                        std::io::ErrorKind::HostUnreachable => ConnectStatus::HostUnreachable,
                        std::io::ErrorKind::TimedOut => ConnectStatus::TtlExpired,
                        _ => ConnectStatus::GeneralFailure,
                    }
                }
                Err(_) => last = ConnectStatus::TtlExpired,
            }
        }
        Err(last)
    }

    /// Resolves a destination and applies the policy before any socket exists.
    pub(super) async fn resolve(&self, addr: &TargetAddr) -> Result<Vec<SocketAddr>, UdpStatus> {
        let all: Vec<SocketAddr> = match addr {
            TargetAddr::Ip(a) => vec![*a],
            TargetAddr::Domain(host, port) => {
                match tokio::time::timeout(
                    DNS_TIMEOUT,
                    tokio::net::lookup_host((host.as_str(), *port)),
                )
                .await
                {
                    Ok(Ok(it)) => it.collect(),
                    _ => return Err(UdpStatus::DnsFailed),
                }
            }
        };
        if all.is_empty() {
            return Err(UdpStatus::DnsFailed);
        }
        let allowed = crate::policy::filter(all, self.ctx.cfg.allow_private);
        if allowed.is_empty() {
            debug!(%addr, "destination refused by policy");
            return Err(UdpStatus::PolicyDenied);
        }
        Ok(allowed)
    }

    pub(super) async fn udp_session(
        &self,
        mut send: SendStream,
        mut r: FrameReader,
    ) -> Result<(), TransportError> {
        let m = &self.ctx.metrics;
        let open = |f| match f {
            Frame::UdpOpen {
                session_id,
                addr,
                idle_timeout_ms,
                flags,
            } => Some((session_id, addr, idle_timeout_ms, flags)),
            _ => None,
        };
        let (session_id, addr, requested_ms, flags) = first_frame(
            &mut send,
            &mut r,
            "UDP_SESSION_OPEN",
            "first frame of a UDP session stream",
            open,
        )
        .await?;
        let limit_ms = self.ctx.cfg.udp_idle_timeout.as_millis() as u64;
        let idle_ms = if requested_ms == 0 {
            limit_ms
        } else {
            requested_ms.min(limit_ms)
        };
        if flags & UDP_FLAG_ATTACH != 0 && self.bundle.id.is_some() {
            // The session's signalling stream died with its path: hand this one to the
            // session task. A session that has meanwhile ended is opened afresh below.
            let tx = locked(&self.bundle.attach).get(&session_id).cloned();
            if let Some(tx) = tx {
                debug!(
                    session = session_id,
                    path = self.index,
                    "UDP session re-attached"
                );
                let _ = tx.send((send, r)).await;
                return Ok(());
            }
        }
        let opened = self.open_socket(session_id, &addr).await;
        let (status, socket, remote) = match opened {
            Ok((s, sender, remote, slot)) => (UdpStatus::Ok, Some((s, sender, slot)), Some(remote)),
            Err(status) => (status, None, None),
        };
        let resp = Frame::UdpResp {
            session_id,
            status,
            idle_timeout_ms: idle_ms,
            remote,
        };
        let Some((socket, sender, _slot)) = socket else {
            inc(&m.udp_sessions_refused);
            if status == UdpStatus::SessionLimit {
                inc(&m.udp_sessions_refused_limit);
            }
            debug!(session = session_id, %addr, ?status, "UDP session refused");
            transport::write_frame(&mut send, None, &resp).await?;
            let _ = send.finish();
            return Ok(());
        };
        let session = match self.bundle.table.insert(session_id, socket, sender) {
            Ok(s) => s,
            Err(status) => {
                inc(&m.udp_sessions_refused);
                if status == UdpStatus::SessionLimit {
                    inc(&m.udp_sessions_refused_limit);
                }
                let resp = Frame::UdpResp {
                    session_id,
                    status,
                    idle_timeout_ms: idle_ms,
                    remote: None,
                };
                transport::write_frame(&mut send, None, &resp).await?;
                let _ = send.finish();
                return Ok(());
            }
        };
        // From here the guard undoes the registration however the task ends (including abort).
        let (attach_tx, mut attach_rx) = mpsc::channel(1);
        locked(&self.bundle.attach).insert(session_id, attach_tx);
        let _guard = SessionGuard {
            id: session_id,
            bundle: self.bundle.clone(),
            metrics: m.clone(),
        };
        inc(&m.udp_sessions_open);
        inc(&m.udp_sessions_total);
        debug!(session = session_id, %addr, idle_ms, "UDP session open");
        transport::write_frame(&mut send, None, &resp).await?;
        self.bundle.broadcast(|| SessionEvent::Opened(session_id));
        let idle = Duration::from_millis(idle_ms);
        let mut packet_id: u16 = 0;
        let multipath = self.bundle.id.is_some();
        let mut stream = Some((send, r));
        let reason = loop {
            let deadline = session.activity.idle_deadline(idle);
            tokio::select! {
                f = next_frame(&mut stream) => match f {
                    Ok(Some(_)) => continue,
                    // The stream died with its path: a multipath session lives on and waits
                    // for the client to re-attach it over another path.
                    Err(e) if multipath && connection_lost(&e) => {
                        debug!(session = session_id, "UDP session lost its signalling path");
                        stream = None;
                    }
                    // The client finished or reset the stream: the session is over.
                    Ok(None) | Err(_) => break None,
                },
                Some((mut s2, r2)) = attach_rx.recv() => {
                    let resp = Frame::UdpResp { session_id, status: UdpStatus::Ok, idle_timeout_ms: idle_ms, remote };
                    if transport::write_frame(&mut s2, None, &resp).await.is_ok() {
                        stream = Some((s2, r2));
                    }
                }
                ready = session.socket.readable() => {
                    if let Err(e) = ready {
                        debug!(error = %e, "UDP socket failed");
                        break Some(CloseReason::SocketError);
                    }
                    self.forward_replies(session_id, &session, &mut packet_id).await;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if Instant::now() >= session.activity.idle_deadline(idle) {
                        break Some(CloseReason::Idle);
                    }
                }
            }
        };
        debug!(session = session_id, ?reason, "UDP session closed");
        if let (Some(reason), Some((mut send, _))) = (reason, stream) {
            let _ =
                transport::write_frame(&mut send, None, &Frame::UdpClose { session_id, reason })
                    .await;
            let _ = send.finish();
        }
        Ok(())
    }

    /// A striped TCP flow: MP_CONNECT, CONNECT_RESPONSE, then records on this stream and on
    /// SUBFLOW streams the client opens on its other paths.
    pub(super) async fn mp_connect(
        &self,
        mut send: SendStream,
        mut r: FrameReader,
    ) -> Result<(), TransportError> {
        let mp = |f| match f {
            Frame::MpConnect { flow_id, addr } => Some((flow_id, addr)),
            _ => None,
        };
        let (flow_id, addr) = first_frame(
            &mut send,
            &mut r,
            "MP_CONNECT",
            "first frame of an MP_CONNECT stream",
            mp,
        )
        .await?;
        inc(&self.ctx.metrics.tcp_flows);
        let (mut status, tcp) = match self.connect_target(&addr).await {
            Ok(tcp) => (ConnectStatus::Ok, Some(tcp)),
            Err(status) => (status, None),
        };
        let (more_tx, more_rx) = mpsc::channel(MAX_PATHS);
        if tcp.is_some() {
            let mut flows = locked(&self.bundle.flows);
            if flows.len() >= MAX_FLOWS || flows.contains_key(&flow_id) {
                status = ConnectStatus::GeneralFailure;
            } else {
                flows.insert(flow_id, more_tx);
            }
        }
        let remote = tcp.as_ref().and_then(|t| t.peer_addr().ok());
        debug!(%addr, flow = flow_id, ?status, "MP_CONNECT");
        transport::write_frame(&mut send, None, &Frame::ConnectResponse { status, remote }).await?;
        let (Some(tcp), ConnectStatus::Ok) = (tcp, status) else {
            let _ = send.finish();
            return Ok(());
        };
        struct Unregister<'a>(&'a Bundle, u64);
        impl Drop for Unregister<'_> {
            fn drop(&mut self) {
                locked(&self.0.flows).remove(&self.1);
            }
        }
        let _unregister = Unregister(&self.bundle, flow_id);
        let first = Subflow::new(self.index, send, r);
        match multipath::run_flow(tcp, self.bundle.paths.clone(), first, more_rx, Bytes::new())
            .await
        {
            Ok((up, down)) => {
                debug!(%addr, flow = flow_id, bytes_from_target = up, bytes_to_target = down, "flow done")
            }
            Err(e @ (FlowError::Tcp(_) | FlowError::PeerReset)) => {
                debug!(%addr, flow = flow_id, error = %crate::logging::Escaped(&e), "flow ended by one side")
            }
            Err(e) => {
                warn!(%addr, flow = flow_id, error = %crate::logging::Escaped(&e), "flow failed; its TCP connection was reset")
            }
        }
        Ok(())
    }

    /// A further subflow of a striped flow, on the path this stream arrived on.
    pub(super) async fn subflow(
        &self,
        send: SendStream,
        mut r: FrameReader,
    ) -> Result<(), TransportError> {
        let flow_id = match tokio::time::timeout(STREAM_HEADER_TIMEOUT, r.frame()).await {
            Ok(Ok(Some(Frame::Subflow { flow_id }))) => flow_id,
            Ok(Err(e)) => return Err(e),
            _ => return Err(TransportError::Timeout("SUBFLOW")),
        };
        let tx = locked(&self.bundle.flows).get(&flow_id).cloned();
        let sub = Subflow::new(self.index, send, r);
        match tx {
            Some(tx) => {
                let _ = tx.send(sub).await;
            }
            None => {
                // Finished, not reset: a subflow that arrives just after its flow completed
                // must not look like an abort to the client.
                debug!(
                    flow = flow_id,
                    "SUBFLOW for an unknown (ended) flow; finishing it"
                );
                let mut sub = sub;
                let _ = sub.send.finish();
                let _ = sub.recv.stop(VarInt::from_u32(0));
            }
        }
        Ok(())
    }

    /// Forwards up to [`UDP_BATCH`] waiting packets from the destination to the client, each
    /// on the path the scheduler picks.
    pub(super) async fn forward_replies(
        &self,
        id: u32,
        session: &crate::udp::Session,
        packet_id: &mut u16,
    ) {
        let m = &self.ctx.metrics;
        let mut buf = SCRATCH.with(|b| std::mem::take(&mut *b.borrow_mut()));
        if buf.len() < proto::MAX_PACKET {
            buf = vec![0; proto::MAX_PACKET];
        }
        for _ in 0..UDP_BATCH {
            let n = match session.socket.try_recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // ICMP errors (port unreachable) surface on connected sockets: not fatal.
                Err(e) => {
                    trace!(error = %e, "UDP receive error");
                    continue;
                }
            };
            let pid = *packet_id;
            *packet_id = packet_id.wrapping_add(1);
            session.activity.touch(Instant::now());
            match self.bundle.paths.send_packet(id, pid, &buf[..n]).await {
                Ok(()) => inc(&m.udp_packets_in),
                Err(why) => {
                    inc(&m.datagrams_dropped);
                    trace!(why, "reply not relayed");
                }
            }
        }
        SCRATCH.with(|b| *b.borrow_mut() = buf);
    }

    pub(super) async fn open_socket(
        &self,
        id: u32,
        addr: &TargetAddr,
    ) -> Result<
        (
            Arc<UdpSocket>,
            std::net::UdpSocket,
            SocketAddr,
            crate::udp::BudgetSlot,
        ),
        UdpStatus,
    > {
        if !self.ctx.cfg.udp_enabled {
            return Err(UdpStatus::UdpDisabled);
        }
        self.bundle.table.precheck(id)?;
        // The process-wide and per-client caps, before any descriptor is taken.
        let slot = self.ctx.udp_budget.acquire(self.client).map_err(|why| {
            debug!(session = id, client = %self.client, ?why, "UDP session refused: session cap reached");
            UdpStatus::SessionLimit
        })?;
        // Policy and DNS first: no socket exists for a destination that is refused.
        let target = self.resolve(addr).await?[0];
        let bind: SocketAddr = if target.is_ipv4() {
            (IpAddr::from([0u8; 4]), 0).into()
        } else {
            (IpAddr::from([0u16; 8]), 0).into()
        };
        let failed = |e: std::io::Error| {
            debug!(error = %e, %target, "UDP socket setup failed");
            UdpStatus::SocketFailed
        };
        let sock = std::net::UdpSocket::bind(bind).map_err(failed)?;
        sock.connect(target).map_err(failed)?;
        sock.set_nonblocking(true).map_err(failed)?;
        let sender = sock.try_clone().map_err(failed)?;
        let sock = UdpSocket::from_std(sock).map_err(failed)?;
        Ok((Arc::new(sock), sender, target, slot))
    }
}

/// Removes a session from its bundle and metrics when its task ends.
pub(super) struct SessionGuard {
    pub(super) id: u32,
    pub(super) bundle: Arc<Bundle>,
    pub(super) metrics: Arc<ServerCounters>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.bundle.table.remove(self.id);
        locked(&self.bundle.attach).remove(&self.id);
        dec(&self.metrics.udp_sessions_open);
        let id = self.id;
        self.bundle.broadcast(|| SessionEvent::Closed(id));
    }
}

/// The next frame of an optional signalling stream (pending without one).
pub(super) async fn next_frame(
    stream: &mut Option<(SendStream, FrameReader)>,
) -> Result<Option<Frame>, TransportError> {
    match stream {
        Some((_, r)) => r.frame().await,
        None => std::future::pending().await,
    }
}

/// Whether a stream error means the connection (the path) is gone, not the stream.
pub(super) fn connection_lost(e: &TransportError) -> bool {
    matches!(
        e,
        TransportError::Connection(_)
            | TransportError::Read(quinn::ReadError::ConnectionLost(_))
            | TransportError::Write(quinn::WriteError::ConnectionLost(_))
    )
}

/// The first frame of a stream, within [`STREAM_HEADER_TIMEOUT`]: what `pick` takes from the
/// one frame type (`name`) that may open a stream of this kind. Any other frame resets the
/// stream, and the error says what was wrong (`wrong`): the peer does not speak the protocol.
async fn first_frame<T>(
    send: &mut SendStream,
    r: &mut FrameReader,
    name: &'static str,
    wrong: &'static str,
    pick: impl FnOnce(Frame) -> Option<T>,
) -> Result<T, TransportError> {
    match tokio::time::timeout(STREAM_HEADER_TIMEOUT, r.frame()).await {
        Err(_) => Err(TransportError::Timeout(name)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(f)) => match f.and_then(pick) {
            Some(t) => Ok(t),
            None => {
                let _ = send.reset(VarInt::from_u32(0));
                Err(TransportError::Decode(proto::DecodeError::Invalid(wrong)))
            }
        },
    }
}
