//! The 9-byte DATAGRAM header, fragmentation of a UDP packet into DATAGRAMs and their
//! bounded reassembly.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::*;

/// Size of the DATAGRAM header.
pub const DATAGRAM_HEADER_LEN: usize = 9;
/// Largest UDP payload carried (after reassembly): what a UDP length field can describe.
pub const MAX_PACKET: usize = 65_535;
/// Most fragments per packet: `frag_count` is a `u8`.
pub const MAX_FRAGMENTS: usize = 255;
/// Reassembly slots per session (the original's 4, LRU). Enough for a few packets interleaved
/// in flight; more would only hold memory for packets that have already lost a fragment.
pub const REASSEMBLY_SLOTS: usize = 4;
/// How long an incomplete packet may wait for its other fragments. Fragments of one packet are
/// sent back to back, so a packet still incomplete after this has lost a fragment.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The 9-byte big-endian header on every DATAGRAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramHeader {
    /// The UDP session (from UDP_SESSION_OPEN).
    pub session_id: u32,
    /// Per-session, per-direction packet counter (wraps); groups fragments.
    pub packet_id: u16,
    /// Reserved, 0; ignored on receipt.
    pub flags: u8,
    /// Index of this fragment, `< frag_count`.
    pub frag_id: u8,
    /// Fragments in the packet, `>= 1`.
    pub frag_count: u8,
}

impl DatagramHeader {
    /// The header bytes.
    pub fn to_bytes(&self) -> [u8; DATAGRAM_HEADER_LEN] {
        let s = self.session_id.to_be_bytes();
        let p = self.packet_id.to_be_bytes();
        [
            s[0],
            s[1],
            s[2],
            s[3],
            p[0],
            p[1],
            self.flags,
            self.frag_id,
            self.frag_count,
        ]
    }

    /// Splits a DATAGRAM into its header and payload.
    pub fn decode(d: &[u8]) -> Result<(DatagramHeader, &[u8]), DecodeError> {
        if d.len() < DATAGRAM_HEADER_LEN {
            return Err(DecodeError::Truncated("datagram header"));
        }
        let h = DatagramHeader {
            session_id: u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
            packet_id: u16::from_be_bytes([d[4], d[5]]),
            flags: d[6],
            frag_id: d[7],
            frag_count: d[8],
        };
        if h.frag_count == 0 || h.frag_id >= h.frag_count {
            return Err(DecodeError::Invalid("fragment index"));
        }
        Ok((h, &d[DATAGRAM_HEADER_LEN..]))
    }
}

/// Why a packet could not be fragmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FragmentError {
    /// Larger than [`MAX_PACKET`].
    #[error("packet of {0} bytes exceeds the {MAX_PACKET}-byte limit")]
    TooLarge(usize),
    /// The connection's DATAGRAM size leaves no room, or needs more than 255 fragments.
    #[error("a {len}-byte packet does not fit 255 fragments of a {max_datagram}-byte DATAGRAM")]
    DatagramTooSmall {
        /// Packet length.
        len: usize,
        /// The connection's current maximum DATAGRAM size.
        max_datagram: usize,
    },
}

/// Splits `payload` into DATAGRAMs (header included) no larger than `max_datagram` bytes.
/// Fragments are equal-sized except the last, and a packet that fits goes unfragmented.
pub fn fragment(
    session_id: u32,
    packet_id: u16,
    payload: &[u8],
    max_datagram: usize,
) -> Result<Vec<Bytes>, FragmentError> {
    if payload.len() > MAX_PACKET {
        return Err(FragmentError::TooLarge(payload.len()));
    }
    let too_small = FragmentError::DatagramTooSmall {
        len: payload.len(),
        max_datagram,
    };
    let chunk = max_datagram
        .checked_sub(DATAGRAM_HEADER_LEN)
        .filter(|c| *c > 0)
        .ok_or(too_small)?;
    let count = payload.len().div_ceil(chunk).max(1);
    if count > MAX_FRAGMENTS {
        return Err(too_small);
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let part = &payload[(i * chunk).min(payload.len())..((i + 1) * chunk).min(payload.len())];
        let mut b = BytesMut::with_capacity(DATAGRAM_HEADER_LEN + part.len());
        b.put_slice(
            &DatagramHeader {
                session_id,
                packet_id,
                flags: 0,
                frag_id: i as u8,
                frag_count: count as u8,
            }
            .to_bytes(),
        );
        b.put_slice(part);
        out.push(b.freeze());
    }
    Ok(out)
}

/// One packet being reassembled.
#[derive(Debug)]
pub(super) struct Slot {
    packet_id: u16,
    frag_count: u8,
    parts: Vec<Option<Bytes>>,
    received: usize,
    bytes: usize,
    started: Instant,
    last_used: u64,
}

/// What [`Reassembler::push`] did with a fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reassembled {
    /// A whole packet.
    Packet(Bytes),
    /// Stored; the packet is not complete yet.
    Pending,
    /// A fragment already held: ignored.
    Duplicate,
    /// The packet would exceed [`MAX_PACKET`]: the slot was dropped.
    Oversized,
}

/// Reassembles fragmented packets of one session and direction: [`REASSEMBLY_SLOTS`] packets in
/// progress, least recently used evicted, bounded at [`MAX_PACKET`] bytes each. No
/// retransmission: a packet missing a fragment is evicted or times out.
#[derive(Debug, Default)]
pub struct Reassembler {
    pub(super) slots: VecDeque<Slot>,
    tick: u64,
    buffered: usize,
}

impl Reassembler {
    /// An empty reassembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Payload bytes held in incomplete packets (for a per-connection budget).
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Feeds one fragment (`header` already validated by [`DatagramHeader::decode`]).
    pub fn push(&mut self, now: Instant, header: &DatagramHeader, payload: &[u8]) -> Reassembled {
        if header.frag_count <= 1 {
            return Reassembled::Packet(Bytes::copy_from_slice(payload));
        }
        self.tick += 1;
        let tick = self.tick;
        // Expire stale slots first: their packets lost a fragment.
        let before = self.slots.len();
        self.slots
            .retain(|s| now.saturating_duration_since(s.started) < REASSEMBLY_TIMEOUT);
        if self.slots.len() != before {
            self.buffered = self.slots.iter().map(|s| s.bytes).sum();
        }
        let idx = match self
            .slots
            .iter()
            .position(|s| s.packet_id == header.packet_id)
        {
            // The same id with another fragment count is a new packet after the id wrapped.
            Some(i) if self.slots[i].frag_count != header.frag_count => {
                self.remove(i);
                self.insert(now, header, tick)
            }
            Some(i) => i,
            None => self.insert(now, header, tick),
        };
        let slot = &mut self.slots[idx];
        slot.last_used = tick;
        let part = &mut slot.parts[header.frag_id as usize];
        if part.is_some() {
            return Reassembled::Duplicate;
        }
        if slot.bytes + payload.len() > MAX_PACKET {
            self.remove(idx);
            return Reassembled::Oversized;
        }
        *part = Some(Bytes::copy_from_slice(payload));
        slot.received += 1;
        slot.bytes += payload.len();
        self.buffered += payload.len();
        if slot.received < slot.frag_count as usize {
            return Reassembled::Pending;
        }
        let slot = self.remove(idx);
        let mut out = BytesMut::with_capacity(slot.bytes);
        for p in slot.parts.into_iter().flatten() {
            out.put_slice(&p);
        }
        Reassembled::Packet(out.freeze())
    }

    fn insert(&mut self, now: Instant, header: &DatagramHeader, tick: u64) -> usize {
        if self.slots.len() >= REASSEMBLY_SLOTS {
            let lru = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i)
                .expect("slots is full, so not empty");
            self.remove(lru);
        }
        self.slots.push_back(Slot {
            packet_id: header.packet_id,
            frag_count: header.frag_count,
            parts: vec![None; header.frag_count as usize],
            received: 0,
            bytes: 0,
            started: now,
            last_used: tick,
        });
        self.slots.len() - 1
    }

    fn remove(&mut self, i: usize) -> Slot {
        let s = self.slots.remove(i).expect("index from position()");
        self.buffered -= s.bytes;
        s
    }
}
