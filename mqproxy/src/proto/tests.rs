//! Wire-format snapshots and round-trip properties of every section.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::*;
use proptest::prelude::*;

#[test]
fn varint_snapshots() {
    for (v, hex) in [
        (37u64, "25"),
        (15293, "7bbd"),
        (494878333, "9d7f3e7d"),
        (151288809941952652, "c2197c5eff14e88c"),
    ] {
        let mut b = BytesMut::new();
        put_varint(&mut b, v);
        assert_eq!(hex::encode(&b), hex);
        assert_eq!(get_varint(&b), Some((v, b.len())));
        assert_eq!(varint_len(v), b.len());
    }
}

#[test]
fn datagram_header_snapshot() {
    let h = DatagramHeader {
        session_id: 0x01020304,
        packet_id: 0x0506,
        flags: 0,
        frag_id: 1,
        frag_count: 3,
    };
    assert_eq!(hex::encode(h.to_bytes()), "010203040506000103");
    let mut d = h.to_bytes().to_vec();
    d.extend_from_slice(b"xy");
    assert_eq!(DatagramHeader::decode(&d), Ok((h, &b"xy"[..])));
    assert!(DatagramHeader::decode(&d[..8]).is_err());
    d[7] = 3; // frag_id == frag_count
    assert!(DatagramHeader::decode(&d).is_err());
    d[8] = 0;
    d[7] = 0;
    assert!(DatagramHeader::decode(&d).is_err());
}

#[test]
fn frame_snapshots() {
    let f = Frame::UdpOpen {
        session_id: 7,
        flags: 0,
        addr: TargetAddr::Ip("1.2.3.4:53".parse().expect("literal")),
        idle_timeout_ms: 30_000,
    };
    // type 05, len 17, id 00000007, flags 00, 01 01020304 0035, 30000 = 80007530, pad 00
    assert_eq!(
        hex::encode(f.to_bytes()),
        "05110000000700010102030400358000753000"
    );
    let f = Frame::AuthRequest {
        version: 1,
        client_id: "c".into(),
        token: b"tk".to_vec(),
        features: FEATURE_UDP,
    };
    assert_eq!(hex::encode(f.to_bytes()), "010801016302746b0100");
}

#[test]
fn frames_skip_extensions_and_unknown_types() {
    // A known frame with padding and trailing extension bytes decodes; the trailer is skipped.
    let f = Frame::UdpClose {
        session_id: 9,
        reason: CloseReason::Idle,
    };
    let mut b = BytesMut::new();
    f.encode_padded(&mut b, 3);
    let mut raw = b.to_vec();
    raw[1] += 2; // two extension bytes after the padding
    raw.extend_from_slice(&[0xee, 0xee]);
    raw.extend_from_slice(&Frame::Unknown { frame_type: 0x30 }.to_bytes());
    let (got, n) = Frame::decode(&raw).expect("valid").expect("complete");
    assert_eq!(got, f);
    let (got, _) = Frame::decode(&raw[n..]).expect("valid").expect("complete");
    assert_eq!(got, Frame::Unknown { frame_type: 0x30 });
}

#[test]
fn oversized_frame_rejected_early() {
    let mut b = BytesMut::new();
    put_varint(&mut b, 1);
    put_varint(&mut b, MAX_FRAME_BODY as u64 + 1);
    assert!(matches!(Frame::check(&b), Err(DecodeError::TooLong { .. })));
}

#[test]
fn fragment_sizes_are_exact() {
    // 3,000 bytes at a 1,200-byte DATAGRAM: chunks of 1,191, 1,191 and 618.
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let frags = fragment(1, 2, &payload, 1200).expect("fits");
    let lens: Vec<usize> = frags.iter().map(|f| f.len()).collect();
    assert_eq!(lens, vec![1200, 1200, 627]);
    let mut r = Reassembler::new();
    let now = Instant::now();
    let mut out = None;
    for f in frags.iter().rev() {
        let (h, p) = DatagramHeader::decode(f).expect("valid");
        if let Reassembled::Packet(b) = r.push(now, &h, p) {
            out = Some(b);
        }
    }
    assert_eq!(out.as_deref(), Some(&payload[..]));
    assert_eq!(r.buffered_bytes(), 0);
    // Exactly a DATAGRAM's worth stays unfragmented; one more byte makes two fragments.
    assert_eq!(
        fragment(1, 2, &payload[..1191], 1200).expect("fits").len(),
        1
    );
    assert_eq!(
        fragment(1, 2, &payload[..1192], 1200).expect("fits").len(),
        2
    );
    assert_eq!(fragment(1, 2, &[], 1200).expect("fits").len(), 1);
    assert!(fragment(1, 2, &payload, 9).is_err());
    assert!(fragment(1, 2, &vec![0; MAX_PACKET + 1], 1200).is_err());
}

#[test]
fn reassembly_lru_duplicates_and_timeout() {
    let now = Instant::now();
    let mut r = Reassembler::new();
    let h = |packet_id, frag_id| DatagramHeader {
        session_id: 1,
        packet_id,
        flags: 0,
        frag_id,
        frag_count: 2,
    };
    assert_eq!(r.push(now, &h(1, 0), b"a"), Reassembled::Pending);
    assert_eq!(r.push(now, &h(1, 0), b"a"), Reassembled::Duplicate);
    for id in 2..=5 {
        assert_eq!(r.push(now, &h(id, 0), b"b"), Reassembled::Pending);
    }
    // Packet 1 was least recently used and is gone: its second half starts a new slot.
    assert_eq!(r.push(now, &h(1, 1), b"c"), Reassembled::Pending);
    assert_eq!(
        r.push(now, &h(5, 1), b"d"),
        Reassembled::Packet(Bytes::from_static(b"bd"))
    );
    // After the timeout everything pending is dropped.
    let later = now + REASSEMBLY_TIMEOUT;
    assert_eq!(r.push(later, &h(4, 1), b"e"), Reassembled::Pending);
    assert_eq!(r.buffered_bytes(), 1);
}

fn arb_addr() -> impl Strategy<Value = TargetAddr> {
    prop_oneof![
        any::<(u32, u16)>()
            .prop_map(|(ip, p)| TargetAddr::Ip(SocketAddr::new(Ipv4Addr::from(ip).into(), p))),
        any::<(u128, u16)>()
            .prop_map(|(ip, p)| TargetAddr::Ip(SocketAddr::new(Ipv6Addr::from(ip).into(), p))),
        ("[a-z0-9.-]{1,255}", any::<u16>()).prop_map(|(d, p)| TargetAddr::Domain(d, p)),
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let sa = || {
        prop::option::of(
            any::<(u32, u16)>().prop_map(|(ip, p)| SocketAddr::new(Ipv4Addr::from(ip).into(), p)),
        )
    };
    prop_oneof![
        (
            0..VARINT_MAX,
            "[ -~]{0,64}",
            prop::collection::vec(any::<u8>(), 0..MAX_TOKEN_LEN),
            0..VARINT_MAX
        )
            .prop_map(|(version, client_id, token, features)| Frame::AuthRequest {
                version,
                client_id,
                token,
                features
            }),
        (0..3u64, 0..VARINT_MAX, 0..VARINT_MAX, 0..VARINT_MAX).prop_map(|(s, f, t, m)| {
            Frame::AuthResponse {
                status: AuthStatus::from_code(s),
                features: f,
                udp_idle_timeout_ms: t,
                max_udp_sessions: m,
            }
        }),
        arb_addr().prop_map(|addr| Frame::ConnectRequest { addr }),
        (0..9u64, sa()).prop_map(|(c, remote)| Frame::ConnectResponse {
            status: ConnectStatus::from_socks_code(c),
            remote
        }),
        (any::<u32>(), 0..VARINT_MAX, arb_addr(), 0..VARINT_MAX).prop_map(
            |(session_id, flags, addr, idle_timeout_ms)| Frame::UdpOpen {
                session_id,
                flags,
                addr,
                idle_timeout_ms
            }
        ),
        (any::<u32>(), 0..100u64, 0..VARINT_MAX, sa()).prop_map(|(id, s, t, remote)| {
            Frame::UdpResp {
                session_id: id,
                status: UdpStatus::from_code(s),
                idle_timeout_ms: t,
                remote,
            }
        }),
        (any::<u32>(), 0..100u64).prop_map(|(id, r)| Frame::UdpClose {
            session_id: id,
            reason: CloseReason::from_code(r)
        }),
        (any::<[u8; BUNDLE_ID_LEN]>(), 0..VARINT_MAX, 0..VARINT_MAX).prop_map(
            |(bundle, path_index, scheduler)| Frame::PathBind {
                bundle,
                path_index,
                scheduler
            }
        ),
        (0..VARINT_MAX, arb_addr()).prop_map(|(flow_id, addr)| Frame::MpConnect { flow_id, addr }),
        (0..VARINT_MAX).prop_map(|flow_id| Frame::Subflow { flow_id }),
    ]
}

proptest! {
    #[test]
    fn frame_round_trip(f in arb_frame(), pad in 0usize..64) {
        let mut b = BytesMut::new();
        f.encode_padded(&mut b, pad);
        prop_assert_eq!(Frame::check(&b), Ok(Some(b.len())));
        let (g, n) = Frame::decode(&b).expect("valid").expect("complete");
        prop_assert_eq!(n, b.len());
        prop_assert_eq!(g, f);
        // Every strict prefix asks for more bytes, never errors or misparses.
        for cut in 0..b.len() {
            prop_assert_eq!(Frame::decode(&b[..cut]), Ok(None));
        }
    }

    #[test]
    fn frame_decode_never_panics(raw in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(Some((_, n))) = Frame::decode(&raw) {
            prop_assert!(n <= raw.len());
        }
    }

    #[test]
    fn addr_round_trip(a in arb_addr()) {
        let mut b = BytesMut::new();
        a.encode(&mut b);
        prop_assert_eq!(b.len(), a.encoded_len());
        prop_assert_eq!(TargetAddr::decode(&b), Ok(Some((a.clone(), b.len()))));
        // A domain that looks like an IP address parses back as one: skip those.
        if !matches!(&a, TargetAddr::Domain(d, _) if d.parse::<IpAddr>().is_ok()) {
            let s = a.to_string();
            prop_assert_eq!(s.parse::<TargetAddr>().expect("own display parses"), a);
        }
    }

    #[test]
    fn header_round_trip(s: u32, p: u16, f: u8, count in 1u8..=255, id: u8) {
        let h = DatagramHeader { session_id: s, packet_id: p, flags: f, frag_id: id % count, frag_count: count };
        let b = h.to_bytes();
        prop_assert_eq!(DatagramHeader::decode(&b), Ok((h, &[][..])));
    }

    #[test]
    fn fragment_reassemble_round_trip(
        len in 0usize..=MAX_PACKET,
        max in 100usize..1500,
        seed: u64,
    ) {
        let payload: Vec<u8> = (0..len).map(|i| (i as u64 ^ seed) as u8).collect();
        match fragment(3, 4, &payload, max) {
            Ok(frags) => {
                let mut order: Vec<usize> = (0..frags.len()).collect();
                // A deterministic shuffle plus a duplicate (a whole unfragmented packet
                // repeated is simply a second packet, so only fragments are duplicated).
                order.sort_by_key(|i| (*i as u64).wrapping_mul(seed | 1) % 1009);
                if frags.len() > 1 {
                    order.insert(1, order[0]);
                }
                let mut r = Reassembler::new();
                let now = Instant::now();
                let mut got = None;
                for i in order {
                    prop_assert!(frags[i].len() <= max);
                    let (h, p) = DatagramHeader::decode(&frags[i]).expect("valid");
                    if let Reassembled::Packet(b) = r.push(now, &h, p) {
                        prop_assert!(got.is_none());
                        got = Some(b);
                    }
                }
                prop_assert_eq!(got.as_deref(), Some(&payload[..]));
                prop_assert_eq!(r.buffered_bytes(), 0);
            }
            Err(_) => prop_assert!(len.div_ceil(max - DATAGRAM_HEADER_LEN) > MAX_FRAGMENTS),
        }
    }

    #[test]
    fn reassembly_stays_bounded(dgrams in prop::collection::vec(prop::collection::vec(any::<u8>(), 9..2000), 0..200)) {
        let mut r = Reassembler::new();
        let now = Instant::now();
        for d in &dgrams {
            if let Ok((h, p)) = DatagramHeader::decode(d) {
                if let Reassembled::Packet(b) = r.push(now, &h, p) {
                    prop_assert!(b.len() <= MAX_PACKET);
                }
            }
            prop_assert!(r.buffered_bytes() <= REASSEMBLY_SLOTS * MAX_PACKET);
            prop_assert!(r.slots.len() <= REASSEMBLY_SLOTS);
        }
    }
}

fn arb_record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (
            0..VARINT_MAX - MAX_CHUNK as u64,
            prop::collection::vec(any::<u8>(), 1..2000)
        )
            .prop_map(|(offset, d)| Record::Data {
                offset,
                data: Bytes::from(d)
            }),
        (0..VARINT_MAX, 0..VARINT_MAX).prop_map(|(a, b)| Record::Ack {
            delivered: a.min(b),
            received: a.max(b),
        }),
        (0..VARINT_MAX).prop_map(|offset| Record::Fin { offset }),
    ]
}

#[test]
fn record_snapshots() {
    let mut b = BytesMut::new();
    Record::Data {
        offset: 64,
        data: Bytes::from_static(b"hi"),
    }
    .encode(&mut b);
    Record::Ack {
        delivered: 5,
        received: 66,
    }
    .encode(&mut b);
    Record::Fin { offset: 66 }.encode(&mut b);
    assert_eq!(hex::encode(&b), "00404002686901054042024042");
    let mut bad = BytesMut::from(&b"\x01\x05\x04"[..]);
    assert!(
        Record::decode(&mut bad).is_err(),
        "received below delivered"
    );
    let mut bad = BytesMut::from(&b"\x00\x00\x00"[..]);
    assert!(Record::decode(&mut bad).is_err(), "empty chunk");
    let mut bad = BytesMut::from(&b"\x07\x00"[..]);
    assert!(Record::decode(&mut bad).is_err(), "unknown type");
}

proptest! {
    #[test]
    fn record_round_trip(rs in prop::collection::vec(arb_record(), 1..8)) {
        let mut b = BytesMut::new();
        for r in &rs {
            r.encode(&mut b);
        }
        let whole = b.clone();
        for r in &rs {
            let got = Record::decode(&mut b).expect("valid");
            prop_assert_eq!(got.as_ref(), Some(r));
        }
        prop_assert!(b.is_empty());
        // A strict prefix asks for more bytes and consumes nothing.
        for cut in 0..whole.len().min(40) {
            let mut p = BytesMut::from(&whole[..cut]);
            if let Ok(None) = Record::decode(&mut p) {
                prop_assert_eq!(p.len(), cut);
            }
        }
    }

    #[test]
    fn record_decode_never_panics(raw in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut b = BytesMut::from(&raw[..]);
        while let Ok(Some(_)) = Record::decode(&mut b) {}
    }
}
