//! Message framing on a QUIC stream: each message is a 4-byte big-endian length, then that many
//! bytes (quic-portal frames its messages the same way: boundaries kept on one stream).
//!
//! The header codec is pure ([`encode_header`], [`decode_header`]); [`read()`] and [`write()`] are
//! the thin async loops over a Quinn stream.

use std::sync::Arc;

use peer_sdk::quinn;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The largest message either side sends or accepts. Python users move model states and
/// observations as single messages (tens of MiB); 256 MiB is well above those and still a
/// bound a peer cannot push us past (a larger length closes the connection).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Application error code sent when the peer's message stream is malformed.
pub const PROTOCOL_ERROR: u32 = 1;

/// Bytes of the length header.
pub const HEADER_LEN: usize = 4;

/// Messages up to this size go out as one write with their header (one packet for small
/// messages, which keeps round trips short); larger ones are written in two parts.
const COALESCE_BELOW: usize = 16 << 10;

/// A malformed message stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length header announces more than [`MAX_MESSAGE_BYTES`].
    #[error("message length {0} exceeds the limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(u64),
    /// The stream ended inside a message.
    #[error("the stream ended {missing} bytes before the end of a message")]
    Truncated {
        /// How many bytes were missing.
        missing: usize,
    },
    /// Reading the stream failed (reset, connection lost).
    #[error("reading the message stream: {0}")]
    Read(String),
}

/// The header for a message of `len` bytes (the caller checked `len <= MAX_MESSAGE_BYTES`).
pub fn encode_header(len: usize) -> [u8; HEADER_LEN] {
    u32::try_from(len)
        .expect("messages are at most MAX_MESSAGE_BYTES, below 4 GiB")
        .to_be_bytes()
}

/// The message length a header announces.
pub fn decode_header(h: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(h);
    usize::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_MESSAGE_BYTES)
        .ok_or(FrameError::TooLarge(len.into()))
}

/// One received message, as the chunks Quinn handed over (copied once, into Python bytes).
#[derive(Debug, Default)]
pub struct Message {
    /// Total length.
    pub len: usize,
    chunks: Vec<bytes::Bytes>,
}

impl Message {
    /// A message made of these chunks.
    pub fn from_chunks(chunks: Vec<bytes::Bytes>) -> Self {
        Message {
            len: chunks.iter().map(|c| c.len()).sum(),
            chunks,
        }
    }

    /// Copies the message into `out` (exactly `self.len` bytes long).
    pub fn copy_to(&self, out: &mut [u8]) {
        let mut at = 0;
        for c in &self.chunks {
            out[at..at + c.len()].copy_from_slice(c);
            at += c.len();
        }
    }
}

/// Writes one message.
pub async fn write(stream: &mut quinn::SendStream, data: &[u8]) -> Result<(), quinn::WriteError> {
    let header = encode_header(data.len());
    if data.len() < COALESCE_BELOW {
        let mut buf = Vec::with_capacity(HEADER_LEN + data.len());
        buf.extend_from_slice(&header);
        buf.extend_from_slice(data);
        stream.write_all(&buf).await
    } else {
        stream.write_all(&header).await?;
        stream.write_all(data).await
    }
}

/// Reads the next message, after taking its size (plus `crate::MESSAGE_OVERHEAD`) from
/// `budget`, which the consumer gives back by dropping the permit. `Ok(None)` at a clean end.
pub async fn read(
    stream: &mut quinn::RecvStream,
    budget: &Arc<Semaphore>,
) -> Result<Option<(Message, OwnedSemaphorePermit)>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match stream.read(&mut header[got..]).await {
            Ok(Some(n)) => got += n,
            Ok(None) if got == 0 => return Ok(None),
            Ok(None) => {
                return Err(FrameError::Truncated {
                    missing: HEADER_LEN - got,
                })
            }
            Err(e) => return Err(FrameError::Read(e.to_string())),
        }
    }
    let len = decode_header(header)?;
    // A message larger than the whole budget waits for an empty queue, then takes all of it.
    let cost = (len + crate::MESSAGE_OVERHEAD).min(crate::RECV_BUFFER_BYTES);
    let permit = budget
        .clone()
        .acquire_many_owned(u32::try_from(cost).expect("the budget fits in u32"))
        .await
        .expect("the budget semaphore is never closed");
    let mut chunks = Vec::new();
    let mut left = len;
    while left > 0 {
        match stream.read_chunk(left, true).await {
            Ok(Some(c)) => {
                left -= c.bytes.len();
                chunks.push(c.bytes);
            }
            Ok(None) => return Err(FrameError::Truncated { missing: left }),
            Err(e) => return Err(FrameError::Read(e.to_string())),
        }
    }
    Ok(Some((Message::from_chunks(chunks), permit)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_bytes() {
        assert_eq!(encode_header(0), [0, 0, 0, 0]);
        assert_eq!(encode_header(1024), [0, 0, 4, 0]);
        assert_eq!(decode_header([0, 0, 4, 0]), Ok(1024));
        assert_eq!(
            decode_header([0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge(u32::MAX.into()))
        );
        assert_eq!(
            decode_header(encode_header(MAX_MESSAGE_BYTES)),
            Ok(MAX_MESSAGE_BYTES)
        );
    }

    proptest! {
        #[test]
        fn header_round_trip(len in 0..=MAX_MESSAGE_BYTES) {
            prop_assert_eq!(decode_header(encode_header(len)), Ok(len));
        }

        #[test]
        fn any_header_decodes_or_is_refused(h in any::<[u8; 4]>()) {
            match decode_header(h) {
                Ok(len) => {
                    prop_assert!(len <= MAX_MESSAGE_BYTES);
                    prop_assert_eq!(encode_header(len), h);
                }
                Err(FrameError::TooLarge(l)) => prop_assert!(l > MAX_MESSAGE_BYTES as u64),
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }

        #[test]
        fn chunks_copy_in_order(parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let m = Message::from_chunks(parts.iter().cloned().map(bytes::Bytes::from).collect());
            let mut out = vec![0u8; m.len];
            m.copy_to(&mut out);
            prop_assert_eq!(out, parts.concat());
        }
    }
}
