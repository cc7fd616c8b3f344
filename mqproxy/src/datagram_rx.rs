//! The DATAGRAM receive pipeline both roles run on each path connection: decode the header,
//! find the session, reassemble fragments within one byte budget across all sessions, and
//! drop packets already delivered. Pure: no IO and no clock of its own; the caller owns the
//! sessions, sends what comes out and counts each [`Received`] as it sees fit.
//!
//! Fragments of one packet always travel on one path, so one [`DatagramRx`] per path
//! connection suffices; the duplicate filter belongs to the session, as a packet may arrive
//! once per path (the `redundant` scheduler).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use crate::defaults::REASSEMBLY_BUDGET;
use crate::multipath::sched::DupFilter;
use crate::proto::{DatagramHeader, DecodeError, Reassembled, Reassembler, DATAGRAM_HEADER_LEN};

/// A UDP session as the pipeline sees it: somewhere to remember which packets were delivered.
pub trait RxSession {
    /// The session's filter of packet ids already delivered in this direction.
    fn dup_filter(&self) -> &Mutex<DupFilter>;
}

impl<T: RxSession + ?Sized> RxSession for Arc<T> {
    fn dup_filter(&self) -> &Mutex<DupFilter> {
        (**self).dup_filter()
    }
}

impl<T: RxSession + ?Sized> RxSession for &T {
    fn dup_filter(&self) -> &Mutex<DupFilter> {
        (**self).dup_filter()
    }
}

/// Why a DATAGRAM of a known session was dropped before it made a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Holding the fragment would exceed the path's reassembly budget.
    OverBudget,
    /// A fragment already held (a copy of the same DATAGRAM).
    RepeatedFragment,
    /// The packet grew past [`crate::proto::MAX_PACKET`]; its partial state went with it.
    Oversized,
}

/// What became of one DATAGRAM.
#[derive(Debug)]
pub enum Received<S> {
    /// A whole packet, new for its session: deliver it.
    Packet {
        /// The session, as the lookup returned it.
        session: S,
        /// Its id on the wire.
        session_id: u32,
        /// The UDP payload (a slice of the DATAGRAM when it was not fragmented).
        payload: Bytes,
    },
    /// A fragment held until the rest of its packet arrives.
    Pending,
    /// The header did not decode.
    Malformed(DecodeError),
    /// No such session (not open yet, or closed); its reassembly state, if any, is gone.
    UnknownSession(u32),
    /// Dropped before reassembly completed.
    Discarded(Discard),
    /// A whole packet already delivered (a copy over another path).
    Duplicate,
}

/// Reassembly state of one path connection: a [`Reassembler`] per session with fragments
/// in flight, and the bytes they hold together, kept under a budget.
#[derive(Debug)]
pub struct DatagramRx {
    reassembly: HashMap<u32, Reassembler>,
    bytes: usize,
    budget: usize,
}

impl Default for DatagramRx {
    fn default() -> Self {
        Self::with_budget(REASSEMBLY_BUDGET)
    }
}

impl DatagramRx {
    /// A pipeline with the default budget, [`REASSEMBLY_BUDGET`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A pipeline holding at most `budget` bytes of incomplete packets.
    pub fn with_budget(budget: usize) -> Self {
        DatagramRx {
            reassembly: HashMap::new(),
            bytes: 0,
            budget,
        }
    }

    /// Bytes held in incomplete packets, across sessions.
    pub fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    /// Drops the reassembly state of a session (it closed).
    pub fn forget(&mut self, session_id: u32) {
        if let Some(r) = self.reassembly.remove(&session_id) {
            self.bytes -= r.buffered_bytes();
        }
    }

    /// Runs one DATAGRAM through the pipeline; `lookup` finds an open session by id.
    pub fn receive<S: RxSession>(
        &mut self,
        now: Instant,
        datagram: &Bytes,
        lookup: impl FnOnce(u32) -> Option<S>,
    ) -> Received<S> {
        let (h, payload) = match DatagramHeader::decode(datagram) {
            Ok(x) => x,
            Err(e) => return Received::Malformed(e),
        };
        let Some(session) = lookup(h.session_id) else {
            self.forget(h.session_id);
            return Received::UnknownSession(h.session_id);
        };
        let payload = if h.frag_count == 1 {
            datagram.slice(DATAGRAM_HEADER_LEN..)
        } else {
            if self.bytes + payload.len() > self.budget {
                return Received::Discarded(Discard::OverBudget);
            }
            let r = self.reassembly.entry(h.session_id).or_default();
            let before = r.buffered_bytes();
            let out = r.push(now, &h, payload);
            self.bytes = self.bytes + r.buffered_bytes() - before;
            match out {
                Reassembled::Packet(p) => p,
                Reassembled::Pending => return Received::Pending,
                Reassembled::Duplicate => return Received::Discarded(Discard::RepeatedFragment),
                Reassembled::Oversized => return Received::Discarded(Discard::Oversized),
            }
        };
        // Every critical section is one call: a poisoned filter is still consistent.
        let new = session
            .dup_filter()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accept(h.packet_id);
        if !new {
            return Received::Duplicate;
        }
        Received::Packet {
            session,
            session_id: h.session_id,
            payload,
        }
    }
}

#[cfg(test)]
mod tests;
