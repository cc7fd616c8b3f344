//! Fuzz target: the TCP frame decoder (`u16 BE length | datagram`). The input is split into
//! pieces at points the input itself chooses and fed in order; the decoder must yield exactly
//! what a one-shot reference parse of the whole stream yields, never panic, and never buffer
//! more than one frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quic_relay::frame::{FrameDecoder, FrameError, FRAME_HEADER, MAX_FRAME_PAYLOAD};

/// The obvious parse of a whole stream.
fn reference(mut s: &[u8]) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut out = Vec::new();
    while s.len() >= FRAME_HEADER {
        let len = usize::from(u16::from_be_bytes([s[0], s[1]]));
        if len > MAX_FRAME_PAYLOAD {
            return (out, Some(FrameError::TooLong(len)));
        }
        if s.len() < FRAME_HEADER + len {
            break;
        }
        out.push(s[FRAME_HEADER..FRAME_HEADER + len].to_vec());
        s = &s[FRAME_HEADER + len..];
    }
    (out, None)
}

fuzz_target!(|input: (Vec<u16>, Vec<u8>)| {
    let (cuts, stream) = input;
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) % (stream.len() + 1))
        .collect();
    points.push(stream.len());
    points.sort_unstable();
    let mut d = FrameDecoder::new();
    let mut got = Vec::new();
    let mut err = None;
    let mut at = 0;
    'feed: for p in points {
        d.extend(&stream[at..p]);
        at = p;
        loop {
            match d.next_frame() {
                Ok(Some(f)) => got.push(f.to_vec()),
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break 'feed;
                }
            }
        }
        assert!(d.buffered() < FRAME_HEADER + MAX_FRAME_PAYLOAD);
    }
    assert_eq!((got, err), reference(&stream));
});
