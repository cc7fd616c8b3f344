//! SOCKS5 (RFC 1928, with RFC 1929 username/password) and HTTP CONNECT ingress parsing; pure.
//! Each parser takes the bytes read so far and returns `Ok(None)` until a whole message is
//! there, so the socket loop in [`crate::client`] never parses the same bytes twice.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::{BufMut, BytesMut};

use crate::proto::{DecodeError, TargetAddr};

/// SOCKS protocol version byte.
pub const VERSION: u8 = 0x05;
/// Method: no authentication.
pub const METHOD_NONE: u8 = 0x00;
/// Method: username/password (RFC 1929).
pub const METHOD_USERPASS: u8 = 0x02;
/// Method reply: none acceptable.
pub const METHOD_UNACCEPTABLE: u8 = 0xff;
/// Command: CONNECT.
pub const CMD_CONNECT: u8 = 0x01;
/// Command: BIND (not supported).
pub const CMD_BIND: u8 = 0x02;
/// Command: UDP ASSOCIATE.
pub const CMD_UDP_ASSOCIATE: u8 = 0x03;

/// Reply: succeeded.
pub const REP_OK: u8 = 0x00;
/// Reply: general SOCKS server failure.
pub const REP_GENERAL_FAILURE: u8 = 0x01;
/// Reply: connection not allowed by ruleset.
pub const REP_NOT_ALLOWED: u8 = 0x02;
/// Reply: command not supported.
pub const REP_COMMAND_NOT_SUPPORTED: u8 = 0x07;
/// Reply: address type not supported.
pub const REP_ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

/// Largest HTTP CONNECT request head accepted. Real ones are a few hundred bytes.
pub const MAX_HTTP_HEAD: usize = 8192;

/// A SOCKS5 or HTTP CONNECT protocol violation, with the reply to send if any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SocksError {
    /// Not SOCKS version 5.
    #[error("not SOCKS5 (version byte {0:#04x})")]
    Version(u8),
    /// The greeting lists no methods.
    #[error("greeting lists no authentication methods")]
    NoMethods,
    /// Username/password sub-negotiation had the wrong version.
    #[error("bad username/password sub-negotiation version {0:#04x}")]
    AuthVersion(u8),
    /// An address could not be parsed.
    #[error("bad address: {0}")]
    Address(DecodeError),
    /// An unknown address type (reply 0x08).
    #[error("address type {0:#04x} not supported")]
    AddressType(u8),
    /// The reserved byte of a request is not zero.
    #[error("reserved byte not zero")]
    Reserved,
    /// The HTTP request is not a valid CONNECT.
    #[error("bad HTTP CONNECT request: {0}")]
    Http(&'static str),
    /// The HTTP method is not CONNECT (reply 405). The method is the client's text, so it
    /// is shown escaped (it reaches log lines).
    #[error("HTTP method {} is not CONNECT", .0.escape_debug())]
    HttpMethod(String),
}

/// The client's greeting: the methods it offers. Returns the bytes consumed.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, SocksError> {
    let (Some(&ver), Some(&n)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(SocksError::Version(ver));
    }
    if n == 0 {
        return Err(SocksError::NoMethods);
    }
    let end = 2 + n as usize;
    Ok(buf.get(2..end).map(|m| (m.to_vec(), end)))
}

/// A username and password (RFC 1929).
pub type Credentials = (Vec<u8>, Vec<u8>);

/// RFC 1929 username/password request.
pub fn parse_userpass(buf: &[u8]) -> Result<Option<(Credentials, usize)>, SocksError> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != 0x01 {
        return Err(SocksError::AuthVersion(ver));
    }
    let Some(&ulen) = buf.get(1) else {
        return Ok(None);
    };
    let u_end = 2 + ulen as usize;
    let Some(&plen) = buf.get(u_end) else {
        return Ok(None);
    };
    let p_end = u_end + 1 + plen as usize;
    if buf.len() < p_end {
        return Ok(None);
    }
    Ok(Some((
        (buf[2..u_end].to_vec(), buf[u_end + 1..p_end].to_vec()),
        p_end,
    )))
}

/// A SOCKS5 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command byte (CONNECT, BIND, UDP ASSOCIATE, or something unknown).
    pub command: u8,
    /// DST.ADDR/DST.PORT.
    pub addr: TargetAddr,
}

fn addr_err(e: DecodeError, atyp: u8) -> SocksError {
    match e {
        DecodeError::Invalid("address type") => SocksError::AddressType(atyp),
        e => SocksError::Address(e),
    }
}

/// A SOCKS5 request (`VER CMD RSV ATYP DST.ADDR DST.PORT`).
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, SocksError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    if buf[0] != VERSION {
        return Err(SocksError::Version(buf[0]));
    }
    if buf[2] != 0 {
        return Err(SocksError::Reserved);
    }
    match TargetAddr::decode(&buf[3..]).map_err(|e| addr_err(e, buf[3]))? {
        None => Ok(None),
        Some((addr, n)) => Ok(Some((
            Request {
                command: buf[1],
                addr,
            },
            3 + n,
        ))),
    }
}

/// A request (`VER CMD RSV ATYP DST.ADDR DST.PORT`), for clients.
pub fn encode_request(command: u8, addr: &TargetAddr) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(3 + addr.encoded_len());
    b.put_slice(&[VERSION, command, 0]);
    addr.encode(&mut b);
    b.to_vec()
}

/// A reply (`VER REP RSV ATYP BND.ADDR BND.PORT`).
pub fn encode_reply(rep: u8, bound: SocketAddr) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(22);
    b.put_slice(&[VERSION, rep, 0]);
    TargetAddr::Ip(bound).encode(&mut b);
    b.to_vec()
}

/// The all-zero IPv4 address SOCKS replies carry when there is nothing better to say.
pub const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// A SOCKS5 UDP request header (`RSV RSV FRAG ATYP DST.ADDR DST.PORT`) and the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPacket<'a> {
    /// Fragment number: anything but 0 is dropped (fragmentation is optional, §7).
    pub frag: u8,
    /// Destination (requests) or source (replies).
    pub addr: TargetAddr,
    /// The UDP payload.
    pub payload: &'a [u8],
}

/// Parses one SOCKS5 UDP datagram.
pub fn parse_udp(d: &[u8]) -> Result<UdpPacket<'_>, SocksError> {
    if d.len() < 4 {
        return Err(SocksError::Address(DecodeError::Truncated("UDP header")));
    }
    if d[0] != 0 || d[1] != 0 {
        return Err(SocksError::Reserved);
    }
    match TargetAddr::decode(&d[3..]).map_err(|e| addr_err(e, d[3]))? {
        None => Err(SocksError::Address(DecodeError::Truncated("UDP header"))),
        Some((addr, n)) => Ok(UdpPacket {
            frag: d[2],
            addr,
            payload: &d[3 + n..],
        }),
    }
}

/// The header to put before a payload (`RSV RSV FRAG=0 ATYP ADDR PORT`).
pub fn encode_udp_header(addr: &TargetAddr) -> BytesMut {
    let mut b = BytesMut::with_capacity(3 + addr.encoded_len());
    b.put_slice(&[0, 0, 0]);
    addr.encode(&mut b);
    b
}

/// An HTTP `CONNECT host:port HTTP/1.x` request head, ending at the blank line. Returns the
/// target and the bytes consumed (bytes after it are tunnel data).
pub fn parse_http_connect(buf: &[u8]) -> Result<Option<(TargetAddr, usize)>, SocksError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HTTP_HEAD {
            return Err(SocksError::Http("request head too long"));
        }
        return Ok(None);
    };
    let head =
        std::str::from_utf8(&buf[..end]).map_err(|_| SocksError::Http("head is not UTF-8"))?;
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SocksError::Http("request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(SocksError::Http("HTTP version"));
    }
    if method != "CONNECT" {
        return Err(SocksError::HttpMethod(method.chars().take(16).collect()));
    }
    let addr = target
        .parse::<TargetAddr>()
        .map_err(|_| SocksError::Http("CONNECT target is not HOST:PORT"))?;
    Ok(Some((addr, end + 4)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_snapshots() {
        let b = hex::decode("050100030b6578616d706c652e636f6d0050").expect("hex");
        assert_eq!(
            parse_request(&b),
            Ok(Some((
                Request {
                    command: CMD_CONNECT,
                    addr: TargetAddr::Domain("example.com".into(), 80)
                },
                b.len()
            )))
        );
        assert_eq!(parse_request(&b[..b.len() - 1]), Ok(None));
        let bad = hex::decode("05010005").expect("hex");
        assert_eq!(parse_request(&bad), Err(SocksError::AddressType(5)));
        assert_eq!(
            hex::encode(encode_reply(REP_OK, "127.0.0.1:1080".parse().expect("lit"))),
            "050000017f0000010438"
        );
        let udp = hex::decode("000000017f00000100356869").expect("hex");
        let p = parse_udp(&udp).expect("valid");
        assert_eq!(p.frag, 0);
        assert_eq!(p.payload, b"hi");
        assert_eq!(&encode_udp_header(&p.addr)[..], &udp[..10]);
    }

    #[test]
    fn greeting_and_userpass() {
        assert_eq!(parse_greeting(&[5, 2, 0, 2]), Ok(Some((vec![0, 2], 4))));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(SocksError::Version(4)));
        assert_eq!(
            parse_userpass(b"\x01\x01u\x02pw"),
            Ok(Some(((b"u".to_vec(), b"pw".to_vec()), 6)))
        );
    }

    #[test]
    fn http_connect() {
        let r = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nxx";
        assert_eq!(
            parse_http_connect(r),
            Ok(Some((
                TargetAddr::Domain("example.com".into(), 443),
                r.len() - 2
            )))
        );
        assert_eq!(parse_http_connect(&r[..20]), Ok(None));
        assert!(matches!(
            parse_http_connect(b"GET / HTTP/1.1\r\n\r\n"),
            Err(SocksError::HttpMethod(_))
        ));
        let v6 = b"CONNECT [::1]:22 HTTP/1.0\r\n\r\n";
        assert_eq!(
            parse_http_connect(v6).expect("valid").expect("complete").0,
            TargetAddr::Ip("[::1]:22".parse().expect("lit"))
        );
    }

    proptest! {
        #[test]
        fn parsers_never_panic(raw in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_greeting(&raw);
            let _ = parse_userpass(&raw);
            if let Ok(Some((_, n))) = parse_request(&raw) { prop_assert!(n <= raw.len()); }
            let _ = parse_udp(&raw);
            if let Ok(Some((_, n))) = parse_http_connect(&raw) { prop_assert!(n <= raw.len()); }
        }

        #[test]
        fn udp_round_trip(ip: u32, port: u16, payload in prop::collection::vec(any::<u8>(), 0..100)) {
            let addr = TargetAddr::Ip(SocketAddr::new(Ipv4Addr::from(ip).into(), port));
            let mut d = encode_udp_header(&addr);
            d.extend_from_slice(&payload);
            let p = parse_udp(&d).expect("own encoding parses");
            prop_assert_eq!(p.addr, addr);
            prop_assert_eq!(p.payload, &payload[..]);
        }

        #[test]
        fn request_round_trip(cmd: u8, port: u16, name in "[a-z]{1,60}") {
            let addr = TargetAddr::Domain(name, port);
            let mut b = BytesMut::new();
            b.put_slice(&[VERSION, cmd, 0]);
            addr.encode(&mut b);
            prop_assert_eq!(parse_request(&b), Ok(Some((Request { command: cmd, addr }, b.len()))));
        }
    }
}
