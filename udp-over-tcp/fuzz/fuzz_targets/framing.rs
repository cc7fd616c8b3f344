//! udp-over-tcp framings: the incremental decoder on arbitrary bytes fed in arbitrary chunks
//! never panics, never yields more than it was fed, and every frame it yields re-encodes to
//! bytes that decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use udp_over_tcp::framing::{self, Decoder, Framing, MAX_DATAGRAM};

fuzz_target!(|input: (u8, u8, &[u8])| {
    let (which, chunk, data) = input;
    let f = match which % 3 {
        0 => Framing::Plain,
        1 => Framing::Flow,
        _ => Framing::Mullvad,
    };
    let chunk = usize::from(chunk).max(1);
    let mut d = Decoder::new(f);
    let mut used = 0usize;
    for part in data.chunks(chunk) {
        d.feed(part);
        loop {
            match d.next_frame() {
                Ok(Some(fr)) => {
                    assert!(fr.payload.len() <= MAX_DATAGRAM);
                    used += f.header_len() + fr.payload.len();
                    let src = fr.source.unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
                    let mut again = bytes::BytesMut::new();
                    framing::encode(f, src, &fr.payload, &mut again).expect("decoded frames fit");
                    let mut d2 = Decoder::new(f);
                    d2.feed(&again);
                    assert_eq!(d2.next_frame().expect("own encoding"), Some(fr));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert!(used <= data.len());
});
