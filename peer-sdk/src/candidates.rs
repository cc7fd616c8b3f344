//! Local candidates: the addresses of this host's interfaces with the socket's port, which a
//! peer behind the same router (one Wi-Fi, one container host) can reach directly even when the
//! router does not hairpin. Each peer sends its list to the other through the relay once they
//! are paired, authenticated with the session's punch key, and both probe them alongside the
//! public addresses (relay PROTOCOL.md, "Local candidates"):
//!
//! ```text
//! magic "PSDK-PUNCH" 0x01 | kind u8 = 3 | sender peer id u64 | count u8 (<= 8)
//!   | count x (family u8: 4 or 6 | address: 4 or 16 bytes | port u16)
//!   | mac [16] = HMAC-SHA256(punch key, kind | sender | count | entries)[..16]
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::punch::PunchKey;

const MAGIC: &[u8; 11] = b"PSDK-PUNCH\x01";
const KIND: u8 = 3;
/// Most local candidates a peer offers (and accepts): a host has a handful of interfaces; a
/// list longer than this is cut, so one message stays small (at most 190 bytes).
pub const MAX_LOCAL_CANDIDATES: usize = 8;
const MAC_LEN: usize = 16;
/// The longest message: header, eight IPv6 entries, MAC.
pub const MAX_LEN: usize = 11 + 1 + 8 + 1 + MAX_LOCAL_CANDIDATES * 19 + MAC_LEN;

/// A peer's local candidates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    /// The sender's peer id (a peer ignores its own list reflected back).
    pub sender: u64,
    /// Interface addresses with the socket's port.
    pub addrs: Vec<SocketAddr>,
}

fn body(sender: u64, addrs: &[SocketAddr]) -> Vec<u8> {
    let addrs = &addrs[..addrs.len().min(MAX_LOCAL_CANDIDATES)];
    let mut out = Vec::with_capacity(MAX_LEN);
    out.push(KIND);
    out.extend_from_slice(&sender.to_be_bytes());
    out.push(addrs.len() as u8);
    for a in addrs {
        match a.ip() {
            IpAddr::V4(v4) => {
                out.push(4);
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.push(6);
                out.extend_from_slice(&v6.octets());
            }
        }
        out.extend_from_slice(&a.port().to_be_bytes());
    }
    out
}

fn mac(key: &PunchKey, body: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key.bytes()).expect("HMAC takes any key length");
    m.update(body);
    m
}

impl Candidates {
    /// Encodes and authenticates the list (at most [`MAX_LOCAL_CANDIDATES`] are kept).
    pub fn encode(&self, key: &PunchKey) -> Vec<u8> {
        let body = body(self.sender, &self.addrs);
        let tag = mac(key, &body).finalize().into_bytes();
        let mut out = Vec::with_capacity(MAX_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag[..MAC_LEN]);
        out
    }

    /// Whether `d` has this message's magic and kind (to take it out of Quinn's stream before
    /// authenticating it).
    pub fn looks_like(d: &[u8]) -> bool {
        d.len() > MAGIC.len() && d.starts_with(MAGIC) && d[MAGIC.len()] == KIND
    }

    /// Decodes and authenticates a message; `None` for anything malformed or forged.
    pub fn decode(d: &[u8], key: &PunchKey) -> Option<Candidates> {
        if !Self::looks_like(d) || d.len() > MAX_LEN || d.len() < MAGIC.len() + 10 + MAC_LEN {
            return None;
        }
        let (body, tag) = d[MAGIC.len()..].split_at(d.len() - MAGIC.len() - MAC_LEN);
        mac(key, body).verify_truncated_left(tag).ok()?;
        let sender = u64::from_be_bytes(body[1..9].try_into().ok()?);
        let count = usize::from(body[9]);
        if count > MAX_LOCAL_CANDIDATES {
            return None;
        }
        let mut rest = &body[10..];
        let mut addrs = Vec::with_capacity(count);
        for _ in 0..count {
            let (ip, len): (IpAddr, usize) = match *rest.first()? {
                4 => (
                    Ipv4Addr::from(<[u8; 4]>::try_from(rest.get(1..5)?).ok()?).into(),
                    5,
                ),
                6 => (
                    Ipv6Addr::from(<[u8; 16]>::try_from(rest.get(1..17)?).ok()?).into(),
                    17,
                ),
                _ => return None,
            };
            let port = u16::from_be_bytes(rest.get(len..len + 2)?.try_into().ok()?);
            addrs.push(SocketAddr::new(ip, port));
            rest = &rest[len + 2..];
        }
        rest.is_empty().then_some(Candidates { sender, addrs })
    }
}

/// Whether a peer may use `ip` as a local candidate: a unicast address that can be reached
/// from another host without a scope (no loopback, unspecified, multicast, broadcast, or
/// link-local, which would need an interface index).
pub fn usable(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

/// This host's local candidates for a socket bound to `local`: every usable interface address
/// of the socket's family (both for an IPv6 socket, which is dual-stack) with its port, or
/// just the bound address when it is specific. At most [`MAX_LOCAL_CANDIDATES`].
pub fn gather(local: SocketAddr) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    if !local.ip().is_unspecified() {
        if usable(local.ip()) {
            out.push(local);
        }
        return out;
    }
    for ip in interface_addresses() {
        let family_ok = local.is_ipv6() || ip.is_ipv4();
        let a = SocketAddr::new(ip, local.port());
        if family_ok && usable(ip) && !out.contains(&a) && out.len() < MAX_LOCAL_CANDIDATES {
            out.push(a);
        }
    }
    out
}

/// The addresses of every interface that is up (empty where the platform cannot tell).
#[cfg(unix)]
fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let up = ifa.ifa_flags & (libc::IFF_UP as libc::c_uint) != 0;
        if ifa.ifa_addr.is_null() || !up {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose family says its layout.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family == libc::AF_INET {
            // SAFETY: family AF_INET: the address is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))));
        } else if family == libc::AF_INET6 {
            // SAFETY: family AF_INET6: the address is a sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(not(unix))]
fn interface_addresses() -> Vec<IpAddr> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn key() -> PunchKey {
        PunchKey::new(Uuid::from_u128(5))
    }

    #[test]
    fn round_trip_and_authentication() {
        let c = Candidates {
            sender: 9,
            addrs: vec![
                "100.64.1.2:5000".parse().expect("addr"),
                "[2001:db8:1::2]:5000".parse().expect("addr"),
            ],
        };
        let bytes = c.encode(&key());
        assert!(Candidates::looks_like(&bytes));
        assert_eq!(Candidates::decode(&bytes, &key()), Some(c));
        assert_eq!(
            Candidates::decode(&bytes, &PunchKey::new(Uuid::nil())),
            None
        );
        let mut forged = bytes.clone();
        forged[22] ^= 1; // an address byte
        assert_eq!(Candidates::decode(&forged, &key()), None);
    }

    #[test]
    fn usable_addresses_exclude_loopback_and_link_local() {
        for bad in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "169.254.1.1",
            "fe80::1",
            "224.0.0.1",
        ] {
            assert!(!usable(bad.parse().expect("ip")), "{bad}");
        }
        for good in ["100.64.1.2", "192.168.1.10", "2001:db8::1", "fd00::1"] {
            assert!(usable(good.parse().expect("ip")), "{good}");
        }
    }

    #[test]
    fn gathering_never_offers_loopback_and_keeps_the_port() {
        let got = gather("0.0.0.0:4242".parse().expect("addr"));
        assert!(got.len() <= MAX_LOCAL_CANDIDATES);
        for a in &got {
            assert!(usable(a.ip()) && a.is_ipv4() && a.port() == 4242, "{a}");
        }
        assert!(gather("127.0.0.1:1".parse().expect("addr")).is_empty());
        let bound: SocketAddr = "100.64.1.2:7".parse().expect("addr");
        assert_eq!(gather(bound), vec![bound]);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Candidates::decode(&bytes, &key());
        }

        #[test]
        fn every_list_round_trips(sender: u64, raw in proptest::collection::vec((any::<bool>(), any::<u128>(), any::<u16>()), 0..12)) {
            let addrs: Vec<SocketAddr> = raw
                .iter()
                .map(|&(v4, bits, port)| {
                    let ip: IpAddr = if v4 {
                        Ipv4Addr::from(bits as u32).into()
                    } else {
                        Ipv6Addr::from(bits).into()
                    };
                    SocketAddr::new(ip, port)
                })
                .collect();
            let bytes = Candidates { sender, addrs: addrs.clone() }.encode(&key());
            prop_assert!(bytes.len() <= MAX_LEN);
            let back = Candidates::decode(&bytes, &key()).expect("decodes");
            prop_assert_eq!(back.sender, sender);
            prop_assert_eq!(&back.addrs[..], &addrs[..addrs.len().min(MAX_LOCAL_CANDIDATES)]);
        }
    }
}
