//! Batched UDP sends for the tunnel's egress: every frame decoded from one TCP read leaves in
//! as few `sendmmsg(2)` calls as [`BATCH`] allows, runs of equal-size datagrams to one
//! destination as one UDP GSO message. The batching itself is the workspace's shared sender,
//! [`netkit::SendBatch`]; this module adds the wait for a writable socket. The listen side's
//! per-datagram `sendto` was the tunnel's bottleneck on loopback.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

use bytes::Bytes;
use netkit::{SendBatch, SendStats};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Messages per `sendmmsg` call.
pub const BATCH: usize = 64;

/// The message buffers for one UDP socket's batched sends, allocated once.
#[derive(Debug)]
pub struct Sender {
    batch: SendBatch,
}

impl Sender {
    /// Buffers for sends on `sock` (its address family decides how destinations are written).
    pub fn for_socket(sock: &UdpSocket) -> io::Result<Self> {
        Ok(Sender {
            batch: SendBatch::for_socket(sock, BATCH)?,
        })
    }

    /// Sends `datagrams` (destination, payload) from `sock` in order, waiting for room as
    /// needed. A datagram the kernel refuses (an ICMP error pending, no route) is skipped and
    /// counted in [`SendStats::failed`], like a failed `send_to`; a GSO message the kernel
    /// refuses goes again datagram by datagram, so nothing is lost.
    pub async fn send_all(
        &mut self,
        sock: &UdpSocket,
        datagrams: &[(SocketAddr, Bytes)],
    ) -> SendStats {
        let mut total = SendStats::default();
        let mut rest = datagrams;
        while !rest.is_empty() {
            let batch = &mut self.batch;
            let st = sock
                .async_io(Interest::WRITABLE, || {
                    let st = batch.send(sock.as_fd(), rest.iter().map(|(a, p)| (*a, &p[..])));
                    // Nothing went: a full socket. WouldBlock makes tokio wait for room.
                    if st.blocked && st.handled() == 0 {
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(st)
                    }
                })
                .await;
            let st = match st {
                Ok(st) => st,
                Err(e) => {
                    // Only WouldBlock is produced above, and async_io retries it itself; an
                    // error here is the socket's own (its fd closed): nothing more can go.
                    tracing::debug!(error = %e, "UDP egress socket unusable");
                    total.failed += rest.len() as u64;
                    break;
                }
            };
            add(&mut total, &st);
            rest = &rest[st.handled().min(rest.len())..];
        }
        total
    }
}

/// Adds one [`SendBatch::send`]'s counts to a running total.
fn add(total: &mut SendStats, st: &SendStats) {
    total.sent += st.sent;
    total.failed += st.failed;
    total.gso_messages += st.gso_messages;
    total.gso_datagrams += st.gso_datagrams;
    total.gso_fallbacks += st.gso_fallbacks;
    total.gso_error = st.gso_error.or(total.gso_error);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn check(sizes: &[usize]) {
        // A burst of GSO sends lands at once: the receiver needs room for all of it.
        let rx =
            crate::tunnel::bind_udp("127.0.0.1:0".parse().expect("lit"), 8 << 20).expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let to = rx.local_addr().expect("addr");
        let batch: Vec<(SocketAddr, Bytes)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (to, Bytes::from(vec![i as u8; n])))
            .collect();
        let mut sender = Sender::for_socket(&tx).expect("sender");
        let st = sender.send_all(&tx, &batch).await;
        assert_eq!((st.sent, st.failed), (sizes.len() as u64, 0), "{st:?}");
        let mut buf = vec![0u8; 70_000];
        for (i, &n) in sizes.iter().enumerate() {
            let (got, _) = tokio::time::timeout(Duration::from_secs(5), rx.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("datagram {i} of {sizes:?} lost"))
                .expect("recv");
            assert_eq!(&buf[..got], &vec![i as u8; n][..], "datagram {i}");
        }
    }

    /// Boundaries survive however the datagrams are grouped: equal runs (GSO), a shorter last
    /// one, zero-length ones, large ones, more than a batch.
    #[tokio::test]
    async fn every_datagram_arrives_whole_and_in_order() {
        check(&[1200; 150]).await;
        check(&[
            1200, 1200, 1200, 700, 1200, 0, 0, 5, 5, 9, 30_000, 30_000, 30_000, 65_507,
        ])
        .await;
        let mixed: Vec<usize> = (0..300).map(|i| (i * 37) % 1500).collect();
        check(&mixed).await;
    }

    async fn expect_all(rx: &UdpSocket, tag: u8) {
        let mut buf = vec![0u8; 2000];
        let mut got = Vec::new();
        for _ in 0..20 {
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), rx.recv_from(&mut buf))
                .await
                .expect("every datagram arrives")
                .expect("recv");
            got.push(buf[..n].to_vec());
        }
        let want: Vec<Vec<u8>> = (0..20u8).map(|i| vec![tag ^ i; 1200]).collect();
        assert_eq!(got, want);
    }

    /// A GSO send the kernel refuses (here through `SO_NO_CHECK`, which makes every GSO send
    /// fail with `EINVAL`, as segments over the route's MTU do) is sent again without GSO,
    /// every datagram arrives, and once GSO's pause after the refusal is over (shortened here
    /// from netkit's second) the next batch uses GSO again.
    #[tokio::test]
    async fn a_refused_gso_batch_is_resent_and_gso_comes_back() {
        const SO_NO_CHECK: libc::c_int = 11;
        let set_no_check = |sock: &UdpSocket, on: libc::c_int| {
            netkit::sockopt::set_int(sock, libc::SOL_SOCKET, SO_NO_CHECK, on).expect("SO_NO_CHECK");
        };
        let rx =
            crate::tunnel::bind_udp("127.0.0.1:0".parse().expect("lit"), 8 << 20).expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let to = rx.local_addr().expect("addr");
        let batch = |tag: u8| -> Vec<(SocketAddr, Bytes)> {
            (0..20u8)
                .map(|i| (to, Bytes::from(vec![tag ^ i; 1200])))
                .collect()
        };
        let mut sender = Sender::for_socket(&tx).expect("sender");
        sender.batch.set_gso_retry_after(Duration::ZERO);
        set_no_check(&tx, 1);
        let st = sender.send_all(&tx, &batch(1)).await;
        assert_eq!((st.sent, st.failed), (20, 0), "{st:?}");
        assert_eq!(st.gso_messages, 0, "{st:?}");
        assert!(
            st.gso_fallbacks >= 1,
            "the refused GSO batch was resent: {st:?}"
        );
        expect_all(&rx, 1).await;
        set_no_check(&tx, 0);
        let st = sender.send_all(&tx, &batch(2)).await;
        assert_eq!((st.sent, st.failed), (20, 0), "{st:?}");
        eprintln!("FIGURE GSO after a refused batch: next batch {st:?}");
        assert!(st.gso_messages >= 1, "GSO is used again: {st:?}");
        expect_all(&rx, 2).await;
    }
}
