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

mod addr_index;
mod expiry;
mod invariants;
mod register;

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
    /// A member's alternate address (its other IP family) registered or refreshed.
    Alt,
    /// Refused.
    Refused(ErrReason),
}

impl RegResult {
    /// Every result, for metrics.
    pub const ALL: [RegResult; 15] = [
        RegResult::New,
        RegResult::Join,
        RegResult::Refresh,
        RegResult::Rebind,
        RegResult::Alt,
        RegResult::Refused(ErrReason::Malformed),
        RegResult::Refused(ErrReason::Short),
        RegResult::Refused(ErrReason::Full),
        RegResult::Refused(ErrReason::Capacity),
        RegResult::Refused(ErrReason::IpLimit),
        RegResult::Refused(ErrReason::Rate),
        RegResult::Refused(ErrReason::Auth),
        RegResult::Refused(ErrReason::Expired),
        RegResult::Refused(ErrReason::NoMember),
        RegResult::Refused(ErrReason::Moved),
    ];

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            RegResult::New => "new",
            RegResult::Join => "join",
            RegResult::Refresh => "refresh",
            RegResult::Rebind => "rebind",
            RegResult::Alt => "alt",
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
    pub regs: [u64; RegResult::ALL.len()],
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

bitflags::bitflags! {
    /// What the relay knows of one member, in one byte of its [`Slot`].
    #[derive(Clone, Copy, PartialEq, Eq)]
    struct SlotFlags: u8 {
        /// The slot holds a member.
        const USED = 1;
        /// The member registered with the extended form (PROTOCOL.md §3.2).
        const EXTENDED = 2;
        /// [`Slot::peer_id`] holds the member's peer id.
        const HAS_PEER_ID = 4;
        /// The member proved its address: it echoed its cookie, or it is a TCP connection
        /// (whose handshake proved it). Only such extended members are forwarded to.
        const VERIFIED = 8;
        /// The member's session heard a second registration (a refresh, a rebind or the
        /// other peer's join): it is not flood debris, and is never evicted to make room.
        const CONFIRMED = 16;
        /// The member reads the other member's alternate address in its ACKs (`ax=1`,
        /// PROTOCOL.md §3.3).
        const ALT_AWARE = 32;
    }
}

/// One member of a session. 32 bytes: the address is stored as IP and port, its transport in
/// `tcp` (a whole [`PeerAddr`] would pad the slot to 40 bytes).
#[derive(Clone, Copy)]
struct Slot {
    ip: [u8; 16],
    port: u16,
    flags: SlotFlags,
    /// [`PeerAddr`]'s `tcp`: 0 for UDP. Fills what would be padding.
    tcp: u8,
    /// Seconds since the relay's epoch; breaks ties when two same-IP members could be rebinding.
    last_heard: u32,
    peer_id: u64,
}

const EMPTY_SLOT: Slot = Slot {
    ip: [0; 16],
    port: 0,
    flags: SlotFlags::empty(),
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
        self.flags.contains(SlotFlags::VERIFIED)
    }
    fn used(&self) -> bool {
        self.flags.contains(SlotFlags::USED)
    }
    fn extended(&self) -> bool {
        self.flags.contains(SlotFlags::EXTENDED)
    }
    fn peer_id(&self) -> Option<u64> {
        self.flags
            .contains(SlotFlags::HAS_PEER_ID)
            .then_some(self.peer_id)
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
        && s.slots
            .iter()
            .all(|m| !m.flags.contains(SlotFlags::CONFIRMED))
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
    by_addr: addr_index::AddrIndex,
    /// Members' alternate addresses (their other IP family, PROTOCOL.md §3.3), by
    /// [`MemberRef`]: at most one per member, removed with it. Kept beside the slab rather
    /// than in [`Slot`], whose size the memory target rests on: few members have one.
    alts: HashMap<u32, PeerAddr>,
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
    /// Draining for maintenance: registrations for new sessions are refused with `moved`.
    draining: bool,
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
            by_addr: addr_index::AddrIndex::new(),
            alts: HashMap::new(),
            per_ip: HashMap::new(),
            young: VecDeque::new(),
            born: 0,
            rate: HashMap::new(),
            next_rate_sweep: 0,
            sweep_cursor: 0,
            next_tick: now + TICK,
            transmits: VecDeque::with_capacity(4),
            stats: Stats::default(),
            draining: false,
        }
    }

    /// Tells the relay the wall-clock time (Unix seconds), used only to check token expiry.
    /// The server calls this every tick, so a clock step is picked up within one.
    pub fn set_wall_clock(&mut self, unix_secs: u64) {
        self.unix_now = unix_secs;
    }

    /// Drain mode (PROTOCOL.md §5.2): while on, a registration that would create a session is
    /// refused with `ERR moved`; existing sessions go on (refreshes, rebinds, the second peer
    /// joining, forwarding) until they end.
    pub fn set_draining(&mut self, on: bool) {
        self.draining = on;
    }

    /// Whether the relay is draining.
    pub fn draining(&self) -> bool {
        self.draining
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
    // Always inlined: the socket loop's forwarding path is mostly this function, and left to
    // the compiler it went out of line as the loop grew, its outcome passed through memory.
    #[inline(always)]
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
    // Always inlined: out of line, its `Option<Outcome>` went through memory and was copied
    // twice more on the way out of `handle`, a fifth of the cost of the forwarding path.
    #[inline(always)]
    fn try_forward(&mut self, now: Instant, src: PeerAddr, len: usize) -> Option<Outcome> {
        let m = self.by_addr.lookup(src)?;
        let t = self.forward_secs(now);
        let s = &mut self.sessions[m.session()];
        let other = s.slots[1 - m.slot()];
        if !other.used() {
            self.stats.dropped_unpaired += 1;
            return Some(Outcome::Dropped(DropReason::Unpaired));
        }
        if other.extended() && !other.verified() {
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

    fn count(&mut self, r: RegResult) {
        self.stats.regs[r.index()] += 1;
    }
}

#[cfg(test)]
mod tests;
