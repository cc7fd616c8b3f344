//! The server's UDP state for one client (one connection, or the bundle of a multipath client): the session table (one connected UDP socket
//! per session, capped), the bounded pre-OPEN buffer for DATAGRAMs that overtake their
//! UDP_SESSION_OPEN, and idle timing. The buffer and activity clock are pure; the socket loop
//! that uses them lives in [`crate::server`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;

use crate::proto::UdpStatus;

/// UDP sessions per connection (the original's limit): a client behind one SOCKS listener
/// rarely talks to more destinations at once, and each costs a socket on the server.
pub const DEFAULT_MAX_SESSIONS: usize = 1024;
/// Pre-OPEN buffer: packets held per connection (the original's 16).
pub const PRE_OPEN_PACKETS: usize = 16;
/// Pre-OPEN buffer: bytes held per connection (the original's 32 KiB).
pub const PRE_OPEN_BYTES: usize = 32 * 1024;
/// Pre-OPEN buffer: how long a packet waits for its session (the original's 250 ms; an OPEN
/// sent with the packet arrives within about one RTT).
pub const PRE_OPEN_TTL: Duration = Duration::from_millis(250);
/// Reassembly memory per connection across all its sessions: 4 slots × 64 KiB per session
/// would allow 256 MiB at 1,024 sessions, so a connection-wide budget bounds it.
pub const REASSEMBLY_BUDGET: usize = 8 << 20;

/// DATAGRAMs (raw, header included) that arrived for a session id not yet open.
#[derive(Debug, Default)]
pub struct PreOpenBuffer {
    q: VecDeque<(Instant, u32, Bytes)>,
    bytes: usize,
}

impl PreOpenBuffer {
    /// Holds a DATAGRAM; `false` when it was dropped because the buffer is full.
    pub fn push(&mut self, now: Instant, session_id: u32, d: Bytes) -> bool {
        self.expire(now);
        if self.q.len() >= PRE_OPEN_PACKETS || self.bytes + d.len() > PRE_OPEN_BYTES {
            return false;
        }
        self.bytes += d.len();
        self.q.push_back((now, session_id, d));
        true
    }

    /// Removes and returns the DATAGRAMs held for `session_id`, oldest first.
    pub fn take(&mut self, session_id: u32) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.q.len());
        for (t, id, d) in self.q.drain(..) {
            if id == session_id {
                self.bytes -= d.len();
                out.push(d);
            } else {
                keep.push_back((t, id, d));
            }
        }
        self.q = keep;
        out
    }

    /// Drops DATAGRAMs older than [`PRE_OPEN_TTL`]; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some((t, _, d)) = self.q.front() {
            if now.saturating_duration_since(*t) < PRE_OPEN_TTL {
                break;
            }
            self.bytes -= d.len();
            self.q.pop_front();
            n += 1;
        }
        n
    }

    /// When the oldest held DATAGRAM expires.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.q.front().map(|(t, _, _)| *t + PRE_OPEN_TTL)
    }

    /// DATAGRAMs held.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
}

/// Last activity of a session, in milliseconds since the table's epoch; written by both
/// directions without a lock.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        let a = Activity {
            epoch,
            last_ms: AtomicU64::new(0),
        };
        a.touch(Instant::now());
        a
    }

    /// Records activity at `now`.
    pub fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When the session goes idle, given the timeout.
    pub fn idle_deadline(&self, timeout: Duration) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + timeout
    }
}

/// One open session: its connected socket and activity.
#[derive(Debug)]
pub struct Session {
    /// Connected to the destination; the session task receives on it.
    pub socket: Arc<UdpSocket>,
    /// A non-blocking clone of the same socket for the dispatcher's sends. tokio's `try_send`
    /// refuses until the reactor has reported the socket writable once, which loses the first
    /// packets of every new session; the kernel socket itself is writable at once.
    pub sender: std::net::UdpSocket,
    /// Last packet either way.
    pub activity: Activity,
    /// Packet ids already delivered towards the destination (copies over a second path).
    pub dup: Mutex<crate::paths::DupFilter>,
}

/// Sessions of one connection, capped.
#[derive(Debug)]
pub struct SessionTable {
    map: Mutex<HashMap<u32, Arc<Session>>>,
    max: usize,
    epoch: Instant,
}

impl SessionTable {
    /// An empty table holding at most `max` sessions.
    pub fn new(max: usize) -> Self {
        SessionTable {
            map: Mutex::new(HashMap::new()),
            max,
            epoch: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Session>>> {
        // A panic while holding this lock leaves a valid map (every operation is one call).
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cheap check before doing DNS and socket work: would `id` be accepted now?
    pub fn precheck(&self, id: u32) -> Result<(), UdpStatus> {
        let m = self.lock();
        if m.contains_key(&id) {
            Err(UdpStatus::DuplicateId)
        } else if m.len() >= self.max {
            Err(UdpStatus::SessionLimit)
        } else {
            Ok(())
        }
    }

    /// Adds a session (re-checking the id and the cap under the lock).
    pub fn insert(
        &self,
        id: u32,
        socket: Arc<UdpSocket>,
        sender: std::net::UdpSocket,
    ) -> Result<Arc<Session>, UdpStatus> {
        let mut m = self.lock();
        if m.contains_key(&id) {
            return Err(UdpStatus::DuplicateId);
        }
        if m.len() >= self.max {
            return Err(UdpStatus::SessionLimit);
        }
        let s = Arc::new(Session {
            socket,
            sender,
            activity: Activity::new(self.epoch),
            dup: Mutex::new(crate::paths::DupFilter::default()),
        });
        m.insert(id, s.clone());
        Ok(s)
    }

    /// The session, if open.
    pub fn get(&self, id: u32) -> Option<Arc<Session>> {
        self.lock().get(&id).cloned()
    }

    /// Removes a session.
    pub fn remove(&self, id: u32) {
        self.lock().remove(&id);
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_open_bounds() {
        let now = Instant::now();
        let mut b = PreOpenBuffer::default();
        for i in 0..PRE_OPEN_PACKETS {
            assert!(b.push(now, i as u32 % 2, Bytes::from_static(b"x")));
        }
        assert!(!b.push(now, 0, Bytes::from_static(b"x")), "packet cap");
        assert_eq!(b.take(1).len(), PRE_OPEN_PACKETS / 2);
        assert!(
            !b.push(now, 3, Bytes::from(vec![0; PRE_OPEN_BYTES])),
            "byte cap"
        );
        assert_eq!(b.expire(now + PRE_OPEN_TTL), PRE_OPEN_PACKETS / 2);
        assert!(b.is_empty());
        assert_eq!(b.next_deadline(), None);
    }
}
