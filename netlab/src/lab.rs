//! The lab itself: builds the namespaces, links, addresses and NAT rules of one topology, runs
//! code and processes inside it, measures how its NATs behave, and removes it all on drop.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use tracing::{debug, warn};

use crate::cleanup;
use crate::ipv6::{self, Stack};
use crate::nat::{self, NatType, PortMapping, WAN_IF};
use crate::netns::{
    configure_namespace_with, create_namespace, ip, netns_exec, open_tap_in, write_sysctls,
    Children, NAME_PREFIX,
};
use crate::probe::{ProbeOptions, ProbeServers, PROBE_PORT, RELAY_IP, RELAY_IP2};
use crate::tools::{self, Tools};
use crate::wire::{LinkShape, Wire};

/// One of the two peers (and its router).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Peer A, behind router A.
    A,
    /// Peer B, behind router B.
    B,
}

impl Side {
    /// Both sides, A first.
    pub const BOTH: [Side; 2] = [Side::A, Side::B];

    pub(crate) fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }

    /// The third octet of this side's addresses: 198.18.N.x public, 100.64.N.x private.
    pub(crate) fn octet(self) -> u8 {
        match self {
            Side::A => 1,
            Side::B => 2,
        }
    }

    pub(crate) fn letter(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::A => "A",
            Side::B => "B",
        })
    }
}

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabConfig {
    /// How peer A reaches the public side.
    pub a: NatType,
    /// How peer B reaches the public side.
    pub b: NatType,
    /// Delay/loss/rate applied to each peer site's link to the public segment (router A's and
    /// router B's WAN links, or the peer's own link for [`NatType::None`]), in both directions.
    /// The relay's link is never shaped, so a peer-to-relay round trip crosses one shaped link
    /// twice and a direct peer-to-peer round trip crosses two shaped links twice.
    pub shape: Option<LinkShape>,
    /// Peer B sits on peer A's network, behind router A (100.64.1.3 next to A's 100.64.1.2, one
    /// Ethernet segment), instead of behind a router of its own: two peers on one LAN.
    pub shared_lan: bool,
    /// With [`LabConfig::shared_lan`]: router A hairpins (a packet from the LAN to its public
    /// address and a mapped port goes back in to the owner of that port). Needs a full-cone
    /// router, whose port map says who owns a public port.
    pub hairpin: bool,
    /// Which IP families peer A and peer B have (default: IPv4 only, and no IPv6 anywhere in
    /// the lab); with IPv6 anywhere the relay host and the transit router get it too.
    pub stacks: [Stack; 2],
}

impl LabConfig {
    /// Peer A behind `a`, peer B behind `b`, no shaping.
    pub fn new(a: NatType, b: NatType) -> Self {
        LabConfig {
            a,
            b,
            shape: None,
            shared_lan: false,
            hairpin: false,
            stacks: [Stack::V4; 2],
        }
    }

    /// The same with peer A on `a` and peer B on `b` ([`Stack`]).
    pub fn with_stacks(mut self, a: Stack, b: Stack) -> Self {
        self.stacks = [a, b];
        self
    }

    /// Which families peer `side` has.
    pub fn stack(&self, side: Side) -> Stack {
        self.stacks[side.index()]
    }

    /// Whether any host in the lab has IPv6.
    pub fn uses_ipv6(&self) -> bool {
        self.stacks.iter().any(|s| s.has_v6())
    }

    /// Both peers on one LAN behind one router of type `nat`, which hairpins or not.
    pub fn shared_lan(nat: NatType, hairpin: bool) -> Self {
        LabConfig {
            shared_lan: true,
            hairpin,
            ..LabConfig::new(nat, nat)
        }
    }

    /// The same with `shape` on both peers' links.
    pub fn with_shape(mut self, shape: LinkShape) -> Self {
        self.shape = Some(shape);
        self
    }

    /// The NAT type of `side`.
    pub fn nat(&self, side: Side) -> NatType {
        match side {
            Side::A => self.a,
            Side::B => self.b,
        }
    }
}

/// The prefix length of each public site's link to the transit router (198.18.N.0/24: the relay
/// host is N = 0, side A 1, side B 2).
const SITE_PREFIX_LEN: u8 = 24;

/// The transit router's address on site N's link (198.18.N.254), that site's default gateway.
fn transit_ip(site: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, site, 254)
}
/// The prefix length of each peer's private network (100.64.N.0/24).
const PRIVATE_PREFIX_LEN: u8 = 24;

/// A running NAT lab. Dropping it (also while unwinding from a panic) kills the processes it
/// spawned, stops its threads and deletes its namespaces, which removes every interface and rule.
///
/// Topology (NAT types other than `none`; addresses for side A, B uses .2 instead of .1):
///
/// ```text
///  peer A ns            router A ns                 public ns              relay ns
///  eth0 100.64.1.2 ---- lan 100.64.1.1              (transit router)
///  (default via .1)     wan 198.18.1.1 ----- wa 198.18.1.254
///                       nftables NAT        wb 198.18.2.254
///                       (default via .254)  relay 198.18.0.254 ------- eth0 198.18.0.1, .0.2
///                                                           (probe servers :3478, :3479)
/// ```
///
/// With `none`, peer A's own `eth0` (198.18.1.2) takes the router's place on the public side.
/// The public namespace routes between the sites (one hop, TTL decremented), as the internet
/// does, rather than bridging them.
#[derive(Debug)]
pub struct Lab {
    config: LabConfig,
    prefix: String,
    /// Every namespace created so far, in creation order; deleted in reverse on drop.
    namespaces: Vec<String>,
    /// Spawned children, killed on drop.
    children: Children,
    /// Per side: how the router's rules are set now (they are regenerated on changes).
    routers: Mutex<[RouterState; 2]>,
    servers: Option<ProbeServers>,
    wires: Vec<Wire>,
    pub(crate) probe_opts: ProbeOptions,
    pub(crate) filter_rounds: u32,
}

/// Per-process counter that makes each lab's prefix unique among labs of the same process.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A fresh lab prefix (`nl<pid>x<n>`); the first call of a process also removes leftovers of
/// labs whose process has died.
pub(crate) fn new_prefix() -> String {
    static STALE: Once = Once::new();
    STALE.call_once(|| {
        if let Err(e) = cleanup::remove_stale(false) {
            warn!(error = %e, "could not remove stale lab namespaces");
        }
    });
    format!(
        "{NAME_PREFIX}{}x{}",
        std::process::id(),
        NEXT_LAB.fetch_add(1, Ordering::Relaxed)
    )
}

impl Lab {
    /// Builds a lab. Takes about a tenth of a second; needs root and the tools named in
    /// [`DEBIAN_PACKAGES`](crate::DEBIAN_PACKAGES) (start tests with
    /// [`require_lab!`](crate::require_lab!)).
    ///
    /// The first lab of a process also removes leftovers of labs whose process has died.
    pub fn new(config: LabConfig) -> Result<Lab> {
        if let Some(reason) = tools::lab_unavailable() {
            bail!("netlab cannot run here: {reason}");
        }
        if config.shared_lan && (config.a != config.b || !config.a.has_router()) {
            bail!("a shared LAN needs one router type for both peers, not none: {config:?}");
        }
        if config.hairpin && !(config.shared_lan && config.a == NatType::FullCone) {
            bail!("hairpinning is modelled for a shared LAN behind a full-cone router: {config:?}");
        }
        let prefix = new_prefix();
        let (probe_opts, filter_rounds) = probe_patience(config.shape);
        let mut lab = Lab {
            config,
            prefix,
            namespaces: Vec::new(),
            children: Children::default(),
            routers: Mutex::new([RouterState::default(); 2]),
            servers: None,
            wires: Vec::new(),
            probe_opts,
            filter_rounds,
        };
        // On error `lab` is dropped here, which removes whatever was built so far.
        lab.build()
            .with_context(|| format!("building lab {} ({:?})", lab.prefix, lab.config))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let t = tools::tools_or_err()?;
        let public = self.public_ns();
        let relay = self.relay_ns();
        let v6 = self.config.uses_ipv6();
        self.add_ns_with(t, &public, v6)?;
        // The "internet" is one router hop between any two sites (as on the real internet,
        // where there are several): a packet sent with a TTL that just crosses the sender's own
        // NAT dies here, before it reaches the other side's router (the SDK's low-TTL probes
        // rely on that).
        write_sysctls(&public, &[("net/ipv4/ip_forward", "1")])?;

        self.add_ns_with(t, &relay, v6)?;
        ip(
            t,
            &relay,
            &format!("link add eth0 type veth peer name relay netns {public}"),
        )?;
        ip(
            t,
            &public,
            &format!("addr add {}/{SITE_PREFIX_LEN} dev relay", transit_ip(0)),
        )?;
        ip(t, &public, "link set relay up")?;
        for addr in [RELAY_IP, RELAY_IP2] {
            ip(
                t,
                &relay,
                &format!("addr add {addr}/{SITE_PREFIX_LEN} dev eth0"),
            )?;
        }
        ip(t, &relay, "link set eth0 up")?;
        ip(
            t,
            &relay,
            &format!("route add default via {}", transit_ip(0)),
        )?;
        if v6 {
            self.build_relay_v6(t)?;
        }

        for side in Side::BOTH {
            if !(self.config.shared_lan && side == Side::B) {
                self.build_side(t, side)?;
            }
        }
        self.servers = Some(ProbeServers::start(&relay)?);
        debug!(prefix = %self.prefix, config = ?self.config, "lab up");
        Ok(())
    }

    fn build_side(&mut self, t: &Tools, side: Side) -> Result<()> {
        let public = self.public_ns();
        let peer = self.peer_ns(side);
        let stack = self.config.stack(side);
        // The router carries IPv6 when any peer behind it has it (two on a shared LAN).
        let router_v6 =
            stack.has_v6() || (self.config.shared_lan && self.config.stack(Side::B).has_v6());
        self.add_ns_with(t, &peer, stack.has_v6())?;
        // The namespace and interface that sit on the public segment: the router, or the peer.
        let (site, site_if) = match self.router_ns(side) {
            Some(r) => {
                self.add_ns_with(t, &r, router_v6)?;
                (r, WAN_IF)
            }
            None => (peer.clone(), "eth0"),
        };
        // The site's port on the public bridge.
        let port = format!("w{}", side.letter());
        match self.config.shape {
            None => ip(
                t,
                &site,
                &format!("link add {site_if} type veth peer name {port} netns {public}"),
            )?,
            Some(shape) => {
                let site_tap = open_tap_in(&site, site_if)?;
                let public_tap = open_tap_in(&public, &port)?;
                let name = format!("{}-{port}", self.prefix);
                self.wires
                    .push(Wire::start(site_tap, public_tap, shape, &name)?);
            }
        }
        let transit = transit_ip(side.octet());
        ip(
            t,
            &public,
            &format!("addr add {transit}/{SITE_PREFIX_LEN} dev {port}"),
        )?;
        ip(t, &public, &format!("link set {port} up"))?;
        let public_ip = self.public_ip(side);
        // A peer with no NAT and no IPv4 has no IPv4 address; a router always has one.
        let site_v4 = self.router_ns(side).is_some() || stack.has_v4();
        if site_v4 {
            ip(
                t,
                &site,
                &format!("addr add {public_ip}/{SITE_PREFIX_LEN} dev {site_if}"),
            )?;
        }
        ip(t, &site, &format!("link set {site_if} up"))?;
        if site_v4 {
            ip(t, &site, &format!("route add default via {transit}"))?;
        }
        if router_v6 {
            self.build_side_v6(t, side, &site, site_if)?;
        }

        let (Some(router), Some(lan_ip)) = (self.router_ns(side), self.router_lan_ip(side)) else {
            return Ok(());
        };
        // The peers on this router's network: one on a veth of its own, or (shared LAN) both on
        // a bridge, which switches traffic between them without routing or NAT.
        let members: &[(Side, &str)] = if self.config.shared_lan {
            ip(t, &router, "link add lan type bridge")?;
            &[(Side::A, "la"), (Side::B, "lb")]
        } else {
            &[(side, "lan")]
        };
        for &(member, port) in members {
            let peer = self.peer_ns(member);
            if member != side {
                self.add_ns(t, &peer)?;
            }
            ip(
                t,
                &router,
                &format!("link add {port} type veth peer name eth0 netns {peer}"),
            )?;
            if self.config.shared_lan {
                ip(t, &router, &format!("link set {port} master lan up"))?;
            }
            let member_stack = self.config.stack(member);
            if member_stack.has_v4() {
                let peer_ip = self.peer_ip(member);
                ip(
                    t,
                    &peer,
                    &format!("addr add {peer_ip}/{PRIVATE_PREFIX_LEN} dev eth0"),
                )?;
            }
            ip(t, &peer, "link set eth0 up")?;
            if member_stack.has_v4() {
                ip(t, &peer, &format!("route add default via {lan_ip}"))?;
            }
            if let Some(a) = self.peer_ip6(member) {
                let gw = ipv6::lan_ip6(side.octet(), 1);
                let len = ipv6::PREFIX_LEN;
                ip(t, &peer, &format!("-6 addr add {a}/{len} dev eth0 nodad"))?;
                ip(t, &peer, &format!("-6 route add default via {gw}"))?;
            }
        }
        ip(
            t,
            &router,
            &format!("addr add {lan_ip}/{PRIVATE_PREFIX_LEN} dev lan"),
        )?;
        ip(t, &router, "link set lan up")?;
        if router_v6 {
            self.build_router_v6(t, side, &router)?;
        }
        // Forwarding is a per-namespace setting: only routers forward, and nothing here touches
        // the host's own setting.
        write_sysctls(&router, &[("net/ipv4/ip_forward", "1")])?;
        self.load_rules(t, side)?;
        Ok(())
    }

    fn add_ns(&mut self, t: &Tools, name: &str) -> Result<()> {
        self.add_ns_with(t, name, false)
    }

    fn add_ns_with(&mut self, t: &Tools, name: &str, ipv6: bool) -> Result<()> {
        create_namespace(t, name)?;
        self.namespaces.push(name.to_owned());
        configure_namespace_with(t, name, ipv6)
    }

    /// (Re)loads router `side`'s rules from its current [`RouterState`].
    fn load_rules(&self, t: &Tools, side: Side) -> Result<()> {
        let (Some(router), Some(wan_ip)) = (self.router_ns(side), self.router_wan_ip(side)) else {
            return Ok(());
        };
        let state = self.router_state(side, |s| *s);
        let nat = self.config.nat(side);
        let Some(rules) = nat::ruleset_with(
            nat,
            wan_ip,
            state.mapping,
            state.fullcone_timeout_s,
            self.config.hairpin,
        ) else {
            return Ok(());
        };
        netns_exec(t, &router, &t.nft, &["-f", "-"], Some(&rules))
            .with_context(|| format!("loading NAT rules into {router}:\n{rules}"))?;
        Ok(())
    }

    /// What this lab was built from.
    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    /// The NAT type of `side`.
    pub fn nat(&self, side: Side) -> NatType {
        self.config.nat(side)
    }

    /// The unique start of every namespace name of this lab (`nl<pid>x<n>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every namespace this lab created.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    fn ns_name(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// The "internet": the namespace holding the bridge every public interface plugs into.
    pub fn public_ns(&self) -> String {
        self.ns_name("pub")
    }

    /// The relay host's namespace (addresses [`RELAY_IP`] and [`RELAY_IP2`]); run a relay here.
    pub fn relay_ns(&self) -> String {
        self.ns_name("relay")
    }

    /// The namespace of peer `side`.
    pub fn peer_ns(&self, side: Side) -> String {
        self.ns_name(side.letter())
    }

    /// The namespace of router `side`; `None` when that peer has no NAT.
    pub fn router_ns(&self, side: Side) -> Option<String> {
        let site = self.site(side);
        self.nat(site)
            .has_router()
            .then(|| self.ns_name(&format!("r{}", site.letter())))
    }

    /// The side whose router serves peer `side`: its own, or A's on a shared LAN.
    fn site(&self, side: Side) -> Side {
        if self.config.shared_lan {
            Side::A
        } else {
            side
        }
    }

    /// The relay host's first address (probe servers on ports [`PROBE_PORT`] and
    /// [`PROBE_ALT_PORT`](crate::PROBE_ALT_PORT); other ports are free for tests).
    pub fn relay_ip(&self) -> Ipv4Addr {
        RELAY_IP
    }

    /// The relay host's second address (probe server on [`PROBE_PORT`]).
    pub fn relay_ip2(&self) -> Ipv4Addr {
        RELAY_IP2
    }

    /// The address of peer `side`'s interface: private 100.64.N.2 behind a router, public
    /// 198.18.N.2 with no NAT.
    pub fn peer_ip(&self, side: Side) -> Ipv4Addr {
        if self.config.shared_lan && side == Side::B {
            Ipv4Addr::new(100, 64, Side::A.octet(), 3)
        } else if self.nat(side).has_router() {
            Ipv4Addr::new(100, 64, side.octet(), 2)
        } else {
            Ipv4Addr::new(198, 18, side.octet(), 2)
        }
    }

    /// The public address peer `side`'s traffic comes from: its router's WAN address, or its own.
    pub fn public_ip(&self, side: Side) -> Ipv4Addr {
        self.router_wan_ip(side)
            .unwrap_or_else(|| self.peer_ip(side))
    }

    /// Router `side`'s public address (198.18.N.1); `None` with no NAT.
    pub fn router_wan_ip(&self, side: Side) -> Option<Ipv4Addr> {
        let site = self.site(side);
        self.nat(site)
            .has_router()
            .then(|| Ipv4Addr::new(198, 18, site.octet(), 1))
    }

    /// Router `side`'s address on the peer's network (100.64.N.1, the peer's gateway).
    pub fn router_lan_ip(&self, side: Side) -> Option<Ipv4Addr> {
        let site = self.site(side);
        self.nat(site)
            .has_router()
            .then(|| Ipv4Addr::new(100, 64, site.octet(), 1))
    }

    /// The probe server at [`RELAY_IP`]:[`PROBE_PORT`], for [`observed_addr`](crate::probe::observed_addr).
    pub fn probe_server(&self) -> SocketAddrV4 {
        SocketAddrV4::new(RELAY_IP, PROBE_PORT)
    }

    /// Probe patience fitted to this lab's shaping (longer with delay, more tries with loss).
    pub fn probe_options(&self) -> ProbeOptions {
        self.probe_opts
    }

    crate::netns::namespace_methods!();

    /// Empties router `side`'s connection tracking table (`conntrack -F`): every NAT mapping is
    /// forgotten, and replies to old flows are dropped until the inside sends again.
    ///
    /// What the next packet of an old socket gets depends on the NAT type. Symmetric picks a
    /// new random port. `masquerade` (port-restricted, full-cone, udp-blocked's TCP) keeps the
    /// inside port whenever it is free, so the mapping usually comes back unchanged; use
    /// [`Lab::rebind`] for a mapping that really moves.
    pub fn flush_conntrack(&self, side: Side) -> Result<()> {
        let t = tools::tools_or_err()?;
        let router = self
            .router_ns(side)
            .ok_or_else(|| anyhow!("peer {side} has no router (NAT type none)"))?;
        netns_exec(t, &router, &t.conntrack, &["-F"], None)?;
        Ok(())
    }

    /// Simulates a NAT rebinding on router `side`: every mapping is forgotten and the next flow
    /// of each inside socket leaves from a different public port, while the NAT keeps its
    /// mapping and filtering behaviour.
    ///
    /// Symmetric NAT: a conntrack flush (it already picks random ports). Endpoint-independent
    /// types: the router switches from `masquerade` to a deterministic hashed port mapping with a
    /// fresh seed (one public port per inside endpoint, whatever the destination; ports
    /// 1024-31023), then flushes conntrack. The full-cone map is emptied too.
    pub fn rebind(&self, side: Side) -> Result<()> {
        let t = tools::tools_or_err()?;
        if !self.nat(side).has_router() {
            bail!("peer {side} has no router (NAT type none): nothing to rebind");
        }
        if !self.nat(side).endpoint_dependent_mapping() {
            self.router_state(side, |s| {
                s.mapping = PortMapping::Hashed { seed: s.next_seed };
                s.next_seed = s.next_seed.wrapping_add(1);
            });
            self.load_rules(t, side)?;
        }
        self.flush_conntrack(side)
    }

    /// Makes router `side` forget a UDP mapping after `secs` seconds without traffic (Linux's
    /// defaults: 30 s for a flow that never got a reply, 120 s once it has). Sets both conntrack
    /// UDP timeouts of the router namespace; for a full-cone router also how long its map
    /// remembers the owner of a public port after the last outbound packet (which reloads its
    /// rules, so the map starts empty and relearns from the next outbound packets).
    ///
    /// Lets tests of keepalives and mapping expiry run in seconds instead of minutes.
    pub fn set_udp_timeout(&self, side: Side, secs: u32) -> Result<()> {
        let t = tools::tools_or_err()?;
        anyhow::ensure!(secs > 0, "a UDP timeout of 0 s would drop every reply");
        let router = self
            .router_ns(side)
            .ok_or_else(|| anyhow!("peer {side} has no router (NAT type none)"))?;
        let value = secs.to_string();
        write_sysctls(
            &router,
            &[
                ("net/netfilter/nf_conntrack_udp_timeout", &value),
                ("net/netfilter/nf_conntrack_udp_timeout_stream", &value),
            ],
        )?;
        if self.nat(side) == NatType::FullCone {
            self.router_state(side, |s| s.fullcone_timeout_s = secs);
            self.load_rules(t, side)?;
        }
        Ok(())
    }

    fn router_state<R>(&self, side: Side, f: impl FnOnce(&mut RouterState) -> R) -> R {
        let mut routers = self.routers.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut routers[self.site(side).index()])
    }

    /// Takes peer `side`'s link to the public segment down (`up = false`) or back up: packets
    /// to and from it are dropped meanwhile; NAT state in the router is kept.
    pub fn set_link(&self, side: Side, up: bool) -> Result<()> {
        let t = tools::tools_or_err()?;
        let port = format!("w{}", side.letter());
        let state = if up { "up" } else { "down" };
        ip(t, &self.public_ns(), &format!("link set {port} {state}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.children.kill_all();
        // Threads first: they hold TAP devices and sockets of the namespaces.
        self.servers = None;
        self.wires.clear();
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = cleanup::remove_ns(&ns) {
                warn!(%ns, error = %e, "could not remove lab namespace");
            }
        }
    }
}

/// The settings a router's rules are generated from.
#[derive(Debug, Clone, Copy)]
struct RouterState {
    mapping: PortMapping,
    /// The seed the next [`Lab::rebind`] uses.
    next_seed: u32,
    fullcone_timeout_s: u32,
}

impl Default for RouterState {
    fn default() -> Self {
        RouterState {
            mapping: PortMapping::Masquerade,
            next_seed: 1,
            fullcone_timeout_s: nat::DEFAULT_FULLCONE_TIMEOUT_S,
        }
    }
}

/// Probe patience and filtering rounds for a lab with `shape` on the peers' links.
fn probe_patience(shape: Option<LinkShape>) -> (ProbeOptions, u32) {
    let base = ProbeOptions::default();
    let Some(shape) = shape else {
        return (base, 1);
    };
    let mut opts = ProbeOptions {
        // A probe to the relay crosses one shaped link each way.
        timeout: base.timeout + Duration::from_millis(2 * u64::from(shape.delay_ms)),
        ..base
    };
    let mut rounds = 1;
    if shape.is_lossy() {
        opts.attempts = 10;
        rounds = 3;
    }
    (opts, rounds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{FilteringKind, MappingKind};

    #[test]
    fn lab_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Lab>();
    }

    #[test]
    fn expected_behaviour_per_type() {
        use FilteringKind as F;
        use MappingKind as M;
        assert_eq!(
            NatType::Symmetric.expected().udp,
            Some((M::EndpointDependent, F::AddressAndPortDependent))
        );
        assert_eq!(NatType::UdpBlocked.expected().udp, None);
        assert!(!NatType::None.expected().translated);
    }

    #[test]
    fn shaped_labs_wait_longer_and_retry_more() {
        let (plain, rounds) = probe_patience(None);
        assert_eq!((plain, rounds), (ProbeOptions::default(), 1));
        let (slow, _) = probe_patience(Some(LinkShape::delay(50)));
        assert_eq!(slow.timeout, plain.timeout + Duration::from_millis(100));
        let lossy = LinkShape {
            loss_pct: 10.0,
            ..LinkShape::default()
        };
        let (opts, rounds) = probe_patience(Some(lossy));
        assert!(opts.attempts > plain.attempts && rounds > 1);
    }
}
