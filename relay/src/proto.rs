//! The relay's wire format: registrations, replies and session tokens. Pure: bytes in, values out.
//!
//! The full specification, with byte-level examples, is `PROTOCOL.md` beside this crate's
//! `Cargo.toml`. In short:
//!
//! ```text
//! REG:<uuid>\n                                   original form   -> "ACK\n"
//! REG:<uuid> p=<peer-id> [t=<expiry>:<mac>] ...  extended form   -> "ACK <you> [<peer>]\n"
//! anything refused                                               -> "ERR <reason>\n"
//! ```
//!
//! This module is compiled by the SDK too (feature `proto`), so the relay and its clients share
//! one definition of every byte.

use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;
pub use uuid::Uuid;

/// Every registration starts with these four bytes; nothing else does.
pub const REG_PREFIX: &[u8] = b"REG:";

/// Every leave request starts with these four bytes.
pub const BYE_PREFIX: &[u8] = b"BYE:";

/// The reply to an original-form registration, byte for byte what the original relay sent.
pub const ACK: &[u8] = b"ACK\n";

/// The longest registration the relay accepts. Room for every known parameter plus padding to
/// [`MAX_REPLY_LEN`], with slack for parameters later versions may add; anything longer is not a
/// registration a client of ours would send.
pub const MAX_REG_LEN: usize = 512;

/// The longest reply the relay can send: `"ACK " + addr + " " + addr + "\n"` with two bracketed
/// IPv6 addresses of 47 characters each. Extended registrations must be at least this long, so
/// that no reply is ever larger than the request that caused it (no amplification).
pub const MAX_REPLY_LEN: usize = 100;

/// What a return-routability cookie adds to an ACK: `" c="` and 16 hex digits (PROTOCOL.md §12).
pub const COOKIE_PARAM_LEN: usize = 3 + 16;

/// The longest ACK that carries a cookie. Extended registrations are padded to this length by
/// [`Registration::encode`], so that the relay can always fit the cookie into its reply without
/// answering with more bytes than it was sent.
pub const MAX_COOKIE_REPLY_LEN: usize = MAX_REPLY_LEN + COOKIE_PARAM_LEN;

/// What the other member's alternate address adds to an ACK: `" pa="` and an address of up to
/// 47 characters (PROTOCOL.md §3.3).
pub const ALT_PARAM_LEN: usize = 4 + 47;

/// The longest ACK: two addresses, a cookie and the peer's alternate address. Registrations of
/// clients that read alternate addresses (`ax=1`, `alt=1`) are padded to this length by
/// [`Registration::encode`].
pub const MAX_ALT_REPLY_LEN: usize = MAX_COOKIE_REPLY_LEN + ALT_PARAM_LEN;

/// Longest parameter key; keys are short lowercase words.
const MAX_KEY_LEN: usize = 16;

/// A client-chosen random identifier that lets the relay tell two peers behind one public IP
/// apart, and recognise a peer after its NAT moved it to a new port (`p=` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerId(pub u64);

/// The relay's return-routability cookie (`c=<16 hex digits>`): a keyed hash of the session, the
/// member's address and the time, sent in an ACK to an extended member that has not proved its
/// address yet. The member echoes it in its next registration; only then does the relay forward
/// datagrams to it. A spoofed registration never sees the cookie, so it cannot make the relay
/// send traffic to an address that did not ask for it (PROTOCOL.md §12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cookie(pub u64);

/// A per-session credential (`t=<expiry>:<mac>`): `mac = HMAC-SHA256(secret, "<uuid>:<expiry>")`
/// with the UUID in lowercase hyphenated form and `expiry` in Unix seconds (TURN REST style).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// Unix time (seconds) after which the relay refuses the token.
    pub expiry: u64,
    /// The HMAC-SHA256 over `"<uuid>:<expiry>"`.
    pub mac: [u8; 32],
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// The MAC does not match any configured secret.
    BadMac,
    /// The token's expiry lies in the past.
    Expired,
}

type HmacSha256 = Hmac<Sha256>;

impl Token {
    /// Mints the token a relay configured with `secret` accepts for `session` until `expiry`.
    ///
    /// This is what an application's backend runs to hand its peers credentials.
    pub fn mint(secret: &[u8], session: Uuid, expiry: u64) -> Token {
        let mut mac = [0u8; 32];
        mac.copy_from_slice(
            &Self::mac_for(secret, session, expiry)
                .finalize()
                .into_bytes(),
        );
        Token { expiry, mac }
    }

    /// Checks the token against any of `secrets` (several allow rotation) at Unix time `now`.
    /// The MAC comparison is constant-time.
    pub fn verify<S: AsRef<[u8]>>(
        &self,
        secrets: &[S],
        session: Uuid,
        now: u64,
    ) -> Result<(), TokenError> {
        let matched = secrets.iter().any(|s| {
            Self::mac_for(s.as_ref(), session, self.expiry)
                .verify_slice(&self.mac)
                .is_ok()
        });
        if !matched {
            Err(TokenError::BadMac)
        } else if self.expiry < now {
            Err(TokenError::Expired)
        } else {
            Ok(())
        }
    }

    fn mac_for(secret: &[u8], session: Uuid, expiry: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
        let mut uuid_buf = Uuid::encode_buffer();
        mac.update(session.hyphenated().encode_lower(&mut uuid_buf).as_bytes());
        mac.update(b":");
        mac.update(expiry.to_string().as_bytes());
        mac
    }
}

/// The token as it goes on the wire after `t=`: `<expiry>:<64 hex digits>`.
impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.expiry, hex::encode(self.mac))
    }
}

/// Parses `<expiry>:<64 hex digits>`, the form [`Token`]'s `Display` writes (and
/// `quic-relay token` prints).
impl std::str::FromStr for Token {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Token, ParseError> {
        parse_token(s.trim().as_bytes())
    }
}

/// A parsed registration datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The session both peers name.
    pub session: Uuid,
    /// `None` for the original form; the extended parameters otherwise.
    pub extended: Option<Extended>,
}

/// The parameters of an extended registration. Their presence is what makes a client extended:
/// it then gets observed addresses in its ACKs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Extended {
    /// `p=`: identifies this peer across NAT rebinding and among peers sharing a public IP.
    pub peer: Option<PeerId>,
    /// `t=`: the session token, required when the relay runs with `--secret-file`.
    pub token: Option<Token>,
    /// `c=`: the cookie of the relay's last ACK, echoed to prove the address (PROTOCOL.md §12).
    pub cookie: Option<Cookie>,
    /// `ax=1`: the client reads the other member's alternate address (`pa=`) in ACKs
    /// (PROTOCOL.md §3.3). Implied by `alt=1`.
    pub alt_aware: bool,
    /// `alt=1`: this registration is not a member's but the *alternate address* (the other IP
    /// family) of the member with peer id `p` (PROTOCOL.md §3.3).
    pub alt: bool,
}

/// Why a datagram that starts with `REG:` is not a valid registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// The datagram does not start with `REG:` (it is data, not a registration).
    NotRegistration,
    /// Longer than [`MAX_REG_LEN`].
    TooLong,
    /// Contains bytes other than printable ASCII, space, tab, CR and LF.
    NotAscii,
    /// The session is not a UUID.
    BadUuid,
    /// A parameter is not `key=value`, has an invalid key, or a known key has a bad value.
    BadParam,
    /// A known parameter appears twice.
    DuplicateParam,
    /// An extended registration shorter than [`MAX_REPLY_LEN`]: the reply might not fit.
    TooShortForReply,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ParseError::NotRegistration => "not a registration",
            ParseError::TooLong => "registration longer than 512 bytes",
            ParseError::NotAscii => "registration contains non-ASCII bytes",
            ParseError::BadUuid => "session is not a UUID",
            ParseError::BadParam => "malformed parameter",
            ParseError::DuplicateParam => "duplicate parameter",
            ParseError::TooShortForReply => "extended registration shorter than 100 bytes",
        })
    }
}

impl std::error::Error for ParseError {}

/// Returns true when `datagram` is meant as a registration (it starts with `REG:`).
#[inline]
pub fn is_registration(datagram: &[u8]) -> bool {
    datagram.starts_with(REG_PREFIX)
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Parses a registration datagram.
///
/// Accepts what the original relay's clients send (`REG:<uuid>` with or without a trailing
/// newline, whitespace around the UUID, any case) and the extended form (see `PROTOCOL.md`).
/// Unknown `key=value` parameters are ignored so that later versions can add some.
pub fn parse_registration(datagram: &[u8]) -> Result<Registration, ParseError> {
    if !is_registration(datagram) {
        return Err(ParseError::NotRegistration);
    }
    parse_body(datagram, true)
}

/// Whether every byte is printable ASCII or [`is_space`]. Branch-free over the bytes so that it
/// compiles to a few vector compares: it runs on every registration the relay receives.
fn all_ascii_or_space(bytes: &[u8]) -> bool {
    // `&` rather than `&&`: no early exit, so no branch per byte.
    bytes
        .iter()
        .fold(true, |ok, &b| ok & (b.is_ascii_graphic() | is_space(b)))
}

/// The non-empty runs of non-space bytes of a registration, in order. Only for bytes that passed
/// [`all_ascii_or_space`]: among those, a space is exactly a byte below `!`.
struct Words<'a> {
    rest: &'a [u8],
}

/// Index of the first space in `s` (its length if none), for bytes that passed
/// [`all_ascii_or_space`]. Eight bytes at a time: a UUID is 32 to 45 bytes long.
fn find_space(s: &[u8]) -> usize {
    const ONES: u64 = u64::from_le_bytes([b'!'; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let mut chunks = s.chunks_exact(8);
    let mut at = 0;
    for c in &mut chunks {
        let x = u64::from_le_bytes(c.try_into().expect("chunks of 8 bytes"));
        // No byte is 0x80 or above, so a byte's high bit is set after the subtraction exactly
        // when it is below `!` or a lower byte was (a borrow); the lowest set bit is exact.
        let below = x.wrapping_sub(ONES) & HIGH;
        if below != 0 {
            return at + (below.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    at + chunks
        .remainder()
        .iter()
        .position(|&b| b < b'!')
        .unwrap_or(chunks.remainder().len())
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let start = self.rest.iter().position(|&b| b >= b'!')?;
        let rest = &self.rest[start..];
        let end = find_space(rest);
        self.rest = &rest[end..];
        Some(&rest[..end])
    }
}

/// Parses what follows the 4-byte prefix (`REG:` or `BYE:`, checked by the caller).
fn parse_body(datagram: &[u8], needs_reply_room: bool) -> Result<Registration, ParseError> {
    let rest = &datagram[REG_PREFIX.len()..];
    if datagram.len() > MAX_REG_LEN {
        return Err(ParseError::TooLong);
    }
    if !all_ascii_or_space(rest) {
        return Err(ParseError::NotAscii);
    }
    let mut words = Words { rest };
    let session = words
        .next()
        .and_then(|w| Uuid::try_parse_ascii(w).ok())
        .ok_or(ParseError::BadUuid)?;
    let mut ext: Option<Extended> = None;
    for word in words {
        let eq = word
            .iter()
            .position(|&b| b == b'=')
            .ok_or(ParseError::BadParam)?;
        let (key, value) = (&word[..eq], &word[eq + 1..]);
        if key.is_empty()
            || key.len() > MAX_KEY_LEN
            || !key
                .iter()
                .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ParseError::BadParam);
        }
        let e = ext.get_or_insert_with(Extended::default);
        match key {
            b"p" => {
                if e.peer.is_some() {
                    return Err(ParseError::DuplicateParam);
                }
                e.peer = Some(parse_peer_id(value)?);
            }
            b"t" => {
                if e.token.is_some() {
                    return Err(ParseError::DuplicateParam);
                }
                e.token = Some(parse_token(value)?);
            }
            b"c" => {
                if e.cookie.is_some() {
                    return Err(ParseError::DuplicateParam);
                }
                e.cookie = Some(Cookie(parse_hex_u64(value).ok_or(ParseError::BadParam)?));
            }
            b"ax" | b"alt" => {
                let flag = if key == b"ax" {
                    &mut e.alt_aware
                } else {
                    &mut e.alt
                };
                if *flag {
                    return Err(ParseError::DuplicateParam);
                }
                if value != b"1" {
                    return Err(ParseError::BadParam);
                }
                *flag = true;
            }
            _ => {} // forward compatibility: unknown parameters (and `pad=`) are ignored
        }
    }
    if let Some(e) = ext.as_mut() {
        // An alternate registration reads the ACK's `pa=` like any other.
        e.alt_aware |= e.alt;
        if e.alt && e.peer.is_none() {
            // The alternate address of whom?
            return Err(ParseError::BadParam);
        }
    }
    if needs_reply_room && ext.is_some() && datagram.len() < MAX_REPLY_LEN {
        return Err(ParseError::TooShortForReply);
    }
    Ok(Registration {
        session,
        extended: ext,
    })
}

fn parse_hex_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 16 || !v.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let s = std::str::from_utf8(v).ok()?;
    u64::from_str_radix(s, 16).ok()
}

fn parse_peer_id(v: &[u8]) -> Result<PeerId, ParseError> {
    match parse_hex_u64(v) {
        Some(0) | None => Err(ParseError::BadParam),
        Some(id) => Ok(PeerId(id)),
    }
}

fn parse_token(v: &[u8]) -> Result<Token, ParseError> {
    let colon = v
        .iter()
        .position(|&b| b == b':')
        .ok_or(ParseError::BadParam)?;
    let (exp, mac_hex) = (&v[..colon], &v[colon + 1..]);
    if exp.is_empty() || exp.len() > 20 || !exp.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::BadParam);
    }
    let expiry: u64 = std::str::from_utf8(exp)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ParseError::BadParam)?;
    let mut mac = [0u8; 32];
    hex::decode_to_slice(mac_hex, &mut mac).map_err(|_| ParseError::BadParam)?;
    Ok(Token { expiry, mac })
}

/// A parsed leave request, `BYE:<uuid> [p=<peer-id>]`: the sender gives up its slot at once
/// (instead of leaving it to expire), so the session can take a new peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bye {
    /// The session to leave.
    pub session: Uuid,
    /// The peer id the sender registered with, if any.
    pub peer: Option<PeerId>,
}

/// Returns true when `datagram` is meant as a leave request (it starts with `BYE:`).
#[inline]
pub fn is_bye(datagram: &[u8]) -> bool {
    datagram.starts_with(BYE_PREFIX)
}

impl Bye {
    /// Parses `BYE:<uuid>` with an optional `p=` parameter (same rules as a registration's;
    /// unknown parameters are ignored; at most [`MAX_REG_LEN`] bytes).
    pub fn parse(datagram: &[u8]) -> Result<Bye, ParseError> {
        if !is_bye(datagram) {
            return Err(ParseError::NotRegistration);
        }
        // The grammar is the registration's, without the length floor for replies: a BYE is
        // never answered.
        let reg = parse_body(datagram, false)?;
        Ok(Bye {
            session: reg.session,
            peer: reg.extended.and_then(|e| e.peer),
        })
    }

    /// Encodes the leave request.
    pub fn encode(&self) -> Vec<u8> {
        let mut uuid_buf = Uuid::encode_buffer();
        let mut s = format!(
            "BYE:{}",
            self.session.hyphenated().encode_lower(&mut uuid_buf)
        );
        if let Some(p) = self.peer {
            let _ = write!(s, " p={:016x}", p.0);
        }
        s.push('\n');
        s.into_bytes()
    }
}

impl Registration {
    /// The original form, `REG:<uuid>\n`.
    pub fn original(session: Uuid) -> Self {
        Registration {
            session,
            extended: None,
        }
    }

    /// Encodes the registration. Extended registrations are padded (with a `pad=` parameter) to
    /// at least [`MAX_COOKIE_REPLY_LEN`] bytes: the relay requires [`MAX_REPLY_LEN`], and the
    /// rest leaves room for a cookie in its ACK; with `ax=1` or `alt=1`, to
    /// [`MAX_ALT_REPLY_LEN`], room for the peer's alternate address too.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::with_capacity(MAX_REPLY_LEN + 8);
        s.push_str("REG:");
        let mut uuid_buf = Uuid::encode_buffer();
        s.push_str(self.session.hyphenated().encode_lower(&mut uuid_buf));
        if let Some(ext) = &self.extended {
            if let Some(p) = ext.peer {
                let _ = write!(s, " p={:016x}", p.0);
            }
            if let Some(t) = &ext.token {
                let _ = write!(s, " t={t}");
            }
            if let Some(Cookie(c)) = ext.cookie {
                let _ = write!(s, " c={c:016x}");
            }
            if ext.alt {
                s.push_str(" alt=1");
            } else if ext.alt_aware {
                s.push_str(" ax=1");
            }
            // Unknown parameters are ignored by the relay; `pad=` fills up to the reply size.
            let reply_len = if ext.alt_aware || ext.alt {
                MAX_ALT_REPLY_LEN
            } else {
                MAX_COOKIE_REPLY_LEN
            };
            let missing = reply_len.saturating_sub(s.len() + 1);
            if missing > 0 {
                s.push_str(" pad=");
                let zeros = missing.saturating_sub(5);
                s.extend(std::iter::repeat_n('0', zeros));
            }
        }
        s.push('\n');
        s.into_bytes()
    }
}

/// Why the relay refused a registration: the word after `ERR `.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrReason {
    /// Starts with `REG:` but does not parse (see [`ParseError`]).
    Malformed,
    /// The extended form was shorter than [`MAX_REPLY_LEN`]: pad it (`pad=`).
    Short,
    /// The session already has two other members.
    Full,
    /// The relay holds as many sessions as it is configured for.
    Capacity,
    /// The source IP is a member of as many sessions as one IP may be.
    IpLimit,
    /// The source IP sent registrations faster than allowed.
    Rate,
    /// The relay requires a token and this one is missing or its MAC is wrong.
    Auth,
    /// The token's expiry has passed.
    Expired,
    /// An alternate registration (`alt=1`) names a peer id that is no member of the session.
    NoMember,
    /// The relay is draining for maintenance: it takes no new peers; use the next relay.
    Moved,
}

impl ErrReason {
    /// Every reason, for metrics and tests.
    pub const ALL: [ErrReason; 10] = [
        ErrReason::Malformed,
        ErrReason::Short,
        ErrReason::Full,
        ErrReason::Capacity,
        ErrReason::IpLimit,
        ErrReason::Rate,
        ErrReason::Auth,
        ErrReason::Expired,
        ErrReason::NoMember,
        ErrReason::Moved,
    ];

    /// The word on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrReason::Malformed => "malformed",
            ErrReason::Short => "short",
            ErrReason::Full => "full",
            ErrReason::Capacity => "capacity",
            ErrReason::IpLimit => "ip-limit",
            ErrReason::Rate => "rate",
            ErrReason::Auth => "auth",
            ErrReason::Expired => "expired",
            ErrReason::NoMember => "no-member",
            ErrReason::Moved => "moved",
        }
    }

    fn from_wire(w: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str().as_bytes() == w)
    }
}

/// A reply from the relay, as the SDK sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Registered. `observed` (extended clients only) is the client's address as the relay sees
    /// it; `peer` is the other member's observed address once the session is paired.
    Ack {
        /// The registrant's public address, as seen by the relay.
        observed: Option<SocketAddr>,
        /// The other member's public address, once paired.
        peer: Option<SocketAddr>,
        /// Present until this member has proved its address: echo it in a registration
        /// (`c=`, [`Extended::cookie`]) at once; the relay forwards nothing to it before.
        cookie: Option<Cookie>,
        /// `pa=`: the other member's alternate address (its other IP family), for a client
        /// that asked for it ([`Extended::alt_aware`]).
        peer_alt: Option<SocketAddr>,
    },
    /// Refused. The reason is `None` for a word this version does not know.
    Err(Option<ErrReason>),
}

/// A reply encoded into a fixed buffer: the relay's hot path never allocates.
#[derive(Clone, Copy)]
pub struct ReplyBuf {
    buf: [u8; MAX_ALT_REPLY_LEN],
    len: u8,
}

impl std::fmt::Debug for ReplyBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ReplyBuf({:?})",
            String::from_utf8_lossy(self.as_bytes())
        )
    }
}

impl ReplyBuf {
    /// `ACK\n`, the reply to almost every registration, built once at compile time.
    const ACK: ReplyBuf = {
        let mut buf = [0; MAX_ALT_REPLY_LEN];
        let mut i = 0;
        while i < ACK.len() {
            buf[i] = ACK[i];
            i += 1;
        }
        ReplyBuf {
            buf,
            len: ACK.len() as u8,
        }
    };

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    fn push(&mut self, bytes: &[u8]) {
        let end = self.len as usize + bytes.len();
        self.buf[self.len as usize..end].copy_from_slice(bytes);
        self.len = end as u8;
    }
}

struct ReplyWriter<'a>(&'a mut ReplyBuf);

impl std::fmt::Write for ReplyWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.0.len as usize + s.len() > MAX_ALT_REPLY_LEN {
            return Err(std::fmt::Error);
        }
        self.0.push(s.as_bytes());
        Ok(())
    }
}

/// Formats an address the way replies carry it: IPv4-mapped IPv6 addresses as plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Reply {
    /// Encodes the reply. `Ack` with neither address is the original `ACK\n`.
    pub fn encode(&self) -> ReplyBuf {
        let mut out = ReplyBuf {
            buf: [0; MAX_ALT_REPLY_LEN],
            len: 0,
        };
        match *self {
            Reply::Ack { observed: None, .. } => return ReplyBuf::ACK,
            Reply::Ack {
                observed: Some(me),
                peer,
                cookie,
                peer_alt,
            } => {
                let mut w = ReplyWriter(&mut out);
                // Cannot fail: two socket addresses, a cookie and an alternate address fit in
                // MAX_ALT_REPLY_LEN by construction.
                let _ = write!(w, "ACK {}", canonical(me));
                if let Some(p) = peer {
                    let _ = write!(w, " {}", canonical(p));
                }
                if let Some(Cookie(c)) = cookie {
                    let _ = write!(w, " c={c:016x}");
                }
                if let Some(a) = peer_alt {
                    let _ = write!(w, " pa={}", canonical(a));
                }
                out.push(b"\n");
            }
            Reply::Err(reason) => {
                out.push(b"ERR ");
                out.push(reason.map_or("unknown", ErrReason::as_str).as_bytes());
                out.push(b"\n");
            }
        }
        out
    }

    /// Parses a reply. Returns `None` for anything that is not one (e.g. a QUIC packet).
    pub fn parse(datagram: &[u8]) -> Option<Reply> {
        let line = datagram.strip_suffix(b"\n")?;
        if line == b"ACK" {
            return Some(Reply::Ack {
                observed: None,
                peer: None,
                cookie: None,
                peer_alt: None,
            });
        }
        if let Some(reason) = line.strip_prefix(b"ERR ") {
            return Some(Reply::Err(ErrReason::from_wire(reason)));
        }
        let addrs = std::str::from_utf8(line.strip_prefix(b"ACK ")?).ok()?;
        let mut parts = addrs.split(' ').peekable();
        let observed = Some(parts.next()?.parse().ok()?);
        let peer = match parts.next_if(|p| !p.contains('=')) {
            Some(p) => Some(p.parse().ok()?),
            None => None,
        };
        let (mut cookie, mut peer_alt) = (None, None);
        for part in parts {
            let (key, value) = part.split_once('=')?;
            match key {
                "c" if cookie.is_none() && value.len() == 16 => {
                    cookie = Some(Cookie(parse_hex_u64(value.as_bytes())?));
                }
                "pa" if peer_alt.is_none() => peer_alt = Some(value.parse().ok()?),
                _ => return None,
            }
        }
        Some(Reply::Ack {
            observed,
            peer,
            cookie,
            peer_alt,
        })
    }
}

#[cfg(test)]
mod tests;
