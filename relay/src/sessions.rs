//! The session table as a sans-IO state machine: `(now, src, datagram) -> outcome`, replies via
//! [`Relay::poll_transmit`], timers via [`Relay::poll_timeout`] / [`Relay::handle_timeout`].
//!
//! No sockets and no clock live here: the server loop feeds datagrams and the time, and performs
//! what comes out. That makes every rule below unit-testable with a fake clock and fuzzable.
//!
//! Memory layout is chosen for the 1,000,000-session target (about 240 bytes per paired
//! session): sessions live in a slab of fixed-size records addressed by `u32`, and the two
//! indexes (`uuid -> slot`, `address -> slot`) hold only small keys and that `u32`.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use tracing::debug;

use crate::proto::{self, ErrReason, PeerId, Registration, Reply, ReplyBuf, TokenError, Uuid};

/// A member's address: a socket address plus the transport it came over.
///
/// IPv4 is stored IPv4-mapped, so one relay socket bound to `[::]` and one bound to `0.0.0.0`
/// see the same key for the same peer. A TCP member (PROTOCOL.md §11) is keyed by its whole
/// connection: the remote address *and* which of the relay's local addresses it reached (a
/// small index, see [`PeerAddr::tcp_via`]), so a UDP datagram from the same IP and port number,
/// or a second connection from the same IP and port to another relay address, is a different
/// address: nobody can speak for a TCP member except its connection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr {
    ip: [u8; 16],
    port: u16,
    /// 0 for UDP; for TCP, 1 + the index of the relay's local address the connection reached.
    tcp: u8,
}

/// The key the per-IP limits count under: the IP itself for IPv4 (stored IPv4-mapped), the /64
/// for IPv6, since one host or subscriber is routinely given a whole /64 and can send from any
/// of its 2^64 addresses without spoofing.
pub fn ip_limit_key(ip: [u8; 16]) -> [u8; 16] {
    if Ipv6Addr::from(ip).to_ipv4_mapped().is_some() {
        ip
    } else {
        let mut k = ip;
        k[8..].fill(0);
        k
    }
}

/// Hashed as two words rather than field by field: the derived hash feeds the IP to the hasher
/// as a length-prefixed byte slice, three hasher rounds per lookup on the forwarding path where
/// two do.
impl std::hash::Hash for PeerAddr {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(u128::from_ne_bytes(self.ip));
        state.write_u32(u32::from(self.port) | (u32::from(self.tcp) << 16));
    }
}

impl PeerAddr {
    /// Builds the key for UDP `ip:port`.
    pub fn new(ip: IpAddr, port: u16) -> Self {
        let ip = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        PeerAddr {
            ip: ip.octets(),
            port,
            tcp: 0,
        }
    }

    /// Builds the key for the TCP connection whose remote end is `a` (on the relay's first
    /// local address; see [`PeerAddr::tcp_via`]).
    pub fn tcp(a: SocketAddr) -> Self {
        Self::tcp_via(0, a)
    }

    /// Builds the key for the TCP connection whose remote end is `a` and whose local end is
    /// the relay's local address number `local` (numbered by the TCP listener as it sees
    /// them; a host has few).
    pub fn tcp_via(local: u8, a: SocketAddr) -> Self {
        PeerAddr {
            tcp: local.saturating_add(1),
            ..PeerAddr::new(a.ip(), a.port())
        }
    }

    /// Builds the UDP key from a 16-byte IPv6 (or IPv4-mapped) address, as sockets report it.
    pub fn from_octets(ip: [u8; 16], port: u16) -> Self {
        PeerAddr { ip, port, tcp: 0 }
    }

    /// The IP as the 16-byte IPv6 (IPv4-mapped) form.
    pub fn ip_octets(&self) -> [u8; 16] {
        self.ip
    }

    /// The port (a TCP port for a TCP member).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether this member is a TCP connection rather than a UDP source address.
    pub fn is_tcp(&self) -> bool {
        self.tcp != 0
    }

    /// The canonical socket address (IPv4 peers as IPv4). For a TCP member, its connection's
    /// remote address.
    pub fn to_socket_addr(self) -> SocketAddr {
        SocketAddr::new(Ipv6Addr::from(self.ip).to_canonical(), self.port)
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(a: SocketAddr) -> Self {
        PeerAddr::new(a.ip(), a.port())
    }
}

impl std::fmt::Debug for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_tcp() {
            write!(f, "tcp:{}", self.to_socket_addr())
        } else {
            write!(f, "{}", self.to_socket_addr())
        }
    }
}

/// Limits that bound the relay's memory and blunt abuse. Defaults suit a 1 GiB cloud box.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sessions in total, paired or not.
    pub max_sessions: u32,
    /// Session memberships one source IP may hold (CGNAT and offices share IPs, so not 1).
    pub max_sessions_per_ip: u32,
    /// Sustained registrations per second from one source IP.
    pub reg_rate_per_ip: u32,
    /// Registrations one source IP may send at once before the rate applies.
    pub reg_burst_per_ip: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // ~240 B each: 250,000 sessions is ~60 MB, comfortable on a t3.micro.
            max_sessions: 250_000,
            // Room for a CGNAT address with many users, far from what one attacker needs.
            max_sessions_per_ip: 128,
            // Original clients re-REG every 3 s; 128 sessions of them is ~43/s. 200/s leaves room.
            reg_rate_per_ip: 200,
            reg_burst_per_ip: 400,
        }
    }
}

/// The relay's behaviour: timeouts, limits and (optionally) token secrets.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// A paired session expires after this long without forwarded traffic or a registration.
    pub session_timeout: Duration,
    /// An unpaired session expires after this long without a registration.
    pub unpaired_timeout: Duration,
    /// See [`Limits`].
    pub limits: Limits,
    /// When non-empty, every registration must carry a token minted with one of these.
    pub secrets: Vec<Vec<u8>>,
    /// Key of the return-routability cookies (PROTOCOL.md §12). Random per process by
    /// default: a restart only makes clients echo a fresh cookie.
    pub cookie_key: [u8; 32],
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            session_timeout: crate::defaults::SESSION_TIMEOUT,
            unpaired_timeout: crate::defaults::UNPAIRED_TIMEOUT,
            limits: Limits::default(),
            secrets: Vec::new(),
            cookie_key: random_key(),
        }
    }
}

/// 32 bytes from the operating system's random source. The cookie key must be unpredictable:
/// whoever knows it can forge cookies for addresses they do not hold.
fn random_key() -> [u8; 32] {
    use std::io::Read as _;
    let mut key = [0u8; 32];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .is_err()
    {
        // No /dev/urandom (an unusual sandbox): std's hasher keys are random per process.
        use std::hash::{BuildHasher, Hasher};
        for chunk in key.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(unix_nanos());
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    key
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What the server loop must do with a datagram after [`Relay::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send the datagram, unchanged, to this address.
    Forward(PeerAddr),
    /// A registration was processed (replies, if any, are in [`Relay::poll_transmit`]).
    Registration,
    /// Dropped (and counted) for this reason.
    Dropped(DropReason),
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// The sender is not a member of any session.
    UnknownSource,
    /// The sender's session has no second member yet.
    Unpaired,
    /// The other member registered in the extended form and has not echoed its cookie yet
    /// (PROTOCOL.md §12): its address may be spoofed.
    Unverified,
}

/// A reply the server loop must send.
#[derive(Debug, Clone, Copy)]
pub struct Transmit {
    /// Where to.
    pub dst: PeerAddr,
    /// What (never longer than the datagram that caused it).
    pub payload: ReplyBuf,
}

/// Registration results, in the order of [`Stats::regs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegResult {
    /// Created a session.
    New,
    /// Took the second slot: the session is now paired.
    Join,
    /// A member re-registered from the address it already had (keepalive).
    Refresh,
    /// A member moved to a new address (NAT rebinding).
    Rebind,
    /// Refused.
    Refused(ErrReason),
}

impl RegResult {
    /// Every result, for metrics.
    pub const ALL: [RegResult; 12] = [
        RegResult::New,
        RegResult::Join,
        RegResult::Refresh,
        RegResult::Rebind,
        RegResult::Refused(ErrReason::Malformed),
        RegResult::Refused(ErrReason::Short),
        RegResult::Refused(ErrReason::Full),
        RegResult::Refused(ErrReason::Capacity),
        RegResult::Refused(ErrReason::IpLimit),
        RegResult::Refused(ErrReason::Rate),
        RegResult::Refused(ErrReason::Auth),
        RegResult::Refused(ErrReason::Expired),
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            RegResult::New => "new",
            RegResult::Join => "join",
            RegResult::Refresh => "refresh",
            RegResult::Rebind => "rebind",
            RegResult::Refused(r) => r.as_str(),
        }
    }

    fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|r| *r == self)
            .expect("every result is listed in ALL")
    }
}

/// Counters kept by the state machine; the server publishes them as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Registrations by result, indexed like [`RegResult::ALL`].
    pub regs: [u64; 12],
    /// Datagrams forwarded.
    pub forwarded_packets: u64,
    /// Payload bytes forwarded.
    pub forwarded_bytes: u64,
    /// Datagrams from an address that is no member of any session.
    pub dropped_unknown_source: u64,
    /// Datagrams from a member whose session is not paired.
    pub dropped_unpaired: u64,
    /// Replies not sent because they would have been longer than the request.
    pub replies_suppressed: u64,
    /// Paired sessions that expired.
    pub expired_paired: u64,
    /// Unpaired sessions that expired.
    pub expired_unpaired: u64,
    /// Registrations let through unmetered because the rate table was full.
    pub rate_table_full: u64,
    /// Members that left with a `BYE`.
    pub byes: u64,
    /// `BYE`s ignored (not from a member, wrong session or peer id, malformed).
    pub byes_ignored: u64,
    /// Members replaced because they had been silent for the unpaired timeout.
    pub stale_replaced: u64,
    /// TCP members removed because their connection closed.
    pub tcp_left: u64,
    /// Datagrams not forwarded because the destination had not echoed its cookie.
    pub dropped_unverified: u64,
    /// Extended registrations whose echoed cookie was wrong or stale.
    pub cookies_rejected: u64,
    /// Unpaired sessions that never heard a second registration, removed to make room when the
    /// table was full.
    pub evicted_unconfirmed: u64,
    /// Sessions now paired (gauge).
    pub sessions_paired: u64,
    /// Sessions now waiting for a second member (gauge).
    pub sessions_unpaired: u64,
}

impl Stats {
    /// Registrations with this result so far.
    pub fn reg(&self, r: RegResult) -> u64 {
        self.regs[r.index()]
    }
}

const SLOT_USED: u8 = 1;
const SLOT_EXTENDED: u8 = 2;
const SLOT_HAS_PEER_ID: u8 = 4;
/// The member proved its address: it echoed its cookie, or it is a TCP connection (whose
/// handshake proved it). Only such extended members are forwarded to.
const SLOT_VERIFIED: u8 = 8;
/// The member's session heard a second registration (a refresh, a rebind or the other peer's
/// join): it is not flood debris, and is never evicted to make room.
const SLOT_CONFIRMED: u8 = 16;

/// One member of a session. 32 bytes: the address is stored as IP and port, its transport in
/// `tcp` (a whole [`PeerAddr`] would pad the slot to 40 bytes).
#[derive(Clone, Copy)]
struct Slot {
    ip: [u8; 16],
    port: u16,
    flags: u8,
    /// [`PeerAddr`]'s `tcp`: 0 for UDP. Fills what would be padding.
    tcp: u8,
    /// Seconds since the relay's epoch; breaks ties when two same-IP members could be rebinding.
    last_heard: u32,
    peer_id: u64,
}

const EMPTY_SLOT: Slot = Slot {
    ip: [0; 16],
    port: 0,
    flags: 0,
    tcp: 0,
    last_heard: 0,
    peer_id: 0,
};

impl Slot {
    fn addr(&self) -> PeerAddr {
        PeerAddr {
            ip: self.ip,
            port: self.port,
            tcp: self.tcp,
        }
    }
    fn is_tcp(&self) -> bool {
        self.tcp != 0
    }
    fn verified(&self) -> bool {
        self.flags & SLOT_VERIFIED != 0
    }
    fn used(&self) -> bool {
        self.flags & SLOT_USED != 0
    }
    fn extended(&self) -> bool {
        self.flags & SLOT_EXTENDED != 0
    }
    fn peer_id(&self) -> Option<u64> {
        (self.flags & SLOT_HAS_PEER_ID != 0).then_some(self.peer_id)
    }
}

/// One session record in the slab. A free record has no used slot.
#[derive(Clone, Copy)]
struct Session {
    id: Uuid,
    slots: [Slot; 2],
    /// Seconds since the relay's epoch of the last forwarded datagram or registration.
    last_active: u32,
    /// Creation number (wrapping), telling this session from an earlier one in the same
    /// record in [`Relay::young`]. Fills what would be padding.
    born: u32,
}

// The memory target (PROTOCOL.md §10) rests on these sizes: new fields go into padding.
const _: () = assert!(std::mem::size_of::<Slot>() == 32);
const _: () = assert!(std::mem::size_of::<Session>() == 88);

impl Session {
    fn paired(&self) -> bool {
        self.slots[0].used() && self.slots[1].used()
    }
    fn live(&self) -> bool {
        self.slots[0].used() || self.slots[1].used()
    }
}

/// Whether `young` entry `(i, born)` still names an unpaired session that never heard a second
/// registration.
fn evictable(sessions: &[Session], (i, born): (u32, u32)) -> bool {
    let s = &sessions[i as usize];
    s.live()
        && s.born == born
        && !s.paired()
        && s.slots.iter().all(|m| m.flags & SLOT_CONFIRMED == 0)
}

/// A reference from the address index into the slab: `session index << 1 | slot`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct MemberRef(u32);

impl MemberRef {
    fn new(session: u32, slot: usize) -> Self {
        MemberRef(session << 1 | slot as u32)
    }
    fn session(self) -> usize {
        (self.0 >> 1) as usize
    }
    fn slot(self) -> usize {
        (self.0 & 1) as usize
    }
}

/// How many source IPs the rate limiter tracks at most. An IP idle for longer than its burst
/// window is indistinguishable from a new one, so entries are swept; past this cap (a spoofed
/// flood from many IPs) new IPs go unmetered and the session limits still bound memory.
const MAX_RATE_ENTRIES: usize = 1 << 17;

/// How long the sweeper may take to visit every session: expiry is accurate to about this.
const SWEEP_PERIOD: Duration = Duration::from_secs(1);

/// How often [`Relay::handle_timeout`] wants to run: the sweep visits a slice of the slab each time.
pub const TICK: Duration = Duration::from_millis(100);

/// Slices per full sweep.
const SWEEP_SLICES: usize = (SWEEP_PERIOD.as_millis() / TICK.as_millis()) as usize;

/// The relay's session table and rules.
pub struct Relay {
    cfg: RelayConfig,
    epoch: Instant,
    /// The `now` last passed in and its distance from `epoch` in microseconds: the server
    /// passes one `now` per batch, so the conversion runs once per batch, not per datagram.
    clock: (Instant, u64),
    /// The second since `epoch` that the forwarding path last saw: `[start, end)` and its
    /// number (see [`Relay::forward_secs`]).
    second: (Instant, Instant, u32),
    /// Wall-clock Unix seconds at the last `set_wall_clock`, for token expiry.
    unix_now: u64,
    sessions: Vec<Session>,
    free: Vec<u32>,
    by_id: HashMap<Uuid, u32>,
    by_addr: HashMap<PeerAddr, MemberRef>,
    /// Memberships per [`ip_limit_key`].
    per_ip: HashMap<[u8; 16], u32>,
    /// Sessions in order of creation, oldest first, as candidates for eviction when the table
    /// is full: (record, [`Session::born`]). Entries go stale (the session paired, was
    /// confirmed, or ended) and are skipped; compacted at [`Relay::young_cap`] entries.
    young: VecDeque<(u32, u32)>,
    /// The next [`Session::born`].
    born: u32,
    /// GCRA state per source IP: the theoretical arrival time in microseconds since `epoch`.
    rate: HashMap<[u8; 16], u64>,
    next_rate_sweep: u64,
    sweep_cursor: usize,
    next_tick: Instant,
    transmits: VecDeque<Transmit>,
    stats: Stats,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("sessions", &self.by_id.len())
            .field("members", &self.by_addr.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay with no sessions, whose clock starts at `now`.
    pub fn new(cfg: RelayConfig, now: Instant) -> Self {
        Relay {
            cfg,
            epoch: now,
            clock: (now, 0),
            second: (now, now + Duration::from_secs(1), 0),
            unix_now: 0,
            sessions: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            by_addr: HashMap::new(),
            per_ip: HashMap::new(),
            young: VecDeque::new(),
            born: 0,
            rate: HashMap::new(),
            next_rate_sweep: 0,
            sweep_cursor: 0,
            next_tick: now + TICK,
            transmits: VecDeque::with_capacity(4),
            stats: Stats::default(),
        }
    }

    /// Tells the relay the wall-clock time (Unix seconds), used only to check token expiry.
    /// The server calls this every tick, so a clock step is picked up within one.
    pub fn set_wall_clock(&mut self, unix_secs: u64) {
        self.unix_now = unix_secs;
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Number of sessions, paired or not.
    pub fn session_count(&self) -> usize {
        self.by_id.len()
    }

    fn secs(&mut self, now: Instant) -> u32 {
        // u32 seconds last 136 years; saturate rather than wrap.
        (self.micros(now) / 1_000_000).min(u32::MAX as u64) as u32
    }

    /// [`Relay::secs`] for the forwarding path: within the second last computed, two
    /// comparisons of `now` instead of a subtraction and a division. At low rates every
    /// datagram has a new `now`, and the exact computation was a sixth of the relay's own
    /// instructions per forwarded datagram. Leaves `clock` alone (registrations read it).
    #[inline]
    fn forward_secs(&mut self, now: Instant) -> u32 {
        let (start, end, secs) = self.second;
        if now >= start && now < end {
            return secs;
        }
        let secs = self.secs(now);
        let start = self.epoch + Duration::from_secs(u64::from(secs));
        self.second = (start, start + Duration::from_secs(1), secs);
        secs
    }

    fn micros(&mut self, now: Instant) -> u64 {
        if now != self.clock.0 {
            let us = now.saturating_duration_since(self.epoch).as_micros();
            self.clock = (now, us.min(u128::from(u64::MAX)) as u64);
        }
        self.clock.1
    }

    /// Processes one datagram from `src`.
    ///
    /// Data from a member of a paired session is to be forwarded to the other member; a
    /// registration updates the table and queues a reply; everything else is dropped.
    #[inline]
    pub fn handle(&mut self, now: Instant, src: PeerAddr, datagram: &[u8]) -> Outcome {
        if proto::is_registration(datagram) {
            match proto::parse_registration(datagram) {
                Ok(reg) => {
                    self.register(now, src, &reg, datagram.len());
                    return Outcome::Registration;
                }
                Err(e) => {
                    // From a paired member, a datagram that merely starts with "REG:" and does
                    // not parse is payload (a QUIC short header can begin with 0x52 'R'): forward
                    // it rather than lose it.
                    if self.is_paired_member(src) {
                        if let Some(out) = self.try_forward(now, src, datagram.len()) {
                            return out;
                        }
                    }
                    let reason = if e == proto::ParseError::TooShortForReply {
                        ErrReason::Short
                    } else {
                        ErrReason::Malformed
                    };
                    debug!(%src, error = %e, "malformed registration");
                    self.refuse(src, reason, datagram.len());
                    return Outcome::Registration;
                }
            }
        }
        if proto::is_bye(datagram) {
            match proto::Bye::parse(datagram) {
                Ok(bye) => {
                    self.leave(src, &bye);
                    return Outcome::Registration;
                }
                // As for REG: from a paired member it is payload; from anyone else, dropped
                // (a BYE is never answered).
                Err(_) if !self.is_paired_member(src) => {
                    self.stats.byes_ignored += 1;
                    return Outcome::Registration;
                }
                Err(_) => {}
            }
        }
        match self.try_forward(now, src, datagram.len()) {
            Some(out) => out,
            None => {
                self.stats.dropped_unknown_source += 1;
                Outcome::Dropped(DropReason::UnknownSource)
            }
        }
    }

    /// A member gives up its slot (`BYE`). Only the member itself can: the request must come
    /// from its current address and name its session and, if it registered with one, its peer id.
    fn leave(&mut self, src: PeerAddr, bye: &proto::Bye) {
        let Some(m) = self.by_addr.get(&src).copied() else {
            self.stats.byes_ignored += 1;
            return;
        };
        let slot = self.sessions[m.session()].slots[m.slot()];
        let id = self.sessions[m.session()].id;
        let peer_ok = match slot.peer_id() {
            None => true,
            Some(p) => bye.peer == Some(PeerId(p)),
        };
        if id != bye.session || !peer_ok {
            self.stats.byes_ignored += 1;
            return;
        }
        debug!(session = %id, peer = %src, "member left");
        self.remove_member(m.session(), m.slot());
        self.stats.byes += 1;
    }

    /// The TCP connection `addr` closed: its member (if it is one) leaves its session at once,
    /// as with a `BYE`. A later connection from the same IP and port is a stranger and must
    /// register anew. Returns whether a member was removed.
    pub fn disconnect(&mut self, addr: PeerAddr) -> bool {
        let Some(m) = self.by_addr.get(&addr).copied() else {
            return false;
        };
        debug!(session = %self.sessions[m.session()].id, peer = %addr, "TCP member disconnected");
        self.remove_member(m.session(), m.slot());
        self.stats.tcp_left += 1;
        true
    }

    /// Whether `addr` is a member of a session now.
    pub fn is_member(&self, addr: PeerAddr) -> bool {
        self.by_addr.contains_key(&addr)
    }

    fn is_paired_member(&self, src: PeerAddr) -> bool {
        self.by_addr
            .get(&src)
            .is_some_and(|m| self.sessions[m.session()].paired())
    }

    /// Forwarding for a member; `None` when `src` is no member.
    #[inline]
    fn try_forward(&mut self, now: Instant, src: PeerAddr, len: usize) -> Option<Outcome> {
        let m = *self.by_addr.get(&src)?;
        let t = self.forward_secs(now);
        let s = &mut self.sessions[m.session()];
        let other = s.slots[1 - m.slot()];
        if !other.used() {
            self.stats.dropped_unpaired += 1;
            return Some(Outcome::Dropped(DropReason::Unpaired));
        }
        if other.flags & (SLOT_EXTENDED | SLOT_VERIFIED) == SLOT_EXTENDED {
            // Its address may be a spoofed registration's: sending there would reflect.
            self.stats.dropped_unverified += 1;
            return Some(Outcome::Dropped(DropReason::Unverified));
        }
        s.last_active = t;
        s.slots[m.slot()].last_heard = t;
        self.stats.forwarded_packets += 1;
        self.stats.forwarded_bytes += len as u64;
        Some(Outcome::Forward(other.addr()))
    }

    /// The next reply to send, if any. Drain after every [`Relay::handle`].
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`Relay::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    /// Expires idle sessions (a slice of the table per call, the whole table every second) and
    /// forgets idle rate-limiter entries.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        let t = self.secs(now);
        let paired_limit = self.cfg.session_timeout.as_secs().min(u32::MAX as u64) as u32;
        let unpaired_limit = self.cfg.unpaired_timeout.as_secs().min(u32::MAX as u64) as u32;
        let len = self.sessions.len();
        if len > 0 {
            let slice = len.div_ceil(SWEEP_SLICES).max(1024).min(len);
            for _ in 0..slice {
                if self.sweep_cursor >= len {
                    self.sweep_cursor = 0;
                }
                let i = self.sweep_cursor;
                self.sweep_cursor += 1;
                let s = &self.sessions[i];
                if !s.live() {
                    continue;
                }
                let limit = if s.paired() {
                    paired_limit
                } else {
                    unpaired_limit
                };
                if t.saturating_sub(s.last_active) >= limit {
                    self.expire(i);
                }
            }
        }
        let us = self.micros(now);
        if us >= self.next_rate_sweep {
            self.sweep_rate(us);
        }
        self.trim_young();
    }

    /// Drops stale entries from the front of `young`, so it does not hold every session ever
    /// created.
    fn trim_young(&mut self) {
        while let Some(&e) = self.young.front() {
            if evictable(&self.sessions, e) {
                break;
            }
            self.young.pop_front();
        }
        // One unpaired session at the front pins every stale entry behind it: compact when
        // stale entries dominate. Live entries are at most the unpaired sessions, so this runs
        // at most once per that many creations.
        let unpaired = self.stats.sessions_unpaired as usize;
        if self.young.len() > 2 * unpaired + 1024 {
            let sessions = &self.sessions;
            self.young.retain(|&e| evictable(sessions, e));
        }
        // After a burst of registrations that all paired, give the memory back: idle paired
        // sessions should cost what the table needs, not the peak of this queue.
        if self.young.capacity() > 4 * self.young.len() + 1024 {
            self.young.shrink_to(2 * self.young.len());
        }
    }

    /// Most entries `young` holds before it is compacted: twice the live ones it can name, so
    /// compaction (a pass over it) happens at most once per `max_sessions` creations.
    fn young_cap(&self) -> usize {
        2 * self.cfg.limits.max_sessions as usize + 1
    }

    /// Removes the oldest unpaired session that never heard a second registration (PROTOCOL.md
    /// §7). Returns whether one was found. A flood of registrations for random sessions
    /// consists of exactly such sessions; a peer waiting for its partner re-registers and is
    /// confirmed, and a paired session never qualifies.
    fn evict_unconfirmed(&mut self) -> bool {
        while let Some(e) = self.young.pop_front() {
            if evictable(&self.sessions, e) {
                let i = e.0 as usize;
                debug!(session = %self.sessions[i].id, "evicting an unconfirmed session to make room");
                for slot in 0..2 {
                    if self.sessions[i].slots[slot].used() {
                        self.remove_member(i, slot);
                    }
                }
                self.stats.evicted_unconfirmed += 1;
                return true;
            }
        }
        false
    }

    fn sweep_rate(&mut self, now_us: u64) {
        // An entry whose theoretical arrival time has passed has a full bucket: forget it.
        self.rate.retain(|_, tat| *tat > now_us);
        self.next_rate_sweep = now_us + 1_000_000;
    }

    fn expire(&mut self, i: usize) {
        let s = self.sessions[i];
        if s.paired() {
            self.stats.expired_paired += 1;
        } else {
            self.stats.expired_unpaired += 1;
        }
        debug!(session = %s.id, paired = s.paired(), "session expired");
        for slot in 0..2 {
            if s.slots[slot].used() {
                self.remove_member(i, slot);
            }
        }
    }

    /// Empties one slot, and frees the session when that was its last member.
    fn remove_member(&mut self, i: usize, slot: usize) {
        let was_paired = self.sessions[i].paired();
        let addr = self.sessions[i].slots[slot].addr();
        self.by_addr.remove(&addr);
        self.dec_ip(addr.ip);
        self.sessions[i].slots[slot] = EMPTY_SLOT;
        if was_paired {
            self.stats.sessions_paired -= 1;
            self.stats.sessions_unpaired += 1;
        }
        if !self.sessions[i].live() {
            self.stats.sessions_unpaired -= 1;
            let id = self.sessions[i].id;
            self.by_id.remove(&id);
            self.free.push(i as u32);
        }
    }

    fn dec_ip(&mut self, ip: [u8; 16]) {
        if let hashbrown::hash_map::Entry::Occupied(mut e) = self.per_ip.entry(ip_limit_key(ip)) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    fn inc_ip(&mut self, ip: [u8; 16]) {
        *self.per_ip.entry(ip_limit_key(ip)).or_insert(0) += 1;
    }

    fn ip_count(&self, ip: &[u8; 16]) -> u32 {
        self.per_ip.get(&ip_limit_key(*ip)).copied().unwrap_or(0)
    }

    /// GCRA: allows `burst` registrations at once, then `rate` per second.
    fn rate_allows(&mut self, now: Instant, ip: [u8; 16]) -> bool {
        let ip = ip_limit_key(ip);
        let l = &self.cfg.limits;
        if l.reg_rate_per_ip == 0 {
            return false;
        }
        let interval = 1_000_000 / u64::from(l.reg_rate_per_ip).max(1);
        let tolerance = interval * u64::from(l.reg_burst_per_ip.max(1) - 1);
        let now_us = self.micros(now);
        // The length first: the lookup is needed only when the table is full.
        if self.rate.len() >= MAX_RATE_ENTRIES && !self.rate.contains_key(&ip) {
            if now_us >= self.next_rate_sweep.saturating_sub(900_000) {
                self.sweep_rate(now_us);
            }
            if self.rate.len() >= MAX_RATE_ENTRIES {
                self.stats.rate_table_full += 1;
                return true;
            }
        }
        let tat = self.rate.entry(ip).or_insert(now_us);
        let start = (*tat).max(now_us);
        if start - now_us > tolerance {
            return false;
        }
        *tat = start + interval;
        true
    }

    fn queue(&mut self, dst: PeerAddr, reply: Reply, request_len: usize) -> bool {
        let mut payload = reply.encode();
        if let Reply::Ack {
            observed,
            peer,
            cookie: Some(_),
        } = reply
        {
            if payload.as_bytes().len() > request_len {
                // An older client's registration, padded for addresses only: it gets its
                // addresses but no cookie (and so stays unverified).
                payload = Reply::Ack {
                    observed,
                    peer,
                    cookie: None,
                }
                .encode();
            }
        }
        // The no-amplification rule: never answer with more bytes than were sent.
        if payload.as_bytes().len() > request_len {
            self.stats.replies_suppressed += 1;
            return false;
        }
        self.transmits.push_back(Transmit { dst, payload });
        true
    }

    fn refuse(&mut self, src: PeerAddr, reason: ErrReason, request_len: usize) {
        self.count(RegResult::Refused(reason));
        self.queue(src, Reply::Err(Some(reason)), request_len);
    }

    fn count(&mut self, r: RegResult) {
        self.stats.regs[r.index()] += 1;
    }

    /// The ACK for the member in `slot` of session `i`.
    fn ack_for(&self, i: usize, slot: usize) -> Reply {
        let s = &self.sessions[i];
        let me = s.slots[slot];
        if !me.extended() {
            return Reply::Ack {
                observed: None,
                peer: None,
                cookie: None,
            };
        }
        let other = s.slots[1 - slot];
        Reply::Ack {
            observed: Some(me.addr().to_socket_addr()),
            peer: other.used().then(|| other.addr().to_socket_addr()),
            cookie: (!me.verified()).then(|| self.cookie(s.id, me.addr(), self.cookie_epoch())),
        }
    }

    /// The current cookie period's number (cookies of this one and the previous are accepted).
    fn cookie_epoch(&self) -> u64 {
        self.clock.1 / crate::defaults::COOKIE_PERIOD.as_micros().max(1) as u64
    }

    /// The cookie for `addr` in `session` during period `epoch`: a keyed hash, so the relay
    /// keeps no state per cookie, and only whoever receives the ACK at `addr` learns it.
    fn cookie(&self, session: Uuid, addr: PeerAddr, epoch: u64) -> proto::Cookie {
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.cfg.cookie_key)
            .expect("HMAC accepts keys of any length");
        mac.update(session.as_bytes());
        mac.update(&addr.ip);
        mac.update(&addr.port.to_be_bytes());
        mac.update(&[addr.tcp]);
        mac.update(&epoch.to_be_bytes());
        let out = mac.finalize().into_bytes();
        proto::Cookie(u64::from_be_bytes(
            out[..8].try_into().expect("SHA-256 is 32 bytes"),
        ))
    }

    /// Whether `c` is the cookie of `addr` in `session` for this period or the previous one.
    /// (A wrong guess is rejected with probability 1 - 2^-63.)
    fn cookie_ok(&self, session: Uuid, addr: PeerAddr, c: proto::Cookie) -> bool {
        let epoch = self.cookie_epoch();
        self.cookie(session, addr, epoch) == c
            || (epoch > 0 && self.cookie(session, addr, epoch - 1) == c)
    }

    /// Tells an extended other member of session `i` about a new or moved peer in `slot`.
    fn notify_other(&mut self, i: usize, slot: usize, request_len: usize) {
        let other = self.sessions[i].slots[1 - slot];
        if other.used() && other.extended() {
            let reply = self.ack_for(i, 1 - slot);
            self.queue(other.addr(), reply, request_len);
        }
    }

    fn register(&mut self, now: Instant, src: PeerAddr, reg: &Registration, request_len: usize) {
        if !self.rate_allows(now, src.ip) {
            return self.refuse(src, ErrReason::Rate, request_len);
        }
        let ext = reg.extended.as_ref();
        if !self.cfg.secrets.is_empty() {
            let verdict = match ext.and_then(|e| e.token.as_ref()) {
                None => Err(TokenError::BadMac),
                Some(t) => t.verify(&self.cfg.secrets, reg.session, self.unix_now),
            };
            match verdict {
                Ok(()) => {}
                Err(TokenError::Expired) => {
                    return self.refuse(src, ErrReason::Expired, request_len)
                }
                Err(_) => return self.refuse(src, ErrReason::Auth, request_len),
            }
        }
        let t = self.secs(now);
        let peer_id = ext.and_then(|e| e.peer).map(|PeerId(p)| p);
        let mut flags = SLOT_USED;
        if ext.is_some() {
            flags |= SLOT_EXTENDED;
        }
        if peer_id.is_some() {
            flags |= SLOT_HAS_PEER_ID;
        }
        // A TCP connection's handshake proved its address; a UDP member proves it by echoing
        // the cookie the relay sent there.
        if src.is_tcp() {
            flags |= SLOT_VERIFIED;
        } else if let Some(c) = ext.and_then(|e| e.cookie) {
            if self.cookie_ok(reg.session, src, c) {
                flags |= SLOT_VERIFIED;
            } else {
                self.stats.cookies_rejected += 1;
            }
        }
        let slot_value = Slot {
            ip: src.ip,
            port: src.port,
            flags,
            tcp: src.tcp,
            last_heard: t,
            peer_id: peer_id.unwrap_or(0),
        };
        let current = self.by_addr.get(&src).copied();

        let Some(&idx) = self.by_id.get(&reg.session) else {
            return self.create(now, src, reg.session, slot_value, current, request_len);
        };
        let i = idx as usize;

        // (a) Already a member at this very address: keepalive.
        if let Some(m) = current.filter(|m| m.session() == i) {
            let other = self.sessions[i].slots[1 - m.slot()];
            if peer_id.is_some() && other.used() && other.peer_id() == peer_id {
                // The other member already goes by this peer id: two peers cannot share one.
                return self.refuse(src, ErrReason::Full, request_len);
            }
            let s = &mut self.sessions[i];
            // Same address: a proof given before still holds.
            let kept = s.slots[m.slot()].flags & SLOT_VERIFIED;
            s.slots[m.slot()] = Slot {
                flags: slot_value.flags | kept | SLOT_CONFIRMED,
                ..slot_value
            };
            s.last_active = t;
            self.count(RegResult::Refresh);
            let ack = self.ack_for(i, m.slot());
            self.queue(src, ack, request_len);
            return;
        }

        // (b) A member that moved: same peer id, or (original form) same IP as a member that
        // has no peer id. Rebinding happens only here, on a registration, never on data.
        let s = &self.sessions[i];
        let moving = match peer_id {
            Some(p) => (0..2).find(|&k| s.slots[k].used() && s.slots[k].peer_id() == Some(p)),
            None => {
                // Only between UDP addresses: a TCP member without a peer id never moves (it
                // leaves when its connection closes), and no REG over TCP takes a UDP member's
                // slot by IP alone: a TCP connection acts only for itself.
                let candidates = (0..2).filter(|&k| {
                    let m = s.slots[k];
                    m.used()
                        && m.peer_id().is_none()
                        && m.ip == src.ip
                        && !m.is_tcp()
                        && !src.is_tcp()
                });
                // Both members behind this IP: the one heard from least recently is the one whose
                // NAT mapping went away.
                candidates.min_by_key(|&k| s.slots[k].last_heard)
            }
        };
        // An address leaving another session for this one does not count twice against its IP.
        let held = u32::from(current.is_some());
        if let Some(k) = moving {
            let old = s.slots[k].addr();
            if ip_limit_key(old.ip) != ip_limit_key(src.ip)
                && self.ip_count(&src.ip) - held >= self.cfg.limits.max_sessions_per_ip
            {
                return self.refuse(src, ErrReason::IpLimit, request_len);
            }
            if let Some(m) = current {
                self.remove_member(m.session(), m.slot());
            }
            self.by_addr.remove(&old);
            self.dec_ip(old.ip);
            self.inc_ip(src.ip);
            self.by_addr.insert(src, MemberRef::new(idx, k));
            let s = &mut self.sessions[i];
            s.slots[k] = Slot {
                flags: slot_value.flags | SLOT_CONFIRMED,
                ..slot_value
            };
            s.last_active = t;
            self.count(RegResult::Rebind);
            debug!(session = %reg.session, from = %old, to = %src, "member rebound");
            let ack = self.ack_for(i, k);
            self.queue(src, ack, request_len);
            self.notify_other(i, k, request_len);
            return;
        }

        // (c) A free slot: the second peer arrives. A member silent for the unpaired timeout
        // (no registration, no data) is gone: a peer that crashed must not lock its session
        // until the other side gives up too.
        let stale_after = self.cfg.unpaired_timeout.as_secs().min(u32::MAX as u64) as u32;
        let slots = self.sessions[i].slots;
        let free = (0..2).find(|&k| !slots[k].used());
        let stale = (0..2)
            .filter(|&k| t.saturating_sub(slots[k].last_heard) >= stale_after)
            .min_by_key(|&k| slots[k].last_heard);
        let Some(k) = free.or(stale) else {
            return self.refuse(src, ErrReason::Full, request_len);
        };
        if self.ip_count(&src.ip) - held >= self.cfg.limits.max_sessions_per_ip {
            return self.refuse(src, ErrReason::IpLimit, request_len);
        }
        if free.is_none() {
            debug!(session = %reg.session, stale = %slots[k].addr(), peer = %src, "replacing a silent member");
            self.remove_member(i, k);
            self.stats.stale_replaced += 1;
        }
        if let Some(m) = current {
            self.remove_member(m.session(), m.slot());
        }
        self.inc_ip(src.ip);
        self.by_addr.insert(src, MemberRef::new(idx, k));
        let s = &mut self.sessions[i];
        s.slots[k] = Slot {
            flags: slot_value.flags | SLOT_CONFIRMED,
            ..slot_value
        };
        s.slots[1 - k].flags |= SLOT_CONFIRMED;
        s.last_active = t;
        self.stats.sessions_unpaired -= 1;
        self.stats.sessions_paired += 1;
        self.count(RegResult::Join);
        debug!(session = %reg.session, peer = %src, "session paired");
        let ack = self.ack_for(i, k);
        self.queue(src, ack, request_len);
        self.notify_other(i, k, request_len);
    }

    fn create(
        &mut self,
        now: Instant,
        src: PeerAddr,
        id: Uuid,
        slot_value: Slot,
        current: Option<MemberRef>,
        request_len: usize,
    ) {
        let held = u32::from(current.is_some());
        if self.ip_count(&src.ip) - held >= self.cfg.limits.max_sessions_per_ip {
            return self.refuse(src, ErrReason::IpLimit, request_len);
        }
        let mut current = current;
        if self.by_id.len() >= self.cfg.limits.max_sessions as usize {
            if !self.evict_unconfirmed() {
                return self.refuse(src, ErrReason::Capacity, request_len);
            }
            // The evicted session may have been the one this address was a member of.
            current = self.by_addr.get(&src).copied();
        }
        if let Some(m) = current {
            self.remove_member(m.session(), m.slot());
        }
        let t = self.secs(now);
        let born = self.born;
        self.born = self.born.wrapping_add(1);
        let record = Session {
            id,
            slots: [slot_value, EMPTY_SLOT],
            last_active: t,
            born,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.sessions[i as usize] = record;
                i
            }
            None => {
                self.sessions.push(record);
                (self.sessions.len() - 1) as u32
            }
        };
        self.by_id.insert(id, idx);
        if self.young.len() >= self.young_cap() {
            // Stale entries pile up behind a live one at the front: compact. Live entries are
            // fewer than max_sessions, so this leaves at least half the room free.
            let sessions = &self.sessions;
            self.young.retain(|&e| evictable(sessions, e));
        }
        self.young.push_back((idx, born));
        self.by_addr.insert(src, MemberRef::new(idx, 0));
        self.inc_ip(src.ip);
        self.stats.sessions_unpaired += 1;
        self.count(RegResult::New);
        debug!(session = %id, peer = %src, "session created");
        let ack = self.ack_for(idx as usize, 0);
        self.queue(src, ack, request_len);
    }

    /// Checks every internal invariant; for tests and fuzzing. Panics with a description when
    /// one does not hold.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        let mut members = 0;
        let mut paired = 0;
        let mut unpaired = 0;
        let mut per_ip: std::collections::HashMap<[u8; 16], u32> = Default::default();
        let free: std::collections::HashSet<u32> = self.free.iter().copied().collect();
        assert_eq!(
            free.len(),
            self.free.len(),
            "a record is on the free list twice"
        );
        for (i, s) in self.sessions.iter().enumerate() {
            if !s.live() {
                assert!(
                    self.free.contains(&(i as u32)),
                    "dead record {i} not on the free list"
                );
                continue;
            }
            assert_eq!(
                self.by_id.get(&s.id),
                Some(&(i as u32)),
                "by_id for {}",
                s.id
            );
            if s.paired() {
                paired += 1;
                assert_ne!(
                    s.slots[0].addr(),
                    s.slots[1].addr(),
                    "session {} paired with itself",
                    s.id
                );
                if let (Some(a), Some(b)) = (s.slots[0].peer_id(), s.slots[1].peer_id()) {
                    assert_ne!(a, b, "two members with one peer id");
                }
            } else {
                unpaired += 1;
            }
            for (k, slot) in s.slots.iter().enumerate() {
                if slot.used() {
                    members += 1;
                    *per_ip.entry(ip_limit_key(slot.addr().ip)).or_default() += 1;
                    assert!(
                        self.by_addr.get(&slot.addr()) == Some(&MemberRef::new(i as u32, k)),
                        "by_addr for {}",
                        slot.addr()
                    );
                }
            }
        }
        assert_eq!(members, self.by_addr.len(), "address index size");
        assert_eq!(paired + unpaired, self.by_id.len(), "session index size");
        assert_eq!(self.stats.sessions_paired, paired as u64, "paired gauge");
        assert_eq!(
            self.stats.sessions_unpaired, unpaired as u64,
            "unpaired gauge"
        );
        assert_eq!(per_ip.len(), self.per_ip.len(), "per-IP table size");
        for (ip, n) in per_ip {
            assert_eq!(self.per_ip.get(&ip), Some(&n), "per-IP count");
        }
        assert!(
            self.young.len() <= self.young_cap(),
            "eviction queue over its cap"
        );
        assert!(
            self.rate.len() <= MAX_RATE_ENTRIES,
            "rate table over its cap"
        );
        assert!(
            self.by_id.len() <= self.cfg.limits.max_sessions as usize,
            "over max sessions"
        );
    }
}

#[cfg(test)]
mod tests;
