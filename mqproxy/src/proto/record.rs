//! Records on multipath TCP subflow streams: DATA, ACK and FIN about one direction's bytes.

use bytes::{BufMut, Bytes, BytesMut};

use super::*;

/// retransmitted on another one when a path dies: small enough to spread one flow over paths
/// finely, large enough that the 2-10 byte header costs nothing.
pub const MAX_CHUNK: usize = 64 * 1024;

const REC_DATA: u8 = 0x00;
const REC_ACK: u8 = 0x01;
const REC_FIN: u8 = 0x02;

/// One record on a subflow stream (after its MP_CONNECT/SUBFLOW frame). Both directions carry
/// them: DATA for the sender's byte stream, ACK and FIN about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Bytes `offset..offset + data.len()` of the sender's byte stream.
    Data {
        /// Byte offset in the flow (not in this subflow).
        offset: u64,
        /// 1..=[`MAX_CHUNK`] bytes.
        data: Bytes,
    },
    /// The receiver has every byte before `received` and has written every byte before
    /// `delivered` to its TCP socket (both cumulative, end to end, over all paths).
    /// `received` ends the sender's resend duty and frees the paths' room; `delivered` frees
    /// the flow window, so an application that stops reading holds only its own flow.
    Ack {
        /// Bytes written to TCP in order.
        delivered: u64,
        /// Bytes received in order (at least `delivered`).
        received: u64,
    },
    /// The sender's byte stream ends at `offset` (its TCP side sent FIN).
    Fin {
        /// Total length of the byte stream.
        offset: u64,
    },
}

impl Record {
    /// Appends the encoding.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Record::Data { offset, data } => {
                out.put_u8(REC_DATA);
                put_varint(out, *offset);
                put_varint(out, data.len() as u64);
                out.put_slice(data);
            }
            Record::Ack {
                delivered,
                received,
            } => {
                out.put_u8(REC_ACK);
                put_varint(out, *delivered);
                put_varint(out, *received);
            }
            Record::Fin { offset } => {
                out.put_u8(REC_FIN);
                put_varint(out, *offset);
            }
        }
    }

    /// Encoded size of a DATA record's header (what precedes its payload).
    pub fn data_header(offset: u64, len: usize) -> BytesMut {
        let mut b = BytesMut::with_capacity(17);
        b.put_u8(REC_DATA);
        put_varint(&mut b, offset);
        put_varint(&mut b, len as u64);
        b
    }

    /// Decodes the first record of `buf` (splitting it off), `Ok(None)` while more bytes are
    /// needed. DATA payloads are split off without copying.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Record>, DecodeError> {
        let Some(&ty) = buf.first() else {
            return Ok(None);
        };
        let rest = &buf[1..];
        let Some((a, n1)) = get_varint(rest) else {
            return Ok(None);
        };
        let r = match ty {
            REC_DATA => {
                let Some((len, n2)) = get_varint(&rest[n1..]) else {
                    return Ok(None);
                };
                if len == 0 || len > MAX_CHUNK as u64 {
                    return Err(DecodeError::TooLong {
                        field: "chunk",
                        len,
                        limit: MAX_CHUNK,
                    });
                }
                if a.checked_add(len).is_none_or(|end| end > VARINT_MAX) {
                    return Err(DecodeError::Invalid("chunk offset"));
                }
                let head = 1 + n1 + n2;
                if buf.len() < head + len as usize {
                    return Ok(None);
                }
                let _ = buf.split_to(head);
                Record::Data {
                    offset: a,
                    data: buf.split_to(len as usize).freeze(),
                }
            }
            REC_ACK => {
                let Some((received, n2)) = get_varint(&rest[n1..]) else {
                    return Ok(None);
                };
                if received < a {
                    return Err(DecodeError::Invalid("ack received below delivered"));
                }
                let _ = buf.split_to(1 + n1 + n2);
                Record::Ack {
                    delivered: a,
                    received,
                }
            }
            REC_FIN => {
                let _ = buf.split_to(1 + n1);
                Record::Fin { offset: a }
            }
            _ => return Err(DecodeError::Invalid("record type")),
        };
        Ok(Some(r))
    }
}
