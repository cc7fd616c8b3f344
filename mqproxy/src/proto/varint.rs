//! QUIC varints (RFC 9000 §16) and the cursor frame bodies are decoded with.

use bytes::{BufMut, BytesMut};

use super::*;

/// Largest value a QUIC varint holds.
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Appends `v` as a QUIC varint. Values above [`VARINT_MAX`] are clamped (callers only encode
/// lengths and small enums).
pub fn put_varint(out: &mut BytesMut, v: u64) {
    let v = v.min(VARINT_MAX);
    if v < 1 << 6 {
        out.put_u8(v as u8);
    } else if v < 1 << 14 {
        out.put_u16(0x4000 | v as u16);
    } else if v < 1 << 30 {
        out.put_u32(0x8000_0000 | v as u32);
    } else {
        out.put_u64(0xc000_0000_0000_0000 | v);
    }
}

/// Encoded length of a varint.
pub fn varint_len(v: u64) -> usize {
    match v {
        0..0x40 => 1,
        0x40..0x4000 => 2,
        0x4000..0x4000_0000 => 4,
        _ => 8,
    }
}

/// Reads a varint from the front of `buf`: `None` when `buf` is too short.
pub fn get_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = (v << 8) | u64::from(*b);
    }
    Some((v, len))
}

/// A cursor over a complete frame body; running out of bytes is `Truncated`.
pub(super) struct Cursor<'a> {
    pub(super) buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(super) fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let (v, n) = get_varint(self.buf).ok_or(DecodeError::Truncated(what))?;
        self.buf = &self.buf[n..];
        Ok(v)
    }

    pub(super) fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A varint length then that many bytes.
    pub(super) fn string(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.varint(what)?;
        if len > limit as u64 {
            return Err(DecodeError::TooLong {
                field: what,
                len,
                limit,
            });
        }
        self.bytes(len as usize, what)
    }

    pub(super) fn text(&mut self, what: &'static str, limit: usize) -> Result<String, DecodeError> {
        let b = self.string(what, limit)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Invalid(what))
    }
}

pub(super) fn put_string(out: &mut BytesMut, s: &[u8]) {
    put_varint(out, s.len() as u64);
    out.put_slice(s);
}
