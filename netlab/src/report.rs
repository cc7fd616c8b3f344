//! What the NAT self-checks measure ([`NatReport`]), what each NAT type must measure
//! ([`Expected`]), and the comparison of the two.

use std::fmt;
use std::net::SocketAddrV4;

use anyhow::{bail, Result};

use crate::lab::Side;
use crate::nat::NatType;
use crate::probe::{FilterObservation, FilteringKind, MappingKind};

/// What peer `side`'s UDP looked like to the probe servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpReport {
    /// The public address seen by [`RELAY_IP`](crate::RELAY_IP):[`PROBE_PORT`](crate::PROBE_PORT), [`RELAY_IP2`](crate::RELAY_IP2):[`PROBE_PORT`](crate::PROBE_PORT) and
    /// [`RELAY_IP`](crate::RELAY_IP):[`PROBE_ALT_PORT`](crate::PROBE_ALT_PORT), from one socket.
    pub observed: [SocketAddrV4; 3],
    /// Same public address for all three destinations, or not.
    pub mapping: MappingKind,
    /// Which unsolicited senders reached a second fresh socket's public address.
    pub filtering: FilterObservation,
    /// The public address differs from the socket's own address (a NAT rewrote it).
    pub translated: bool,
}

/// The result of measuring one peer's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatReport {
    /// Which peer.
    pub side: Side,
    /// The NAT type the lab configured for it.
    pub nat: NatType,
    /// The probing socket's own address (the mapping probe's).
    pub peer: SocketAddrV4,
    /// `None`: no UDP reply at all.
    pub udp: Option<UdpReport>,
    /// The address a TCP connection to the relay came from; `None` when it failed.
    pub tcp: Option<SocketAddrV4>,
    /// Whether the router answered an unsolicited datagram from the relay host to its public
    /// address (`false` with no router: nothing to ask).
    pub router_answers: bool,
}

/// How each NAT type must measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// Mapping and filtering, or `None` when UDP must be blocked.
    pub udp: Option<(MappingKind, FilteringKind)>,
    /// Whether the public address differs from the peer's own.
    pub translated: bool,
    /// Whether the router answers an unsolicited datagram to itself (ICMP port unreachable)
    /// instead of dropping it.
    pub router_answers: bool,
    /// Whether one socket's successive flows get successive public ports.
    pub sequential: bool,
}

impl NatType {
    /// What [`Lab::nat_report`](crate::Lab::nat_report) must measure for this type.
    pub fn expected(self) -> Expected {
        use FilteringKind as F;
        use MappingKind as M;
        let (udp, translated) = match self {
            NatType::None => (
                Some((M::EndpointIndependent, F::EndpointIndependent)),
                false,
            ),
            NatType::FullCone => (Some((M::EndpointIndependent, F::EndpointIndependent)), true),
            NatType::PortRestricted | NatType::PortRestrictedOpen => (
                Some((M::EndpointIndependent, F::AddressAndPortDependent)),
                true,
            ),
            NatType::Symmetric | NatType::SymmetricSequential => (
                Some((M::EndpointDependent, F::AddressAndPortDependent)),
                true,
            ),
            NatType::UdpBlocked => (None, true),
        };
        Expected {
            udp,
            translated,
            router_answers: self.has_router() && !self.input_firewall(),
            sequential: self == NatType::SymmetricSequential,
        }
    }
}

impl NatReport {
    /// Checks the measurement against what the configured NAT type must show.
    pub fn verify(&self) -> Result<()> {
        let want = self.nat.expected();
        let got = self.udp.map(|u| (u.mapping, u.filtering.kind()));
        let mut problems = Vec::new();
        if got != want.udp {
            problems.push(match (want.udp, got) {
                (None, Some(_)) => "UDP should be blocked but got replies".to_owned(),
                (Some(_), None) => "UDP got no reply".to_owned(),
                (Some((wm, wf)), Some((gm, gf))) => {
                    format!("expected {wm} mapping / {wf} filtering, measured {gm} / {gf}")
                }
                (None, None) => unreachable!("equal"),
            });
        }
        if let Some(u) = self.udp {
            if u.translated != want.translated {
                problems.push(format!(
                    "address translation expected {}, measured {} ({} seen as {})",
                    want.translated, u.translated, self.peer, u.observed[0]
                ));
            }
        }
        if self.router_answers != want.router_answers {
            problems.push(format!(
                "the router {} unsolicited datagrams to itself, expected it to {}",
                if self.router_answers {
                    "answers"
                } else {
                    "drops"
                },
                if want.router_answers {
                    "answer"
                } else {
                    "drop"
                },
            ));
        }
        if let Some(u) = self.udp {
            let ports = u.observed.map(|a| a.port());
            let sequential = ports.windows(2).all(|w| w[1] == w[0].wrapping_add(1));
            if want.sequential && !sequential {
                problems.push(format!(
                    "expected successive public ports for successive flows, saw {ports:?}"
                ));
            }
        }
        match self.tcp {
            None => problems.push("TCP connect to the relay failed".to_owned()),
            Some(seen) if (seen.ip() != self.peer.ip()) != want.translated => {
                problems.push(format!("TCP source {seen} does not match the NAT type"));
            }
            Some(_) => {}
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!(
                "peer {} behind {} does not behave as named: {}\n{self}",
                self.side,
                self.nat,
                problems.join("; ")
            )
        }
    }
}

impl fmt::Display for NatReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer {} ({}) socket {}: ",
            self.side, self.nat, self.peer
        )?;
        match &self.udp {
            None => write!(f, "UDP blocked")?,
            Some(u) => write!(
                f,
                "UDP seen as {} / {} / {} -> {} mapping; unsolicited alt-port {} alt-addr {} -> {} \
                 filtering",
                u.observed[0],
                u.observed[1],
                u.observed[2],
                u.mapping,
                reach(u.filtering.alt_port_reached),
                reach(u.filtering.alt_addr_reached),
                u.filtering.kind()
            )?,
        }
        match self.tcp {
            Some(a) => write!(f, "; TCP ok, seen as {a}")?,
            None => write!(f, "; TCP failed")?,
        }
        if self.nat.has_router() {
            let r = if self.router_answers {
                "answers"
            } else {
                "drops"
            };
            write!(f, "; router {r} unsolicited")?;
        }
        Ok(())
    }
}

fn reach(b: bool) -> &'static str {
    if b {
        "reached"
    } else {
        "blocked"
    }
}
