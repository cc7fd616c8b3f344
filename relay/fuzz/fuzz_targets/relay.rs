//! Fuzz target: the session state machine. An arbitrary configuration and sequence of clock
//! advances and datagrams (raw bytes, well-formed and mangled registrations, leave requests) from a
//! small set of addresses, over UDP or TCP (and TCP disconnects), is fed to `Relay`; its invariants must hold after every step, no reply
//! may be longer than its request, and nothing may panic.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use quic_relay::proto::{self, Bye, Extended, PeerId, Registration, Token, Uuid};
use quic_relay::sessions::{Limits, Outcome, PeerAddr, Relay, RelayConfig};

/// Sources: shared IPs with several ports (NAT rebinding, CGNAT), IPv6, and an IPv4 address
/// also seen IPv4-mapped (one host through a dual-stack socket).
const ADDRS: [(IpAddr, u16); 8] = [
    (IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 1000),
    (IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 1001),
    (IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 1002),
    (IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)), 1000),
    (
        IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0xc633, 0x6402)),
        1000,
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        443,
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        444,
    ),
    (
        IpAddr::V6(Ipv6Addr::new(
            0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
        )),
        65535,
    ),
];

const KNOWN_SESSIONS: [u128; 3] = [1, 0x67e5_5044_10b1_426f_9247_bb68_0e5f_e0c8, u128::MAX];
const SECRETS: [&[u8]; 2] = [b"fuzz-secret-a", b"fuzz-secret-b"];
const WALL0: u64 = 1_700_000_000;

#[derive(Debug, Arbitrary)]
struct Config {
    max_sessions: u8,
    max_sessions_per_ip: u8,
    reg_rate_per_ip: u16,
    reg_burst_per_ip: u16,
    /// 0: no tokens required; 1 or 2: that many of `SECRETS`.
    secrets: u8,
    session_timeout_s: u8,
    unpaired_timeout_s: u8,
}

#[derive(Debug, Arbitrary)]
enum Session {
    /// One of a few fixed sessions, so that registrations meet.
    Known(u8),
    Any(u128),
}

#[derive(Debug, Arbitrary)]
struct TokenSpec {
    /// Index into `SECRETS`; past its end, a secret the relay does not know.
    secret: u8,
    /// Expiry relative to the relay's wall clock at the epoch.
    expiry_offset: i32,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Advance {
        ms: u16,
    },
    /// A TCP connection closes.
    Disconnect {
        src: u8,
    },
    /// Step the wall clock (token expiry) without moving the monotonic clock.
    WallClock {
        offset: i32,
    },
    Raw {
        src: u8,
        data: Vec<u8>,
    },
    Reg {
        src: u8,
        session: Session,
        /// `None`: original form.
        extended: Option<(Option<u8>, Option<TokenSpec>)>,
    },
    /// A leave request (peer id 0 makes it malformed).
    Bye {
        src: u8,
        session: Session,
        peer: Option<u8>,
    },
    /// A well-formed registration, cut and extended with arbitrary bytes.
    Mangled {
        src: u8,
        session: Session,
        extended: Option<(Option<u8>, Option<TokenSpec>)>,
        keep: u8,
        tail: Vec<u8>,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    config: Config,
    ops: Vec<Op>,
}

/// Indexes with the high bit set name the TCP connection from the same IP and port number as
/// the UDP address (a look-alike that must never act for the other).
fn addr(i: u8) -> PeerAddr {
    let (ip, port) = ADDRS[(i & 0x7f) as usize % ADDRS.len()];
    if i & 0x80 != 0 {
        PeerAddr::tcp(SocketAddr::new(ip, port))
    } else {
        PeerAddr::from(SocketAddr::new(ip, port))
    }
}

fn session(s: &Session) -> Uuid {
    match *s {
        Session::Known(i) => Uuid::from_u128(KNOWN_SESSIONS[i as usize % KNOWN_SESSIONS.len()]),
        Session::Any(n) => Uuid::from_u128(n),
    }
}

fn registration(id: Uuid, extended: &Option<(Option<u8>, Option<TokenSpec>)>) -> Vec<u8> {
    let extended = extended.as_ref().map(|(peer, token)| Extended {
        // Arbitrary cookies are wrong ones: the relay must count and ignore them.
        cookie: peer.map(|p| quic_relay::proto::Cookie(u64::from(p))),
        // Peer id 0 is invalid on the wire: the relay must refuse it, not panic.
        peer: peer.map(|p| PeerId(u64::from(p % 5))),
        token: token.as_ref().map(|t| {
            let secret = SECRETS
                .get(t.secret as usize)
                .copied()
                .unwrap_or(b"unknown");
            Token::mint(
                secret,
                id,
                WALL0.saturating_add_signed(i64::from(t.expiry_offset)),
            )
        }), alt_aware: false, alt: false,
    });
    Registration {
        session: id,
        extended,
    }
    .encode()
}

fuzz_target!(|input: Input| {
    let c = &input.config;
    let cfg = RelayConfig {
        session_timeout: Duration::from_secs(c.session_timeout_s.into()),
        unpaired_timeout: Duration::from_secs(c.unpaired_timeout_s.into()),
        limits: Limits {
            max_sessions: u32::from(c.max_sessions % 8),
            max_sessions_per_ip: u32::from(c.max_sessions_per_ip % 5),
            reg_rate_per_ip: c.reg_rate_per_ip.into(),
            reg_burst_per_ip: c.reg_burst_per_ip.into(),
        },
        secrets: SECRETS[..usize::from(c.secrets % 3)]
            .iter()
            .map(|s| s.to_vec())
            .collect(),
        // A fixed key keeps runs reproducible from the input alone.
        cookie_key: [7; 32],
    };
    let epoch = Instant::now();
    let mut now = epoch;
    let mut relay = Relay::new(cfg, epoch);
    relay.set_wall_clock(WALL0);

    for op in &input.ops {
        let (src, datagram) = match op {
            Op::Advance { ms } => {
                now += Duration::from_millis((*ms).into());
                relay.handle_timeout(now);
                assert!(relay.poll_timeout() > now, "timer not rearmed");
                assert!(relay.poll_transmit().is_none(), "timers never reply");
                relay.check_invariants();
                continue;
            }
            Op::Disconnect { src } => {
                let a = addr(*src);
                let was = relay.is_member(a);
                assert_eq!(relay.disconnect(a), was);
                assert!(!relay.is_member(a));
                assert!(
                    relay.poll_transmit().is_none(),
                    "a disconnect never replies"
                );
                relay.check_invariants();
                continue;
            }
            Op::WallClock { offset } => {
                relay.set_wall_clock(WALL0.saturating_add_signed(i64::from(*offset)));
                continue;
            }
            Op::Raw { src, data } => (addr(*src), data.clone()),
            Op::Reg {
                src,
                session: s,
                extended,
            } => (addr(*src), registration(session(s), extended)),
            Op::Bye {
                src,
                session: s,
                peer,
            } => {
                let bye = Bye {
                    session: session(s),
                    peer: peer.map(|p| PeerId(u64::from(p % 5))),
                };
                (addr(*src), bye.encode())
            }
            Op::Mangled {
                src,
                session: s,
                extended,
                keep,
                tail,
            } => {
                let mut d = registration(session(s), extended);
                d.truncate(usize::from(*keep));
                d.extend_from_slice(tail);
                (addr(*src), d)
            }
        };

        let outcome = relay.handle(now, src, &datagram);
        let mut replies = 0;
        while let Some(t) = relay.poll_transmit() {
            replies += 1;
            assert!(
                t.payload.as_bytes().len() <= datagram.len(),
                "a {}-byte reply to a {}-byte request",
                t.payload.as_bytes().len(),
                datagram.len()
            );
            assert!(proto::Reply::parse(t.payload.as_bytes()).is_some());
        }
        assert!(replies <= 2, "{replies} replies to one datagram");
        match outcome {
            Outcome::Forward(dst) => {
                assert_ne!(dst, src, "forwarded back to the sender");
                assert!((0..=255u8).any(|i| addr(i) == dst));
                assert!(
                    proto::parse_registration(&datagram).is_err(),
                    "a registration was forwarded"
                );
                assert!(
                    Bye::parse(&datagram).is_err(),
                    "a leave request was forwarded"
                );
                assert_eq!(replies, 0);
            }
            Outcome::Registration => {
                assert!(proto::is_registration(&datagram) || proto::is_bye(&datagram));
                if proto::is_bye(&datagram) {
                    assert_eq!(replies, 0, "a BYE is never answered");
                }
            }
            Outcome::Dropped(_) => {
                assert!(!proto::is_registration(&datagram) && !proto::is_bye(&datagram));
                assert_eq!(replies, 0);
            }
        }
        relay.check_invariants();
    }
});
