//! sing-box UoT: the request and packet decoders on arbitrary bytes never panic, consume what
//! they claim, and what they decode re-encodes to the same bytes' meaning.
#![no_main]

use libfuzzer_sys::fuzz_target;
use udp_over_tcp::singbox::{decode_packet, encode_packet, Mode, Request};

fuzz_target!(|input: (bool, &[u8])| {
    let (connect, data) = input;
    if let Ok(Some((r, n))) = Request::decode(data) {
        assert!(n <= data.len());
        let mut again = bytes::BytesMut::new();
        r.encode(&mut again);
        assert_eq!(Request::decode(&again).expect("own encoding"), Some((r, again.len())));
    }
    let mode = if connect { Mode::Connect } else { Mode::Addressed };
    let mut rest = data;
    while let Ok(Some((p, n))) = decode_packet(mode, rest) {
        assert!(n > 0 && n <= rest.len());
        let mut again = bytes::BytesMut::new();
        encode_packet(mode, p.addr.as_ref(), &p.payload, &mut again).expect("decoded packets fit");
        let (back, m) = decode_packet(mode, &again).expect("own encoding").expect("complete");
        assert_eq!((back, m), (p, again.len()));
        rest = &rest[n..];
    }
});
