//! Wire framings of the `udp-over-tcp` tool: pure encoders and an incremental (sans-IO) decoder.
//!
//! | framing | frame |
//! | --- | --- |
//! | [`Framing::Plain`] | `u32 LE length \| payload` (the port-preserving original, 0.1.x) |
//! | [`Framing::Flow`] | `u32 LE length \| u16 LE source port \| 16-byte source IP \| payload` (its per-flow fork, 0.2.x; IPv4 as `::ffff:a.b.c.d`; the length counts the 18-byte address **and** the payload, as the fork's `UdpPacketWithSource::serialize` builds address + payload and then writes that buffer's length) |
//! | [`Framing::Mullvad`] | `u16 BE length \| payload` (Mullvad's udp2tcp/tcp2udp) |
//!
//! Lengths are bounded by [`MAX_DATAGRAM`]: the originals trusted a peer's 32-bit length and grew
//! their buffer without limit; a longer length here is an error that ends the TCP connection
//! (a byte stream cannot resynchronise after a bad length). A flow frame whose length cannot
//! even hold the 18-byte address is an error too: the peer is not speaking the fork's format
//! (typically it runs `--framing plain`).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The largest datagram a frame may carry: the IP length field's limit. (Real UDP payloads stop
/// at 65,507 bytes over IPv4 and 65,527 over IPv6; the codec accepts what any framing can carry.)
pub const MAX_DATAGRAM: usize = 65_535;

/// Bytes in a flow frame's source address (u16 port + 16-byte IP). The fork's length field
/// counts them.
pub const FLOW_ADDR_LEN: usize = 18;

/// Which framing a tunnel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Framing {
    /// `u32 LE length | payload`: byte-compatible with the original udp-over-tcp.
    #[default]
    Plain,
    /// `u32 LE length | u16 LE port | 16-byte IP | payload`: the per-flow fork's format, where
    /// the length counts the address and the payload (`18 + payload`).
    Flow,
    /// `u16 BE length | payload`: Mullvad's udp2tcp/tcp2udp.
    Mullvad,
}

impl Framing {
    /// Bytes of the length field.
    const fn prefix_len(self) -> usize {
        match self {
            Framing::Plain | Framing::Flow => 4,
            Framing::Mullvad => 2,
        }
    }

    /// Bytes before the payload.
    pub const fn header_len(self) -> usize {
        match self {
            Framing::Plain => 4,
            Framing::Flow => 4 + FLOW_ADDR_LEN,
            Framing::Mullvad => 2,
        }
    }

    /// Whether frames carry the datagram's source address.
    pub const fn carries_source(self) -> bool {
        matches!(self, Framing::Flow)
    }

    /// The name used on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Framing::Plain => "plain",
            Framing::Flow => "flow",
            Framing::Mullvad => "mullvad",
        }
    }
}

impl std::fmt::Display for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Framing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "plain" => Ok(Framing::Plain),
            "flow" => Ok(Framing::Flow),
            "mullvad" => Ok(Framing::Mullvad),
            other => Err(format!(
                "unknown framing `{other}`: use plain (the original udp-over-tcp), flow (its per-flow fork) or mullvad (udp2tcp/tcp2udp)"
            )),
        }
    }
}

/// A frame that cannot be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length exceeds [`MAX_DATAGRAM`] (or what the framing's length field holds).
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    TooLong {
        /// The length asked for.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A flow frame's length is shorter than its 18-byte source address: the peer does not
    /// speak the per-flow fork's format.
    #[error(
        "flow frame length {len} is shorter than its {min}-byte source address: is the peer using `--framing plain` rather than `flow`?"
    )]
    TooShort {
        /// The length announced.
        len: usize,
        /// The least a flow frame's length can be.
        min: usize,
    },
}

/// The largest payload a framing can carry.
pub const fn max_payload(framing: Framing) -> usize {
    match framing {
        Framing::Mullvad => u16::MAX as usize,
        _ => MAX_DATAGRAM,
    }
}

/// Appends one frame. `source` is written by [`Framing::Flow`] and ignored by the others.
pub fn encode(
    framing: Framing,
    source: SocketAddr,
    payload: &[u8],
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    encode_header(framing, source, payload.len(), out)?;
    out.put_slice(payload);
    Ok(())
}

/// Appends a frame header for a payload of `len` bytes (the payload follows separately).
pub fn encode_header(
    framing: Framing,
    source: SocketAddr,
    len: usize,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    let max = max_payload(framing);
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    out.reserve(framing.header_len() + len);
    match framing {
        Framing::Plain => out.put_u32_le(len as u32),
        Framing::Flow => {
            // The fork's length counts the address too (`serialize()` builds address + payload
            // and then writes that buffer's length).
            out.put_u32_le((FLOW_ADDR_LEN + len) as u32);
            out.put_u16_le(source.port());
            out.put_slice(&to_v6(source.ip()).octets());
        }
        Framing::Mullvad => out.put_u16(len as u16),
    }
    Ok(())
}

/// IPv4 as IPv4-mapped IPv6, as the fork writes it.
fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// IPv4-mapped IPv6 back to IPv4, so replies go out on IPv4 sockets.
fn from_v6(ip: Ipv6Addr) -> IpAddr {
    match ip.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip),
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The datagram's source (flow framing only).
    pub source: Option<SocketAddr>,
    /// The datagram.
    pub payload: Bytes,
}

/// Checks whether `buf` starts with a complete frame; `Ok(Some(n))` is the frame's total length.
/// Cheap (no copy), for callers that want to know before parsing.
pub fn check(framing: Framing, buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let len = match framing {
        Framing::Plain | Framing::Flow => {
            let Some(h) = buf.get(..4) else {
                return Ok(None);
            };
            u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize
        }
        Framing::Mullvad => {
            let Some(h) = buf.get(..2) else {
                return Ok(None);
            };
            u16::from_be_bytes([h[0], h[1]]) as usize
        }
    };
    let total = framing.prefix_len() + checked_body(framing, len)?;
    Ok((buf.len() >= total).then_some(total))
}

/// Bounds a frame's declared length (what follows the length field) for `framing`.
fn checked_body(framing: Framing, len: usize) -> Result<usize, FrameError> {
    let addr = framing.header_len() - framing.prefix_len();
    if len < addr {
        return Err(FrameError::TooShort { len, min: addr });
    }
    if len - addr > MAX_DATAGRAM {
        return Err(FrameError::TooLong {
            len,
            max: addr + MAX_DATAGRAM,
        });
    }
    Ok(len)
}

/// Incremental decoder: feed it whatever the TCP stream delivered (any split), take frames out.
/// It holds at most one frame's worth of bytes beyond what the caller feeds.
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    buf: BytesMut,
}

impl Decoder {
    /// A decoder for `framing`.
    pub fn new(framing: Framing) -> Self {
        Decoder {
            framing,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// The framing decoded.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// The buffer to read into (append to it), e.g. with `AsyncReadExt::read_buf`.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held that do not yet form a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. An error is final: the
    /// stream is out of step and must be closed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let Some(total) = check(self.framing, &self.buf)? else {
            // Make room for the rest of this frame in one allocation (`check` bounded it).
            if self.buf.len() >= self.framing.prefix_len() {
                let want = self.framing.prefix_len() + self.declared_len();
                self.buf.reserve(want.saturating_sub(self.buf.len()));
            }
            return Ok(None);
        };
        let mut frame = self.buf.split_to(total);
        let source = match self.framing {
            Framing::Plain => {
                frame.advance(4);
                None
            }
            Framing::Mullvad => {
                frame.advance(2);
                None
            }
            Framing::Flow => {
                frame.advance(4);
                let port = frame.get_u16_le();
                let mut ip = [0u8; 16];
                frame.copy_to_slice(&mut ip);
                Some(SocketAddr::new(from_v6(Ipv6Addr::from(ip)), port))
            }
        };
        Ok(Some(Frame {
            source,
            payload: frame.freeze(),
        }))
    }

    fn declared_len(&self) -> usize {
        match self.framing {
            Framing::Plain | Framing::Flow => {
                u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize
            }
            Framing::Mullvad => u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A hex column of a vector file; `-` is empty.
    fn vector_hex(col: &str) -> Vec<u8> {
        if col == "-" {
            Vec::new()
        } else {
            hex::decode(col).expect("hex")
        }
    }

    /// Checks one captured vector: `payload` from `src` encodes to exactly `wire`, and `wire`
    /// fed one byte per write decodes to a frame at its last byte and not before; returns it.
    fn check_vector(
        framing: Framing,
        src: SocketAddr,
        payload: &[u8],
        wire: &[u8],
        line: &str,
    ) -> Frame {
        let mut out = BytesMut::new();
        encode(framing, src, payload, &mut out).expect("fits");
        assert_eq!(hex::encode(&out), hex::encode(wire), "encoding {line}");
        let mut d = Decoder::new(framing);
        let mut got = None;
        for (i, b) in wire.iter().enumerate() {
            d.feed(std::slice::from_ref(b));
            let f = d.next_frame().expect("captured frames are valid");
            if i + 1 < wire.len() {
                assert_eq!(f, None, "complete before its last byte: {line}");
            } else {
                got = f;
            }
        }
        got.expect("complete at its last byte")
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("literal")
    }

    fn enc(framing: Framing, source: &str, payload: &[u8]) -> String {
        let mut out = BytesMut::new();
        encode(framing, a(source), payload, &mut out).expect("fits");
        hex::encode(out)
    }

    /// Golden vectors derived from field-notes' format table (the tools' source): byte for byte
    /// what the original tools put on the wire.
    #[test]
    fn golden_vectors() {
        // udp-over-tcp 0.1.x: u32 LE length, no header.
        assert_eq!(
            enc(Framing::Plain, "127.0.0.1:1", b"hello"),
            "0500000068656c6c6f"
        );
        assert_eq!(enc(Framing::Plain, "127.0.0.1:1", b""), "00000000");
        // The fork: u32 LE length | u16 LE port | IPv4-mapped IPv6 | payload.
        assert_eq!(
            enc(Framing::Flow, "127.0.0.1:5000", b"hi"),
            "14000000881300000000000000000000ffff7f0000016869"
        );
        assert_eq!(
            enc(Framing::Flow, "[2001:db8::1]:53", b""),
            "12000000350020010db8000000000000000000000001"
        );
        // Mullvad: u16 BE length.
        assert_eq!(enc(Framing::Mullvad, "127.0.0.1:1", b"hi"), "00026869");
        assert_eq!(enc(Framing::Mullvad, "127.0.0.1:1", b""), "0000");
    }

    #[test]
    fn decodes_golden_vectors_split_anywhere() {
        let cases: &[(Framing, &str, Option<&str>, &[u8])] = &[
            (Framing::Plain, "0500000068656c6c6f", None, b"hello"),
            (Framing::Plain, "00000000", None, b""),
            (
                Framing::Flow,
                "14000000881300000000000000000000ffff7f0000016869",
                Some("127.0.0.1:5000"),
                b"hi",
            ),
            (
                Framing::Flow,
                "12000000350020010db8000000000000000000000001",
                Some("[2001:db8::1]:53"),
                b"",
            ),
            (Framing::Mullvad, "00026869", None, b"hi"),
        ];
        for (framing, wire, source, payload) in cases {
            let wire = hex::decode(wire).expect("hex");
            for split in 0..=wire.len() {
                let mut d = Decoder::new(*framing);
                d.feed(&wire[..split]);
                let first = d.next_frame().expect("valid");
                if split < wire.len() {
                    assert_eq!(first, None, "{framing} split at {split}");
                    d.feed(&wire[split..]);
                }
                let f = match first {
                    Some(f) => f,
                    None => d.next_frame().expect("valid").expect("complete"),
                };
                assert_eq!(f.source, source.map(a), "{framing}");
                assert_eq!(&f.payload[..], *payload, "{framing}");
                assert_eq!(d.pending(), 0);
            }
        }
    }

    /// Frames the per-flow fork itself wrote (captured from its binary by
    /// `tests/data/capture_flow_fork.py`; CI cannot fetch or build the fork, which is on no
    /// registry, so the capture is committed). Our encoder must write the same bytes, and our
    /// decoder must read them fed one byte per write.
    #[test]
    fn flow_vectors_from_the_fork() {
        let vectors = include_str!("../tests/data/flow-fork-vectors.txt");
        let mut seen = 0;
        for line in vectors.lines().filter(|l| !l.starts_with('#')) {
            let mut cols = line.split_whitespace();
            let (Some(src), Some(payload), Some(wire)) = (cols.next(), cols.next(), cols.next())
            else {
                panic!("malformed vector line {line:?}");
            };
            let src = a(src);
            let payload = vector_hex(payload);
            let f = check_vector(Framing::Flow, src, &payload, &vector_hex(wire), line);
            assert_eq!(f.source, Some(src), "{line}");
            assert_eq!(&f.payload[..], &payload[..], "{line}");
            seen += 1;
        }
        assert_eq!(seen, 6, "IPv4 and IPv6, three sizes each");
    }

    /// Frames Mullvad's udp2tcp itself wrote (captured from its binary by
    /// `tests/data/capture_mullvad.py`; the crate is `publish = false`, on no registry CI
    /// reaches, so the capture is committed), encoded and decoded one byte per write.
    #[test]
    fn mullvad_vectors_from_udp2tcp() {
        let vectors = include_str!("../tests/data/mullvad-vectors.txt");
        let mut seen = 0;
        for line in vectors.lines().filter(|l| !l.starts_with('#')) {
            let (payload, wire) = line.split_once(' ').expect("two columns");
            let payload = vector_hex(payload);
            let wire = vector_hex(wire);
            let f = check_vector(Framing::Mullvad, a("127.0.0.1:1"), &payload, &wire, line);
            assert_eq!((f.source, &f.payload[..]), (None, &payload[..]), "{line}");
            seen += 1;
        }
        assert_eq!(seen, 3);
    }

    #[test]
    fn largest_datagram_and_limits() {
        for framing in [Framing::Plain, Framing::Flow, Framing::Mullvad] {
            let big = vec![0xa5u8; MAX_DATAGRAM];
            let mut out = BytesMut::new();
            encode(framing, a("10.0.0.1:9"), &big, &mut out).expect("65,535 bytes fit");
            let mut d = Decoder::new(framing);
            d.feed(&out);
            let f = d.next_frame().expect("valid").expect("complete");
            assert_eq!(f.payload.len(), MAX_DATAGRAM);
            let too_big = vec![0u8; MAX_DATAGRAM + 1];
            assert_eq!(
                encode(framing, a("10.0.0.1:9"), &too_big, &mut BytesMut::new()),
                Err(FrameError::TooLong {
                    len: MAX_DATAGRAM + 1,
                    max: MAX_DATAGRAM
                })
            );
        }
        // A peer announcing 4 GiB is refused at once, before any byte of it is buffered.
        let mut d = Decoder::new(Framing::Plain);
        d.feed(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLong {
                len: u32::MAX as usize,
                max: MAX_DATAGRAM
            })
        );
        assert!(d.buffer().capacity() < 1 << 20);
        // The fork's length counts the 18-byte address: 18 + 65,535 is the longest flow frame.
        let mut d = Decoder::new(Framing::Flow);
        d.feed(&((FLOW_ADDR_LEN + MAX_DATAGRAM + 1) as u32).to_le_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLong {
                len: FLOW_ADDR_LEN + MAX_DATAGRAM + 1,
                max: FLOW_ADDR_LEN + MAX_DATAGRAM
            })
        );
        // A flow length too short for the address (a plain-framing peer's) is refused, naming
        // the likely cause.
        for short in [0u32, 5, 17] {
            let mut d = Decoder::new(Framing::Flow);
            d.feed(&short.to_le_bytes());
            let e = d.next_frame().expect_err("shorter than the address");
            assert_eq!(
                e,
                FrameError::TooShort {
                    len: short as usize,
                    min: FLOW_ADDR_LEN
                }
            );
            assert!(e.to_string().contains("--framing plain"), "{e}");
        }
    }

    #[test]
    fn framing_names_parse() {
        for f in [Framing::Plain, Framing::Flow, Framing::Mullvad] {
            assert_eq!(f.name().parse::<Framing>(), Ok(f));
        }
        assert!("udp"
            .parse::<Framing>()
            .expect_err("not a framing")
            .contains("plain"));
    }

    fn framing() -> impl Strategy<Value = Framing> {
        prop_oneof![
            Just(Framing::Plain),
            Just(Framing::Flow),
            Just(Framing::Mullvad)
        ]
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::new(from_v6(Ipv6Addr::from(ip)), p)),
        ]
    }

    proptest! {
        /// Any sequence of frames, cut into arbitrary chunks, decodes to the same datagrams.
        #[test]
        fn round_trip_any_split(
            framing in framing(),
            frames in prop::collection::vec((addr(), prop::collection::vec(any::<u8>(), 0..2000)), 0..8),
            cuts in prop::collection::vec(1usize..700, 0..20),
        ) {
            let mut wire = BytesMut::new();
            for (src, p) in &frames {
                encode(framing, *src, p, &mut wire).expect("fits");
            }
            let mut d = Decoder::new(framing);
            let mut got = Vec::new();
            let mut rest = &wire[..];
            let mut cuts = cuts.into_iter().cycle();
            while !rest.is_empty() {
                let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
                d.feed(&rest[..n]);
                rest = &rest[n..];
                while let Some(f) = d.next_frame().expect("own frames are valid") {
                    got.push(f);
                }
            }
            prop_assert_eq!(got.len(), frames.len());
            for (f, (src, p)) in got.iter().zip(&frames) {
                prop_assert_eq!(&f.payload[..], &p[..]);
                prop_assert_eq!(f.source, framing.carries_source().then_some(*src));
            }
            prop_assert_eq!(d.pending(), 0);
        }

        /// Arbitrary bytes never panic the decoder, and frames it returns are within bounds.
        #[test]
        fn garbage_is_safe(framing in framing(), data in prop::collection::vec(any::<u8>(), 0..4096)) {
            let mut d = Decoder::new(framing);
            d.feed(&data);
            let mut used = 0;
            while let Ok(Some(f)) = d.next_frame() {
                prop_assert!(f.payload.len() <= MAX_DATAGRAM);
                used += framing.header_len() + f.payload.len();
            }
            prop_assert!(used <= data.len());
        }
    }
}
