//! The destination policy every server-side front end applies (TCP CONNECT and UDP sessions
//! from SOCKS5 CONNECT, HTTP CONNECT and UDP ASSOCIATE, and sing-box UoT): unless
//! `--allow-private`, loopback, private, link-local, shared (CGNAT), unspecified, broadcast and
//! multicast destinations are refused, including when the IPv4 address hides inside an IPv6
//! one (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo). Pure: no IO.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether `ip` is refused unless `--allow-private`. An IPv6 address that carries an IPv4 one
/// (see [`embedded_ipv4`]) is refused when any IPv4 address it may carry is refused: on a
/// NAT64 network `64:ff9b::a00:5` reaches 10.0.0.5.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_forbidden(v4),
        IpAddr::V6(v6) => v6_forbidden(v6) || embedded_ipv4(v6).into_iter().any(v4_forbidden),
    }
}

/// Whether `ip` may be reached, given `--allow-private`.
pub fn allowed(ip: IpAddr, allow_private: bool) -> bool {
    allow_private || !is_forbidden(ip)
}

/// The addresses of `addrs` the policy allows, in order.
pub fn filter(addrs: impl IntoIterator<Item = SocketAddr>, allow_private: bool) -> Vec<SocketAddr> {
    addrs
        .into_iter()
        .filter(|a| allowed(a.ip(), allow_private))
        .collect()
}

fn v4_forbidden(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        // 100.64.0.0/10, shared address space (carrier-grade NAT).
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        // 0.0.0.0/8, "this network".
        || o[0] == 0
}

fn v6_forbidden(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    v6.is_loopback()
        || v6.is_unspecified()
        || v6.is_multicast()
        // fc00::/7, unique local.
        || (s[0] & 0xfe00) == 0xfc00
        // fe80::/10, link-local.
        || (s[0] & 0xffc0) == 0xfe80
}

fn v4_at(b: &[u8; 16], at: [usize; 4]) -> Ipv4Addr {
    Ipv4Addr::new(b[at[0]], b[at[1]], b[at[2]], b[at[3]])
}

/// Every IPv4 address `v6` may carry, by the address's prefix:
/// - `::ffff:a.b.c.d` (IPv4-mapped) and `::a.b.c.d` (IPv4-compatible, deprecated but still
///   routed by some stacks): the last 32 bits;
/// - `64:ff9b::/96` (NAT64 well-known prefix, RFC 6052): the last 32 bits;
/// - `64:ff9b:1::/48` (NAT64 local-use prefix, RFC 8215): the operator picks a prefix length
///   of /48, /56, /64 or /96 inside it and the address does not say which, so all four
///   RFC 6052 positions (bits 64-71 skipped) are returned;
/// - `2002::/16` (6to4, RFC 3056): bits 16-47;
/// - `2001::/32` (Teredo, RFC 4380): the client's address, the last 32 bits inverted.
pub fn embedded_ipv4(v6: Ipv6Addr) -> Vec<Ipv4Addr> {
    let b = v6.octets();
    let s = v6.segments();
    let last = v4_at(&b, [12, 13, 14, 15]);
    let mapped_or_compatible = s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0);
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    if mapped_or_compatible || nat64 {
        vec![last]
    } else if s[..3] == [0x64, 0xff9b, 1] {
        vec![
            // /48: bits 48-63 and 72-87.
            v4_at(&b, [6, 7, 9, 10]),
            // /56: bits 56-63 and 72-95.
            v4_at(&b, [7, 9, 10, 11]),
            // /64: bits 72-103.
            v4_at(&b, [9, 10, 11, 12]),
            // /96: the last 32 bits.
            last,
        ]
    } else if s[0] == 0x2002 {
        vec![v4_at(&b, [2, 3, 4, 5])]
    } else if s[..2] == [0x2001, 0] {
        vec![Ipv4Addr::from(!u32::from(last))]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn forbidden(s: &str) -> bool {
        is_forbidden(s.parse().expect("literal"))
    }

    #[test]
    fn plain_addresses() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
        ] {
            assert!(forbidden(ip), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2001:4860::8888", "100.128.0.1"] {
            assert!(!forbidden(ip), "{ip}");
        }
    }

    /// Each embedding the issue names, with a private address inside (refused) and a public
    /// one (allowed).
    #[test]
    fn embedded_addresses() {
        for ip in [
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.5",
            "::10.0.0.5",
            "::127.0.0.1",
            "64:ff9b::a00:5",
            "64:ff9b::127.0.0.1",
            "64:ff9b::192.168.1.1",
            "64:ff9b:1::a00:5",
            "64:ff9b:1:a00:5::",
            "2002:a00:5::1",
            "2002:7f00:1::",
            // Teredo, client 10.0.0.5 (0a000005 inverted is f5fffffa).
            "2001:0:4136:e378:8000:63bf:f5ff:fffa",
            // Teredo, client 127.0.0.1.
            "2001:0:4136:e378::80ff:fffe",
        ] {
            assert!(forbidden(ip), "{ip}");
        }
        for ip in [
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            // Teredo, client 8.8.8.8 (08080808 inverted is f7f7f7f7).
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
        ] {
            assert!(!forbidden(ip), "{ip}");
        }
    }

    fn v6_with(prefix: [u8; 16], at: [usize; 4], v4: Ipv4Addr, invert: bool) -> IpAddr {
        let mut b = prefix;
        let o = if invert {
            (!u32::from(v4)).to_be_bytes()
        } else {
            v4.octets()
        };
        for (i, p) in at.into_iter().enumerate() {
            b[p] = o[i];
        }
        IpAddr::V6(Ipv6Addr::from(b))
    }

    proptest! {
        /// The verdict on an embedded IPv4 address is the verdict on the address itself, for
        /// every embedding with one fixed position, whatever the other bits hold.
        #[test]
        fn embedding_keeps_the_verdict(v4 in any::<u32>(), noise in any::<[u8; 16]>()) {
            let v4 = Ipv4Addr::from(v4);
            let want = is_forbidden(IpAddr::V4(v4));
            let mut mapped = [0u8; 16];
            mapped[10] = 0xff;
            mapped[11] = 0xff;
            let mut nat64 = [0u8; 16];
            nat64[1] = 0x64;
            nat64[2] = 0xff;
            nat64[3] = 0x9b;
            let mut six_to_four = noise;
            six_to_four[0] = 0x20;
            six_to_four[1] = 0x02;
            let mut teredo = noise;
            teredo[..4].copy_from_slice(&[0x20, 0x01, 0, 0]);
            // Teredo's server address and flags are noise; a non-global server is still a
            // global-looking IPv6 address, so only the client's part decides.
            let cases = [
                v6_with(mapped, [12, 13, 14, 15], v4, false),
                v6_with(nat64, [12, 13, 14, 15], v4, false),
                v6_with(six_to_four, [2, 3, 4, 5], v4, false),
                v6_with(teredo, [12, 13, 14, 15], v4, true),
            ];
            for ip in cases {
                prop_assert_eq!(is_forbidden(ip), want, "{} carrying {}", ip, v4);
            }
            // IPv4-compatible: :: and ::1 are refused as IPv6 too, and so are 0.0.0.0 and
            // 0.0.0.1 as IPv4 (0.0.0.0/8), so the verdict is the same here as well.
            let compat = v6_with([0; 16], [12, 13, 14, 15], v4, false);
            prop_assert_eq!(is_forbidden(compat), want, "{}", compat);
        }

        /// In the local-use NAT64 prefix a refused IPv4 address is refused at every prefix
        /// length the operator may have chosen.
        #[test]
        fn local_use_nat64_refuses_at_every_length(
            range in 0usize..8,
            low in any::<u32>(),
            noise in any::<[u8; 16]>(),
        ) {
            // A refused IPv4 address: a refused range's prefix, random host bits.
            let (net, bits) = [
                (0x0a00_0000u32, 8),
                (0x7f00_0000, 8),
                (0xac10_0000, 12),
                (0xc0a8_0000, 16),
                (0xa9fe_0000, 16),
                (0x6440_0000, 10),
                (0xe000_0000, 4),
                (0, 8),
            ][range];
            let v4 = Ipv4Addr::from(net | (low >> bits));
            prop_assert!(is_forbidden(IpAddr::V4(v4)), "{}", v4);
            let mut p = noise;
            p[..6].copy_from_slice(&[0, 0x64, 0xff, 0x9b, 0, 1]);
            for at in [[6, 7, 9, 10], [7, 9, 10, 11], [9, 10, 11, 12], [12, 13, 14, 15]] {
                let ip = v6_with(p, at, v4, false);
                prop_assert!(is_forbidden(ip), "{} carrying {}", ip, v4);
            }
        }

        /// Never panics, and an address outside every embedding prefix is judged as IPv6 only.
        #[test]
        fn other_ipv6_is_judged_alone(b in any::<[u8; 16]>()) {
            let v6 = Ipv6Addr::from(b);
            if embedded_ipv4(v6).is_empty() {
                prop_assert_eq!(is_forbidden(IpAddr::V6(v6)), v6_forbidden(v6));
            }
        }
    }
}
