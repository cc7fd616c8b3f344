//! The IP-family self-check behind `netlab check`: which families a peer really has
//! ([`Stack`]), and that its global IPv6 address is routed untranslated (no NAT66) behind a
//! firewall that admits only replies (or none, with no router; or no UDP, behind `udp-blocked`).

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::ipv6::Stack;
use crate::lab::{Lab, Side};
use crate::nat::NatType;

/// What peer `side`'s IPv6 looked like from the relay host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V6Observation {
    /// The peer socket's own global address.
    pub own: SocketAddrV6,
    /// The source the relay host saw, `None` when nothing arrived (UDP blocked).
    pub seen: Option<SocketAddrV6>,
    /// The relay host's answer came back through the peer's firewall.
    pub reply_admitted: bool,
    /// A datagram from another port of the relay host, unasked, reached the peer's socket.
    pub unsolicited_reached: bool,
}

/// Which families peer `side` has, measured ([`Lab::stack_report`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackReport {
    /// Which peer.
    pub side: Side,
    /// Its NAT type (IPv4) and router.
    pub nat: NatType,
    /// The families the lab configured.
    pub stack: Stack,
    /// Whether a UDP datagram to the relay host's IPv4 address could be sent at all (a route).
    pub v4_route: bool,
    /// `None`: the peer has no global IPv6 address, or no route to the relay host's.
    pub v6: Option<V6Observation>,
}

/// How long the IPv6 check waits for each datagram: replies in the lab take well under a
/// millisecond, as for the IPv4 probes.
const WAIT: Duration = Duration::from_millis(300);

/// `UdpSocket::recv_from` that retries when a signal interrupts it. A blocking receive with a
/// read timeout is never restarted by the kernel (signal(7)), and tests run next to code that
/// installs signal handlers (tokio's SIGCHLD handler as soon as it spawns a child), so a child
/// exiting anywhere in the process would otherwise fail an unrelated receive with EINTR. Each
/// retry starts the read timeout afresh; signals are rare enough that this stays bounded.
pub fn recv_from(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    loop {
        match sock.recv_from(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Waits up to `wait` for a datagram with exactly the bytes `want` on `sock` (others are
/// skipped) and returns its source; `None` when none came.
pub fn receive(
    sock: &UdpSocket,
    want: &[u8],
    wait: Duration,
) -> std::io::Result<Option<SocketAddr>> {
    sock.set_read_timeout(Some(wait))?;
    let mut buf = [0u8; 32];
    loop {
        match recv_from(sock, &mut buf) {
            Ok((n, from)) if &buf[..n] == want => return Ok(Some(from)),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
    }
}

impl Lab {
    /// Measures which IP families peer `side` has and how its IPv6 is filtered.
    pub fn stack_report(&self, side: Side) -> Result<StackReport> {
        let relay4 = SocketAddr::from((self.relay_ip(), 9));
        let v4_route = self.run_in(&self.peer_ns(side), move || {
            UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"route?", relay4))
        })?;
        let v6 = match self.peer_ip6(side) {
            None => {
                let relay6 = SocketAddr::from((self.relay_ip6(), 9));
                let sent = self.run_in(&self.peer_ns(side), move || {
                    UdpSocket::bind("[::]:0").and_then(|s| s.send_to(b"route?", relay6))
                })?;
                if sent.is_ok() {
                    bail!("peer {side} has no IPv6 address but a route to the relay's");
                }
                None
            }
            Some(ip) => Some(self.observe_v6(side, ip)?),
        };
        Ok(StackReport {
            side,
            nat: self.nat(side),
            stack: self.config().stack(side),
            v4_route: v4_route.is_ok(),
            v6,
        })
    }

    fn observe_v6(&self, side: Side, ip: Ipv6Addr) -> Result<V6Observation> {
        let relay_ip6 = self.relay_ip6();
        let server = self.run_in(&self.relay_ns(), move || {
            UdpSocket::bind(SocketAddrV6::new(relay_ip6, 0, 0, 0))
        })??;
        let stranger = self.run_in(&self.relay_ns(), move || {
            UdpSocket::bind(SocketAddrV6::new(relay_ip6, 0, 0, 0))
        })??;
        let peer = self.run_in(&self.peer_ns(side), || UdpSocket::bind("[::]:0"))??;
        let own = SocketAddrV6::new(ip, peer.local_addr()?.port(), 0, 0);
        peer.send_to(b"hello", server.local_addr()?)?;
        let seen = match receive(&server, b"hello", WAIT)? {
            Some(SocketAddr::V6(a)) => Some(a),
            Some(a) => bail!("an IPv6 datagram arrived from {a}"),
            None => None,
        };
        let mut reply_admitted = false;
        if let Some(from) = seen {
            server.send_to(b"welcome", from)?;
            reply_admitted = receive(&peer, b"welcome", WAIT)?.is_some();
        }
        stranger.send_to(b"knock", own)?;
        let unsolicited_reached = receive(&peer, b"knock", WAIT)?.is_some();
        Ok(V6Observation {
            own,
            seen,
            reply_admitted,
            unsolicited_reached,
        })
    }
}

impl StackReport {
    /// Checks the measurement against the configured stack and NAT type.
    pub fn verify(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.v4_route != self.stack.has_v4() {
            problems.push(format!(
                "IPv4 route {}, expected {}",
                self.v4_route,
                self.stack.has_v4()
            ));
        }
        match (self.stack.has_v6(), self.v6) {
            (false, None) => {}
            (false, Some(_)) => problems.push("has IPv6 although configured without".to_owned()),
            (true, None) => problems.push("no global IPv6 address".to_owned()),
            (true, Some(v6)) => {
                let udp = self.nat != NatType::UdpBlocked;
                match v6.seen {
                    None if udp => problems.push("IPv6 UDP got nowhere".to_owned()),
                    Some(_) if !udp => problems.push("IPv6 UDP should be blocked".to_owned()),
                    Some(seen) if seen != v6.own => {
                        problems.push(format!(
                            "translated: {} seen as {seen} (no NAT66 expected)",
                            v6.own
                        ));
                    }
                    _ => {}
                }
                if udp && !v6.reply_admitted {
                    problems.push("the relay's reply did not get through".to_owned());
                }
                // Only a peer with no router has no firewall in front of it.
                let open = self.nat == NatType::None;
                if v6.unsolicited_reached != open {
                    problems.push(format!(
                        "unsolicited IPv6 {}, expected {}",
                        crate::report::reach(v6.unsolicited_reached),
                        crate::report::reach(open)
                    ));
                }
            }
        }
        crate::report::verdict(
            &problems,
            format_args!(
                "peer {} ({}, {:?}) does not behave as configured",
                self.side, self.nat, self.stack
            ),
            self,
        )
    }
}

impl fmt::Display for StackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer {} ({}, {:?}): IPv4 {}",
            self.side,
            self.nat,
            self.stack,
            if self.v4_route { "routed" } else { "none" }
        )?;
        match self.v6 {
            None => write!(f, "; IPv6 none"),
            Some(v6) => {
                let seen = v6.seen.map_or("nothing".to_owned(), |s| s.to_string());
                write!(
                    f,
                    "; IPv6 {} seen as {seen}, reply {}, unsolicited {}",
                    v6.own,
                    if v6.reply_admitted {
                        "admitted"
                    } else {
                        "dropped"
                    },
                    crate::report::reach(v6.unsolicited_reached)
                )
            }
        }
    }
}
