//! The reassembler fed arbitrary fragment sequences (with a clock that moves): memory stays
//! within 4 slots of 64 KiB, and no packet exceeds 65,535 bytes.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mqproxy::proto::{
    DatagramHeader, Reassembled, Reassembler, MAX_PACKET, REASSEMBLY_SLOTS,
};

#[derive(Debug, Arbitrary)]
struct Fragment {
    packet_id: u8,
    frag_id: u8,
    frag_count: u8,
    len: u16,
    advance_ms: u16,
}

fuzz_target!(|frags: Vec<Fragment>| {
    let mut r = Reassembler::new();
    let mut now = Instant::now();
    let payload = vec![0xa5u8; 65_535];
    for f in frags {
        now += Duration::from_millis(u64::from(f.advance_ms % 3000));
        let h = DatagramHeader {
            session_id: 1,
            packet_id: u16::from(f.packet_id % 8),
            flags: 0,
            frag_id: f.frag_id,
            frag_count: f.frag_count,
        };
        // Only what the header decoder would let through reaches the reassembler.
        let Ok((h, _)) = DatagramHeader::decode(&h.to_bytes()) else {
            continue;
        };
        let len = usize::from(f.len) % 4000;
        if let Reassembled::Packet(p) = r.push(now, &h, &payload[..len]) {
            assert!(p.len() <= MAX_PACKET);
        }
        assert!(r.buffered_bytes() <= REASSEMBLY_SLOTS * MAX_PACKET);
    }
});
