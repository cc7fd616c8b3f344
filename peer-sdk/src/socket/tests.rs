//! The peer socket's bind on real loopback sockets: port 0 hands every peer a port of its own,
//! and the port stays shareable as the crate docs promise.

use std::collections::HashSet;
use std::net::SocketAddr;

use quinn::AsyncUdpSocket as _;

use super::PeerSocket;

/// Enough binds that Linux's port-0 pick, were the sharing flags set before the bind, would
/// hand two of them the same port: about 6 times expected over its ~28,000 ephemeral ports
/// (18 in 1,000 measured), so this passes by luck about once in 600 runs.
const BINDS: usize = 600;

#[tokio::test]
async fn port_zero_gives_every_peer_its_own_port_and_the_port_stays_shareable() {
    let relay: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let bind: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut held = Vec::with_capacity(BINDS);
    let mut ports = HashSet::with_capacity(BINDS);
    for _ in 0..BINDS {
        let (socket, control) = PeerSocket::bind(bind, relay, None).expect("bind");
        let port = socket.local_addr().expect("local address").port();
        assert!(ports.insert(port), "port {port} handed out twice");
        held.push((socket, control));
    }
    // What the crate docs offer: another socket with both flags may share the port.
    let port = held[0].0.local_addr().expect("local address").port();
    let other =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    other.set_reuse_address(true).expect("SO_REUSEADDR");
    other.set_reuse_port(true).expect("SO_REUSEPORT");
    other
        .bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("share the peer's port");
}
