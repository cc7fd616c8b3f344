//! quinn's UDP socket made safe for QUIC packets far above 1,500 bytes: GSO batches split to
//! what the kernel takes in one send, and a receive buffer sized for what it can deliver.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The most bytes one GSO send may carry: a UDP datagram's length field, 65,535, less the
/// 8-byte UDP header and IPv4's 20-byte header (IPv6 allows 20 more; the smaller holds for
/// both).
pub(crate) const GSO_SEND_BYTES: usize = 65_507;

/// The largest GRO train quinn's receive buffer must hold: the kernel merges at most 64
/// datagrams (`UDP_GRO_CNT_MAX`) and, with the default `gro_max_size`, under 64 KiB; 64
/// datagrams of an ordinary 1,500-byte path (1,472 bytes each) are the most even where an
/// administrator raised `gro_max_size`.
const GRO_TRAIN_BYTES: usize = 64 * 1_472;

/// How many bytes of a GSO batch of `segment`-byte packets go into one send: as many whole
/// segments as fit in [`GSO_SEND_BYTES`], at least one.
pub(crate) fn send_chunk_bytes(segment: usize) -> usize {
    (GSO_SEND_BYTES / segment.max(1)).max(1) * segment.max(1)
}

/// How many `max_payload`-byte segments the receive buffer is sized for: enough for
/// [`GRO_TRAIN_BYTES`].
pub(crate) fn receive_segments(max_payload: usize) -> usize {
    GRO_TRAIN_BYTES.div_ceil(max_payload.max(1)).max(1)
}

/// quinn's own socket for an endpoint whose packets may reach `max_payload` bytes.
///
/// Sending: quinn batches up to 10 packets of the path's current MTU in one GSO send. Above
/// 6,550 bytes a packet, that batch passes 64 KiB and the kernel refuses it (EMSGSIZE), which
/// quinn-udp drops silently and MTU discovery takes for a black hole, falling back to 1,200
/// bytes. Capping quinn's batch by the largest packet instead would also cap it on an ordinary
/// 1,452-byte path, where batches of 10 are what make GSO pay; so a batch over the limit is
/// split here into sends of whole packets that fit, and smaller batches pass untouched.
///
/// Receiving: quinn sizes each of its 32 receive slots as the largest payload times the
/// socket's GRO segment count (64 on Linux): 133 MB at 65,000-byte packets. Every train the
/// kernel delivers fits in [`GRO_TRAIN_BYTES`], so the count is cut to [`receive_segments`]:
/// ~4 MB.
#[derive(Debug)]
pub(crate) struct BigPacketSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    max_receive: usize,
}

impl BigPacketSocket {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, max_payload: usize) -> Self {
        Self {
            inner,
            max_receive: receive_segments(max_payload),
        }
    }
}

impl AsyncUdpSocket for BigPacketSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let segment = match transmit.segment_size {
            Some(segment) if transmit.contents.len() > GSO_SEND_BYTES => segment,
            _ => return self.inner.try_send(transmit),
        };
        // If a later part would block, quinn retries the whole batch once the socket is
        // writable and the parts already sent arrive twice: QUIC drops duplicate packet
        // numbers, and a duplicate costs less than the loss that returning Ok would be.
        for part in transmit.contents.chunks(send_chunk_bytes(segment)) {
            self.inner.try_send(&Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: part,
                segment_size: (part.len() > segment).then_some(segment),
                src_ip: transmit.src_ip,
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments().min(self.max_receive)
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_ordinary_batch_of_ten_fits_one_send_and_big_packets_go_alone() {
        assert_eq!(send_chunk_bytes(1_452), 45 * 1_452);
        assert_eq!(send_chunk_bytes(6_500), 10 * 6_500);
        assert_eq!(send_chunk_bytes(6_551), 9 * 6_551);
        assert_eq!(send_chunk_bytes(65_000), 65_000);
        assert_eq!(receive_segments(65_000), 2);
        assert_eq!(receive_segments(1_452), 65);
    }

    /// A batch of ten 6,600-byte packets (66,000 bytes: one send would be refused) arrives
    /// whole through a real loopback socket.
    #[tokio::test]
    async fn a_batch_over_64_kib_arrives_as_its_packets() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind receiver");
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind sender");
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, tx).expect("wrap");
        assert!(inner.max_transmit_segments() >= 10, "GSO on loopback");
        let socket = Arc::new(BigPacketSocket::new(inner, 65_000));
        let mut poller = socket.clone().create_io_poller();
        let segment = 6_600;
        let batch: Vec<u8> = (0..10 * segment).map(|i| (i / segment) as u8).collect();
        let transmit = Transmit {
            destination: rx.local_addr().expect("addr"),
            ecn: None,
            contents: &batch,
            segment_size: Some(segment),
            src_ip: None,
        };
        // As quinn does: a send that would block waits for the socket to be writable.
        loop {
            match socket.try_send(&transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                        .await
                        .expect("writable");
                }
                r => break r.expect("send"),
            }
        }
        let mut buf = vec![0u8; 65_536];
        for i in 0..10u8 {
            let n = rx
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("packet {i} of 10: {e}"));
            assert_eq!(n, segment, "packet {i}");
            assert!(
                buf[..n].iter().all(|&b| b == i),
                "packet {i} in order, intact"
            );
        }
    }

    proptest! {
        /// Every part is whole packets within the kernel's limit, and the parts are the batch.
        #[test]
        fn parts_are_whole_packets_under_the_limit(segment in 1usize..=65_507, count in 1usize..=10, last in 1usize..=65_507) {
            let last = last.min(segment);
            let len = segment * (count - 1) + last;
            let chunk = send_chunk_bytes(segment);
            prop_assert!(chunk <= GSO_SEND_BYTES);
            prop_assert_eq!(chunk % segment, 0);
            let batch: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let joined: Vec<u8> = batch.chunks(chunk).flatten().copied().collect();
            prop_assert_eq!(joined, batch);
        }

        /// The receive buffer quinn derives (largest payload × segments) holds any GRO train.
        #[test]
        fn the_receive_buffer_holds_a_gro_train(max_payload in 1_200usize..=65_527) {
            prop_assert!(max_payload * receive_segments(max_payload) >= GRO_TRAIN_BYTES);
        }
    }
}
