//! Socket setup for the tunnel: large UDP receive buffers, TCP_NODELAY, per-flow bind addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::{TcpStream, UdpSocket};
use tracing::debug;

/// A UDP socket with a large receive buffer, bound to `addr`.
pub(crate) fn bind_udp(addr: SocketAddr, recv_buffer: usize) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(false);
    }
    set_recv_buffer(&s, recv_buffer);
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

/// Asks for `size` bytes of receive buffer: forced with CAP_NET_ADMIN, else up to rmem_max.
fn set_recv_buffer(s: &socket2::Socket, size: usize) {
    // Best effort: what the kernel granted is read back and logged below.
    let _ = netkit::sockopt::set_buffer(s, netkit::sockopt::Buffer::Recv, size);
    let got = s.recv_buffer_size().unwrap_or(0);
    if got < size {
        debug!(
            asked = size,
            got, "smaller UDP receive buffer than asked; raise net.core.rmem_max for high rates"
        );
    }
}

/// Sets TCP_NODELAY: a frame must leave now, not after the peer's delayed ACK (the original's
/// ~88 ms per round trip).
pub fn configure_tcp(s: &TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)
}

/// Unspecified address of `ip`'s family, port 0: where per-flow sockets bind.
pub(super) fn any_of(ip: IpAddr) -> SocketAddr {
    match ip {
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    }
}
