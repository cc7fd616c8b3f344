//! sing-box UDP-over-TCP (UoT) v1 and v2 wire format: pure encoders and incremental decoders,
//! following the sing Go code (`common/uot`), whose docs misdescribe the per-packet address.
//!
//! - A client opens a TCP stream through a proxy to the magic destination [`MAGIC_V2`] (or
//!   [`MAGIC_V1`]), port 0.
//! - v2 sends a [`Request`] once: `isConnect u8 | SOCKS address (0x01 IPv4 | 0x03 FQDN | 0x04
//!   IPv6) | port u16 BE`; it may share a write with the first packet.
//! - v2 with `isConnect = 1`: packets are `length u16 BE | data`, both ways ([`Mode::Connect`]).
//! - v2 with `isConnect = 0`, and all of v1 (no request): packets are `address | port u16 BE |
//!   length u16 BE | data` with a *different* address table, `0x00` IPv4 | `0x01` IPv6 | `0x02`
//!   FQDN ([`Mode::Addressed`]). Client to server it names the destination, server to client the
//!   source.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The v2 magic destination.
pub const MAGIC_V2: &str = "sp.v2.udp-over-tcp.arpa";
/// The v1 (legacy) magic destination.
pub const MAGIC_V1: &str = "sp.udp-over-tcp.arpa";

/// Largest packet: the u16 length field's limit.
pub const MAX_PACKET: usize = u16::MAX as usize;

/// A destination or source as UoT carries it: an IP address or a domain name, with a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// An IP address and port.
    Ip(SocketAddr),
    /// A domain name (1..=255 bytes of UTF-8, no NUL) and port.
    Domain(String, u16),
}

/// Malformed UoT bytes (or a packet too long to encode). A byte stream cannot resynchronise, so
/// every decode error ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A payload over [`MAX_PACKET`].
    #[error("UoT packet too long: {0} bytes (limit {MAX_PACKET})")]
    TooLong(usize),
    /// A field holds a value the protocol does not allow.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// The address-type bytes of one of UoT's two address layouts, which are the same but for them.
#[derive(Debug, Clone, Copy)]
struct AddrLayout {
    ipv4: u8,
    ipv6: u8,
    fqdn: u8,
    /// Whether IPv4-mapped IPv6 addresses are written and read as IPv4 (sing's packet
    /// addresses; the request keeps whatever the client wrote).
    unmap: bool,
    /// Names the layout in errors.
    what: &'static str,
}

/// The request's SOCKS layout.
const SOCKS: AddrLayout = AddrLayout {
    ipv4: 0x01,
    ipv6: 0x04,
    fqdn: 0x03,
    unmap: false,
    what: "address type",
};

/// Per-packet address types (sing's `uot.AddrParser`), not the SOCKS ones.
const PACKET: AddrLayout = AddrLayout {
    ipv4: 0x00,
    ipv6: 0x01,
    fqdn: 0x02,
    unmap: true,
    what: "UoT packet address type",
};

impl AddrLayout {
    /// Appends `addr` (type, address, port BE).
    fn encode(self, addr: &Address, out: &mut BytesMut) {
        match addr {
            Address::Ip(a) => {
                let ip = match a.ip() {
                    IpAddr::V6(v6) if self.unmap => {
                        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
                    }
                    ip => ip,
                };
                match ip {
                    IpAddr::V4(v4) => {
                        out.put_u8(self.ipv4);
                        out.put_slice(&v4.octets());
                    }
                    IpAddr::V6(v6) => {
                        out.put_u8(self.ipv6);
                        out.put_slice(&v6.octets());
                    }
                }
                out.put_u16(a.port());
            }
            Address::Domain(d, port) => {
                // Decoded names are 1..=255 bytes; clamp so a caller's longer name cannot desync.
                let d = &d.as_bytes()[..d.len().min(255)];
                out.put_u8(self.fqdn);
                out.put_u8(d.len() as u8);
                out.put_slice(d);
                out.put_u16(*port);
            }
        }
    }

    /// Parses an address and port from the front of `buf`; `Ok(None)`: more bytes are needed.
    fn decode(self, buf: &[u8]) -> Result<Option<(Address, usize)>, DecodeError> {
        let Some(&ty) = buf.first() else {
            return Ok(None);
        };
        let (len, start) = if ty == self.ipv4 {
            (4, 1)
        } else if ty == self.ipv6 {
            (16, 1)
        } else if ty == self.fqdn {
            match buf.get(1) {
                None => return Ok(None),
                Some(&n) => (n as usize, 2),
            }
        } else {
            return Err(DecodeError::Invalid(self.what));
        };
        let total = start + len + 2;
        if buf.len() < total {
            return Ok(None);
        }
        let body = &buf[start..start + len];
        let port = u16::from_be_bytes([buf[total - 2], buf[total - 1]]);
        let addr = if ty == self.ipv4 {
            let o: [u8; 4] = body.try_into().expect("length checked above");
            Address::Ip(SocketAddr::new(Ipv4Addr::from(o).into(), port))
        } else if ty == self.ipv6 {
            let o: [u8; 16] = body.try_into().expect("length checked above");
            // IPv4-mapped means IPv4 (as sing writes it): one address, one meaning, and it
            // goes out on the IPv4 socket.
            let v6 = Ipv6Addr::from(o);
            let ip = match v6.to_ipv4_mapped() {
                Some(v4) if self.unmap => IpAddr::V4(v4),
                _ => IpAddr::V6(v6),
            };
            Address::Ip(SocketAddr::new(ip, port))
        } else {
            // Non-empty UTF-8 without NUL: a NUL would truncate the name in libc's resolver
            // and resolve a different name than the one checked.
            if body.is_empty() || body.contains(&0) {
                return Err(DecodeError::Invalid("domain name"));
            }
            let name =
                std::str::from_utf8(body).map_err(|_| DecodeError::Invalid("domain name"))?;
            Address::Domain(name.to_owned(), port)
        };
        Ok(Some((addr, total)))
    }
}

/// The UoT protocol version a magic destination selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `sp.udp-over-tcp.arpa`: no request, addressed packets.
    V1,
    /// `sp.v2.udp-over-tcp.arpa`: a request, then connect or addressed packets.
    V2,
}

/// The UoT version if a CONNECT to `host` is one to the magic destinations (names compare
/// case-insensitively, like DNS; sing sends port 0 but the port is not checked, as sing does not
/// check it either).
pub fn magic_version(host: &str) -> Option<Version> {
    if host.eq_ignore_ascii_case(MAGIC_V2) {
        Some(Version::V2)
    } else if host.eq_ignore_ascii_case(MAGIC_V1) {
        Some(Version::V1)
    } else {
        None
    }
}

/// How packets are framed on a UoT stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `length u16 BE | data`; the destination is the request's.
    Connect,
    /// `address | port u16 BE | length u16 BE | data`.
    Addressed,
}

/// The v2 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `isConnect`: packets go to `destination` only, without per-packet addresses.
    pub is_connect: bool,
    /// The destination (for non-connect streams, informational: packets carry their own).
    pub destination: Address,
}

impl Request {
    /// The packet mode this request selects.
    pub fn mode(&self) -> Mode {
        if self.is_connect {
            Mode::Connect
        } else {
            Mode::Addressed
        }
    }

    /// Appends the request.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(u8::from(self.is_connect));
        SOCKS.encode(&self.destination, out);
    }

    /// Parses a request from the front of `buf`; `Ok(None)`: more bytes are needed.
    pub fn decode(buf: &[u8]) -> Result<Option<(Request, usize)>, DecodeError> {
        let Some(&flag) = buf.first() else {
            return Ok(None);
        };
        let is_connect = match flag {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::Invalid("UoT isConnect flag")),
        };
        Ok(SOCKS.decode(&buf[1..])?.map(|(destination, n)| {
            (
                Request {
                    is_connect,
                    destination,
                },
                1 + n,
            )
        }))
    }
}

/// Appends a per-packet address in sing's `AddrParser` layout (`0x00/0x01/0x02`), then the port.
/// sing unmaps IPv4-mapped addresses before writing; so do we.
pub fn encode_packet_addr(addr: &Address, out: &mut BytesMut) {
    PACKET.encode(addr, out);
}

/// Parses a per-packet address and port; `Ok(None)`: more bytes are needed.
pub fn decode_packet_addr(buf: &[u8]) -> Result<Option<(Address, usize)>, DecodeError> {
    PACKET.decode(buf)
}

/// Appends one packet. `addr` is required in [`Mode::Addressed`] and ignored in
/// [`Mode::Connect`]. Fails (writing nothing) for a payload over [`MAX_PACKET`].
pub fn encode_packet(
    mode: Mode,
    addr: Option<&Address>,
    payload: &[u8],
    out: &mut BytesMut,
) -> Result<(), DecodeError> {
    if payload.len() > MAX_PACKET {
        return Err(DecodeError::TooLong(payload.len()));
    }
    if mode == Mode::Addressed {
        let addr = addr.ok_or(DecodeError::Invalid("UoT packet without an address"))?;
        encode_packet_addr(addr, out);
    }
    out.put_u16(payload.len() as u16);
    out.put_slice(payload);
    Ok(())
}

/// One UoT packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Destination (client to server) or source (server to client); `None` in connect mode.
    pub addr: Option<Address>,
    /// The datagram.
    pub payload: Bytes,
}

/// Parses one packet from the front of `buf`, returning it and its length; `Ok(None)`: more bytes
/// are needed. Lengths are u16, so nothing here can ask for more than ~64 KiB.
pub fn decode_packet(mode: Mode, buf: &[u8]) -> Result<Option<(Packet, usize)>, DecodeError> {
    let (addr, at) = match mode {
        Mode::Connect => (None, 0),
        Mode::Addressed => match decode_packet_addr(buf)? {
            None => return Ok(None),
            Some((a, n)) => (Some(a), n),
        },
    };
    let Some(l) = buf.get(at..at + 2) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([l[0], l[1]]) as usize;
    let end = at + 2 + len;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((
        Packet {
            addr,
            payload: Bytes::copy_from_slice(&buf[at + 2..end]),
        },
        end,
    )))
}

/// Incremental packet decoder over a byte stream.
#[derive(Debug)]
pub struct PacketDecoder {
    mode: Mode,
    buf: BytesMut,
}

impl PacketDecoder {
    /// A decoder for `mode`, starting with bytes already received (e.g. after the request).
    pub fn new(mode: Mode, leftover: BytesMut) -> Self {
        PacketDecoder {
            mode,
            buf: leftover,
        }
    }

    /// The buffer to read into.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete packet; an error is final (the stream is out of step).
    pub fn next_packet(&mut self) -> Result<Option<Packet>, DecodeError> {
        match decode_packet(self.mode, &self.buf)? {
            None => Ok(None),
            Some((p, n)) => {
                self.buf.advance(n);
                Ok(Some(p))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn a(s: &str) -> Address {
        Address::Ip(s.parse().expect("literal"))
    }

    /// field-notes §5's golden vectors, from the sing Go code.
    #[test]
    fn golden_v2_connect() {
        let req = Request {
            is_connect: true,
            destination: a("127.0.0.1:53"),
        };
        let mut out = BytesMut::new();
        req.encode(&mut out);
        assert_eq!(hex::encode(&out), "01017f0000010035");
        let mut pkt = BytesMut::new();
        encode_packet(Mode::Connect, None, b"packet", &mut pkt).expect("fits");
        assert_eq!(hex::encode(&pkt), "00067061636b6574");
        // Request and first packet in one write, as sing may send them.
        out.extend_from_slice(&pkt);
        let (r, n) = Request::decode(&out).expect("valid").expect("complete");
        assert_eq!((r, n), (req, 8));
        let mut d = PacketDecoder::new(Mode::Connect, out.split_off(n));
        let p = d.next_packet().expect("valid").expect("complete");
        assert_eq!((p.addr, &p.payload[..]), (None, &b"packet"[..]));
    }

    #[test]
    fn golden_v2_non_connect() {
        let req = Request {
            is_connect: false,
            destination: a("127.0.0.1:53"),
        };
        let mut out = BytesMut::new();
        req.encode(&mut out);
        assert_eq!(hex::encode(&out), "00017f0000010035");
        let mut pkt = BytesMut::new();
        encode_packet(
            Mode::Addressed,
            Some(&a("127.0.0.1:53")),
            b"packet",
            &mut pkt,
        )
        .expect("fits");
        assert_eq!(hex::encode(&pkt), "007f000001003500067061636b6574");
        let (p, n) = decode_packet(Mode::Addressed, &pkt)
            .expect("valid")
            .expect("complete");
        assert_eq!(n, pkt.len());
        assert_eq!(p.addr, Some(a("127.0.0.1:53")));
    }

    /// Derived from the address table: IPv6, FQDN, the SOCKS-table request forms, zero length.
    #[test]
    fn derived_vectors() {
        let mut o = BytesMut::new();
        encode_packet(Mode::Addressed, Some(&a("[2001:db8::1]:443")), b"", &mut o).expect("fits");
        assert_eq!(
            hex::encode(&o),
            "0120010db800000000000000000000000101bb0000"
        );
        let mut o = BytesMut::new();
        let dns = Address::Domain("dns.example".into(), 53);
        encode_packet(Mode::Addressed, Some(&dns), b"x", &mut o).expect("fits");
        assert_eq!(hex::encode(&o), "020b646e732e6578616d706c650035000178");
        assert_eq!(
            decode_packet(Mode::Addressed, &o).expect("valid"),
            Some((
                Packet {
                    addr: Some(dns.clone()),
                    payload: Bytes::from_static(b"x")
                },
                o.len()
            ))
        );
        // IPv4-mapped IPv6 is written as IPv4, as sing unmaps it.
        let mut o = BytesMut::new();
        encode_packet_addr(&a("[::ffff:10.0.0.1]:1"), &mut o);
        assert_eq!(hex::encode(&o), "000a0000010001");
        // ...and read back as IPv4 when a peer sends it in the IPv6 form (found by fuzzing).
        let mapped = hex::decode("0100000000000000000000ffff0a0000010001").expect("hex");
        assert_eq!(
            decode_packet_addr(&mapped).expect("valid"),
            Some((a("10.0.0.1:1"), mapped.len()))
        );
        let mut o = BytesMut::new();
        Request {
            is_connect: true,
            destination: dns,
        }
        .encode(&mut o);
        assert_eq!(hex::encode(&o), "01030b646e732e6578616d706c650035");
        assert_eq!(magic_version(MAGIC_V2), Some(Version::V2));
        assert_eq!(magic_version("SP.UDP-over-tcp.arpa"), Some(Version::V1));
        assert_eq!(magic_version("example.com"), None);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(Request::decode(&[2, 1, 127, 0, 0, 1, 0, 53]).is_err());
        assert!(decode_packet_addr(&[0x03, 1, 2, 3, 4, 0, 1]).is_err());
        assert!(decode_packet_addr(&[PACKET.fqdn, 0, 0, 1]).is_err());
        assert!(decode_packet_addr(&[PACKET.fqdn, 1, 0, 0, 1]).is_err());
        assert_eq!(decode_packet(Mode::Connect, &[0, 5, 1]), Ok(None));
        assert!(encode_packet(Mode::Addressed, None, b"x", &mut BytesMut::new()).is_err());
        assert!(encode_packet(
            Mode::Connect,
            None,
            &vec![0; MAX_PACKET + 1],
            &mut BytesMut::new()
        )
        .is_err());
    }

    fn target() -> impl Strategy<Value = Address> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| Address::Ip(SocketAddr::new(IpAddr::from(ip), p))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| {
                let v6 = Ipv6Addr::from(ip);
                let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
                Address::Ip(SocketAddr::new(ip, p))
            }),
            ("[a-z0-9.-]{1,60}", any::<u16>()).prop_map(|(d, p)| Address::Domain(d, p)),
        ]
    }

    proptest! {
        #[test]
        fn packets_round_trip_any_split(
            connect in any::<bool>(),
            pkts in prop::collection::vec((target(), prop::collection::vec(any::<u8>(), 0..1500)), 0..6),
            cut in 1usize..300,
        ) {
            let mode = if connect { Mode::Connect } else { Mode::Addressed };
            let mut wire = BytesMut::new();
            for (t, p) in &pkts {
                encode_packet(mode, Some(t), p, &mut wire).expect("fits");
            }
            let mut d = PacketDecoder::new(mode, BytesMut::new());
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                d.feed(chunk);
                while let Some(p) = d.next_packet().expect("own packets are valid") {
                    got.push(p);
                }
            }
            prop_assert_eq!(got.len(), pkts.len());
            for (g, (t, p)) in got.iter().zip(&pkts) {
                prop_assert_eq!(&g.payload[..], &p[..]);
                prop_assert_eq!(g.addr.as_ref(), (!connect).then_some(t));
            }
        }

        #[test]
        fn request_round_trip(is_connect in any::<bool>(), destination in target()) {
            let r = Request { is_connect, destination };
            let mut o = BytesMut::new();
            r.encode(&mut o);
            for i in 0..o.len() {
                prop_assert_eq!(Request::decode(&o[..i]).expect("prefix is not invalid"), None);
            }
            prop_assert_eq!(Request::decode(&o).expect("valid"), Some((r, o.len())));
        }

        #[test]
        fn garbage_is_safe(connect in any::<bool>(), data in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Request::decode(&data);
            let mode = if connect { Mode::Connect } else { Mode::Addressed };
            let mut rest = &data[..];
            while let Ok(Some((_, n))) = decode_packet(mode, rest) {
                prop_assert!(n > 0 && n <= rest.len());
                rest = &rest[n..];
            }
        }
    }
}
