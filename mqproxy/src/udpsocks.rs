//! A minimal SOCKS5 UDP ASSOCIATE client: the library side of the `udpsocks` tool, also used
//! by the tests and the benchmark. Not a general SOCKS library: no authentication methods
//! beyond "none" and username/password.

#![cfg(feature = "runtime")]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::proto::TargetAddr;
use crate::socks;

/// Errors of the SOCKS5 UDP client; each names what the proxy did.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UdpSocksError {
    /// Socket IO with the proxy.
    #[error("talking to the proxy {proxy}: {source}")]
    Io {
        /// The proxy.
        proxy: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The proxy chose no acceptable method.
    #[error("the proxy accepts none of our authentication methods")]
    NoMethod,
    /// Username/password refused.
    #[error("the proxy refused the username/password")]
    BadCredentials,
    /// The proxy refused UDP ASSOCIATE with this SOCKS reply code.
    #[error("the proxy refused UDP ASSOCIATE: reply {code:#04x} ({text})", code = .0, text = reply_text(*.0))]
    Refused(u8),
    /// The proxy's answer was not SOCKS5.
    #[error("malformed reply from the proxy")]
    Malformed,
    /// The proxy did not answer in time.
    #[error("the proxy did not answer within {0:?}")]
    Timeout(Duration),
}

/// RFC 1928's text for a reply code.
pub fn reply_text(code: u8) -> &'static str {
    match code {
        0x00 => "succeeded",
        0x01 => "general SOCKS server failure",
        0x02 => "connection not allowed by ruleset",
        0x03 => "network unreachable",
        0x04 => "host unreachable",
        0x05 => "connection refused",
        0x06 => "TTL expired",
        0x07 => "command not supported",
        0x08 => "address type not supported",
        _ => "unassigned",
    }
}

/// How long the proxy may take to answer the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An open UDP association: keep it alive as long as the relay is used (dropping it closes the
/// TCP control connection, which ends the association).
#[derive(Debug)]
pub struct UdpAssociation {
    _control: TcpStream,
    socket: UdpSocket,
    relay: SocketAddr,
}

impl UdpAssociation {
    /// Performs the SOCKS5 handshake and UDP ASSOCIATE with `proxy`.
    pub async fn open(
        proxy: SocketAddr,
        auth: Option<(&[u8], &[u8])>,
    ) -> Result<Self, UdpSocksError> {
        tokio::time::timeout(HANDSHAKE_TIMEOUT, Self::open_inner(proxy, auth))
            .await
            .map_err(|_| UdpSocksError::Timeout(HANDSHAKE_TIMEOUT))?
    }

    async fn open_inner(
        proxy: SocketAddr,
        auth: Option<(&[u8], &[u8])>,
    ) -> Result<Self, UdpSocksError> {
        let io = |source| UdpSocksError::Io { proxy, source };
        let mut tcp = TcpStream::connect(proxy).await.map_err(io)?;
        let method = if auth.is_some() {
            socks::METHOD_USERPASS
        } else {
            socks::METHOD_NONE
        };
        tcp.write_all(&[socks::VERSION, 1, method])
            .await
            .map_err(io)?;
        let mut m = [0u8; 2];
        tcp.read_exact(&mut m).await.map_err(io)?;
        if m != [socks::VERSION, method] {
            return Err(UdpSocksError::NoMethod);
        }
        if let Some((u, p)) = auth {
            let mut b = vec![1, u.len() as u8];
            b.extend_from_slice(u);
            b.push(p.len() as u8);
            b.extend_from_slice(p);
            tcp.write_all(&b).await.map_err(io)?;
            tcp.read_exact(&mut m).await.map_err(io)?;
            if m[1] != 0 {
                return Err(UdpSocksError::BadCredentials);
            }
        }
        // Bind first so the request can name our address; the proxy locks onto it.
        let local_ip = tcp.local_addr().map_err(io)?.ip();
        let socket = UdpSocket::bind((local_ip, 0)).await.map_err(io)?;
        let me = socket.local_addr().map_err(io)?;
        tcp.write_all(&socks::encode_request(
            socks::CMD_UDP_ASSOCIATE,
            &TargetAddr::Ip(me),
        ))
        .await
        .map_err(io)?;
        let mut head = [0u8; 4];
        tcp.read_exact(&mut head).await.map_err(io)?;
        if head[0] != socks::VERSION {
            return Err(UdpSocksError::Malformed);
        }
        if head[1] != socks::REP_OK {
            return Err(UdpSocksError::Refused(head[1]));
        }
        let rest = match head[3] {
            crate::proto::ATYP_IPV4 => 6,
            crate::proto::ATYP_IPV6 => 18,
            _ => return Err(UdpSocksError::Malformed),
        };
        let mut b = vec![0u8; rest];
        tcp.read_exact(&mut b).await.map_err(io)?;
        let mut full = vec![head[3]];
        full.extend_from_slice(&b);
        let relay = match TargetAddr::decode(&full) {
            Ok(Some((TargetAddr::Ip(mut a), _))) => {
                // An unspecified BND.ADDR means "the address you reached me at".
                if a.ip().is_unspecified() {
                    a.set_ip(proxy.ip());
                }
                a
            }
            _ => return Err(UdpSocksError::Malformed),
        };
        Ok(UdpAssociation {
            _control: tcp,
            socket,
            relay,
        })
    }

    /// The proxy's UDP relay address (BND.ADDR/BND.PORT).
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay
    }

    /// Sends `payload` to `target` through the proxy.
    pub async fn send_to(&self, target: &TargetAddr, payload: &[u8]) -> std::io::Result<()> {
        let mut d = socks::encode_udp_header(target);
        d.extend_from_slice(payload);
        self.socket.send_to(&d, self.relay).await.map(|_| ())
    }

    /// Receives one reply: its source as the proxy states it, and the payload.
    pub async fn recv_from(&self) -> std::io::Result<(TargetAddr, BytesMut)> {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (n, from) = self.socket.recv_from(&mut buf).await?;
            if from != self.relay {
                continue;
            }
            if let Ok(p) = socks::parse_udp(&buf[..n]) {
                return Ok((p.addr, BytesMut::from(p.payload)));
            }
        }
    }
}
