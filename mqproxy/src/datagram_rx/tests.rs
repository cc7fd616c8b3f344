//! Tests of the DATAGRAM receive pipeline: each outcome, the budget, and (property tests)
//! arbitrary input never breaking its accounting, in-order fragments always reassembling.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::proto::{fragment, MAX_PACKET, REASSEMBLY_TIMEOUT};

#[derive(Debug, Default)]
struct TestSession(Mutex<DupFilter>);

impl RxSession for TestSession {
    fn dup_filter(&self) -> &Mutex<DupFilter> {
        &self.0
    }
}

/// Sessions 1 and 2 are open; any other id is not.
struct Open(HashMap<u32, Arc<TestSession>>);

impl Open {
    fn new() -> Self {
        Open((1..=2).map(|id| (id, Arc::default())).collect())
    }

    fn get(&self, id: u32) -> Option<Arc<TestSession>> {
        self.0.get(&id).cloned()
    }
}

fn datagram(session_id: u32, packet_id: u16, frag_id: u8, frag_count: u8, body: &[u8]) -> Bytes {
    let h = DatagramHeader {
        session_id,
        packet_id,
        flags: 0,
        frag_id,
        frag_count,
    };
    [&h.to_bytes()[..], body].concat().into()
}

fn packet<S>(r: Received<S>) -> (u32, Bytes) {
    match r {
        Received::Packet {
            session_id,
            payload,
            ..
        } => (session_id, payload),
        other => panic!(
            "expected a packet, got {:?}",
            std::mem::discriminant(&other)
        ),
    }
}

#[test]
fn whole_packet_is_a_slice_of_the_datagram() {
    let open = Open::new();
    let mut rx = DatagramRx::new();
    let d = datagram(1, 7, 0, 1, b"hello");
    let (id, p) = packet(rx.receive(Instant::now(), &d, |id| open.get(id)));
    assert_eq!((id, &p[..]), (1, &b"hello"[..]));
    assert_eq!(p.as_ptr(), d[DATAGRAM_HEADER_LEN..].as_ptr(), "no copy");
}

#[test]
fn malformed_and_unknown_are_reported() {
    let open = Open::new();
    let mut rx = DatagramRx::new();
    let now = Instant::now();
    let short = Bytes::from_static(b"\0\0\0\x01");
    assert!(matches!(
        rx.receive(now, &short, |id| open.get(id)),
        Received::Malformed(DecodeError::Truncated(_))
    ));
    let bad_index = datagram(1, 0, 3, 3, b"x");
    assert!(matches!(
        rx.receive(now, &bad_index, |id| open.get(id)),
        Received::Malformed(DecodeError::Invalid(_))
    ));
    assert!(matches!(
        rx.receive(now, &datagram(9, 0, 0, 1, b"x"), |id| open.get(id)),
        Received::UnknownSession(9)
    ));
}

#[test]
fn fragments_reassemble_and_copies_are_dropped() {
    let open = Open::new();
    let mut rx = DatagramRx::new();
    let now = Instant::now();
    let first = datagram(2, 40, 0, 2, b"ab");
    assert!(matches!(
        rx.receive(now, &first, |id| open.get(id)),
        Received::Pending
    ));
    assert_eq!(rx.buffered_bytes(), 2);
    assert!(matches!(
        rx.receive(now, &first, |id| open.get(id)),
        Received::Discarded(Discard::RepeatedFragment)
    ));
    let (id, p) = packet(rx.receive(now, &datagram(2, 40, 1, 2, b"cd"), |id| open.get(id)));
    assert_eq!((id, &p[..]), (2, &b"abcd"[..]));
    assert_eq!(rx.buffered_bytes(), 0);
    // The same packet again, whole this time (another path): a duplicate.
    assert!(matches!(
        rx.receive(now, &datagram(2, 40, 0, 1, b"abcd"), |id| open.get(id)),
        Received::Duplicate
    ));
    // Duplicate filters are per session.
    packet(rx.receive(now, &datagram(1, 40, 0, 1, b"abcd"), |id| open.get(id)));
}

#[test]
fn budget_bounds_held_bytes_across_sessions() {
    let open = Open::new();
    let mut rx = DatagramRx::with_budget(10);
    let now = Instant::now();
    let r = rx.receive(now, &datagram(1, 0, 0, 2, &[0; 6]), |id| open.get(id));
    assert!(matches!(r, Received::Pending));
    let r = rx.receive(now, &datagram(2, 0, 0, 2, &[0; 5]), |id| open.get(id));
    assert!(matches!(r, Received::Discarded(Discard::OverBudget)));
    let r = rx.receive(now, &datagram(2, 0, 0, 2, &[0; 4]), |id| open.get(id));
    assert!(matches!(r, Received::Pending));
    assert_eq!(rx.buffered_bytes(), 10);
    // Unfragmented packets need no budget.
    packet(rx.receive(now, &datagram(2, 1, 0, 1, &[0; 50]), |id| open.get(id)));
    rx.forget(1);
    assert_eq!(rx.buffered_bytes(), 4);
}

#[test]
fn unknown_session_loses_its_reassembly_state() {
    let mut open = Open::new();
    let mut rx = DatagramRx::new();
    let now = Instant::now();
    let r = rx.receive(now, &datagram(1, 0, 0, 2, b"abc"), |id| open.get(id));
    assert!(matches!(r, Received::Pending));
    open.0.remove(&1);
    let r = rx.receive(now, &datagram(1, 0, 1, 2, b"def"), |id| open.get(id));
    assert!(matches!(r, Received::UnknownSession(1)));
    assert_eq!(rx.buffered_bytes(), 0);
}

#[test]
fn oversized_packet_is_discarded() {
    let open = Open::new();
    let mut rx = DatagramRx::new();
    let now = Instant::now();
    let big = vec![0; MAX_PACKET / 2 + 1];
    let r = rx.receive(now, &datagram(1, 0, 0, 3, &big), |id| open.get(id));
    assert!(matches!(r, Received::Pending));
    let r = rx.receive(now, &datagram(1, 0, 1, 3, &big), |id| open.get(id));
    assert!(matches!(r, Received::Discarded(Discard::Oversized)));
    assert_eq!(rx.buffered_bytes(), 0);
}

/// One DATAGRAM of a property test: raw bytes, or a header the test builds.
#[derive(Debug, Clone)]
enum Input {
    Raw(Vec<u8>),
    Framed {
        session_id: u32,
        packet_id: u16,
        frag_id: u8,
        frag_count: u8,
        len: usize,
        advance_ms: u64,
    },
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..32).prop_map(Input::Raw),
        (0u32..4, 0u16..6, 0u8..5, 0u8..5, 0usize..3000, 0u64..2500).prop_map(
            |(session_id, packet_id, frag_id, frag_count, len, advance_ms)| Input::Framed {
                session_id,
                packet_id,
                frag_id,
                frag_count,
                len,
                advance_ms,
            }
        ),
    ]
}

proptest! {
    /// Any sequence of DATAGRAMs: no panic, held bytes within the budget and equal to what the
    /// reassemblers hold, packets within MAX_PACKET, outcomes consistent with the session ids.
    #[test]
    fn arbitrary_datagrams_keep_the_books(inputs in proptest::collection::vec(input(), 0..200),
                                          budget in 0usize..12_000) {
        let open = Open::new();
        let mut rx = DatagramRx::with_budget(budget);
        let mut now = Instant::now();
        for i in inputs {
            let d: Bytes = match i {
                Input::Raw(b) => b.into(),
                Input::Framed { session_id, packet_id, frag_id, frag_count, len, advance_ms } => {
                    now += Duration::from_millis(advance_ms);
                    datagram(session_id, packet_id, frag_id, frag_count, &vec![0x5a; len])
                }
            };
            match rx.receive(now, &d, |id| open.get(id)) {
                Received::Packet { session_id, payload, .. } => {
                    prop_assert!(open.0.contains_key(&session_id));
                    prop_assert!(payload.len() <= MAX_PACKET);
                }
                Received::UnknownSession(id) => prop_assert!(!open.0.contains_key(&id)),
                _ => {}
            }
            prop_assert!(rx.buffered_bytes() <= budget);
            let held: usize = rx.reassembly.values().map(Reassembler::buffered_bytes).sum();
            prop_assert_eq!(rx.buffered_bytes(), held);
        }
    }

    /// Packets fragmented by the sender and received in order, sessions interleaved packet by
    /// packet: each comes out once, whole, whatever the DATAGRAM size.
    #[test]
    fn fragmented_packets_round_trip(packets in proptest::collection::vec(
                                         (1u32..=2, proptest::collection::vec(any::<u8>(), 0..4000)),
                                         1..20),
                                     max_datagram in 64usize..1500) {
        let open = Open::new();
        let mut rx = DatagramRx::new();
        let now = Instant::now();
        for (n, (session, body)) in packets.iter().enumerate() {
            let frags = fragment(*session, n as u16, body, max_datagram).expect("fits");
            let (last, rest) = frags.split_last().expect("at least one fragment");
            for f in rest {
                prop_assert!(matches!(rx.receive(now, f, |id| open.get(id)), Received::Pending));
            }
            let (id, p) = packet(rx.receive(now, last, |id| open.get(id)));
            prop_assert_eq!(id, *session);
            prop_assert_eq!(&p[..], &body[..]);
            prop_assert_eq!(rx.buffered_bytes(), 0);
        }
        // A packet that lost a fragment is let go after the timeout, and the budget with it.
        let stale = datagram(1, 999, 0, 2, b"abc");
        prop_assert!(matches!(rx.receive(now, &stale, |id| open.get(id)), Received::Pending));
        let late = datagram(1, 998, 0, 2, b"x");
        let r = rx.receive(now + REASSEMBLY_TIMEOUT, &late, |id| open.get(id));
        prop_assert!(matches!(r, Received::Pending));
        prop_assert_eq!(rx.buffered_bytes(), 1);
    }
}
