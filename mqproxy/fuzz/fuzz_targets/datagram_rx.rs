//! The DATAGRAM receive pipeline fed arbitrary DATAGRAMs (raw bytes or built headers, for open
//! and unknown sessions, with a clock that moves): held bytes stay within the budget and no
//! packet exceeds 65,535 bytes.
#![no_main]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mqproxy::datagram_rx::{DatagramRx, Received, RxSession};
use mqproxy::multipath::sched::DupFilter;
use mqproxy::proto::{DatagramHeader, MAX_PACKET};

/// Budget small enough for the fuzzer to reach it.
const BUDGET: usize = 16 * 1024;

#[derive(Debug, Arbitrary)]
enum Input<'a> {
    Raw(&'a [u8]),
    Framed {
        session_id: u8,
        packet_id: u8,
        frag_id: u8,
        frag_count: u8,
        len: u16,
        advance_ms: u16,
    },
}

#[derive(Default)]
struct Session(Mutex<DupFilter>);

impl RxSession for Session {
    fn dup_filter(&self) -> &Mutex<DupFilter> {
        &self.0
    }
}

fuzz_target!(|inputs: Vec<Input<'_>>| {
    // Sessions 0 to 3 are open, the rest unknown.
    let open: Vec<Session> = (0..4).map(|_| Session::default()).collect();
    let mut rx = DatagramRx::with_budget(BUDGET);
    let mut now = Instant::now();
    let payload = vec![0xa5u8; 65_535];
    for i in inputs {
        let d = match i {
            Input::Raw(b) => Bytes::copy_from_slice(b),
            Input::Framed {
                session_id,
                packet_id,
                frag_id,
                frag_count,
                len,
                advance_ms,
            } => {
                now += Duration::from_millis(u64::from(advance_ms % 3000));
                let h = DatagramHeader {
                    session_id: u32::from(session_id % 6),
                    packet_id: u16::from(packet_id % 8),
                    flags: 0,
                    frag_id,
                    frag_count,
                };
                let body = &payload[..usize::from(len) % 40_000];
                [&h.to_bytes()[..], body].concat().into()
            }
        };
        let r = rx.receive(now, &d, |id| open.get(id as usize));
        if let Received::Packet { payload, .. } = r {
            assert!(payload.len() <= MAX_PACKET);
        }
        assert!(rx.buffered_bytes() <= BUDGET);
    }
});
