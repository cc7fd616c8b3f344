//! The server's UDP state for one client (one connection, or the bundle of a multipath client): the session table (one connected UDP socket
//! per session, capped), the bounded pre-OPEN buffer for DATAGRAMs that overtake their
//! UDP_SESSION_OPEN, and idle timing. The buffer and activity clock are pure; the socket loop
//! that uses them lives in [`crate::server`].

#![cfg(feature = "runtime")]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use netkit::slots::{Slot, Slots};
use tokio::net::UdpSocket;

use crate::defaults::{
    FDS_PER_SESSION, MAX_SESSIONS_TOTAL_CEILING, PRE_OPEN_BYTES, PRE_OPEN_PACKETS, PRE_OPEN_TTL,
    SESSION_FD_SHARE_DIVISOR,
};
use crate::proto::UdpStatus;

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
    pub dup: Mutex<crate::multipath::sched::DupFilter>,
}

impl crate::datagram_rx::RxSession for Session {
    fn dup_filter(&self) -> &Mutex<crate::multipath::sched::DupFilter> {
        &self.dup
    }
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
            dup: Mutex::new(crate::multipath::sched::DupFilter::default()),
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

/// The default process-wide UDP session cap: raises the soft `RLIMIT_NOFILE` to the hard
/// limit (sessions are descriptors; a soft limit of 1,024 is a distribution default, not a
/// choice), then gives sessions [`SESSION_FD_SHARE_DIVISOR`]'s share of it, at most
/// [`MAX_SESSIONS_TOTAL_CEILING`] and at least 1. Returns (cap, the descriptor limit used).
pub fn derive_total_cap() -> (usize, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read the one struct passed.
    let nofile = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            1024
        } else {
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
            lim.rlim_cur
        }
    };
    (total_cap_for(nofile), nofile)
}

/// The process-wide session cap for a descriptor limit (see [`derive_total_cap`]).
pub fn total_cap_for(nofile: u64) -> usize {
    let n = nofile / SESSION_FD_SHARE_DIVISOR / FDS_PER_SESSION;
    (n.min(MAX_SESSIONS_TOTAL_CEILING as u64) as usize).max(1)
}

/// Why [`UdpBudget::acquire`] refused a session: `Total`, the process-wide cap
/// (`--max-udp-sessions-total`); `Key`, the per-client cap (`--max-udp-sessions-per-client`).
pub use netkit::slots::Refusal as BudgetRefusal;

/// UDP sessions across all connections: a process-wide cap (descriptors are the server's, not
/// one connection's) and a cap per client address (an IPv6 /64, which one host usually holds,
/// as for the relay's per-IP limits). The per-connection cap is [`SessionTable`]'s.
#[derive(Debug)]
pub struct UdpBudget {
    slots: Arc<Slots<std::net::IpAddr>>,
}

/// One session's place in a [`UdpBudget`], given back on drop.
pub type BudgetSlot = Slot<std::net::IpAddr>;

/// The per-client key of an address: IPv4 as is (IPv4-mapped IPv6 as IPv4), IPv6 by /64.
pub fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.into(),
            None => {
                let b = u128::from(v6) & !((1u128 << 64) - 1);
                std::net::Ipv6Addr::from(b).into()
            }
        },
        v4 => v4,
    }
}

impl UdpBudget {
    /// A budget of `max_total` sessions, at most `max_per_client` for one client address.
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        UdpBudget {
            slots: Arc::new(Slots::new(max_total, max_per_client)),
        }
    }

    /// The process-wide cap.
    pub fn max_total(&self) -> usize {
        self.slots.max_total()
    }

    /// Sessions held now.
    pub fn in_use(&self) -> usize {
        self.slots.in_use()
    }

    /// A slot for a new session from `client`, or why not.
    pub fn acquire(&self, client: std::net::IpAddr) -> Result<BudgetSlot, BudgetRefusal> {
        self.slots.acquire(client_key(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_caps_total_and_per_client_and_gives_back() {
        let b = Arc::new(UdpBudget::new(5, 3));
        let a: std::net::IpAddr = "198.18.0.1".parse().expect("lit");
        let c: std::net::IpAddr = "2001:db8:1:2::1".parse().expect("lit");
        let c_same64: std::net::IpAddr = "2001:db8:1:2:ffff::9".parse().expect("lit");
        let mut held: Vec<BudgetSlot> = (0..3).map(|_| b.acquire(a).expect("slot")).collect();
        assert_eq!(b.acquire(a).err(), Some(BudgetRefusal::Key));
        held.push(b.acquire(c).expect("other client"));
        held.push(b.acquire(c_same64).expect("same /64, under its cap"));
        assert_eq!(b.acquire(c).err(), Some(BudgetRefusal::Total));
        assert_eq!(b.in_use(), 5);
        held.clear();
        assert_eq!(b.in_use(), 0);
        assert_eq!(b.slots.keys(), 0, "entries go at zero");
        assert!(b.acquire(a).is_ok());
    }

    #[test]
    fn derived_cap_uses_half_the_descriptors() {
        assert_eq!(total_cap_for(1024), 256);
        assert_eq!(total_cap_for(20_000), 5_000);
        assert_eq!(total_cap_for(1 << 30), MAX_SESSIONS_TOTAL_CEILING);
        assert_eq!(total_cap_for(0), 1);
    }

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
