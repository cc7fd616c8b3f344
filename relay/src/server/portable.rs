//! One datagram per system call, for platforms without `recvmmsg`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::{Outcome, PeerAddr, Server};
use crate::defaults::MAX_DATAGRAM;

pub(super) fn run(server: &mut Server, shutdown: &AtomicBool) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !shutdown.load(Ordering::Relaxed) {
        let received = server.socket.recv_from(&mut buf);
        let now = Instant::now();
        let mut core = crate::tcp::lock(&server.core);
        if let Ok((len, src)) = received {
            let outcome = core.relay.handle(now, PeerAddr::from(src), &buf[..len]);
            if let Outcome::Forward(dst) = outcome {
                if dst.is_tcp() {
                    core.send_tcp(dst, &buf[..len], &server.metrics.tcp);
                } else if server
                    .socket
                    .send_to(&buf[..len], dst.to_socket_addr())
                    .is_err()
                {
                    server
                        .metrics
                        .io
                        .send_errors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            while let Some(t) = core.relay.poll_transmit() {
                if t.dst.is_tcp() {
                    core.send_tcp(t.dst, t.payload.as_bytes(), &server.metrics.tcp);
                } else {
                    let _ = server
                        .socket
                        .send_to(t.payload.as_bytes(), t.dst.to_socket_addr());
                }
            }
        }
        Server::maybe_tick(&server.metrics, now, &mut core);
    }
}
