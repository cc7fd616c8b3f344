//! The SOCKS5 and HTTP CONNECT listeners' side: handshakes, then TCP CONNECT spliced onto a
//! stream or striped over the paths.

use super::*;

/// Accepts on an optional listener (pending forever without one); cancel-safe.
pub(super) async fn accept_opt(
    l: Option<&TcpListener>,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Ingress errors (logged at debug: they concern one SOCKS client).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngressError {
    /// Socket IO.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Protocol violation by the SOCKS/HTTP client.
    #[error(transparent)]
    Socks(#[from] SocksError),
    /// The client was too slow.
    #[error("handshake timed out")]
    Timeout,
    /// The client closed mid-handshake.
    #[error("client closed during the handshake")]
    Closed,
    /// The handshake message is too long.
    #[error("handshake message too long")]
    TooLong,
    /// Wrong SOCKS username or password.
    #[error("wrong SOCKS username or password")]
    BadCredentials,
}

/// Reads from `tcp` into `buf` until `parse` yields a message; consumes its bytes.
pub(super) async fn read_msg<T>(
    tcp: &mut TcpStream,
    buf: &mut BytesMut,
    limit: usize,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, SocksError>,
) -> Result<T, IngressError> {
    let fut = async {
        loop {
            if let Some((v, n)) = parse(buf)? {
                let _ = buf.split_to(n);
                return Ok(v);
            }
            if buf.len() >= limit {
                return Err(IngressError::TooLong);
            }
            if tcp.read_buf(buf).await? == 0 {
                return Err(IngressError::Closed);
            }
        }
    };
    tokio::time::timeout(INGRESS_HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| IngressError::Timeout)?
}

pub(super) async fn serve_socks<D: Dialer>(
    mut tcp: TcpStream,
    peer: SocketAddr,
    link: &Link<D>,
) -> Result<(), IngressError> {
    let mut buf = BytesMut::with_capacity(512);
    let methods = read_msg(&mut tcp, &mut buf, MAX_HANDSHAKE, socks::parse_greeting).await?;
    let wanted = if link.cfg.socks_auth.is_some() {
        socks::METHOD_USERPASS
    } else {
        socks::METHOD_NONE
    };
    if !methods.contains(&wanted) {
        tcp.write_all(&[socks::VERSION, socks::METHOD_UNACCEPTABLE])
            .await?;
        return Ok(());
    }
    tcp.write_all(&[socks::VERSION, wanted]).await?;
    if let Some((user, pass)) = &link.cfg.socks_auth {
        let (u, p) = read_msg(&mut tcp, &mut buf, MAX_HANDSHAKE, socks::parse_userpass).await?;
        let ok = &u == user && &p == pass;
        tcp.write_all(&[0x01, if ok { 0 } else { 1 }]).await?;
        if !ok {
            return Err(IngressError::BadCredentials);
        }
    }
    let req = match read_msg(&mut tcp, &mut buf, MAX_HANDSHAKE, socks::parse_request).await {
        Ok(r) => r,
        Err(IngressError::Socks(SocksError::AddressType(t))) => {
            let reply =
                socks::encode_reply(socks::REP_ADDRESS_TYPE_NOT_SUPPORTED, socks::UNSPECIFIED);
            tcp.write_all(&reply).await?;
            return Err(SocksError::AddressType(t).into());
        }
        Err(e) => return Err(e),
    };
    match req.command {
        socks::CMD_CONNECT => {
            inc(&link.metrics.tcp_connects);
            match open_connect(link, &req.addr).await {
                Ok(opened) => {
                    tcp.write_all(&socks::encode_reply(socks::REP_OK, socks::UNSPECIFIED))
                        .await?;
                    splice_with(tcp, buf, opened).await
                }
                Err(status) => {
                    debug!(addr = %req.addr, ?status, "CONNECT refused");
                    tcp.write_all(&socks::encode_reply(
                        status.socks_code(),
                        socks::UNSPECIFIED,
                    ))
                    .await?;
                    Ok(())
                }
            }
        }
        socks::CMD_UDP_ASSOCIATE => udp_associate(tcp, peer, req.addr, link).await,
        _ => {
            let reply = socks::encode_reply(socks::REP_COMMAND_NOT_SUPPORTED, socks::UNSPECIFIED);
            tcp.write_all(&reply).await?;
            Ok(())
        }
    }
}

/// A server-side TCP connection, ready to carry bytes.
pub(super) enum Opened {
    /// Single path: one CONNECT stream.
    Stream(SendStream, FrameReader),
    /// Multipath: a striped flow and the subflow it was opened on.
    Flow(Arc<Bundle>, u64, Subflow),
}

/// Sends bytes the client sent after its request, then splices (or runs the striped flow).
pub(super) async fn splice_with(
    tcp: TcpStream,
    early: BytesMut,
    opened: Opened,
) -> Result<(), IngressError> {
    let (mut send, reader) = match opened {
        Opened::Stream(send, reader) => (send, reader),
        Opened::Flow(c, flow_id, first) => {
            run_client_flow(tcp, c, flow_id, first, early.freeze()).await;
            return Ok(());
        }
    };
    if !early.is_empty() && send.write_all(&early).await.is_err() {
        return Ok(());
    }
    let (recv, leftover) = reader.into_parts();
    let (up, down) = transport::splice(tcp, send, recv, leftover).await;
    debug!(bytes_up = up, bytes_down = down, "CONNECT done");
    Ok(())
}

/// Carries one TCP connection as a striped flow: opens a SUBFLOW on every other path, now
/// and whenever a path (re)connects, while the flow runs.
pub(super) async fn run_client_flow(
    tcp: TcpStream,
    c: Arc<Bundle>,
    flow_id: u64,
    first: Subflow,
    early: Bytes,
) {
    let (more_tx, more_rx) = mpsc::channel(MAX_PATHS);
    let first_id = c.paths.get(first.path).map(|p| p.generation);
    let opener = AbortOnDrop(tokio::spawn(
        open_subflows(c.clone(), flow_id, first.path, first_id, more_tx).in_current_span(),
    ));
    match multipath::run_flow(tcp, c.paths.clone(), first, more_rx, early).await {
        Ok((up, down)) => debug!(
            flow = flow_id,
            bytes_up = up,
            bytes_down = down,
            "flow done"
        ),
        // The application ending its side is ordinary; the proxy giving up on a flow is not.
        Err(e @ (FlowError::Tcp(_) | FlowError::PeerReset)) => {
            debug!(flow = flow_id, error = %crate::logging::Escaped(&e), "flow ended by one side")
        }
        Err(e) => {
            warn!(flow = flow_id, error = %crate::logging::Escaped(&e), "flow failed; its TCP connection was reset")
        }
    }
    drop(opener);
}

pub(super) async fn open_subflows(
    c: Arc<Bundle>,
    flow_id: u64,
    first_path: usize,
    first_id: Option<u64>,
    more: mpsc::Sender<Subflow>,
) {
    // The connection (generation) each path's subflow was opened on.
    let mut opened: [Option<u64>; MAX_PATHS] = [None; MAX_PATHS];
    opened[first_path] = first_id;
    let mut changes = c.paths.subscribe();
    loop {
        for p in c.paths.all() {
            let id = p.generation;
            if opened[p.index] == Some(id) || p.conn.close_reason().is_some() {
                continue;
            }
            opened[p.index] = Some(id);
            let open = async {
                let (mut send, recv) = p.conn.open_bi().await.map_err(TransportError::from)?;
                transport::write_frame(
                    &mut send,
                    Some(proto::STREAM_SUBFLOW),
                    &Frame::Subflow { flow_id },
                )
                .await?;
                Ok::<_, TransportError>((send, recv))
            };
            match open.await {
                Ok((send, recv)) => {
                    let sub = Subflow {
                        path: p.index,
                        send,
                        recv,
                        leftover: BytesMut::new(),
                    };
                    if more.send(sub).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    debug!(flow = flow_id, path = p.index, error = %crate::logging::Escaped(&e), "opening a subflow failed")
                }
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Opens a CONNECT stream (a striped flow when multipath) and waits for the server's answer.
pub(super) async fn open_connect<D: Dialer>(
    link: &Link<D>,
    addr: &TargetAddr,
) -> Result<Opened, ConnectStatus> {
    let c = link.get().await.map_err(|e| {
        debug!(error = %e, "no server connection for CONNECT");
        ConnectStatus::GeneralFailure
    })?;
    let path = c.paths.best().ok_or(ConnectStatus::GeneralFailure)?;
    let flow_id = c.next_flow.fetch_add(1, Ordering::Relaxed);
    let attempt = async {
        let (mut send, recv) = path.conn.open_bi().await.map_err(TransportError::from)?;
        if c.multipath {
            let req = Frame::MpConnect {
                flow_id,
                addr: addr.clone(),
            };
            transport::write_frame(&mut send, Some(proto::STREAM_MP_CONNECT), &req).await?;
        } else {
            let req = Frame::ConnectRequest { addr: addr.clone() };
            transport::write_frame(&mut send, Some(proto::STREAM_CONNECT_TCP), &req).await?;
        }
        let mut r = FrameReader::new(recv);
        let resp = r.frame().await?;
        Ok::<_, TransportError>((send, r, resp))
    };
    match tokio::time::timeout(CONNECT_RESPONSE_TIMEOUT, attempt).await {
        Ok(Ok((send, r, Some(Frame::ConnectResponse { status, .. })))) => {
            if status != ConnectStatus::Ok {
                Err(status)
            } else if c.multipath {
                Ok(Opened::Flow(c, flow_id, Subflow::new(path.index, send, r)))
            } else {
                Ok(Opened::Stream(send, r))
            }
        }
        Ok(Ok(_)) => Err(ConnectStatus::GeneralFailure),
        Ok(Err(e)) => {
            debug!(error = %crate::logging::Escaped(&e), "CONNECT stream failed");
            Err(ConnectStatus::GeneralFailure)
        }
        Err(_) => Err(ConnectStatus::TtlExpired),
    }
}

pub(super) async fn serve_http<D: Dialer>(
    mut tcp: TcpStream,
    link: &Link<D>,
) -> Result<(), IngressError> {
    let mut buf = BytesMut::with_capacity(1024);
    let addr = match read_msg(
        &mut tcp,
        &mut buf,
        socks::MAX_HTTP_HEAD + 4,
        socks::parse_http_connect,
    )
    .await
    {
        Ok(a) => a,
        Err(IngressError::Socks(SocksError::HttpMethod(m))) => {
            tcp.write_all(
                b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
            return Err(SocksError::HttpMethod(m).into());
        }
        Err(IngressError::Socks(e)) => {
            tcp.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await?;
            return Err(e.into());
        }
        Err(e) => return Err(e),
    };
    inc(&link.metrics.tcp_connects);
    match open_connect(link, &addr).await {
        Ok(opened) => {
            tcp.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            splice_with(tcp, buf, opened).await
        }
        Err(status) => {
            let line: &[u8] = match status {
                ConnectStatus::NotAllowed => b"403 Forbidden",
                ConnectStatus::TtlExpired => b"504 Gateway Timeout",
                ConnectStatus::GeneralFailure => b"503 Service Unavailable",
                _ => b"502 Bad Gateway",
            };
            let mut resp = b"HTTP/1.1 ".to_vec();
            resp.extend_from_slice(line);
            resp.extend_from_slice(b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            tcp.write_all(&resp).await?;
            Ok(())
        }
    }
}
