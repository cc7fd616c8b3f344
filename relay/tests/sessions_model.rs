//! Model-based property test of the session state machine: random sequences of registrations,
//! leave requests, data, malformed datagrams and clock advances over a small universe (3 sessions, 3 IPs x 3
//! ports, peer ids 1..=3, tight limits, optional tokens) are fed to `Relay` and to a naive
//! reference model (a map of sessions, no indexes), which must agree on every outcome, reply,
//! counter and timer. Model-independent safety properties are asserted as well.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use quic_relay::proto::{self, Bye, ErrReason, Extended, PeerId, Registration, Reply, Token, Uuid};
use quic_relay::sessions::{
    DropReason, Limits, Outcome, PeerAddr, RegResult, Relay, RelayConfig, Stats,
};

const SESSIONS: [Uuid; 3] = [
    Uuid::from_u128(0x67e5_5044_10b1_426f_9247_bb68_0e5f_e0c8),
    Uuid::from_u128(0x0000_0000_0000_4000_8000_0000_0000_0001),
    Uuid::from_u128(0xffff_ffff_ffff_4fff_bfff_ffff_ffff_fffe),
];

/// Two IPv4 addresses and one IPv6, so replies of every length occur.
const IPS: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7)),
];
const PORTS: [u16; 3] = [1000, 40_000, 65_535];

/// Secrets a relay may be configured with; tokens are minted with these or with `FORGED`.
const SECRETS: [&[u8]; 2] = [b"old-secret", b"new-secret"];
const FORGED: &[u8] = b"not-a-secret";

/// Wall-clock Unix time at the relay's epoch.
const WALL0: u64 = 1_700_000_000;

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Src {
    ip: usize,
    port: usize,
    /// Present an IPv4 source as IPv4-mapped IPv6, as a dual-stack socket reports it.
    mapped: bool,
}

impl Src {
    fn addr(self) -> PeerAddr {
        let ip = match IPS[self.ip] {
            IpAddr::V4(v4) if self.mapped => IpAddr::V6(v4.to_ipv6_mapped()),
            ip => ip,
        };
        PeerAddr::from(SocketAddr::new(ip, PORTS[self.port]))
    }
}

#[derive(Debug, Clone, Copy)]
enum OriginalStyle {
    Newline,
    Bare,
    Uppercase,
    Simple,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum TokenKind {
    None,
    /// Minted with `SECRETS[i]`.
    Valid(usize),
    /// Minted with a configured secret for another session.
    OtherSession,
    /// Minted with a secret the relay does not know.
    Forged,
    /// Valid, but expires 90 s after the epoch.
    ExpiresSoon,
    /// Valid MAC, expired before the epoch.
    Expired,
}

#[derive(Debug, Clone)]
enum Op {
    Reg {
        src: Src,
        session: usize,
        original: Option<OriginalStyle>,
        peer: Option<u64>,
        token: TokenKind,
        /// Echo the cookie the relay last sent to this address (extended form only).
        echo: bool,
    },
    /// An extended registration without padding: refused as short.
    ShortReg { src: Src, session: usize },
    /// Starts with `REG:` but is no registration; `long` ones are long enough to be answered.
    Malformed { src: Src, long: bool },
    /// A leave request.
    Bye {
        src: Src,
        session: usize,
        peer: Option<u64>,
    },
    /// Starts with `BYE:` but does not parse.
    BadBye { src: Src },
    /// A datagram that is not a registration.
    Data { src: Src, len: usize },
    /// Advance the clock and run `handle_timeout`.
    Advance { ms: u64 },
}

fn arb_src() -> impl Strategy<Value = Src> {
    (0..IPS.len(), 0..PORTS.len(), any::<bool>()).prop_map(|(ip, port, mapped)| Src {
        ip,
        port,
        mapped,
    })
}

fn arb_op() -> impl Strategy<Value = Op> {
    let style = prop_oneof![
        Just(OriginalStyle::Newline),
        Just(OriginalStyle::Bare),
        Just(OriginalStyle::Uppercase),
        Just(OriginalStyle::Simple),
    ];
    let token = prop_oneof![
        3 => Just(TokenKind::None),
        4 => (0..SECRETS.len()).prop_map(TokenKind::Valid),
        1 => Just(TokenKind::OtherSession),
        1 => Just(TokenKind::Forged),
        1 => Just(TokenKind::ExpiresSoon),
        1 => Just(TokenKind::Expired),
    ];
    let reg = (
        arb_src(),
        0..SESSIONS.len(),
        prop::option::weighted(0.4, style),
        prop::option::of(1..=3u64),
        token,
        any::<bool>(),
    )
        .prop_map(|(src, session, original, peer, token, echo)| Op::Reg {
            src,
            session,
            original,
            peer,
            token,
            echo,
        });
    let advance = prop_oneof![
        Just(0u64),
        0..=1_500u64,
        (1..=40u64).prop_map(|s| s * 1000),
        0..=40_000u64,
    ];
    prop_oneof![
        10 => reg,
        1 => (arb_src(), 0..SESSIONS.len())
            .prop_map(|(src, session)| Op::ShortReg { src, session }),
        1 => (arb_src(), any::<bool>()).prop_map(|(src, long)| Op::Malformed { src, long }),
        3 => (arb_src(), 0..SESSIONS.len(), prop::option::weighted(0.3, 1..=3u64))
            .prop_map(|(src, session, peer)| Op::Bye { src, session, peer }),
        1 => arb_src().prop_map(|src| Op::BadBye { src }),
        6 => (arb_src(), 0..40usize).prop_map(|(src, len)| Op::Data { src, len }),
        3 => advance.prop_map(|ms| Op::Advance { ms }),
    ]
}

#[derive(Debug, Clone)]
struct Setup {
    limits: Limits,
    /// How many of `SECRETS` the relay is configured with (0: no tokens required).
    secrets: usize,
    session_timeout: Duration,
    unpaired_timeout: Duration,
}

fn arb_setup() -> impl Strategy<Value = Setup> {
    (
        1..=3u32,
        1..=3u32,
        prop_oneof![Just(2u32), Just(4), Just(1000)],
        prop_oneof![2 => Just(0usize), 1 => Just(1), 1 => Just(2)],
        prop_oneof![Just(30u64), Just(60)],
        prop_oneof![Just(5u64), Just(20)],
    )
        .prop_map(
            |(max_sessions, per_ip, burst, secrets, paired, unpaired)| Setup {
                limits: Limits {
                    max_sessions,
                    max_sessions_per_ip: per_ip,
                    reg_rate_per_ip: 1000,
                    reg_burst_per_ip: burst,
                },
                secrets,
                session_timeout: Duration::from_secs(paired),
                unpaired_timeout: Duration::from_secs(unpaired),
            },
        )
}

/// What a datagram is, as the model sees it (the relay sees only the bytes).
#[derive(Debug, Clone)]
enum Kind {
    Reg {
        session: usize,
        /// `None`: original form; otherwise the peer id and the token.
        ext: Option<(Option<u64>, Option<Token>)>,
        /// Carries the cookie the relay last sent to the source (whatever session it was for).
        echo: bool,
    },
    Short,
    Malformed,
    Bye {
        session: usize,
        peer: Option<u64>,
    },
    BadBye,
    Data,
}

fn token_for(kind: TokenKind, session: usize) -> Option<Token> {
    let id = SESSIONS[session];
    match kind {
        TokenKind::None => None,
        TokenKind::Valid(i) => Some(Token::mint(SECRETS[i], id, WALL0 + 3600)),
        TokenKind::OtherSession => Some(Token::mint(
            SECRETS[0],
            SESSIONS[(session + 1) % SESSIONS.len()],
            WALL0 + 3600,
        )),
        TokenKind::Forged => Some(Token::mint(FORGED, id, WALL0 + 3600)),
        TokenKind::ExpiresSoon => Some(Token::mint(SECRETS[0], id, WALL0 + 90)),
        TokenKind::Expired => Some(Token::mint(SECRETS[1], id, WALL0 - 1)),
    }
}

/// The bytes of a datagram, and what it is. `cookie`: the last cookie the relay sent to the
/// datagram's source, echoed by an extended registration that asks for it.
fn datagram(op: &Op, cookie: Option<proto::Cookie>) -> (Vec<u8>, Kind) {
    match *op {
        Op::Reg {
            session,
            original: Some(style),
            ..
        } => {
            let id = SESSIONS[session];
            let text = match style {
                OriginalStyle::Newline => format!("REG:{}\n", id.hyphenated()),
                OriginalStyle::Bare => format!("REG:{}", id.hyphenated()),
                OriginalStyle::Uppercase => {
                    format!("REG:{}\r\n", id.hyphenated().to_string().to_uppercase())
                }
                OriginalStyle::Simple => format!("REG:{}", id.simple()),
            };
            (
                text.into_bytes(),
                Kind::Reg {
                    session,
                    ext: None,
                    echo: false,
                },
            )
        }
        Op::Reg {
            session,
            original: None,
            peer,
            token,
            echo,
            ..
        } => {
            let token = token_for(token, session);
            let cookie = cookie.filter(|_| echo);
            let reg = Registration {
                session: SESSIONS[session],
                extended: Some(Extended {
                    cookie,
                    peer: peer.map(PeerId),
                    token,
                    alt_aware: false,
                    alt: false,
                }),
            };
            (
                reg.encode(),
                Kind::Reg {
                    session,
                    ext: Some((peer, token)),
                    echo: cookie.is_some(),
                },
            )
        }
        Op::ShortReg { session, .. } => (
            format!("REG:{} p=1\n", SESSIONS[session]).into_bytes(),
            Kind::Short,
        ),
        Op::Malformed { long: false, .. } => (b"REG:xyz".to_vec(), Kind::Malformed),
        Op::Malformed { long: true, .. } => (
            b"REG:this is not a session id, but long enough to answer\n".to_vec(),
            Kind::Malformed,
        ),
        Op::Bye { session, peer, .. } => (
            Bye {
                session: SESSIONS[session],
                peer: peer.map(PeerId),
            }
            .encode(),
            Kind::Bye { session, peer },
        ),
        Op::BadBye { .. } => (b"BYE:not-a-session\n".to_vec(), Kind::BadBye),
        Op::Data { len, .. } => {
            // Starts like a QUIC short header ('R' is 0x52) but never with "REG:".
            let mut d = b"RE".to_vec();
            d.resize(len, 0x42);
            (d, Kind::Data)
        }
        Op::Advance { .. } => unreachable!("not a datagram"),
    }
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct MSlot {
    addr: PeerAddr,
    extended: bool,
    peer: Option<u64>,
    last_heard: u64,
    /// Echoed a cookie valid for this address and session.
    verified: bool,
    /// Its session heard a second registration: never evicted.
    confirmed: bool,
}

#[derive(Debug, Clone)]
struct MSession {
    slots: [Option<MSlot>; 2],
    last_active: u64,
    /// Creation order, for eviction.
    born: u64,
}

impl MSession {
    fn paired(&self) -> bool {
        self.slots.iter().all(Option::is_some)
    }
}

/// The relay's rules written as plainly as possible: sessions keyed by their index into
/// `SESSIONS`, every lookup a linear scan.
struct Model {
    setup: Setup,
    sessions: BTreeMap<usize, MSession>,
    /// GCRA theoretical arrival time per IP, in microseconds.
    rate: HashMap<[u8; 16], u64>,
    now_ms: u64,
    next_tick_ms: u64,
    stats: Stats,
    transmits: Vec<(PeerAddr, Vec<u8>)>,
    /// The last cookie sent to each address: for which session, in which cookie period.
    issued: HashMap<PeerAddr, (usize, u64)>,
    born: u64,
}

/// Cookie period of the relay (defaults::COOKIE_PERIOD), in milliseconds.
const COOKIE_PERIOD_MS: u64 = 60_000;

fn count(stats: &mut Stats, r: RegResult) {
    let i = RegResult::ALL.iter().position(|x| *x == r).expect("listed");
    stats.regs[i] += 1;
}

impl Model {
    fn new(setup: Setup) -> Self {
        Model {
            setup,
            sessions: BTreeMap::new(),
            rate: HashMap::new(),
            now_ms: 0,
            next_tick_ms: 100,
            stats: Stats::default(),
            transmits: Vec::new(),
            issued: HashMap::new(),
            born: 0,
        }
    }

    fn cookie_epoch(&self) -> u64 {
        self.now_ms / COOKIE_PERIOD_MS
    }

    fn secs(&self) -> u64 {
        self.now_ms / 1000
    }

    fn wall(&self) -> u64 {
        WALL0 + self.secs()
    }

    fn member(&self, addr: PeerAddr) -> Option<(usize, usize)> {
        self.sessions.iter().find_map(|(&id, s)| {
            (0..2)
                .find(|&k| s.slots[k].is_some_and(|m| m.addr == addr))
                .map(|k| (id, k))
        })
    }

    fn ip_count(&self, ip: [u8; 16]) -> u32 {
        self.sessions
            .values()
            .flat_map(|s| s.slots.iter().flatten())
            .filter(|m| m.addr.ip_octets() == ip)
            .count() as u32
    }

    fn queue(&mut self, dst: PeerAddr, reply: Reply, request_len: usize) {
        let mut reply = reply;
        if let Reply::Ack {
            observed,
            peer,
            cookie: Some(_),
            ..
        } = reply
        {
            if reply.encode().as_bytes().len() > request_len {
                // No room for the cookie: the addresses alone.
                reply = Reply::Ack {
                    observed,
                    peer,
                    cookie: None,
                    peer_alt: None,
                };
            }
        }
        let bytes = reply.encode().as_bytes().to_vec();
        if bytes.len() > request_len {
            self.stats.replies_suppressed += 1;
        } else {
            if matches!(
                reply,
                Reply::Ack {
                    cookie: Some(_),
                    ..
                }
            ) {
                let sid = self
                    .member(dst)
                    .map(|(sid, _)| sid)
                    .expect("acked a member");
                self.issued.insert(dst, (sid, self.cookie_epoch()));
            }
            self.transmits.push((dst, bytes));
        }
    }

    fn refuse(&mut self, src: PeerAddr, reason: ErrReason, len: usize) -> Outcome {
        count(&mut self.stats, RegResult::Refused(reason));
        self.queue(src, Reply::Err(Some(reason)), len);
        Outcome::Registration
    }

    fn ack(&self, id: usize, k: usize) -> Reply {
        let s = &self.sessions[&id];
        let me = s.slots[k].expect("acked member exists");
        if !me.extended {
            return Reply::Ack {
                cookie: None,
                observed: None,
                peer: None,
                peer_alt: None,
            };
        }
        Reply::Ack {
            // The model cannot know the relay's key: compared as zero (see `normalized`).
            cookie: (!me.verified).then_some(proto::Cookie(0)),
            observed: Some(me.addr.to_socket_addr()),
            peer: s.slots[1 - k].map(|o| o.addr.to_socket_addr()),
            peer_alt: None,
        }
    }

    fn ack_and_notify(&mut self, src: PeerAddr, id: usize, k: usize, len: usize, notify: bool) {
        let reply = self.ack(id, k);
        self.queue(src, reply, len);
        if notify {
            if let Some(other) = self.sessions[&id].slots[1 - k].filter(|o| o.extended) {
                let reply = self.ack(id, 1 - k);
                self.queue(other.addr, reply, len);
            }
        }
    }

    fn remove(&mut self, (id, k): (usize, usize)) {
        let s = self.sessions.get_mut(&id).expect("member's session exists");
        s.slots[k] = None;
        if s.slots.iter().all(Option::is_none) {
            self.sessions.remove(&id);
        }
    }

    fn forward(&mut self, src: PeerAddr, len: usize) -> Outcome {
        let Some((id, k)) = self.member(src) else {
            self.stats.dropped_unknown_source += 1;
            return Outcome::Dropped(DropReason::UnknownSource);
        };
        let t = self.secs();
        let s = self.sessions.get_mut(&id).expect("exists");
        let Some(other) = s.slots[1 - k] else {
            self.stats.dropped_unpaired += 1;
            return Outcome::Dropped(DropReason::Unpaired);
        };
        if other.extended && !other.verified {
            self.stats.dropped_unverified += 1;
            return Outcome::Dropped(DropReason::Unverified);
        }
        s.last_active = t;
        if let Some(me) = s.slots[k].as_mut() {
            me.last_heard = t;
        }
        self.stats.forwarded_packets += 1;
        self.stats.forwarded_bytes += len as u64;
        Outcome::Forward(other.addr)
    }

    fn rate_allows(&mut self, ip: [u8; 16]) -> bool {
        let l = &self.setup.limits;
        let interval = 1_000_000 / u64::from(l.reg_rate_per_ip);
        let tolerance = interval * u64::from(l.reg_burst_per_ip - 1);
        let now = self.now_ms * 1000;
        let tat = self.rate.entry(ip).or_insert(now);
        let start = (*tat).max(now);
        if start - now > tolerance {
            return false;
        }
        *tat = start + interval;
        true
    }

    fn handle(&mut self, src: PeerAddr, dgram: &[u8], kind: &Kind) -> Outcome {
        let len = dgram.len();
        match *kind {
            Kind::Data => self.forward(src, len),
            Kind::Short | Kind::Malformed | Kind::BadBye => {
                // From a paired member it is payload that happens to look like a request.
                let paired = self
                    .member(src)
                    .is_some_and(|(id, _)| self.sessions[&id].paired());
                if paired {
                    return self.forward(src, len);
                }
                if matches!(kind, Kind::BadBye) {
                    self.stats.byes_ignored += 1;
                    return Outcome::Registration;
                }
                let reason = if matches!(kind, Kind::Short) {
                    ErrReason::Short
                } else {
                    ErrReason::Malformed
                };
                self.refuse(src, reason, len)
            }
            Kind::Reg { session, ext, echo } => self.register(src, session, ext, echo, len),
            Kind::Bye { session, peer } => {
                // Only the member itself, naming its session and its peer id if it has one.
                match self.member(src) {
                    Some((id, k))
                        if id == session
                            && self.sessions[&id].slots[k]
                                .is_some_and(|m| m.peer.is_none() || m.peer == peer) =>
                    {
                        self.remove((id, k));
                        self.stats.byes += 1;
                    }
                    _ => self.stats.byes_ignored += 1,
                }
                Outcome::Registration
            }
        }
    }

    fn register(
        &mut self,
        src: PeerAddr,
        id: usize,
        ext: Option<(Option<u64>, Option<Token>)>,
        echo: bool,
        len: usize,
    ) -> Outcome {
        let ip = src.ip_octets();
        if !self.rate_allows(ip) {
            return self.refuse(src, ErrReason::Rate, len);
        }
        if self.setup.secrets > 0 {
            let secrets = &SECRETS[..self.setup.secrets];
            match ext.and_then(|(_, t)| t) {
                None => return self.refuse(src, ErrReason::Auth, len),
                Some(t) => {
                    let mac_ok = secrets
                        .iter()
                        .any(|s| Token::mint(s, SESSIONS[id], t.expiry).mac == t.mac);
                    if !mac_ok {
                        return self.refuse(src, ErrReason::Auth, len);
                    }
                    if t.expiry < self.wall() {
                        return self.refuse(src, ErrReason::Expired, len);
                    }
                }
            }
        }
        let t = self.secs();
        let peer = ext.and_then(|(p, _)| p);
        let mut verified = false;
        if echo {
            let e = self.cookie_epoch();
            verified = self
                .issued
                .get(&src)
                .is_some_and(|&(sid, at)| sid == id && (at == e || at + 1 == e));
            if !verified {
                self.stats.cookies_rejected += 1;
            }
        }
        let new = MSlot {
            addr: src,
            extended: ext.is_some(),
            peer,
            last_heard: t,
            verified,
            confirmed: true,
        };
        let mut current = self.member(src);
        let held = u32::from(current.is_some());
        let limits = self.setup.limits.clone();

        let Some(s) = self.sessions.get(&id).cloned() else {
            // A new session.
            if self.ip_count(ip) - held >= limits.max_sessions_per_ip {
                return self.refuse(src, ErrReason::IpLimit, len);
            }
            if self.sessions.len() >= limits.max_sessions as usize {
                // Make room: the oldest session that never heard a second registration.
                let victim = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| !s.paired() && s.slots.iter().flatten().all(|m| !m.confirmed))
                    .min_by_key(|(_, s)| s.born)
                    .map(|(&v, _)| v);
                let Some(v) = victim else {
                    return self.refuse(src, ErrReason::Capacity, len);
                };
                self.sessions.remove(&v);
                self.stats.evicted_unconfirmed += 1;
                current = self.member(src);
            }
            if let Some(c) = current {
                self.remove(c);
            }
            self.born += 1;
            self.sessions.insert(
                id,
                MSession {
                    slots: [
                        Some(MSlot {
                            confirmed: false,
                            ..new
                        }),
                        None,
                    ],
                    last_active: t,
                    born: self.born,
                },
            );
            count(&mut self.stats, RegResult::New);
            self.ack_and_notify(src, id, 0, len, false);
            return Outcome::Registration;
        };

        // Keepalive from a member's own address.
        if let Some((_, k)) = current.filter(|&(cid, _)| cid == id) {
            if peer.is_some() && s.slots[1 - k].is_some_and(|o| o.peer == peer) {
                return self.refuse(src, ErrReason::Full, len);
            }
            let s = self.sessions.get_mut(&id).expect("exists");
            let kept = s.slots[k].is_some_and(|m| m.verified);
            s.slots[k] = Some(MSlot {
                verified: new.verified || kept,
                ..new
            });
            s.last_active = t;
            count(&mut self.stats, RegResult::Refresh);
            self.ack_and_notify(src, id, k, len, false);
            return Outcome::Registration;
        }

        // A member that moved: same peer id; or, without one, the least recently heard member
        // without a peer id on the same IP.
        let moving = match peer {
            Some(_) => (0..2).find(|&k| s.slots[k].is_some_and(|m| m.peer == peer)),
            None => (0..2)
                .filter_map(|k| s.slots[k].map(|m| (k, m)))
                .filter(|(_, m)| m.peer.is_none() && m.addr.ip_octets() == ip)
                .min_by_key(|&(k, m)| (m.last_heard, k))
                .map(|(k, _)| k),
        };
        if let Some(k) = moving {
            let old = s.slots[k].expect("moving member exists").addr;
            if old.ip_octets() != ip && self.ip_count(ip) - held >= limits.max_sessions_per_ip {
                return self.refuse(src, ErrReason::IpLimit, len);
            }
            if let Some(c) = current {
                self.remove(c);
            }
            let s = self.sessions.get_mut(&id).expect("exists");
            s.slots[k] = Some(new);
            s.last_active = t;
            count(&mut self.stats, RegResult::Rebind);
            self.ack_and_notify(src, id, k, len, true);
            return Outcome::Registration;
        }

        // The second member arrives, in a free slot or in place of the member silent longest
        // if that one has been silent for the unpaired timeout.
        let free = (0..2).find(|&k| s.slots[k].is_none());
        let stale = (0..2)
            .filter_map(|k| s.slots[k].map(|m| (k, m)))
            .filter(|(_, m)| {
                t.saturating_sub(m.last_heard) >= self.setup.unpaired_timeout.as_secs()
            })
            .min_by_key(|&(k, m)| (m.last_heard, k))
            .map(|(k, _)| k);
        let Some(k) = free.or(stale) else {
            return self.refuse(src, ErrReason::Full, len);
        };
        if self.ip_count(ip) - held >= limits.max_sessions_per_ip {
            return self.refuse(src, ErrReason::IpLimit, len);
        }
        if free.is_none() {
            self.remove((id, k));
            self.stats.stale_replaced += 1;
        }
        if let Some(c) = current {
            self.remove(c);
        }
        let s = self.sessions.get_mut(&id).expect("exists");
        s.slots[k] = Some(new);
        if let Some(o) = s.slots[1 - k].as_mut() {
            o.confirmed = true;
        }
        s.last_active = t;
        count(&mut self.stats, RegResult::Join);
        self.ack_and_notify(src, id, k, len, true);
        Outcome::Registration
    }

    fn handle_timeout(&mut self) {
        if self.now_ms < self.next_tick_ms {
            return;
        }
        self.next_tick_ms = self.now_ms + 100;
        let t = self.secs();
        let (paired, unpaired) = (
            self.setup.session_timeout.as_secs(),
            self.setup.unpaired_timeout.as_secs(),
        );
        let stats = &mut self.stats;
        self.sessions.retain(|_, s| {
            let limit = if s.paired() { paired } else { unpaired };
            let expired = t.saturating_sub(s.last_active) >= limit;
            if expired && s.paired() {
                stats.expired_paired += 1;
            } else if expired {
                stats.expired_unpaired += 1;
            }
            !expired
        });
    }

    /// The counters the relay should report, gauges included.
    fn expected_stats(&self) -> Stats {
        let paired = self.sessions.values().filter(|s| s.paired()).count() as u64;
        Stats {
            sessions_paired: paired,
            sessions_unpaired: self.sessions.len() as u64 - paired,
            ..self.stats.clone()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// What the relay did with one datagram: its outcome and the replies it queued.
type Step = (Outcome, Vec<(PeerAddr, Vec<u8>)>);

/// Feeds `ops` to a relay and to the model, checking both agree and the safety properties hold
/// after every step. Returns what the relay did with each datagram.
fn run(setup: Setup, ops: &[Op]) -> Result<Vec<Step>, TestCaseError> {
    let epoch = Instant::now();
    let cfg = RelayConfig {
        session_timeout: setup.session_timeout,
        unpaired_timeout: setup.unpaired_timeout,
        limits: setup.limits.clone(),
        secrets: SECRETS[..setup.secrets]
            .iter()
            .map(|s| s.to_vec())
            .collect(),
        ..RelayConfig::default()
    };
    let mut relay = Relay::new(cfg, epoch);
    relay.set_wall_clock(WALL0);
    let mut model = Model::new(setup.clone());
    // Addresses that got a registration accepted at some point.
    let mut ever_registered: HashSet<PeerAddr> = HashSet::new();
    let mut trace = Vec::new();
    // The last cookie the relay sent to each address, for registrations that echo one.
    let mut cookies: HashMap<PeerAddr, proto::Cookie> = HashMap::new();

    for (step, op) in ops.iter().enumerate() {
        let now = epoch + Duration::from_millis(model.now_ms);
        match *op {
            Op::Advance { ms } => {
                model.now_ms += ms;
                let now = epoch + Duration::from_millis(model.now_ms);
                relay.set_wall_clock(model.wall());
                relay.handle_timeout(now);
                model.handle_timeout();
                prop_assert!(relay.poll_transmit().is_none(), "timers never reply");
            }
            Op::Reg { src, .. }
            | Op::ShortReg { src, .. }
            | Op::Malformed { src, .. }
            | Op::Bye { src, .. }
            | Op::BadBye { src }
            | Op::Data { src, .. } => {
                let src = src.addr();
                let (dgram, kind) = datagram(op, cookies.get(&src).copied());
                let accepted_before = accepted(relay.stats());
                let outcome = relay.handle(now, src, &dgram);
                let mut sent = Vec::new();
                while let Some(t) = relay.poll_transmit() {
                    sent.push((t.dst, t.payload.as_bytes().to_vec()));
                }
                let registered = accepted(relay.stats()) > accepted_before;

                // Safety properties that hold whatever the rules are.
                for (dst, bytes) in &sent {
                    prop_assert!(bytes.len() <= dgram.len(), "amplification at step {step}");
                    prop_assert!(
                        *dst == src || ever_registered.contains(dst),
                        "reply to a stranger {dst} at step {step}"
                    );
                    prop_assert!(Reply::parse(bytes).is_some(), "unparsable reply {bytes:?}");
                }
                prop_assert!(sent.len() <= 2, "one ACK and one notification at most");
                match outcome {
                    Outcome::Forward(dst) => {
                        prop_assert_ne!(dst, src, "forwarded to its own source");
                        prop_assert!(ever_registered.contains(&src), "forwarded for a stranger");
                        prop_assert!(ever_registered.contains(&dst), "forwarded to a stranger");
                        prop_assert!(sent.is_empty(), "forwarding never replies");
                        prop_assert!(
                            proto::parse_registration(&dgram).is_err(),
                            "a valid registration was forwarded"
                        );
                        prop_assert!(Bye::parse(&dgram).is_err(), "a valid BYE was forwarded");
                    }
                    Outcome::Registration => {
                        prop_assert!(proto::is_registration(&dgram) || proto::is_bye(&dgram));
                    }
                    Outcome::Dropped(reason) => {
                        prop_assert!(sent.is_empty(), "a drop never replies");
                        // Payload that only looks like a request, from a paired member, may be
                        // held back for an unverified destination.
                        if reason != DropReason::Unverified {
                            prop_assert!(!proto::is_registration(&dgram));
                            prop_assert!(!proto::is_bye(&dgram));
                        }
                    }
                }
                if proto::parse_registration(&dgram).is_ok() || Bye::parse(&dgram).is_ok() {
                    prop_assert_eq!(outcome, Outcome::Registration);
                }
                if proto::is_bye(&dgram) {
                    prop_assert!(sent.is_empty(), "a BYE is never answered");
                }
                if registered {
                    prop_assert!(!sent.is_empty(), "an accepted registration is acknowledged");
                    prop_assert_eq!(&sent[0].0, &src, "the ACK goes to the registrant");
                    ever_registered.insert(src);
                }

                // Agreement with the model.
                let expected = model.handle(src, &dgram, &kind);
                prop_assert_eq!(outcome, expected, "outcome at step {}: {:?}", step, op);
                for (dst, bytes) in &sent {
                    if let Some(Reply::Ack {
                        cookie: Some(c), ..
                    }) = Reply::parse(bytes)
                    {
                        cookies.insert(*dst, c);
                    }
                }
                let want = std::mem::take(&mut model.transmits);
                prop_assert_eq!(
                    &normalized(&sent),
                    &want,
                    "replies at step {}: {:?}",
                    step,
                    op
                );
                trace.push((outcome, sent));
            }
        }
        relay.check_invariants();
        prop_assert_eq!(
            relay.stats(),
            &model.expected_stats(),
            "stats after step {}",
            step
        );
        prop_assert_eq!(relay.session_count(), model.sessions.len());
        prop_assert!(relay.session_count() <= setup.limits.max_sessions as usize);
        prop_assert_eq!(
            relay.poll_timeout(),
            epoch + Duration::from_millis(model.next_tick_ms)
        );
    }
    Ok(trace)
}

/// The replies with every cookie replaced by zero, as the model writes them.
fn normalized(sent: &[(PeerAddr, Vec<u8>)]) -> Vec<(PeerAddr, Vec<u8>)> {
    sent.iter()
        .map(|(d, b)| match Reply::parse(b) {
            Some(Reply::Ack {
                observed,
                peer,
                cookie: Some(_),
                peer_alt: None,
            }) => (
                *d,
                Reply::Ack {
                    observed,
                    peer,
                    cookie: Some(proto::Cookie(0)),
                    peer_alt: None,
                }
                .encode()
                .as_bytes()
                .to_vec(),
            ),
            _ => (*d, b.clone()),
        })
        .collect()
}

/// Registrations accepted so far.
fn accepted(stats: &Stats) -> u64 {
    [
        RegResult::New,
        RegResult::Join,
        RegResult::Refresh,
        RegResult::Rebind,
    ]
    .into_iter()
    .map(|r| stats.reg(r))
    .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn relay_agrees_with_model(
        setup in arb_setup(),
        ops in prop::collection::vec(arb_op(), 1..60),
    ) {
        run(setup, &ops)?;
    }
}

fn src(ip: usize, port: usize) -> Src {
    Src {
        ip,
        port,
        mapped: false,
    }
}

fn roomy_setup() -> Setup {
    Setup {
        limits: Limits {
            max_sessions: 3,
            max_sessions_per_ip: 3,
            reg_rate_per_ip: 1000,
            reg_burst_per_ip: 1000,
        },
        secrets: 0,
        session_timeout: Duration::from_secs(30),
        unpaired_timeout: Duration::from_secs(5),
    }
}

fn reg(src: Src, original: bool, peer: Option<u64>) -> Op {
    Op::Reg {
        src,
        session: 0,
        original: original.then_some(OriginalStyle::Newline),
        peer,
        token: TokenKind::None,
        echo: false,
    }
}

/// An extended registration echoing the last cookie the relay sent to `src`.
fn echo(src: Src, peer: Option<u64>) -> Op {
    Op::Reg {
        src,
        session: 0,
        original: None,
        peer,
        token: TokenKind::None,
        echo: true,
    }
}

/// Two peers pair and exchange data, then the session expires: a fixed walk, so that the
/// property test cannot pass vacuously with a relay (and model) that accept nothing.
#[test]
fn walkthrough_pairs_forwards_and_expires() {
    let (a, b) = (src(0, 0), src(2, 1));
    let ops = [
        reg(a, false, Some(1)),
        echo(a, Some(1)),
        Op::Data { src: a, len: 10 },
        reg(b, false, Some(2)),
        // Not forwarded before b proves its address.
        Op::Data { src: a, len: 10 },
        echo(b, Some(2)),
        Op::Data { src: a, len: 10 },
        Op::Data {
            src: Src { mapped: true, ..a },
            len: 5,
        },
        Op::Data { src: b, len: 7 },
        Op::Advance { ms: 31_000 },
        Op::Data { src: b, len: 7 },
    ];
    let trace = run(roomy_setup(), &ops).expect("relay agrees with the model");
    let (pa, pb) = (a.addr(), b.addr());
    let outcomes: Vec<Outcome> = trace.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Registration,
            Outcome::Registration,
            Outcome::Dropped(DropReason::Unpaired),
            Outcome::Registration,
            Outcome::Dropped(DropReason::Unverified),
            Outcome::Registration,
            Outcome::Forward(pb),
            Outcome::Forward(pb),
            Outcome::Forward(pa),
            Outcome::Dropped(DropReason::UnknownSource),
        ]
    );
    let (sa, sb) = (pa.to_socket_addr(), pb.to_socket_addr());
    let zero = "c=0000000000000000";
    assert_eq!(
        normalized(&trace[0].1),
        [(pa, format!("ACK {sa} {zero}\n").into_bytes())],
        "an extended registrant gets a cookie"
    );
    assert_eq!(
        trace[1].1,
        [(pa, format!("ACK {sa}\n").into_bytes())],
        "and none once it echoed it"
    );
    assert_eq!(
        normalized(&trace[3].1),
        [
            (pb, format!("ACK {sb} {sa} {zero}\n").into_bytes()),
            (pa, format!("ACK {sa} {sb}\n").into_bytes()),
        ],
        "the joiner is acknowledged and the first member hears about it"
    );
    assert_eq!(trace[5].1, [(pb, format!("ACK {sb} {sa}\n").into_bytes())]);
}

/// Of two members without peer ids behind one IP, a third address on that IP replaces the one
/// heard from least recently (its NAT mapping is the one that went away).
#[test]
fn walkthrough_rebind_replaces_least_recently_heard() {
    let (x, y, z) = (src(0, 0), src(0, 1), src(0, 2));
    let ops = [
        reg(x, true, None),
        // Joins rather than rebinding x: it has a peer id.
        reg(y, false, Some(1)),
        // Refreshes without its peer id (echoing its cookie): now neither member has one.
        echo(y, None),
        Op::Advance { ms: 2_000 },
        Op::Data { src: x, len: 3 },
        reg(z, true, None),
        Op::Data { src: x, len: 3 },
        Op::Data { src: y, len: 3 },
    ];
    let trace = run(roomy_setup(), &ops).expect("relay agrees with the model");
    let outcomes: Vec<Outcome> = trace.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Registration,
            Outcome::Registration,
            Outcome::Registration,
            Outcome::Forward(y.addr()),
            Outcome::Registration,
            Outcome::Forward(z.addr()),
            Outcome::Dropped(DropReason::UnknownSource),
        ]
    );
}

/// The rarer rules, at their boundaries: a peer id another member already uses is refused, a
/// member silent for exactly the unpaired timeout is replaced, and a `BYE` frees a slot only
/// when it names the leaver's own peer id.
#[test]
fn walkthrough_conflict_stale_replacement_and_bye() {
    let (a, b, c) = (src(0, 0), src(1, 0), src(2, 0));
    let bye = |peer| Op::Bye {
        src: c,
        session: 0,
        peer: Some(peer),
    };
    let ops = [
        reg(a, false, Some(1)),
        echo(a, Some(1)),
        reg(b, false, Some(2)),
        echo(b, Some(2)),
        // b may not take the peer id a goes by.
        reg(b, false, Some(1)),
        Op::Advance { ms: 5_000 },
        Op::Data { src: a, len: 3 },
        // b has been silent for the unpaired timeout (5 s): c takes its slot.
        reg(c, false, Some(3)),
        echo(c, Some(3)),
        Op::Data { src: b, len: 3 },
        Op::Data { src: a, len: 3 },
        bye(2),
        Op::Data { src: a, len: 3 },
        bye(3),
        Op::Data { src: a, len: 3 },
    ];
    let trace = run(roomy_setup(), &ops).expect("relay agrees with the model");
    let outcomes: Vec<Outcome> = trace.iter().map(|(o, _)| *o).collect();
    let (pa, pc) = (a.addr(), c.addr());
    assert_eq!(
        outcomes,
        [
            Outcome::Registration,
            Outcome::Registration,
            Outcome::Registration,
            Outcome::Registration,
            Outcome::Registration,
            Outcome::Forward(b.addr()),
            Outcome::Registration,
            Outcome::Registration,
            Outcome::Dropped(DropReason::UnknownSource),
            Outcome::Forward(pc),
            Outcome::Registration,
            Outcome::Forward(pc),
            Outcome::Registration,
            Outcome::Dropped(DropReason::Unpaired),
        ]
    );
    assert_eq!(trace[4].1, [(b.addr(), b"ERR full\n".to_vec())]);
    let (sa, sc) = (pa.to_socket_addr(), pc.to_socket_addr());
    assert_eq!(
        normalized(&trace[6].1),
        [
            (
                pc,
                format!("ACK {sc} {sa} c=0000000000000000\n").into_bytes()
            ),
            (pa, format!("ACK {sa} {sc}\n").into_bytes()),
        ]
    );
}
