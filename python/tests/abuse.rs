//! The message stream against a hostile peer, on real peer-sdk connections through a real relay
//! on loopback: a length header past the limit closes the connection with a protocol error, and
//! a peer that floods messages nobody reads fills at most the receive budget (QUIC flow control
//! holds the rest back), while a bystander connection through the same relay stays unaffected.

use std::sync::Arc;
use std::time::Duration;

use _core::frame::{self, FrameError, MAX_MESSAGE_BYTES};
use peer_sdk::{ClientTls, Identity, Options, PeerConnection, ServerTls, Uuid};
use quic_relay::server::{Server, ServerHandle};
use quic_relay::sessions::RelayConfig;
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(30);

fn relay() -> ServerHandle {
    Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        RelayConfig::default(),
        4 << 20,
    )
    .expect("bind relay")
    .spawn()
    .expect("spawn relay")
}

/// A connected pair (listener, dialer) through `relay`.
async fn pair(relay: &ServerHandle) -> (PeerConnection, PeerConnection) {
    let session = Uuid::from_u128(rand_session());
    let id = Identity::generate().expect("identity");
    let pin = id.fingerprint();
    let opts = Options::new(relay.local_addr(), session);
    let peer = peer_sdk::Peer::bind(opts.clone()).await.expect("listener");
    let accept = tokio::spawn(peer.accept(ServerTls::Identity(id)));
    let dialer = peer_sdk::connect(opts, ClientTls::Pinned(pin))
        .await
        .expect("dial");
    let listener = accept.await.expect("join").expect("accept");
    (listener, dialer)
}

fn rand_session() -> u128 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    t ^ (u128::from(std::process::id()) << 64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_header_is_refused() {
    let relay = relay();
    let (listener, dialer) = pair(&relay).await;
    let mut send = dialer.open_uni().await.expect("open");
    send.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .expect("write");
    let mut recv = tokio::time::timeout(WAIT, listener.accept_uni())
        .await
        .expect("stream in time")
        .expect("accept");
    let budget = Arc::new(Semaphore::new(_core::RECV_BUFFER_BYTES));
    let r = frame::read(&mut recv, &budget).await;
    assert!(
        matches!(r, Err(FrameError::TooLarge(l)) if l == u64::from(u32::MAX)),
        "{r:?}"
    );
    assert!(u64::from(u32::MAX) > MAX_MESSAGE_BYTES as u64);
    // Nothing of the claimed 4 GiB was reserved.
    assert_eq!(budget.available_permits(), _core::RECV_BUFFER_BYTES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_nobody_reads_fills_only_the_budget_and_spares_a_bystander() {
    let relay = relay();
    let (listener, dialer) = pair(&relay).await;
    let (b_listener, b_dialer) = pair(&relay).await;
    // The flooder: 1 MiB messages as fast as flow control lets it, 4x the budget in all.
    const MSG: usize = 1 << 20;
    let total = 4 * _core::RECV_BUFFER_BYTES / MSG;
    let flood = tokio::spawn(async move {
        let mut s = dialer.open_uni().await.expect("open");
        let data = vec![7u8; MSG];
        for _ in 0..total {
            if frame::write(&mut s, &data).await.is_err() {
                break;
            }
        }
        dialer
    });
    // The receiver reads into its queue and never hands anything to "Python".
    let mut recv = tokio::time::timeout(WAIT, listener.accept_uni())
        .await
        .expect("stream in time")
        .expect("accept");
    let budget = Arc::new(Semaphore::new(_core::RECV_BUFFER_BYTES));
    let mut held = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(2), frame::read(&mut recv, &budget)).await {
            Ok(Ok(Some(m))) => held.push(m),
            Ok(other) => panic!("the flood stream ended: {other:?}"),
            // Blocked on the budget: the reader stops taking data.
            Err(_) => break,
        }
    }
    let queued: usize = held.iter().map(|(m, _)| m.len).sum();
    assert!(queued <= _core::RECV_BUFFER_BYTES, "queued {queued} bytes");
    assert!(held.len() < total, "the whole flood was queued");
    assert!(budget.available_permits() < _core::MESSAGE_OVERHEAD + MSG);
    // A bystander session through the same relay still round-trips a message at once.
    let mut bs = b_dialer.open_uni().await.expect("open");
    frame::write(&mut bs, b"still here").await.expect("write");
    let mut br = tokio::time::timeout(WAIT, b_listener.accept_uni())
        .await
        .expect("bystander stream in time")
        .expect("accept");
    let b_budget = Arc::new(Semaphore::new(_core::RECV_BUFFER_BYTES));
    let (m, _p) = tokio::time::timeout(WAIT, frame::read(&mut br, &b_budget))
        .await
        .expect("bystander message in time")
        .expect("read")
        .expect("a message");
    let mut out = vec![0u8; m.len];
    m.copy_to(&mut out);
    assert_eq!(out, b"still here");
    // Releasing the queue lets the flood go on.
    drop(held);
    let more = tokio::time::timeout(WAIT, frame::read(&mut recv, &budget))
        .await
        .expect("the reader resumes once the queue drains")
        .expect("read");
    assert!(more.is_some());
    flood.abort();
}
