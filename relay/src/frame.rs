//! Framing of datagrams on a TCP stream to the relay: `u16 big-endian length | datagram`
//! (PROTOCOL.md §11). Pure (no sockets): shared by the relay's TCP listener and the SDK.
//!
//! Why this format: a UDP datagram's length always fits 16 bits, so a wider prefix would only
//! waste bytes; network byte order as everywhere on the wire; and it is exactly the framing of
//! Mullvad's udp2tcp/tcp2udp, so that tool can carry an unmodified UDP client's traffic to the
//! relay's TCP port.

/// Largest datagram a frame may carry: the largest UDP payload over IPv4. Anything longer could
/// not be forwarded to a UDP member, so a longer length means a broken or hostile client.
pub const MAX_FRAME_PAYLOAD: usize = 65_507;

/// Bytes of the length prefix.
pub const FRAME_HEADER: usize = 2;

/// Appends one frame (`u16 BE length | datagram`) to `out`. `datagram` must be at most
/// [`MAX_FRAME_PAYLOAD`] bytes.
pub fn encode_frame(datagram: &[u8], out: &mut Vec<u8>) {
    debug_assert!(datagram.len() <= MAX_FRAME_PAYLOAD);
    out.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
    out.extend_from_slice(datagram);
}

/// Why a byte stream is not a valid sequence of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// A length prefix above [`MAX_FRAME_PAYLOAD`].
    TooLong(usize),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLong(n) => write!(
                f,
                "frame length {n} exceeds the largest UDP datagram ({MAX_FRAME_PAYLOAD})"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// An incremental frame decoder: feed it bytes as they arrive (split anywhere), take whole
/// datagrams out. Its buffer never holds more than one frame plus one read.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole datagram, `Ok(None)` if more bytes are needed, or an error (after which
    /// the stream is unusable: close it).
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < FRAME_HEADER {
            self.compact();
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([avail[0], avail[1]]));
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        if avail.len() < FRAME_HEADER + len {
            self.compact();
            return Ok(None);
        }
        let begin = self.start + FRAME_HEADER;
        self.start = begin + len;
        Ok(Some(&self.buf[begin..begin + len]))
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Feeds `stream` to a decoder in pieces cut at `cuts` and collects what it yields.
    fn decode_in_pieces(stream: &[u8], cuts: &[usize]) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut d = FrameDecoder::new();
        let mut out = Vec::new();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        points.push(stream.len());
        points.sort_unstable();
        let mut at = 0;
        for p in points {
            d.extend(&stream[at..p]);
            at = p;
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => out.push(f.to_vec()),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
            // Never more than one partial frame is held.
            assert!(d.buffered() < FRAME_HEADER + MAX_FRAME_PAYLOAD);
        }
        (out, None)
    }

    #[test]
    fn golden_bytes() {
        let mut out = Vec::new();
        encode_frame(b"ACK\n", &mut out);
        encode_frame(b"", &mut out);
        assert_eq!(out, [0x00, 0x04, b'A', b'C', b'K', b'\n', 0x00, 0x00]);
        assert_eq!(
            decode_in_pieces(&out, &[1, 3, 7]),
            (vec![b"ACK\n".to_vec(), vec![]], None)
        );
        assert_eq!(
            decode_in_pieces(&[0xff, 0xe4], &[]).1,
            Some(FrameError::TooLong(65_508)),
            "anything above 65,507 is refused at once, before its body arrives"
        );
        assert_eq!(
            decode_in_pieces(&[0xff, 0xe3], &[]).1,
            None,
            "65,507 is allowed"
        );
    }

    proptest! {
        #[test]
        fn frames_survive_any_split(
            datagrams in proptest::collection::vec(
                prop_oneof![
                    9 => proptest::collection::vec(any::<u8>(), 0..1500),
                    1 => proptest::collection::vec(any::<u8>(), 60_000..=MAX_FRAME_PAYLOAD),
                ],
                0..8,
            ),
            cuts in proptest::collection::vec(any::<usize>(), 0..16),
        ) {
            let mut stream = Vec::new();
            for d in &datagrams {
                encode_frame(d, &mut stream);
            }
            let (got, err) = decode_in_pieces(&stream, &cuts);
            prop_assert_eq!(err, None);
            prop_assert!(got == datagrams);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_errors_name_a_bad_length(
            stream in proptest::collection::vec(any::<u8>(), 0..4096),
            cuts in proptest::collection::vec(any::<usize>(), 0..16),
        ) {
            let (got, err) = decode_in_pieces(&stream, &cuts);
            let total: usize = got.iter().map(|f| f.len() + FRAME_HEADER).sum();
            prop_assert!(total <= stream.len());
            if let Some(FrameError::TooLong(n)) = err {
                prop_assert!(n > MAX_FRAME_PAYLOAD);
                // The bad length sits right after the frames that decoded.
                prop_assert_eq!(usize::from(u16::from_be_bytes([stream[total], stream[total + 1]])), n);
            }
        }
    }
}
