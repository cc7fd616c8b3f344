//! DATAGRAM header decoder on raw bytes, and fragmentation of arbitrary payloads at arbitrary
//! DATAGRAM sizes: every fragment fits, decodes, and names a valid fragment index.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqproxy::proto::{fragment, DatagramHeader, DATAGRAM_HEADER_LEN};

fuzz_target!(|input: (&[u8], u16, u32, u16)| {
    let (data, max, session, packet) = input;
    if let Ok((h, payload)) = DatagramHeader::decode(data) {
        assert!(h.frag_id < h.frag_count);
        assert_eq!(payload.len() + DATAGRAM_HEADER_LEN, data.len());
        assert_eq!(&h.to_bytes()[..], &data[..DATAGRAM_HEADER_LEN]);
    }
    if let Ok(frags) = fragment(session, packet, data, max as usize) {
        let mut total = 0;
        for f in &frags {
            assert!(f.len() <= max as usize);
            let (h, p) = DatagramHeader::decode(f).expect("own fragment decodes");
            assert_eq!(h.frag_count as usize, frags.len());
            assert_eq!((h.session_id, h.packet_id), (session, packet));
            total += p.len();
        }
        assert_eq!(total, data.len());
    }
});
