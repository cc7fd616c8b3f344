//! Subflow record decoder on raw bytes: never panics, always makes progress or asks for more,
//! and every record it decodes re-encodes to the bytes it consumed.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqproxy::proto::Record;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match Record::decode(&mut buf) {
            Ok(Some(r)) => {
                let used = before.len() - buf.len();
                assert!(used > 0);
                let mut again = BytesMut::new();
                r.encode(&mut again);
                let mut back = again.clone();
                assert_eq!(Record::decode(&mut back), Ok(Some(r)));
                assert!(back.is_empty());
            }
            Ok(None) => {
                assert_eq!(buf, before, "an incomplete record consumes nothing");
                break;
            }
            Err(_) => break,
        }
    }
});
