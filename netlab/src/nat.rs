//! NAT types and the nftables ruleset that makes a Linux router namespace behave as each one.
//!
//! Pure text generation (tested below); the lab loads the text with `nft -f -`.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::nft::Table;

/// How a peer reaches the public side.
///
/// Named after the classic STUN (RFC 3489) types; RFC 4787 terms are in each variant's doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatType {
    /// No NAT: the peer has a public 198.18.x address on the public segment.
    None,
    /// Endpoint-independent mapping and endpoint-independent filtering: anyone who learns the
    /// peer's public address:port can send to it. Built from `masquerade` plus a dynamic map that
    /// remembers which inside endpoint owns each public port and DNATs unsolicited packets to it.
    FullCone,
    /// Endpoint-independent mapping, address-and-port-dependent filtering: Linux `masquerade`,
    /// behind an input firewall that drops new inbound traffic to the router itself (as home
    /// routers do).
    PortRestricted,
    /// The same NAT without that input firewall: the router itself accepts (and answers, with
    /// ICMP port unreachable) unsolicited inbound packets, as a Docker host, a Kubernetes node or
    /// a cloud NAT instance does. Each such packet leaves a conntrack entry on the router that a
    /// later outbound flow to the same remote endpoint clashes with (it is given another public
    /// port), which is what breaks naive simultaneous hole punching.
    PortRestrictedOpen,
    /// Endpoint-dependent mapping (a new random public port for every destination) and
    /// address-and-port-dependent filtering: `masquerade fully-random`.
    Symmetric,
    /// Endpoint-dependent mapping with sequential port allocation (each new flow gets the next
    /// public port: `snat to <wan> : numgen inc`), address-and-port-dependent filtering. The
    /// kind of NAT port prediction aims at.
    SymmetricSequential,
    /// The router drops every forwarded UDP packet; TCP is port-restricted NAT as above.
    UdpBlocked,
}

impl NatType {
    /// Every type, in the order `netlab check` reports them; [`NatType::UdpBlocked`] last, so
    /// that the others are [`NatType::PUNCHABLE`].
    pub const ALL: [NatType; 7] = [
        NatType::None,
        NatType::FullCone,
        NatType::PortRestricted,
        NatType::PortRestrictedOpen,
        NatType::Symmetric,
        NatType::SymmetricSequential,
        NatType::UdpBlocked,
    ];

    /// The types a peer can punch from, in the order of `cargo xtask lab matrix` (every type
    /// but [`NatType::UdpBlocked`]).
    pub const PUNCHABLE: [NatType; 6] = match Self::ALL.split_last() {
        Some((NatType::UdpBlocked, rest)) => match rest.first_chunk() {
            Some(punchable) => *punchable,
            None => panic!("ALL has six types before UdpBlocked"),
        },
        _ => panic!("ALL ends with UdpBlocked"),
    };

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            NatType::None => "none",
            NatType::FullCone => "full-cone",
            NatType::PortRestricted => "port-restricted",
            NatType::PortRestrictedOpen => "port-restricted-open",
            NatType::Symmetric => "symmetric",
            NatType::SymmetricSequential => "symmetric-sequential",
            NatType::UdpBlocked => "udp-blocked",
        }
    }

    /// Whether the peer sits behind a router namespace (every type but [`NatType::None`]).
    pub fn has_router(self) -> bool {
        self != NatType::None
    }

    /// Whether the mapping is endpoint-dependent (a new public port per destination).
    pub fn endpoint_dependent_mapping(self) -> bool {
        matches!(self, NatType::Symmetric | NatType::SymmetricSequential)
    }

    /// Whether anyone who knows the public endpoint may send to it (endpoint-independent
    /// filtering): no NAT, or full cone.
    pub fn endpoint_independent_filtering(self) -> bool {
        matches!(self, NatType::None | NatType::FullCone)
    }

    /// Whether the router drops new inbound traffic to itself (the input firewall home routers
    /// have); `false` for [`NatType::PortRestrictedOpen`] and for no router.
    pub fn input_firewall(self) -> bool {
        self.has_router() && self != NatType::PortRestrictedOpen
    }

    /// Whether a direct UDP path between a peer behind `self` and one behind `other` is within
    /// reach of hole punching with birthday punching and port prediction (peer-sdk's methods):
    /// not when either side blocks UDP, nor when both mappings are endpoint-dependent and
    /// either is random.
    ///
    /// One endpoint-dependent side against an endpoint-independent mapping is the birthday
    /// case ([`NatType::birthday_with`]). Two sequential sides meet by predicting each other's
    /// next ports ([`NatType::sweep_with`]). With a random side against another
    /// endpoint-dependent one, each of the random side's mappings admits one port of the other
    /// side, which changes with every destination (256 sockets on one side and 64512 possible
    /// ports on the other need about 175 x 256 = 45 000 packets for an even chance even when
    /// the other side is sequential): out of reach.
    pub fn direct_possible_with(self, other: NatType) -> bool {
        if self == NatType::UdpBlocked || other == NatType::UdpBlocked {
            return false;
        }
        !(self.endpoint_dependent_mapping() && other.endpoint_dependent_mapping())
            || self.sweep_with(other)
    }

    /// Whether the direct path needs the port prediction sweep: both sides' mappings are
    /// endpoint-dependent and sequential (each new flow takes the NAT's next public port), so
    /// each side can open flows that land on the ports the other side's next flows target.
    pub fn sweep_with(self, other: NatType) -> bool {
        self == NatType::SymmetricSequential && other == NatType::SymmetricSequential
    }

    /// Whether the direct path needs birthday punching: one side's mapping is
    /// endpoint-dependent and the other filters by address and port (an ordinary punch from
    /// the hard side never reaches it, and the easy side cannot guess the hard side's port).
    pub fn birthday_with(self, other: NatType) -> bool {
        let hard_vs_filter = |a: NatType, b: NatType| {
            a.endpoint_dependent_mapping()
                && !b.endpoint_dependent_mapping()
                && !b.endpoint_independent_filtering()
        };
        self.direct_possible_with(other)
            && (hard_vs_filter(self, other) || hard_vs_filter(other, self))
    }
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A NAT type name that is not one of [`NatType::ALL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownNatType(pub String);

impl fmt::Display for UnknownNatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = NatType::ALL.iter().map(|t| t.name()).collect();
        write!(
            f,
            "unknown NAT type {:?}; expected one of: {}",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownNatType {}

impl FromStr for NatType {
    type Err = UnknownNatType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NatType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| UnknownNatType(s.to_owned()))
    }
}

/// How an endpoint-independent router picks public ports.
///
/// `masquerade` keeps the inside source port whenever that public port is free, which is what
/// makes its mapping endpoint-independent, and also why flushing conntrack does not move a
/// mapping: the next packet gets the same port back. To simulate a real rebinding (a NAT that
/// forgot the mapping and hands out a new port), the lab switches the router to a hashed mapping
/// with a fresh seed: still one public port per inside endpoint whatever the destination, but a
/// different one after every rebind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortMapping {
    /// Plain `masquerade` (port-preserving when possible).
    Masquerade,
    /// `snat` to `HASHED_PORT_BASE + jhash(inside ip, inside port, seed) % HASHED_PORT_SPAN`.
    Hashed { seed: u32 },
}

/// Lowest public port of the hashed mapping (above the privileged ports).
const HASHED_PORT_BASE: u16 = 1024;
/// Number of public ports of the hashed mapping: 1024..=31023, all below Linux's ephemeral range
/// (32768..=60999) that inside sockets bind from, so the first rebind always moves a mapping that
/// `masquerade` had left on the inside port.
const HASHED_PORT_SPAN: u16 = 30000;

/// First public port of the sequential symmetric NAT; the ports are handed out in turn from
/// here and reused cyclically, one per new flow.
const SEQUENTIAL_PORT_BASE: u16 = 40000;
/// How many ports the sequential symmetric NAT cycles through: many more than the flows a test
/// opens at once, few enough that the ruleset stays small (each is a map entry).
const SEQUENTIAL_PORTS: u16 = 256;

/// How long, by default, the full-cone router remembers which inside endpoint owns a public port
/// after the last outbound packet: Linux's UDP conntrack timeout for flows with replies
/// (`nf_conntrack_udp_timeout_stream`), so a full-cone mapping lives as long as a masquerade one.
pub(crate) const DEFAULT_FULLCONE_TIMEOUT_S: u32 = 120;

/// The name of the router's interface towards the public segment.
pub(crate) const WAN_IF: &str = "wan";
/// The name of the router's interface towards its peers' network.
pub(crate) const LAN_IF: &str = "lan";

/// The nftables ruleset (an `nft -f` script) that turns a router namespace into `nat`.
///
/// Replaces the lab's table atomically ([`Table::replace`]). `None` for [`NatType::None`]: no router.
///
/// `fullcone_timeout_s`: how long a full-cone mapping outlives the last outbound packet.
#[cfg(test)]
pub(crate) fn ruleset(
    nat: NatType,
    wan_ip: Ipv4Addr,
    mapping: PortMapping,
    fullcone_timeout_s: u32,
) -> Option<String> {
    ruleset_with(nat, wan_ip, mapping, fullcone_timeout_s, false)
}

/// [`ruleset`], and with `hairpin` (full cone only) a packet from the LAN to the router's public
/// address goes back in to the owner of the public port, its source rewritten to the router's
/// LAN address so the reply comes back through the router.
pub(crate) fn ruleset_with(
    nat: NatType,
    wan_ip: Ipv4Addr,
    mapping: PortMapping,
    fullcone_timeout_s: u32,
    hairpin: bool,
) -> Option<String> {
    if nat == NatType::None {
        return None;
    }
    let wan = WAN_IF;
    let mut t = Table::replace("ip", "netlab");
    if nat == NatType::FullCone {
        t.block(
            "map fullcone",
            &[
                "type inet_service : ipv4_addr . inet_service".to_owned(),
                "flags dynamic,timeout".to_owned(),
                format!("timeout {fullcone_timeout_s}s"),
                "size 65536".to_owned(),
            ],
        );
    }
    // A NAT needs a prerouting nat chain even when it has no rule: without one the kernel never
    // sets up the inbound half of NAT for packets that start a flow from outside.
    let mut prerouting = Vec::new();
    if nat == NatType::FullCone {
        // Unsolicited UDP to a public port someone inside owns goes to that owner.
        prerouting.push(format!(
            "iifname \"{wan}\" meta l4proto udp dnat ip to udp dport map @fullcone"
        ));
        if hairpin {
            prerouting.push(format!(
                "iifname \"{LAN_IF}\" ip daddr {wan_ip} meta l4proto udp dnat ip to udp dport \
                 map @fullcone"
            ));
        }
    }
    t.chain(
        "prerouting",
        "nat hook prerouting priority dstnat",
        &prerouting,
    );
    let mut postrouting = Vec::new();
    if hairpin && nat == NatType::FullCone {
        postrouting.push(format!(
            "oifname \"{LAN_IF}\" ct status dnat ip saddr 100.64.0.0/10 masquerade"
        ));
    }
    // A source NAT rule per protocol with its own choice of public port, then masquerade for
    // the rest (ICMP).
    let snat_each = |port: &dyn Fn(&str) -> String| -> Vec<String> {
        ["udp", "tcp"]
            .into_iter()
            .map(|proto| {
                format!(
                    "oifname \"{wan}\" meta l4proto {proto} snat ip to {wan_ip} : {}",
                    port(proto)
                )
            })
            .chain([format!("oifname \"{wan}\" masquerade")])
            .collect()
    };
    match (nat, mapping) {
        (NatType::Symmetric, _) => {
            // A random public port per conntrack entry, so per destination: endpoint-dependent.
            postrouting.push(format!("oifname \"{wan}\" masquerade fully-random"));
        }
        (NatType::SymmetricSequential, _) => {
            // The next port per new conntrack entry (the counter advances once per flow: the nat
            // chain sees only a flow's first packet). Through a map because nftables would put
            // the counter's host-order bytes straight into the port (1024, 1025 become 4, 260).
            let ports: Vec<String> = (0..SEQUENTIAL_PORTS)
                .map(|i| format!("{i} : {}", SEQUENTIAL_PORT_BASE + i))
                .collect();
            let ports = ports.join(", ");
            postrouting.extend(snat_each(&|_| {
                format!("numgen inc mod {SEQUENTIAL_PORTS} map {{ {ports} }}")
            }));
        }
        (_, PortMapping::Masquerade) => {
            postrouting.push(format!("oifname \"{wan}\" masquerade"));
        }
        (_, PortMapping::Hashed { seed }) => {
            postrouting.extend(snat_each(&|proto| {
                format!(
                    "jhash ip saddr . {proto} sport mod {HASHED_PORT_SPAN} seed {seed:#x} offset \
                     {HASHED_PORT_BASE}"
                )
            }));
        }
    }
    t.chain(
        "postrouting",
        "nat hook postrouting priority srcnat",
        &postrouting,
    );
    if nat == NatType::FullCone {
        // Runs after source NAT (priority srcnat + 10), so `udp sport` is the public port; the
        // conntrack original tuple still holds the inside endpoint. Only packets that start or
        // continue an inside-initiated flow teach the map (not replies to outside senders).
        t.chain(
            "fullcone_learn",
            "filter hook postrouting priority srcnat + 10",
            &[format!(
                "oifname \"{wan}\" ct direction original meta l4proto udp update @fullcone {{ udp \
                 sport timeout {fullcone_timeout_s}s : ct original ip saddr . ct original proto-src }}"
            )],
        );
    }
    // The router's own firewall, as on home routers: nothing from outside reaches the router
    // itself unless it belongs to a known flow. Dropping here, before conntrack confirms the
    // packet, matters for NAT behaviour: without it an unsolicited packet to a public port would
    // leave a conntrack entry (outside -> router) behind, and when the inside host then sends to
    // that same outside endpoint `masquerade` finds the port taken and picks another one. Two
    // port-restricted peers could then never punch unless their first packets crossed in flight.
    // `PortRestrictedOpen` models the routers without it.
    if nat.input_firewall() {
        t.chain(
            "input",
            "filter hook input priority filter",
            &only_replies_from(wan),
        );
    }
    if nat == NatType::UdpBlocked {
        t.chain(
            "forward",
            "filter hook forward priority filter",
            &["meta l4proto udp drop"],
        );
    }
    Some(t.finish())
}

/// Rules that admit traffic arriving on `iface` only as part of a known flow (replies).
pub(crate) fn only_replies_from(iface: &str) -> [String; 2] {
    [
        format!("iifname \"{iface}\" ct state established,related accept"),
        format!("iifname \"{iface}\" drop"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

    /// The ruleset of a router type, with the default full-cone timeout.
    fn rules(nat: NatType, mapping: PortMapping) -> String {
        ruleset(nat, WAN_IP, mapping, 120).expect("router type")
    }

    #[test]
    fn names_round_trip() {
        for t in NatType::ALL {
            assert_eq!(t.name().parse::<NatType>(), Ok(t));
        }
        assert!("cone".parse::<NatType>().is_err());
    }

    #[test]
    fn no_router_no_rules() {
        assert_eq!(
            ruleset(NatType::None, WAN_IP, PortMapping::Masquerade, 120),
            None
        );
    }

    #[test]
    fn port_restricted_is_plain_masquerade() {
        let r = rules(NatType::PortRestricted, PortMapping::Masquerade);
        assert_eq!(
            r,
            "table ip netlab\ndelete table ip netlab\ntable ip netlab {\n  chain prerouting {\n    \
             type nat hook prerouting priority dstnat; policy accept;\n  }\n  chain postrouting {\n    \
             type nat hook postrouting priority srcnat; policy accept;\n    oifname \"wan\" \
             masquerade\n  }\n  chain input {\n    type filter hook input priority filter; policy \
             accept;\n    iifname \"wan\" ct state established,related accept\n    iifname \"wan\" \
             drop\n  }\n}\n"
        );
    }

    #[test]
    fn symmetric_is_random_even_after_rebind() {
        for mapping in [PortMapping::Masquerade, PortMapping::Hashed { seed: 7 }] {
            let r = rules(NatType::Symmetric, mapping);
            assert!(r.contains("masquerade fully-random\n"), "{r}");
            assert!(!r.contains("jhash"), "{r}");
        }
    }

    #[test]
    fn full_cone_learns_after_snat_and_dnats_inbound() {
        let r = rules(NatType::FullCone, PortMapping::Masquerade);
        assert!(r.contains("dnat ip to udp dport map @fullcone"), "{r}");
        assert!(r.contains("priority srcnat + 10"), "{r}");
        assert!(r.contains("ct direction original"), "{r}");
    }

    #[test]
    fn hashed_mapping_names_seed_and_wan_address() {
        let r = ruleset(
            NatType::FullCone,
            WAN_IP,
            PortMapping::Hashed { seed: 0xab },
            45,
        )
        .expect("router type");
        assert!(r.contains("timeout 45s"), "{r}");
        assert!(
            r.contains(
                "snat ip to 198.18.1.1 : jhash ip saddr . udp sport mod 30000 seed 0xab offset 1024"
            ),
            "{r}"
        );
    }

    #[test]
    fn open_router_has_no_input_firewall_but_the_same_nat() {
        let open = rules(NatType::PortRestrictedOpen, PortMapping::Masquerade);
        let closed = rules(NatType::PortRestricted, PortMapping::Masquerade);
        assert!(!open.contains("hook input"), "{open}");
        assert!(closed.contains("hook input"), "{closed}");
        let postrouting = |r: &str| r[r.find("chain postrouting").expect("chain")..].to_owned();
        assert_eq!(
            postrouting(&open),
            postrouting(&closed)
                .split("  chain input")
                .next()
                .expect("prefix")
                .to_owned()
                + "}\n"
        );
    }

    #[test]
    fn sequential_symmetric_counts_ports_per_flow() {
        let r = rules(
            NatType::SymmetricSequential,
            PortMapping::Hashed { seed: 3 },
        );
        assert!(
            r.contains(
                "udp snat ip to 198.18.1.1 : numgen inc mod 256 map { 0 : 40000, 1 : 40001,"
            ),
            "{r}"
        );
        assert!(r.contains("255 : 40255 }"), "{r}");
        assert!(!r.contains("jhash"), "a rebind keeps it sequential: {r}");
        assert!(r.contains("hook input"), "{r}");
    }

    #[test]
    fn theory_of_direct_paths() {
        use NatType::*;
        assert!(PortRestrictedOpen.direct_possible_with(PortRestricted));
        assert!(Symmetric.direct_possible_with(FullCone));
        assert!(None.direct_possible_with(SymmetricSequential));
        assert!(SymmetricSequential.direct_possible_with(PortRestrictedOpen));
        assert!(SymmetricSequential.birthday_with(PortRestrictedOpen));
        assert!(PortRestricted.birthday_with(Symmetric));
        assert!(
            !Symmetric.birthday_with(FullCone),
            "full cone admits the hard side"
        );
        assert!(!PortRestricted.birthday_with(PortRestrictedOpen));
        assert!(!Symmetric.direct_possible_with(SymmetricSequential));
        assert!(!SymmetricSequential.direct_possible_with(Symmetric));
        assert!(SymmetricSequential.direct_possible_with(SymmetricSequential));
        assert!(SymmetricSequential.sweep_with(SymmetricSequential));
        assert!(!SymmetricSequential.birthday_with(SymmetricSequential));
        assert!(!Symmetric.sweep_with(SymmetricSequential));
        assert!(!UdpBlocked.direct_possible_with(None));
        for a in NatType::ALL {
            for b in NatType::ALL {
                assert_eq!(a.direct_possible_with(b), b.direct_possible_with(a));
            }
        }
    }

    #[test]
    fn hairpin_sends_lan_traffic_for_the_public_address_back_in() {
        let r = ruleset_with(
            NatType::FullCone,
            WAN_IP,
            PortMapping::Masquerade,
            120,
            true,
        )
        .expect("router type");
        assert!(
            r.contains("iifname \"lan\" ip daddr 198.18.1.1 meta l4proto udp dnat ip to udp dport map @fullcone"),
            "{r}"
        );
        assert!(
            r.contains("oifname \"lan\" ct status dnat ip saddr 100.64.0.0/10 masquerade"),
            "{r}"
        );
        assert!(!rules(NatType::FullCone, PortMapping::Masquerade).contains("iifname \"lan\""));
    }

    #[test]
    fn udp_blocked_drops_forwarded_udp() {
        let r = rules(NatType::UdpBlocked, PortMapping::Masquerade);
        assert!(r.contains("hook forward"), "{r}");
        assert!(r.contains("meta l4proto udp drop"), "{r}");
    }
}
