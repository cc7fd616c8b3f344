//! IPv6 in the lab: which hosts have it ([`Stack`]), the addressing plan inside the
//! 2001:db8::/32 documentation range, and the stateful firewall each router puts in front of its
//! peers' global addresses (IPv6 is routed, never translated: no NAT66).
//!
//! ```text
//!  relay host     2001:db8::1/64                      (transit 2001:db8::fe)
//!  site N link    router (or no-NAT peer) 2001:db8:N::1 (::2)   (transit 2001:db8:N::fe)
//!  site N LAN     router 2001:db8:N:1::1, peer 2001:db8:N:1::2 (shared LAN: B is ::3)
//! ```

use std::net::Ipv6Addr;

use anyhow::{Context as _, Result};

use crate::lab::{Lab, Side};
use crate::nat::NatType;
use crate::netns::{ip, netns_exec, write_sysctls};
use crate::tools::Tools;

/// Which IP families a peer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Stack {
    /// IPv4 only (the lab's default: no IPv6 anywhere).
    #[default]
    V4,
    /// IPv4 behind its NAT, and a global IPv6 address behind the router's firewall.
    Dual,
    /// A global IPv6 address only (the router still has IPv4 on its own WAN link).
    V6,
}

impl Stack {
    /// Whether the peer has IPv4.
    pub fn has_v4(self) -> bool {
        self != Stack::V6
    }

    /// Whether the peer has IPv6.
    pub fn has_v6(self) -> bool {
        self != Stack::V4
    }
}

/// The relay host's IPv6 address.
pub const RELAY_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// The transit router's address on site `n`'s link (its IPv6 default gateway).
pub(crate) fn transit_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, u16::from(n), 0, 0, 0, 0, 0xfe)
}

/// Host `host` on site `n`'s link to the transit router (1: the router, 2: a peer with no NAT).
pub(crate) fn site_ip6(n: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, u16::from(n), 0, 0, 0, 0, host)
}

/// Host `host` on site `n`'s LAN behind its router (1: the router, 2 and 3: peers).
pub(crate) fn lan_ip6(n: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, u16::from(n), 1, 0, 0, 0, host)
}

/// The prefix length of every IPv6 link.
pub(crate) const PREFIX_LEN: u8 = 64;

/// The router's IPv6 firewall (an `nft -f` script): traffic from outside reaches the peers only
/// as part of a flow they started (address-and-port-dependent filtering, the common CPE
/// default); with `udp_blocked`, forwarded UDP is dropped both ways, as for IPv4.
pub(crate) fn firewall(udp_blocked: bool) -> String {
    let mut rules = Vec::new();
    if udp_blocked {
        rules.push("meta l4proto udp drop".to_owned());
    }
    rules.extend(crate::nat::only_replies_from("wan"));
    let mut t = crate::nft::Table::replace("ip6", "netlab6");
    t.chain("forward", "filter hook forward priority filter", &rules);
    t.finish()
}

/// Building the IPv6 half of a lab, and its addresses.
impl Lab {
    /// The relay host's IPv6 address and the transit router's side of that link.
    pub(crate) fn build_relay_v6(&self, t: &Tools) -> Result<()> {
        let (public, relay) = (self.public_ns(), self.relay_ns());
        write_sysctls(&public, &[("net/ipv6/conf/all/forwarding", "1")])?;
        let transit = transit_ip6(0);
        ip(
            t,
            &public,
            &format!("-6 addr add {transit}/{PREFIX_LEN} dev relay nodad"),
        )?;
        ip(
            t,
            &relay,
            &format!("-6 addr add {RELAY_IP6}/{PREFIX_LEN} dev eth0 nodad"),
        )?;
        ip(t, &relay, &format!("-6 route add default via {transit}"))
    }

    /// Router `side`'s LAN address, forwarding and firewall.
    pub(crate) fn build_router_v6(&self, t: &Tools, side: Side, router: &str) -> Result<()> {
        let lan6 = lan_ip6(side.octet(), 1);
        ip(
            t,
            router,
            &format!("-6 addr add {lan6}/{PREFIX_LEN} dev lan nodad"),
        )?;
        write_sysctls(router, &[("net/ipv6/conf/all/forwarding", "1")])?;
        let rules = firewall(self.nat(side) == NatType::UdpBlocked);
        netns_exec(t, router, &t.nft, &["-f", "-"], Some(&rules))
            .with_context(|| format!("loading the IPv6 firewall into {router}:\n{rules}"))?;
        Ok(())
    }

    /// IPv6 on site `side`'s link to the transit router: the site's address and default route,
    /// and the transit router's route to the LAN prefix behind a router.
    pub(crate) fn build_side_v6(
        &self,
        t: &Tools,
        side: Side,
        site: &str,
        site_if: &str,
    ) -> Result<()> {
        let (n, len) = (side.octet(), PREFIX_LEN);
        let public = self.public_ns();
        let port = format!("w{}", side.letter());
        let transit = transit_ip6(n);
        ip(
            t,
            &public,
            &format!("-6 addr add {transit}/{len} dev {port} nodad"),
        )?;
        let host = if self.router_ns(side).is_some() { 1 } else { 2 };
        let addr = site_ip6(n, host);
        ip(
            t,
            site,
            &format!("-6 addr add {addr}/{len} dev {site_if} nodad"),
        )?;
        ip(t, site, &format!("-6 route add default via {transit}"))?;
        if self.router_ns(side).is_some() {
            let lan = lan_ip6(n, 0);
            ip(t, &public, &format!("-6 route add {lan}/{len} via {addr}"))?;
        }
        Ok(())
    }

    /// Peer `side`'s global IPv6 address, when its [`Stack`] has IPv6: behind a router
    /// 2001:db8:N:1::2 (::3 for B on a shared LAN), with no NAT 2001:db8:N::2.
    pub fn peer_ip6(&self, side: Side) -> Option<std::net::Ipv6Addr> {
        if !self.config().stack(side).has_v6() {
            return None;
        }
        Some(if self.config().shared_lan && side == Side::B {
            lan_ip6(Side::A.octet(), 3)
        } else if self.nat(side).has_router() {
            lan_ip6(side.octet(), 2)
        } else {
            site_ip6(side.octet(), 2)
        })
    }

    /// The relay host's IPv6 address (only reachable in labs with IPv6).
    pub fn relay_ip6(&self) -> std::net::Ipv6Addr {
        RELAY_IP6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_stays_in_the_documentation_range() {
        let doc = |a: Ipv6Addr| a.segments()[..2] == [0x2001, 0xdb8];
        for a in [
            RELAY_IP6,
            transit_ip6(0),
            transit_ip6(2),
            site_ip6(1, 1),
            lan_ip6(2, 3),
        ] {
            assert!(doc(a), "{a}");
        }
        assert_eq!(lan_ip6(1, 2).to_string(), "2001:db8:1:1::2");
    }

    #[test]
    fn firewall_admits_only_replies_from_outside() {
        let f = firewall(false);
        assert!(
            f.contains(
                "iifname \"wan\" ct state established,related accept\n    iifname \"wan\" drop"
            ),
            "{f}"
        );
        assert!(!f.contains("udp drop"));
        assert!(firewall(true).contains("meta l4proto udp drop"));
    }
}
