//! NAT lab integration tests on the real kernel: each NAT type measures as named, hole punching
//! succeeds and fails where NAT theory says, rebinding moves mappings, link shaping delays and
//! drops, and labs leave nothing behind. Run as root (`require_lab!` skips otherwise, except in CI).

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use netlab::probe::{self, ProbeOptions};
use netlab::stack_check::recv_from;
use netlab::{FilteringKind, Lab, LabConfig, LinkShape, MappingKind, NatType, Side};

fn lab(a: NatType, b: NatType) -> Result<Lab> {
    Lab::new(LabConfig::new(a, b))
}

/// A UDP socket bound in peer `side`'s namespace, usable from any thread.
fn peer_socket(lab: &Lab, side: Side) -> Result<UdpSocket> {
    Ok(lab.run_in(&lab.peer_ns(side), || UdpSocket::bind("0.0.0.0:0"))??)
}

/// The public address `sock` gets towards the relay.
fn public_addr(lab: &Lab, sock: &UdpSocket) -> Result<SocketAddrV4> {
    probe::observed_addr(sock, lab.probe_server(), lab.probe_options())?
        .context("no reply from the probe server")
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn none_is_public_and_open() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::None, NatType::None)?;
    assert_eq!(lab.router_ns(Side::A), None);
    assert_eq!(
        lab.check_mapping(Side::A)?,
        MappingKind::EndpointIndependent
    );
    assert_eq!(
        lab.check_filtering(Side::A)?,
        FilteringKind::EndpointIndependent
    );
    let report = lab.self_check(Side::A)?;
    let udp = report.udp.context("UDP works without NAT")?;
    assert!(!udp.translated, "{report}");
    assert_eq!(udp.observed[0], report.peer, "no NAT: seen as itself");
    assert_eq!(*report.peer.ip(), lab.peer_ip(Side::A));
    assert!(report.peer.ip().octets()[..2] == [198, 18], "{report}");
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn full_cone_maps_independently_and_admits_strangers() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::FullCone, NatType::None)?;
    let (local_port, seen) = lab.probe_mapping(Side::A)?;
    let seen = seen.context("UDP works through a full cone")?;
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    assert_eq!(*seen[0].ip(), lab.public_ip(Side::A));
    // Field-notes caveat: masquerade need not keep the port. What matters is that it is the same
    // for every destination; here (one inside host, no clashes) it is also kept.
    assert_eq!(
        seen[0].port(),
        local_port,
        "observed: masquerade kept the inside port"
    );
    let filtering = lab.probe_filtering(Side::A)?.context("filtering probe")?;
    assert!(
        filtering.alt_addr_reached,
        "stranger must reach a full-cone mapping: {filtering:?}"
    );
    assert!(filtering.alt_port_reached, "{filtering:?}");
    lab.self_check(Side::A)?;
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn port_restricted_maps_independently_and_filters_strangers() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::PortRestricted, NatType::None)?;
    assert_eq!(
        lab.check_mapping(Side::A)?,
        MappingKind::EndpointIndependent
    );
    let filtering = lab.probe_filtering(Side::A)?.context("filtering probe")?;
    assert!(
        !filtering.alt_addr_reached,
        "stranger reached a port-restricted mapping: {filtering:?}"
    );
    assert!(
        !filtering.alt_port_reached,
        "other port reached a port-restricted mapping: {filtering:?}"
    );
    assert_eq!(*filtering.observed.ip(), lab.public_ip(Side::A));
    lab.self_check(Side::A)?;
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn symmetric_maps_per_destination() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::Symmetric, NatType::None)?;
    let (_, seen) = lab.probe_mapping(Side::A)?;
    let seen = seen.context("UDP works through symmetric NAT")?;
    assert_ne!(
        seen[0].port(),
        seen[1].port(),
        "other address, same port: {seen:?}"
    );
    assert_ne!(
        seen[0].port(),
        seen[2].port(),
        "same address, other port: {seen:?}"
    );
    assert_eq!(lab.check_mapping(Side::A)?, MappingKind::EndpointDependent);
    assert_eq!(
        lab.check_filtering(Side::A)?,
        FilteringKind::AddressAndPortDependent
    );
    lab.self_check(Side::A)?;
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn udp_blocked_drops_udp_but_passes_tcp() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::UdpBlocked, NatType::None)?;
    assert_eq!(lab.probe_udp(Side::A)?, None, "UDP must get no reply");
    assert!(lab.check_mapping(Side::A).is_err());
    let tcp = lab
        .probe_tcp(Side::A)?
        .context("TCP to the relay must work")?;
    assert_eq!(*tcp.ip(), lab.public_ip(Side::A), "TCP is NATed");
    // Side B (no NAT) is unaffected.
    assert!(lab.probe_udp(Side::B)?.is_some());
    lab.self_check(Side::A)?;
    Ok(())
}

/// Both peers learn their public address from the relay, then send to each other every 20 ms,
/// each answering the address it last heard the other from (as ICE does with peer-reflexive
/// candidates). Returns (A heard B, B heard A).
fn punch(lab: &Lab) -> Result<(bool, bool)> {
    punch_with_ttl(lab, None)
}

/// [`punch`], each side first sending one datagram with `low_ttl` (if set) to open its own
/// NAT's mapping without reaching the other side's router, then the usual probes.
fn punch_with_ttl(lab: &Lab, low_ttl: Option<u32>) -> Result<(bool, bool)> {
    let sa = peer_socket(lab, Side::A)?;
    let sb = peer_socket(lab, Side::B)?;
    let mut to_b = public_addr(lab, &sb)?;
    let mut to_a = public_addr(lab, &sa)?;
    if let Some(ttl) = low_ttl {
        for (s, to) in [(&sa, to_b), (&sb, to_a)] {
            s.set_ttl(ttl)?;
            s.send_to(b"open my mapping", to)?;
            s.set_ttl(64)?;
        }
    }
    for s in [&sa, &sb] {
        s.set_nonblocking(true)?;
    }
    let (mut a_heard, mut b_heard) = (false, false);
    let mut buf = [0u8; 64];
    for _ in 0..15 {
        sa.send_to(b"punch from A", to_b)?;
        sb.send_to(b"punch from B", to_a)?;
        std::thread::sleep(Duration::from_millis(20));
        while let Ok((n, SocketAddr::V4(from))) = recv_from(&sa, &mut buf) {
            if &buf[..n] == b"punch from B" {
                a_heard = true;
                to_b = from;
            }
        }
        while let Ok((n, SocketAddr::V4(from))) = recv_from(&sb, &mut buf) {
            if &buf[..n] == b"punch from A" {
                b_heard = true;
                to_a = from;
            }
        }
        if a_heard && b_heard {
            break;
        }
    }
    Ok((a_heard, b_heard))
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn hole_punching_works_where_nat_theory_says() -> Result<()> {
    netlab::require_lab!(Ok(()));
    use NatType::*;
    // (A, B, both directions get through?)
    let cases = [
        (PortRestricted, PortRestricted, true),
        (FullCone, Symmetric, true),
        (PortRestricted, None, true),
        (PortRestricted, Symmetric, false),
        (Symmetric, Symmetric, false),
        // Routers that accept inbound to themselves: A's first datagram reaches router B before
        // B has sent and leaves a conntrack entry (A -> router B) there; B's own flow to A then
        // clashes with it and is given another public port, which router A does not expect.
        (PortRestrictedOpen, PortRestrictedOpen, false),
        (PortRestricted, SymmetricSequential, false),
    ];
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = cases
            .iter()
            .map(|&(a, b, want)| {
                s.spawn(move || -> Result<()> {
                    let lab = lab(a, b)?;
                    let (a_heard, b_heard) = punch(&lab)?;
                    assert_eq!(
                        a_heard && b_heard,
                        want,
                        "punching {a} x {b}: A heard B {a_heard}, B heard A {b_heard}"
                    );
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
        }
        Ok(())
    })
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn naive_punching_between_open_routers_leaves_a_clashing_entry_and_low_ttl_avoids_it() -> Result<()>
{
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::PortRestrictedOpen, NatType::PortRestrictedOpen)?;
    assert_eq!(punch(&lab)?, (false, false));
    // The evidence: router B holds an entry for A's datagram addressed to the router itself
    // (which B's own flow to A then clashed with).
    let rb = lab.router_ns(Side::B).expect("router B");
    let mut cmd = std::process::Command::new("conntrack");
    cmd.args(["-L", "-p", "udp"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let out = lab.spawn(&rb, cmd)?.wait_with_output()?;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let a_pub = lab.public_ip(Side::A);
    let b_pub = lab.public_ip(Side::B);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("udp") && l.contains(&format!("src={a_pub} dst={b_pub}"))),
        "no inbound entry from A to router B:\n{table}"
    );
    // Fresh lab, same routers: a first datagram with TTL 2 crosses the sender's own router
    // (which maps it) and dies at the transit router, so neither router sees the other's flow
    // before its own and both directions get through.
    let lab = self::lab(NatType::PortRestrictedOpen, NatType::PortRestrictedOpen)?;
    assert_eq!(punch_with_ttl(&lab, Some(2))?, (true, true));
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn conntrack_flush_and_rebind_move_mappings_as_documented() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::PortRestricted, NatType::Symmetric)?;
    let relay2 = SocketAddrV4::new(lab.relay_ip2(), netlab::PROBE_PORT);

    // Port-restricted (masquerade): the inside port is kept, and a flush alone gives it back.
    let sock = peer_socket(&lab, Side::A)?;
    let local = sock.local_addr()?.port();
    let before = public_addr(&lab, &sock)?;
    assert_eq!(before.port(), local);
    lab.flush_conntrack(Side::A)?;
    let after_flush = public_addr(&lab, &sock)?;
    assert_eq!(
        after_flush, before,
        "observed: masquerade re-picks the free inside port"
    );

    // A rebind really moves the mapping, and the NAT stays endpoint-independent and filtering.
    lab.rebind(Side::A)?;
    let rebound = public_addr(&lab, &sock)?;
    assert_ne!(
        rebound.port(),
        before.port(),
        "rebind must move the public port"
    );
    assert_eq!(*rebound.ip(), lab.public_ip(Side::A));
    let to_relay2 = probe::observed_addr(&sock, relay2, lab.probe_options())?;
    assert_eq!(
        to_relay2,
        Some(rebound),
        "still endpoint-independent after rebind"
    );
    lab.self_check(Side::A)?;
    lab.rebind(Side::A)?;
    let rebound_again = public_addr(&lab, &sock)?;
    assert_ne!(
        rebound_again.port(),
        rebound.port(),
        "each rebind moves the port again"
    );

    // Symmetric: a flow keeps its random port until a flush; the next flow gets another one.
    let sock = peer_socket(&lab, Side::B)?;
    let first = public_addr(&lab, &sock)?;
    assert_eq!(
        public_addr(&lab, &sock)?,
        first,
        "same flow, same conntrack entry"
    );
    lab.flush_conntrack(Side::B)?;
    let after = public_addr(&lab, &sock)?;
    assert_ne!(
        after.port(),
        first.port(),
        "a flushed symmetric NAT picks a new port"
    );

    assert!(lab.flush_conntrack(Side::A).is_ok());
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn full_cone_rebind_keeps_it_full_cone() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::FullCone, NatType::None)?;
    let sock = peer_socket(&lab, Side::A)?;
    let before = public_addr(&lab, &sock)?;
    lab.rebind(Side::A)?;
    let after = public_addr(&lab, &sock)?;
    assert_ne!(after.port(), before.port());
    lab.self_check(Side::A)?;
    // An outsider reaches the new mapping of the old socket.
    let outsider = peer_socket(&lab, Side::B)?;
    outsider.send_to(b"unsolicited", after)?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 32];
    let (n, from) = recv_from(&sock, &mut buf)?;
    assert_eq!(&buf[..n], b"unsolicited");
    let outsider_port = outsider.local_addr()?.port();
    assert_eq!(
        from,
        SocketAddr::from((lab.peer_ip(Side::B), outsider_port))
    );
    assert!(lab.rebind(Side::B).is_err(), "no router, nothing to rebind");
    Ok(())
}

/// Smallest of a few probe round trips from `sock` to `server`.
fn min_rtt(sock: &UdpSocket, server: SocketAddrV4, opts: ProbeOptions) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let (_, rtt) = probe::probe_rtt(sock, server, opts)?.context("no reply")?;
        best = best.min(rtt);
    }
    Ok(best)
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn delay_applies_to_both_directions_of_each_peer_link() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let plain = lab(NatType::PortRestricted, NatType::None)?;
    let shaped = Lab::new(
        LabConfig::new(NatType::PortRestricted, NatType::None).with_shape(LinkShape::delay(20)),
    )?;
    let base = min_rtt(
        &peer_socket(&plain, Side::A)?,
        plain.probe_server(),
        plain.probe_options(),
    )?;
    // Peer A -> relay crosses router A's shaped WAN link once each way: 2 x 20 ms.
    let sock = peer_socket(&shaped, Side::A)?;
    let rtt = min_rtt(&sock, shaped.probe_server(), shaped.probe_options())?;
    eprintln!("peer A <-> relay: unshaped {base:?}, 20 ms one-way delay {rtt:?}");
    assert!(rtt >= Duration::from_millis(40), "{rtt:?}");
    assert!(rtt < Duration::from_millis(140), "{rtt:?}");
    assert!(base < Duration::from_millis(20), "{base:?}");

    // Peer A -> peer B (public) crosses both shaped links each way: 4 x 20 ms.
    let b = peer_socket(&shaped, Side::B)?;
    let b_addr = SocketAddrV4::new(shaped.peer_ip(Side::B), b.local_addr()?.port());
    let echo = std::thread::spawn(move || -> Result<()> {
        b.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let (n, from) = recv_from(&b, &mut buf)?;
            b.send_to(&buf[..n], from)?;
        }
        Ok(())
    });
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut best = Duration::MAX;
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        let t = Instant::now();
        sock.send_to(b"ping", b_addr)?;
        recv_from(&sock, &mut buf)?;
        best = best.min(t.elapsed());
    }
    echo.join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))?;
    eprintln!("peer A <-> peer B: {best:?}");
    assert!(best >= Duration::from_millis(80), "{best:?}");
    Ok(())
}

/// Receives on `sink` until `idle` passes without a datagram: (count, first arrival, last).
fn drain(sink: &UdpSocket, idle: Duration) -> Result<(usize, Option<Instant>, Option<Instant>)> {
    sink.set_read_timeout(Some(idle))?;
    let mut buf = [0u8; 2048];
    let (mut count, mut first, mut last) = (0, None, None);
    while recv_from(sink, &mut buf).is_ok() {
        let now = Instant::now();
        count += 1;
        first.get_or_insert(now);
        last = Some(now);
    }
    Ok((count, first, last))
}

/// Sends `n` datagrams of `size` bytes from peer A to a sink on the relay and drains it.
fn blast(lab: &Lab, n: usize, size: usize) -> Result<(usize, Option<Instant>, Option<Instant>)> {
    let sink = lab.run_in(&lab.relay_ns(), || UdpSocket::bind((lab.relay_ip(), 5000)))??;
    // The burst must not overflow the sink's default ~200 KiB buffer while its thread waits for
    // a core: that would be the test's loss, not the link's.
    let bytes: libc::c_int = 8 << 20;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int; the socket is open.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sink),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "SO_RCVBUFFORCE: {}",
        std::io::Error::last_os_error()
    );
    let sock = peer_socket(lab, Side::A)?;
    // One answered probe first: ARP is resolved and the path is known good before counting.
    public_addr(lab, &sock)?;
    let receiver = std::thread::spawn(move || drain(&sink, Duration::from_millis(300)));
    let payload = vec![0x5a; size];
    for _ in 0..n {
        sock.send_to(&payload, (lab.relay_ip(), 5000))?;
    }
    receiver
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// A packet counter of interface `dev` as seen inside namespace `ns` (`ip netns exec` remounts
/// /sys for the namespace).
fn counter(ns: &str, dev: &str, name: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{dev}/statistics/{name}");
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat", &path])
        .output()?;
    anyhow::ensure!(out.status.success(), "cat {path} in {ns}: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn loss_drops_about_the_configured_share() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let shape = LinkShape {
        loss_pct: 20.0,
        ..LinkShape::default()
    };
    let lab = Lab::new(LabConfig::new(NatType::None, NatType::None).with_shape(shape))?;
    // Counted on the wire itself, not at a socket, so a receiver that falls behind on a busy
    // machine cannot pass for link loss: frames the link took from peer A's side (its TAP's
    // TX) against frames it delivered to the public side (the bridge port's RX).
    let (peer_ns, public_ns) = (lab.peer_ns(Side::A), lab.public_ns());
    let offered0 = counter(&peer_ns, "eth0", "tx_packets")?;
    let delivered0 = counter(&public_ns, "wa", "rx_packets")?;
    let sent = 500;
    let (got, _, _) = blast(&lab, sent, 100)?;
    let offered = counter(&peer_ns, "eth0", "tx_packets")? - offered0;
    let delivered = counter(&public_ns, "wa", "rx_packets")? - delivered0;
    eprintln!(
        "20 % loss: link took {offered} frames, delivered {delivered}; sink got {got} of {sent}"
    );
    // The probe, its reply and ARP add a few frames to the datagrams.
    assert!(
        (sent as u64..sent as u64 + 10).contains(&offered),
        "{offered}"
    );
    // Binomial(~500, 0.8): mean ~400, sd ~9; the bounds are about 6 sd wide.
    assert!(
        (offered * 68 / 100..=offered * 92 / 100).contains(&delivered),
        "{delivered}"
    );
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn rate_limit_paces_a_burst() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let shape = LinkShape {
        rate_mbit: Some(10.0),
        ..LinkShape::default()
    };
    let lab = Lab::new(LabConfig::new(NatType::None, NatType::None).with_shape(shape))?;
    // 200 frames of 1000 + 42 bytes at 10 Mbit/s take ~167 ms to serialise.
    let (got, first, last) = blast(&lab, 200, 1000)?;
    let span = last
        .zip(first)
        .map(|(l, f)| l - f)
        .context("nothing arrived")?;
    eprintln!("10 Mbit/s: {got} frames over {span:?}");
    assert_eq!(got, 200, "the queue holds the burst");
    assert!(span >= Duration::from_millis(140), "{span:?}");
    assert!(span < Duration::from_secs(1), "{span:?}");
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn link_down_cuts_the_peer_off_and_up_restores_it() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::PortRestricted, NatType::None)?;
    assert!(lab.probe_udp(Side::A)?.is_some());
    lab.set_link(Side::A, false)?;
    assert_eq!(lab.probe_udp(Side::A)?, None);
    lab.set_link(Side::A, true)?;
    assert!(lab.probe_udp(Side::A)?.is_some());
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn run_in_and_spawn_place_work_in_the_namespace() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::PortRestricted, NatType::None)?;
    let peer_ip = lab.peer_ip(Side::A);
    // The private address exists only inside peer A's namespace.
    assert!(
        UdpSocket::bind((peer_ip, 0)).is_err(),
        "test process is outside the lab"
    );
    let bound = lab.run_in(&lab.peer_ns(Side::A), || {
        UdpSocket::bind((peer_ip, 0)).is_ok()
    })?;
    assert!(bound);

    // A tokio runtime built inside run_in: its worker threads are in the namespace too.
    let relay = SocketAddr::V4(lab.probe_server());
    let seen = lab.run_in(&lab.peer_ns(Side::A), move || -> Result<String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            tokio::spawn(async move {
                let sock = tokio::net::UdpSocket::bind((peer_ip, 0)).await?;
                sock.send_to(b"netlab probe 1", relay).await?;
                let mut buf = [0u8; 128];
                let (n, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf))
                    .await??;
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            })
            .await?
        })
    })??;
    assert!(seen.starts_with("netlab seen 1 198.18.1.1:"), "{seen}");

    // A panic inside run_in fails the caller like any assertion.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lab.run_in(&lab.peer_ns(Side::A), || panic!("inside"))
    }));
    assert!(caught.is_err());

    let out = lab
        .spawn(&lab.peer_ns(Side::A), {
            let mut c = Command::new("ip");
            c.args(["-o", "-4", "addr", "show", "dev", "eth0"])
                .stdout(Stdio::piped());
            c
        })?
        .wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{peer_ip}/24")), "{text}");
    Ok(())
}

fn lab_namespaces_with(prefix: &str) -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn drop_kills_children_and_removes_namespaces() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = Lab::new(
        LabConfig::new(NatType::FullCone, NatType::Symmetric).with_shape(LinkShape::delay(1)),
    )?;
    let prefix = lab.prefix().to_owned();
    assert_eq!(
        lab_namespaces_with(&prefix)?.len(),
        6,
        "pub, relay, 2 routers, 2 peers"
    );
    let mut sleeper = lab.spawn(&lab.relay_ns(), {
        let mut c = Command::new("sleep");
        c.arg("30");
        c
    })?;
    let started = Instant::now();
    drop(lab);
    let status = sleeper.wait()?;
    assert!(!status.success(), "killed, not finished: {status}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(lab_namespaces_with(&prefix)?, Vec::<String>::new());
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn panic_while_lab_is_up_still_removes_it() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let prefix = Arc::new(std::sync::Mutex::new(String::new()));
    let reached = Arc::new(AtomicBool::new(false));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = lab(NatType::PortRestricted, NatType::UdpBlocked).expect("lab");
        *prefix.lock().expect("lock") = lab.prefix().to_owned();
        reached.store(true, Ordering::SeqCst);
        panic!("test failure while the lab is up");
    }));
    assert!(result.is_err());
    assert!(reached.load(Ordering::SeqCst));
    let prefix = prefix.lock().expect("lock").clone();
    assert!(!prefix.is_empty());
    assert_eq!(lab_namespaces_with(&prefix)?, Vec::<String>::new());
    Ok(())
}

/// A lab whose process was killed (no drop ran) is removed by the next cleanup.
#[cfg(feature = "cli")]
#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn cleanup_removes_labs_of_dead_processes() -> Result<()> {
    use std::io::BufRead as _;
    netlab::require_lab!(Ok(()));
    let mut up = Command::new(env!("CARGO_BIN_EXE_netlab"))
        .args(["up", "--a", "symmetric", "--b", "none", "--no-check"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = String::new();
    std::io::BufReader::new(up.stdout.take().context("piped")?).read_line(&mut first)?;
    let prefix = first
        .strip_prefix("lab ")
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("unexpected first line {first:?}"))?
        .to_owned();
    up.kill()?; // SIGKILL: the lab is left behind.
    up.wait()?;
    assert_eq!(
        lab_namespaces_with(&prefix)?.len(),
        5,
        "pub, relay, router A, 2 peers"
    );
    // Another test's first lab may be removing the same leftovers right now, so only the
    // outcome is checked, not who removed them.
    netlab::cleanup::remove_stale(false)?;
    assert_eq!(lab_namespaces_with(&prefix)?, Vec::<String>::new());
    Ok(())
}

/// Whether a datagram from `from` to `to` reaches `sock` within 300 ms.
fn reaches(from: &UdpSocket, to: SocketAddr, sock: &UdpSocket) -> Result<bool> {
    from.send_to(b"knock", to)?;
    Ok(netlab::stack_check::receive(sock, b"knock", Duration::from_millis(300))?.is_some())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn udp_timeout_makes_mappings_expire() -> Result<()> {
    netlab::require_lab!(Ok(()));
    let lab = lab(NatType::PortRestricted, NatType::FullCone)?;
    let (relay_ip, relay_ip2) = (lab.relay_ip(), lab.relay_ip2());
    let partner = lab.run_in(&lab.relay_ns(), || UdpSocket::bind((relay_ip, 0)))??;
    let stranger = lab.run_in(&lab.relay_ns(), || UdpSocket::bind((relay_ip2, 0)))??;
    partner.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut peers = Vec::new();
    for side in Side::BOTH {
        lab.set_udp_timeout(side, 1)?;
        let sock = peer_socket(&lab, side)?;
        sock.send_to(b"hello", partner.local_addr()?)?;
        let mut buf = [0u8; 16];
        let (_, public) = recv_from(&partner, &mut buf)?;
        peers.push((side, sock, public));
    }
    // Port-restricted: only the partner gets in. Full cone: anyone. Both while the mapping lives.
    let (_, a_sock, a_pub) = &peers[0];
    let (_, b_sock, b_pub) = &peers[1];
    assert!(reaches(&partner, *a_pub, a_sock)?);
    assert!(!reaches(&stranger, *a_pub, a_sock)?);
    assert!(reaches(&stranger, *b_pub, b_sock)?);
    // Then 1 s of silence from inside: both routers forget.
    std::thread::sleep(Duration::from_millis(1600));
    assert!(
        !reaches(&partner, *a_pub, a_sock)?,
        "port-restricted mapping outlived its timeout"
    );
    assert!(
        !reaches(&stranger, *b_pub, b_sock)?,
        "full-cone mapping outlived its timeout"
    );
    assert!(lab.set_udp_timeout(Side::A, 0).is_err());
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn a_shared_lan_switches_between_its_peers_and_hairpins_only_when_asked() -> Result<()> {
    netlab::require_lab!(Ok(()));
    for (nat, hairpin) in [(NatType::PortRestricted, false), (NatType::FullCone, true)] {
        let lab = Lab::new(LabConfig::shared_lan(nat, hairpin))?;
        assert_eq!(lab.public_ip(Side::A), lab.public_ip(Side::B), "one router");
        let sa = peer_socket(&lab, Side::A)?;
        let sb = peer_socket(&lab, Side::B)?;
        // Over the LAN: straight to the other peer's own address.
        let a_local = SocketAddr::from((lab.peer_ip(Side::A), sa.local_addr()?.port()));
        assert!(reaches(&sb, a_local, &sa)?, "{nat}: B reaches A on the LAN");
        // Through the router's public address: only when it hairpins.
        let a_public = SocketAddr::V4(public_addr(&lab, &sa)?);
        assert_eq!(
            reaches(&sb, a_public, &sa)?,
            hairpin,
            "{nat}: hairpin {hairpin}: B to A's public {a_public}"
        );
    }
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn ipv6_hosts_have_global_addresses_behind_firewalls_that_admit_only_replies() -> Result<()> {
    use netlab::Stack;
    netlab::require_lab!(Ok(()));
    let lab = Lab::new(
        LabConfig::new(NatType::Symmetric, NatType::Symmetric).with_stacks(Stack::Dual, Stack::V6),
    )?;
    let a6 = lab.peer_ip6(Side::A).context("A has IPv6")?;
    let b6 = lab.peer_ip6(Side::B).context("B has IPv6")?;
    let v6_socket = |side: Side| -> Result<UdpSocket> {
        Ok(lab.run_in(&lab.peer_ns(side), || UdpSocket::bind("[::]:0"))??)
    };
    let (sa, sb) = (v6_socket(Side::A)?, v6_socket(Side::B)?);
    let to_a = SocketAddr::from((a6, sa.local_addr()?.port()));
    let to_b = SocketAddr::from((b6, sb.local_addr()?.port()));
    // A stranger (the relay host) cannot reach A's global address unasked.
    let stranger = lab.run_in(&lab.relay_ns(), || UdpSocket::bind("[::]:0"))??;
    assert!(
        !reaches(&stranger, to_a, &sa)?,
        "the firewall drops unsolicited IPv6"
    );
    // No NAT66: what A sends arrives from A's own address; after A has sent to B, B's reply
    // is admitted, and the other way round.
    sa.send_to(b"open", to_b)?; // dropped at B's firewall, but opens A's
    assert!(
        reaches(&sb, to_a, &sa)?,
        "B's datagram to A passes A's firewall"
    );
    assert!(reaches(&sa, to_b, &sb)?, "and A's to B passes B's");
    // IPv4: A is dual-stack behind its NAT; B has none (no route: the send fails).
    assert!(lab.probe_udp(Side::A)?.is_some(), "A has IPv4");
    assert!(lab.probe_udp(Side::B).is_err(), "B has no IPv4");
    Ok(())
}

#[ignore = "NAT lab: needs root, ip, nft, conntrack (apt-get install iproute2 nftables conntrack); run as root with `cargo test -- --ignored` (CI does)"]
#[test]
fn the_stack_self_check_sees_each_family_and_the_ipv6_firewall() -> Result<()> {
    use netlab::Stack;
    netlab::require_lab!(Ok(()));
    // A behind a router (firewalled IPv6), B with no router (open IPv6).
    let config = LabConfig::new(NatType::PortRestrictedOpen, NatType::None);
    for (stacks, v6) in [
        ((Stack::V4, Stack::V4), [false, false]),
        ((Stack::Dual, Stack::V6), [true, true]),
        ((Stack::V6, Stack::Dual), [true, true]),
    ] {
        let lab = Lab::new(config.with_stacks(stacks.0, stacks.1))?;
        for (side, has_v6) in Side::BOTH.into_iter().zip(v6) {
            let report = lab.stack_report(side)?;
            report.verify()?;
            assert_eq!(report.v6.is_some(), has_v6, "{report}");
            if let Some(v6) = report.v6 {
                assert_eq!(v6.seen, Some(v6.own), "no NAT66: {report}");
                assert_eq!(v6.unsolicited_reached, side == Side::B, "{report}");
            }
        }
    }
    Ok(())
}
