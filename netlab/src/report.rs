//! What the NAT self-checks measure ([`NatReport`]), what each NAT type must measure
//! ([`Expected`]), and the comparison of the two.

use std::fmt;
use std::net::{SocketAddrV4, UdpSocket};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::lab::{Lab, Side};
use crate::nat::NatType;
use crate::probe::{
    self, FilterObservation, FilteringKind, MappingKind, PROBE_ALT_PORT, PROBE_PORT, RELAY_IP,
    RELAY_IP2,
};

/// The self-checks: how a peer's network behaves, measured from inside the lab.
impl Lab {
    /// From a fresh socket in peer `side`'s namespace, the public address the probe server at
    /// [`RELAY_IP`] sees; `None` when no reply comes (UDP blocked).
    pub fn probe_udp(&self, side: Side) -> Result<Option<SocketAddrV4>> {
        let opts = self.probe_opts;
        self.run_in(&self.peer_ns(side), move || {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            probe::observed_addr(&sock, SocketAddrV4::new(RELAY_IP, PROBE_PORT), opts)
        })?
        .context("UDP probe")
    }

    /// From a fresh socket in peer `side`'s namespace, the public addresses seen by three probe
    /// servers: [`RELAY_IP`]:[`PROBE_PORT`], [`RELAY_IP2`]:[`PROBE_PORT`] and
    /// [`RELAY_IP`]:[`PROBE_ALT_PORT`]. `None` when UDP gets no answer. Also returns the socket's
    /// local port.
    pub fn probe_mapping(&self, side: Side) -> Result<(u16, Option<[SocketAddrV4; 3]>)> {
        let opts = self.probe_opts;
        self.run_in(&self.peer_ns(side), move || -> Result<_> {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            let local_port = sock.local_addr()?.port();
            let mut seen = Vec::with_capacity(3);
            for server in [
                SocketAddrV4::new(RELAY_IP, PROBE_PORT),
                SocketAddrV4::new(RELAY_IP2, PROBE_PORT),
                SocketAddrV4::new(RELAY_IP, PROBE_ALT_PORT),
            ] {
                match probe::observed_addr(&sock, server, opts)? {
                    Some(addr) => seen.push(addr),
                    None if seen.is_empty() => return Ok((local_port, None)),
                    None => bail!("probe server {server} did not answer although another did"),
                }
            }
            let seen: [SocketAddrV4; 3] = seen
                .try_into()
                .map_err(|_| anyhow!("three probes, three answers"))?;
            Ok((local_port, Some(seen)))
        })?
    }

    /// The mapping self-check: does peer `side` keep one public endpoint across destinations?
    /// Errors when UDP gets no answer at all.
    pub fn check_mapping(&self, side: Side) -> Result<MappingKind> {
        let (_, seen) = self.probe_mapping(side)?;
        let seen =
            seen.ok_or_else(|| anyhow!("peer {side}: no UDP reply from the probe servers"))?;
        Ok(mapping_kind(&seen))
    }

    /// The filtering self-check, raw: from a fresh socket, which unsolicited senders reach the
    /// public endpoint it got. `None` when UDP gets no answer.
    pub fn probe_filtering(&self, side: Side) -> Result<Option<FilterObservation>> {
        let (opts, rounds) = (self.probe_opts, self.filter_rounds);
        self.run_in(&self.peer_ns(side), move || {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            probe::observe_filtering(&sock, rounds, opts)
        })?
        .context("UDP filtering probe")
    }

    /// The filtering self-check: who may send to peer `side`'s public endpoint unasked.
    /// Errors when UDP gets no answer at all.
    pub fn check_filtering(&self, side: Side) -> Result<FilteringKind> {
        self.probe_filtering(side)?
            .map(|o| o.kind())
            .ok_or_else(|| anyhow!("peer {side}: no UDP reply from the probe server"))
    }

    /// Connects over TCP from peer `side` to [`RELAY_IP`]:[`PROBE_PORT`]; `Ok(None)` when the
    /// connection fails (TCP blocked or unreachable), else the public address the server saw.
    pub fn probe_tcp(&self, side: Side) -> Result<Option<SocketAddrV4>> {
        let timeout = self.probe_opts.timeout * self.probe_opts.attempts.max(1);
        self.run_in(&self.peer_ns(side), move || {
            probe::observed_tcp_addr(SocketAddrV4::new(RELAY_IP, PROBE_PORT), timeout).ok()
        })
    }

    /// Measures how peer `side`'s network behaves: mapping, filtering, TCP.
    pub fn nat_report(&self, side: Side) -> Result<NatReport> {
        let (local_port, seen) = self.probe_mapping(side)?;
        let udp = match seen {
            None => None,
            Some(seen) => {
                let filtering = self.probe_filtering(side)?.ok_or_else(|| {
                    anyhow!("peer {side}: the filtering probe got no reply, the mapping probe did")
                })?;
                Some(UdpReport {
                    mapping: mapping_kind(&seen),
                    translated: seen[0] != SocketAddrV4::new(self.peer_ip(side), local_port),
                    observed: seen,
                    filtering,
                })
            }
        };
        Ok(NatReport {
            side,
            nat: self.nat(side),
            peer: SocketAddrV4::new(self.peer_ip(side), local_port),
            udp,
            tcp: self.probe_tcp(side)?,
            router_answers: self.probe_router_answers(side)?,
        })
    }

    /// Sends one unsolicited datagram from the relay host to router `side`'s public address
    /// (a port nothing listens on) and reports whether the router answered it (ICMP port
    /// unreachable, seen as `ECONNREFUSED` on a connected socket) rather than dropping it.
    pub fn probe_router_answers(&self, side: Side) -> Result<bool> {
        let Some(wan) = self.router_wan_ip(side) else {
            return Ok(false);
        };
        let opts = self.probe_opts;
        self.run_in(&self.relay_ns(), move || -> Result<bool> {
            let sock = UdpSocket::bind(SocketAddrV4::new(RELAY_IP, 0))?;
            sock.connect(SocketAddrV4::new(wan, UNSOLICITED_PORT))?;
            sock.set_read_timeout(Some(opts.timeout))?;
            let mut buf = [0u8; 16];
            for _ in 0..opts.attempts.max(1) {
                sock.send(b"netlab unsolicited")?;
                match sock.recv(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(true),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e).context("unsolicited probe"),
                    Ok(_) => bail!("router {side} sent data back to an unsolicited datagram"),
                }
            }
            Ok(false)
        })?
    }

    /// Measures peer `side`'s network and checks it behaves as its NAT type says; the error
    /// describes the difference.
    pub fn self_check(&self, side: Side) -> Result<NatReport> {
        let report = self.nat_report(side)?;
        report.verify()?;
        Ok(report)
    }
}

/// The port the router-answers check sends to: discard, which no lab router listens on.
const UNSOLICITED_PORT: u16 = 9;

fn mapping_kind(seen: &[SocketAddrV4; 3]) -> MappingKind {
    if seen.iter().all(|s| *s == seen[0]) {
        MappingKind::EndpointIndependent
    } else {
        MappingKind::EndpointDependent
    }
}

/// What peer `side`'s UDP looked like to the probe servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpReport {
    /// The public address seen by [`RELAY_IP`]:[`PROBE_PORT`], [`RELAY_IP2`]:[`PROBE_PORT`] and
    /// [`RELAY_IP`]:[`PROBE_ALT_PORT`], from one socket.
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
        verdict(
            &problems,
            format_args!(
                "peer {} behind {} does not behave as named",
                self.side, self.nat
            ),
            self,
        )
    }
}

/// A self-check's outcome: `Ok` without problems, else an error that says who failed (`who`),
/// lists the problems and shows the whole `report` below.
pub(crate) fn verdict(
    problems: &[String],
    who: fmt::Arguments<'_>,
    report: &dyn fmt::Display,
) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    bail!("{who}: {}\n{report}", problems.join("; "))
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

/// `reached` or `blocked`, for reports.
pub(crate) fn reach(b: bool) -> &'static str {
    if b {
        "reached"
    } else {
        "blocked"
    }
}
