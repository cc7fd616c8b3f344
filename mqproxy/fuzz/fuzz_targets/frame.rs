//! Control-frame decoder on raw bytes: never panics, consumes what it claims, and every frame
//! it decodes re-encodes to something that decodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqproxy::proto::{get_varint, Frame};

fuzz_target!(|data: &[u8]| {
    let _ = get_varint(data);
    let mut rest = data;
    while let Ok(Some((frame, n))) = Frame::decode(rest) {
        assert!(n > 0 && n <= rest.len());
        assert_eq!(Frame::check(rest), Ok(Some(n)));
        let again = frame.to_bytes();
        let (back, m) = Frame::decode(&again)
            .expect("own encoding decodes")
            .expect("own encoding is complete");
        assert_eq!(m, again.len());
        assert_eq!(back, frame);
        rest = &rest[n..];
    }
});
