//! Multipath, the pure parts: the scheduler that places each UDP packet or TCP chunk on a path,
//! the reorder buffer that puts a striped TCP flow back in order, the send buffer that keeps
//! chunks until they are acknowledged end to end (so chunks of a dead path can be sent again
//! on a live one), and the duplicate filter for UDP packets that may arrive over two paths.
//! No IO and no clocks: the socket side lives in [`crate::multipath`].

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;

/// Most paths one client may bundle (`--path` given more often is refused): each is a QUIC
/// connection with its own buffers on both ends.
pub const MAX_PATHS: usize = 8;

/// How packets and chunks are spread over the paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheduler {
    /// The lowest-RTT path that has room in its congestion window.
    #[default]
    MinRtt,
    /// The first usable path in the client's order; the others only while it is down.
    Backup,
    /// Weighted load balancing: each path gets traffic in proportion to its measured bandwidth.
    Wlb,
    /// Like `minrtt`, and every UDP packet also goes over a second path (for latency and loss).
    Redundant,
}

impl Scheduler {
    /// Every scheduler, in wire-code order.
    pub const ALL: [Scheduler; 4] = [
        Scheduler::MinRtt,
        Scheduler::Backup,
        Scheduler::Wlb,
        Scheduler::Redundant,
    ];

    /// The value carried in PATH_BIND.
    pub fn code(self) -> u64 {
        match self {
            Scheduler::MinRtt => 0,
            Scheduler::Backup => 1,
            Scheduler::Wlb => 2,
            Scheduler::Redundant => 3,
        }
    }

    /// From a PATH_BIND code; unknown codes (a newer client) fall back to `minrtt`.
    pub fn from_code(c: u64) -> Self {
        Scheduler::ALL
            .into_iter()
            .find(|s| s.code() == c)
            .unwrap_or_default()
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::MinRtt => "minrtt",
            Scheduler::Backup => "backup",
            Scheduler::Wlb => "wlb",
            Scheduler::Redundant => "redundant",
        }
    }
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Scheduler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scheduler::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!("unknown scheduler {s:?}: expected minrtt, backup, wlb or redundant")
            })
    }
}

/// What the scheduler knows of one path at the moment it decides.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PathView {
    /// Connected, authenticated and recently heard from.
    pub usable: bool,
    /// Smoothed RTT.
    pub srtt: Duration,
    /// Bytes this path may take now (congestion window minus what the caller has in flight or
    /// queued on it); 0 when full.
    pub room: u64,
    /// Bytes the caller has in flight or queued on this path.
    pub load: u64,
    /// Measured delivery rate in bytes/s (0: not measured yet).
    pub bandwidth: u64,
}

impl PathView {
    /// Load relative to bandwidth: the time this path needs to drain what it holds.
    fn drain_cost(&self, extra: u64) -> f64 {
        (self.load + extra) as f64 / self.bandwidth.max(1) as f64
    }
}

/// Where a TCP chunk of `len` bytes goes: a path index, or `None` to wait until a path has room
/// (or becomes usable). Paths are in the client's order (index 0 is the primary).
pub fn pick_chunk(s: Scheduler, paths: &[PathView], len: u64) -> Option<usize> {
    let fits = |p: &PathView| p.usable && p.room >= len;
    match s {
        Scheduler::Backup => {
            // The first usable path, full or not: waiting for it beats spilling onto a backup.
            let i = paths.iter().position(|p| p.usable)?;
            fits(&paths[i]).then_some(i)
        }
        Scheduler::MinRtt | Scheduler::Redundant => paths
            .iter()
            .enumerate()
            .filter(|(_, p)| fits(p))
            .min_by_key(|(_, p)| (p.srtt, p.load))
            .map(|(i, _)| i),
        Scheduler::Wlb => paths
            .iter()
            .enumerate()
            .filter(|(_, p)| fits(p))
            .min_by(|(_, a), (_, b)| a.drain_cost(len).total_cmp(&b.drain_cost(len)))
            .map(|(i, _)| i),
    }
}

/// Where a UDP packet goes: a first path and, for `redundant`, a second one. UDP never waits:
/// when no path has room the packet goes where it drains soonest (and may be dropped there,
/// as UDP may). `None` only when no path is usable.
pub fn pick_datagram(s: Scheduler, paths: &[PathView], len: u64) -> Option<(usize, Option<usize>)> {
    let first = pick_chunk(s, paths, len).or_else(|| match s {
        Scheduler::Backup => paths.iter().position(|p| p.usable),
        _ => paths
            .iter()
            .enumerate()
            .filter(|(_, p)| p.usable)
            .min_by(|(_, a), (_, b)| a.drain_cost(len).total_cmp(&b.drain_cost(len)))
            .map(|(i, _)| i),
    })?;
    let second = (s == Scheduler::Redundant)
        .then(|| {
            paths
                .iter()
                .enumerate()
                .filter(|(i, p)| *i != first && p.usable)
                .min_by_key(|(_, p)| (p.room < len, p.srtt))
                .map(|(i, _)| i)
        })
        .flatten();
    Some((first, second))
}

/// Why a chunk was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReorderError {
    /// The peer sent further ahead than the window it was granted.
    #[error("chunk at {offset} is beyond the reorder window (delivered {delivered}, cap {cap})")]
    Overflow {
        /// The chunk's offset.
        offset: u64,
        /// Bytes delivered so far.
        delivered: u64,
        /// The window.
        cap: usize,
    },
    /// Data past the end the peer announced with FIN.
    #[error("data beyond the end of the stream")]
    PastFin,
}

/// Puts the chunks of one direction of a striped flow back in order. Holds at most `cap` bytes
/// beyond what was delivered: the sender keeps no more than that unacknowledged, so a chunk
/// further ahead is a protocol violation.
#[derive(Debug)]
pub struct ReorderBuffer {
    /// Everything before this offset has been handed out.
    next: u64,
    held: BTreeMap<u64, Bytes>,
    bytes: usize,
    cap: usize,
    fin: Option<u64>,
}

impl ReorderBuffer {
    /// An empty buffer with a window of `cap` bytes.
    pub fn new(cap: usize) -> Self {
        ReorderBuffer {
            next: 0,
            held: BTreeMap::new(),
            bytes: 0,
            cap,
            fin: None,
        }
    }

    /// Offset of the next byte to deliver.
    pub fn delivered(&self) -> u64 {
        self.next
    }

    /// Bytes held out of order.
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    /// Adds a chunk. Duplicates (a chunk retransmitted on another path, or copies of already
    /// delivered bytes) are ignored.
    pub fn insert(&mut self, offset: u64, mut data: Bytes) -> Result<(), ReorderError> {
        let end = offset.saturating_add(data.len() as u64);
        if self.fin.is_some_and(|f| end > f) {
            return Err(ReorderError::PastFin);
        }
        if end <= self.next {
            return Ok(());
        }
        let mut offset = offset;
        if offset < self.next {
            data = data.slice((self.next - offset) as usize..);
            offset = self.next;
        }
        if end - self.next > self.cap as u64 {
            return Err(ReorderError::Overflow {
                offset,
                delivered: self.next,
                cap: self.cap,
            });
        }
        match self.held.get(&offset) {
            Some(old) if old.len() >= data.len() => return Ok(()),
            Some(old) => self.bytes -= old.len(),
            None => {}
        }
        self.bytes += data.len();
        self.held.insert(offset, data);
        Ok(())
    }

    /// Records the end of the stream; `Err` if data beyond it is already held.
    pub fn set_fin(&mut self, offset: u64) -> Result<(), ReorderError> {
        let held_end = self
            .held
            .iter()
            .next_back()
            .map_or(self.next, |(o, d)| o + d.len() as u64);
        if offset < held_end.max(self.next) || self.fin.is_some_and(|f| f != offset) {
            return Err(ReorderError::PastFin);
        }
        self.fin = Some(offset);
        Ok(())
    }

    /// The next in-order bytes, if any.
    pub fn pop(&mut self) -> Option<Bytes> {
        loop {
            let (&off, _) = self.held.first_key_value()?;
            if off > self.next {
                return None;
            }
            let data = self.held.remove(&off).expect("first key exists");
            self.bytes -= data.len();
            let end = off + data.len() as u64;
            if end <= self.next {
                continue;
            }
            let data = data.slice((self.next - off) as usize..);
            self.next = end;
            return Some(data);
        }
    }

    /// Whether every byte up to the FIN has been delivered.
    pub fn finished(&self) -> bool {
        self.fin == Some(self.next)
    }
}

/// A chunk sent and not yet acknowledged.
#[derive(Debug, Clone)]
struct Sent {
    offset: u64,
    data: Bytes,
    path: usize,
}

/// The sending side of one direction of a striped flow: every chunk stays here until the peer
/// acknowledges receiving it (it may have to be resent on another path until then), and the
/// window of `cap` bytes (the peer's reorder window) stays taken until the peer acknowledges
/// delivering the bytes to its TCP socket.
#[derive(Debug)]
pub struct SendBuffer {
    /// Delivered by the peer (frees the window).
    acked: u64,
    /// Received by the peer (frees the chunks and their paths' in-flight count).
    received: u64,
    next: u64,
    chunks: VecDeque<Sent>,
    per_path: [u64; MAX_PATHS],
    cap: usize,
}

impl SendBuffer {
    /// An empty buffer for a peer whose reorder window is `cap` bytes.
    pub fn new(cap: usize) -> Self {
        SendBuffer {
            acked: 0,
            received: 0,
            next: 0,
            chunks: VecDeque::new(),
            per_path: [0; MAX_PATHS],
            cap,
        }
    }

    /// Bytes that may still be sent before the window is full.
    pub fn room(&self) -> usize {
        self.cap.saturating_sub((self.next - self.acked) as usize)
    }

    /// Offset the next chunk gets (= bytes taken from TCP so far).
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Bytes acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Unacknowledged bytes last sent on `path`.
    pub fn in_flight(&self, path: usize) -> u64 {
        self.per_path.get(path).copied().unwrap_or(0)
    }

    /// Keeps a new chunk sent on `path`; returns its offset. The caller checks [`Self::room`].
    pub fn push(&mut self, data: Bytes, path: usize) -> u64 {
        let offset = self.next;
        self.next += data.len() as u64;
        self.per_path[path] += data.len() as u64;
        self.chunks.push_back(Sent { offset, data, path });
        offset
    }

    /// Takes an acknowledgement: forgets chunks wholly below `received` and frees the window
    /// below `delivered`. Acks may arrive out of order over different paths; older ones change
    /// nothing. `false` if the ack is beyond what was sent (or delivered exceeds received).
    pub fn ack(&mut self, delivered: u64, received: u64) -> bool {
        if received > self.next || delivered > received {
            return false;
        }
        self.received = self.received.max(received);
        while let Some(c) = self.chunks.front() {
            if c.offset + c.data.len() as u64 > self.received {
                break;
            }
            self.per_path[c.path] -= c.data.len() as u64;
            self.chunks.pop_front();
        }
        self.acked = self.acked.max(delivered);
        true
    }

    /// Moves every unacknowledged chunk of `dead` to `to` and returns them for sending again.
    pub fn reroute(&mut self, dead: usize, to: usize) -> Vec<(u64, Bytes)> {
        let mut out = Vec::new();
        for c in self.chunks.iter_mut().filter(|c| c.path == dead) {
            self.per_path[dead] -= c.data.len() as u64;
            self.per_path[to] += c.data.len() as u64;
            c.path = to;
            out.push((c.offset, c.data.clone()));
        }
        out
    }

    /// Whether everything sent has been delivered to the peer's TCP socket.
    pub fn all_acked(&self) -> bool {
        self.acked == self.next
    }
}

/// Remembers which recent packet ids of one UDP session and direction were delivered, so a
/// packet that arrives twice (the `redundant` scheduler, or a resend) is delivered once.
/// A sliding window of [`DupFilter::WINDOW`] ids behind the highest seen; older ids are let
/// through (a duplicate that late is rarer than a legitimate packet that late).
#[derive(Debug, Clone)]
pub struct DupFilter {
    highest: Option<u16>,
    bits: [u64; DupFilter::WINDOW / 64],
}

impl Default for DupFilter {
    fn default() -> Self {
        DupFilter {
            highest: None,
            bits: [0; DupFilter::WINDOW / 64],
        }
    }
}

impl DupFilter {
    /// Packet ids remembered: at ~10,000 packets/s per path this covers ~100 ms of reordering
    /// between paths, in 128 bytes per session.
    pub const WINDOW: usize = 1024;

    fn bit(&mut self, id: u16) -> (usize, u64) {
        let i = id as usize % Self::WINDOW;
        (i / 64, 1u64 << (i % 64))
    }

    /// Whether packet `id` is new (deliver it) or a duplicate (drop it).
    pub fn accept(&mut self, id: u16) -> bool {
        let Some(h) = self.highest else {
            self.highest = Some(id);
            let (w, b) = self.bit(id);
            self.bits[w] |= b;
            return true;
        };
        let ahead = id.wrapping_sub(h);
        if ahead != 0 && ahead < 0x8000 {
            // Newer: clear the ids the window slides past, then mark.
            let clear = (ahead as usize).min(Self::WINDOW);
            for k in 1..=clear {
                let (w, b) = self.bit(h.wrapping_add(k as u16));
                self.bits[w] &= !b;
            }
            self.highest = Some(id);
            let (w, b) = self.bit(id);
            self.bits[w] |= b;
            return true;
        }
        let behind = h.wrapping_sub(id) as usize;
        if behind >= Self::WINDOW {
            return true;
        }
        let (w, b) = self.bit(id);
        let dup = self.bits[w] & b != 0;
        self.bits[w] |= b;
        !dup
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn view(usable: bool, rtt_ms: u64, room: u64, load: u64, bw: u64) -> PathView {
        PathView {
            usable,
            srtt: Duration::from_millis(rtt_ms),
            room,
            load,
            bandwidth: bw,
        }
    }

    #[test]
    fn minrtt_prefers_low_rtt_with_room() {
        let p = [view(true, 50, 0, 900, 1), view(true, 60, 5000, 0, 1)];
        assert_eq!(
            pick_chunk(Scheduler::MinRtt, &p, 1000),
            Some(1),
            "0 is full"
        );
        let p = [view(true, 50, 5000, 0, 1), view(true, 60, 5000, 0, 1)];
        assert_eq!(pick_chunk(Scheduler::MinRtt, &p, 1000), Some(0));
        let p = [view(false, 10, 5000, 0, 1), view(true, 60, 500, 0, 1)];
        assert_eq!(
            pick_chunk(Scheduler::MinRtt, &p, 1000),
            None,
            "wait for room"
        );
        assert_eq!(
            pick_datagram(Scheduler::MinRtt, &p, 1000),
            Some((1, None)),
            "UDP never waits"
        );
    }

    #[test]
    fn backup_waits_for_the_primary() {
        let p = [view(true, 80, 0, 10, 1), view(true, 10, 5000, 0, 1)];
        assert_eq!(pick_chunk(Scheduler::Backup, &p, 1000), None);
        assert_eq!(pick_datagram(Scheduler::Backup, &p, 1000), Some((0, None)));
        let p = [view(false, 80, 5000, 0, 1), view(true, 10, 5000, 0, 1)];
        assert_eq!(pick_chunk(Scheduler::Backup, &p, 1000), Some(1));
    }

    #[test]
    fn wlb_follows_bandwidth_and_redundant_uses_two_paths() {
        // Path 1 is four times as fast: with equal loads it drains sooner.
        let p = [
            view(true, 10, 1 << 20, 4000, 100),
            view(true, 90, 1 << 20, 4000, 400),
        ];
        assert_eq!(pick_chunk(Scheduler::Wlb, &p, 1000), Some(1));
        let p = [
            view(true, 10, 1 << 20, 1000, 100),
            view(true, 90, 1 << 20, 16000, 400),
        ];
        assert_eq!(pick_chunk(Scheduler::Wlb, &p, 1000), Some(0));
        let p = [view(true, 30, 1 << 20, 0, 1), view(true, 20, 1 << 20, 0, 1)];
        assert_eq!(
            pick_datagram(Scheduler::Redundant, &p, 100),
            Some((1, Some(0)))
        );
        let p = [
            view(true, 30, 1 << 20, 0, 1),
            view(false, 20, 1 << 20, 0, 1),
        ];
        assert_eq!(
            pick_datagram(Scheduler::Redundant, &p, 100),
            Some((0, None))
        );
        assert_eq!(
            pick_datagram(Scheduler::Wlb, &[view(false, 1, 1, 1, 1)], 1),
            None
        );
    }

    #[test]
    fn scheduler_names_and_codes() {
        for s in Scheduler::ALL {
            assert_eq!(s.name().parse::<Scheduler>(), Ok(s));
            assert_eq!(Scheduler::from_code(s.code()), s);
        }
        assert!("fastest".parse::<Scheduler>().is_err());
        assert_eq!(Scheduler::from_code(99), Scheduler::MinRtt);
    }

    #[test]
    fn reorder_basics() {
        let mut r = ReorderBuffer::new(100);
        r.insert(10, Bytes::from_static(b"world"))
            .expect("in window");
        assert_eq!(r.pop(), None);
        r.insert(0, Bytes::from_static(b"hello, ..."))
            .expect("in window");
        assert_eq!(r.pop().as_deref(), Some(&b"hello, ..."[..]));
        assert_eq!(r.pop().as_deref(), Some(&b"world"[..]));
        r.insert(3, Bytes::from_static(b"dup"))
            .expect("old data is ignored");
        assert_eq!(r.pop(), None);
        assert!(matches!(
            r.insert(200, Bytes::from_static(b"x")),
            Err(ReorderError::Overflow { .. })
        ));
        r.set_fin(15).expect("fin at the end");
        assert!(r.finished());
        assert_eq!(
            r.insert(15, Bytes::from_static(b"x")),
            Err(ReorderError::PastFin)
        );
    }

    #[test]
    fn send_buffer_acks_and_reroutes() {
        let mut s = SendBuffer::new(10);
        assert_eq!(s.push(Bytes::from_static(b"abcd"), 0), 0);
        assert_eq!(s.push(Bytes::from_static(b"efg"), 1), 4);
        assert_eq!(s.room(), 3);
        assert_eq!(s.in_flight(1), 3);
        let again = s.reroute(1, 0);
        assert_eq!(again, vec![(4, Bytes::from_static(b"efg"))]);
        assert_eq!((s.in_flight(0), s.in_flight(1)), (7, 0));
        assert!(s.ack(4, 4));
        assert_eq!(s.in_flight(0), 3);
        assert!(!s.ack(100, 100), "ack beyond what was sent");
        assert!(!s.ack(5, 4), "delivered beyond received");
        // Received but not yet delivered (the peer's application is not reading): nothing is
        // left to resend and the paths are free, but the window stays taken.
        assert!(s.ack(4, 7));
        assert_eq!((s.in_flight(0), s.in_flight(1)), (0, 0));
        assert!(s.reroute(0, 1).is_empty(), "nothing to resend");
        assert_eq!(s.room(), 7);
        assert!(!s.all_acked());
        assert!(s.ack(2, 5), "an older ack changes nothing");
        assert_eq!(s.room(), 7);
        assert!(s.ack(7, 7));
        assert!(s.all_acked());
        assert_eq!(s.room(), 10);
    }

    #[test]
    fn dup_filter() {
        let mut f = DupFilter::default();
        assert!(f.accept(5));
        assert!(!f.accept(5));
        assert!(f.accept(3));
        assert!(!f.accept(3));
        assert!(f.accept(6));
        // Wrap-around.
        let mut f = DupFilter::default();
        assert!(f.accept(65535));
        assert!(f.accept(0));
        assert!(!f.accept(65535));
        assert!(!f.accept(0));
    }

    proptest! {
        /// Chunks of a stream, delivered in any order with any duplicates (as after a path dies
        /// and its chunks are resent), come out as the original stream, byte for byte.
        #[test]
        fn reorder_restores_any_order(
            data in prop::collection::vec(any::<u8>(), 1..4000),
            cuts in prop::collection::vec(1usize..300, 1..40),
            seed in any::<u64>(),
            dups in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let data = Bytes::from(data);
            let mut chunks = Vec::new();
            let mut off = 0usize;
            for c in cuts.iter().cycle() {
                if off >= data.len() { break; }
                let end = (off + c).min(data.len());
                chunks.push((off as u64, data.slice(off..end)));
                off = end;
            }
            for d in &dups {
                let c = chunks[d.index(chunks.len())].clone();
                chunks.push(c);
            }
            // Deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..chunks.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                chunks.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut r = ReorderBuffer::new(data.len());
            let mut out = Vec::new();
            for (o, c) in chunks {
                r.insert(o, c).expect("within the window");
                prop_assert!(r.held_bytes() <= data.len());
                while let Some(b) = r.pop() { out.extend_from_slice(&b); }
            }
            r.set_fin(data.len() as u64).expect("fin");
            prop_assert!(r.finished());
            prop_assert_eq!(&out[..], &data[..]);
        }

        /// Whatever the acks and reroutes, per-path accounting sums to what is unacknowledged,
        /// and the window is never exceeded.
        #[test]
        fn send_buffer_accounting(ops in prop::collection::vec((0u8..3, 1usize..50, 0usize..3), 1..200)) {
            let mut s = SendBuffer::new(500);
            for (op, n, p) in ops {
                match op {
                    0 if s.room() >= n => { s.push(Bytes::from(vec![0; n]), p); }
                    1 => {
                        let rx = (s.received + n as u64).min(s.next_offset());
                        let to = (s.acked() + (n as u64) / 2).min(rx);
                        prop_assert!(s.ack(to, rx));
                    }
                    _ => { s.reroute(p, (p + 1) % 3); }
                }
                let total: u64 = (0..3).map(|i| s.in_flight(i)).sum();
                let unacked: u64 = s.chunks.iter().map(|c| c.data.len() as u64).sum();
                prop_assert_eq!(total, unacked);
                prop_assert!(s.chunks.iter().all(|c| c.offset + c.data.len() as u64 > s.received));
                prop_assert!(s.next_offset() - s.acked() <= 500);
            }
        }

        /// The filter never drops a first copy inside its window and drops every second copy.
        #[test]
        fn dup_filter_drops_only_duplicates(start in any::<u16>(), steps in prop::collection::vec(0u16..64, 1..300)) {
            let mut f = DupFilter::default();
            let mut id = start;
            let mut seen = std::collections::HashSet::new();
            for s in steps {
                id = id.wrapping_add(s);
                let first = seen.insert(id);
                prop_assert_eq!(f.accept(id), first, "id {}", id);
                prop_assert!(!f.accept(id));
            }
        }

        /// Schedulers only ever pick usable paths, and only ones with room for chunks.
        #[test]
        fn picks_are_usable(paths in prop::collection::vec((any::<bool>(), 1u64..200, 0u64..5000, 0u64..5000, 0u64..1000), 0..MAX_PATHS), len in 1u64..3000) {
            let views: Vec<PathView> = paths.iter().map(|&(u, r, room, l, b)| view(u, r, room, l, b)).collect();
            for s in Scheduler::ALL {
                if let Some(i) = pick_chunk(s, &views, len) {
                    prop_assert!(views[i].usable && views[i].room >= len);
                }
                match pick_datagram(s, &views, len) {
                    Some((a, b)) => {
                        prop_assert!(views[a].usable);
                        if let Some(b) = b { prop_assert!(views[b].usable && b != a); }
                    }
                    None => prop_assert!(views.iter().all(|v| !v.usable)),
                }
            }
        }
    }
}
