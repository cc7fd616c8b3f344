//! Batched UDP sends for the tunnel's egress: every frame decoded from one TCP read leaves in
//! one `sendmmsg(2)` per [`BATCH`] messages instead of one `sendto` each, and runs of equal-size
//! datagrams to one destination go as one UDP GSO message (`UDP_SEGMENT`), which the kernel
//! splits back into the original datagrams. The listen side's per-datagram `sendto` was the
//! tunnel's bottleneck on loopback.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Messages per `sendmmsg` call.
pub const BATCH: usize = 64;
/// Datagrams per GSO message (the kernel's UDP_MAX_SEGMENTS is 64 or more).
const GSO_MAX_SEGMENTS: usize = 64;
/// Payload bytes per GSO message: under the 65,507-byte UDP limit with room to spare.
const GSO_MAX_BYTES: usize = 60_000;
/// `UDP_SEGMENT` (linux/udp.h), not in every libc version.
const UDP_SEGMENT: libc::c_int = 103;

/// How long GSO stays off after the kernel said it has none (`ENOPROTOOPT`: no `UDP_SEGMENT`;
/// `EIO`: the route's device cannot checksum segments). A route can change (another
/// interface, a new device), so it is probed again after this; a failed probe costs one
/// refused `sendmmsg` per interval, nothing measurable.
pub const GSO_REPROBE: Duration = Duration::from_secs(30);

/// Milliseconds since [`epoch`] before which GSO is not tried (0: try it).
static GSO_OFF_UNTIL_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // +1 so that 0 always means "on".
    epoch().elapsed().as_millis() as u64 + 1
}

/// What [`send_all_counted`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams the kernel refused (skipped).
    pub failed: u64,
    /// GSO messages sent (each carrying several datagrams).
    pub gso_messages: u64,
    /// Batches whose GSO send the kernel refused and that went again without GSO.
    pub gso_fallbacks: u64,
}

/// Sends `datagrams` (destination, payload) from `sock`, waiting for room as needed. Returns
/// (sent, failed): a datagram the kernel refuses (an ICMP error pending, no route) is skipped
/// and counted, like a failed `send_to`.
pub async fn send_all(sock: &UdpSocket, datagrams: &[(SocketAddr, Bytes)]) -> (u64, u64) {
    let s = send_all_counted(sock, datagrams).await;
    (s.sent, s.failed)
}

/// [`send_all`], also saying how GSO fared.
pub async fn send_all_counted(sock: &UdpSocket, datagrams: &[(SocketAddr, Bytes)]) -> SendStats {
    let mut st = SendStats::default();
    let mut rest = datagrams;
    while !rest.is_empty() {
        match sock
            .async_io(Interest::WRITABLE, || send_some(sock, rest, &mut st))
            .await
        {
            Ok(n) => {
                st.sent += n as u64;
                rest = &rest[n..];
            }
            Err(_) => {
                // The first message failed (its error is what this call reports): skip its
                // first datagram and carry on.
                st.failed += 1;
                rest = &rest[1..];
            }
        }
    }
    st
}

/// How many datagrams from the front of `d` one message carries, and its segment size.
fn group(d: &[(SocketAddr, Bytes)], gso: bool) -> (usize, usize) {
    let (dest, first) = (&d[0].0, d[0].1.len());
    if !gso || first == 0 {
        return (1, first);
    }
    let (mut n, mut bytes) = (1, first);
    while n < d.len() && n < GSO_MAX_SEGMENTS {
        let len = d[n].1.len();
        if &d[n].0 != dest || len > first || len == 0 || bytes + len > GSO_MAX_BYTES {
            break;
        }
        n += 1;
        bytes += len;
        if len < first {
            // Only the last segment may be shorter.
            break;
        }
    }
    (n, first)
}

/// Control-message room for one `UDP_SEGMENT` (a u16), aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Cmsg([u8; 32]);

/// One non-blocking `sendmmsg`: how many datagrams from the front of `d` went out. When the
/// kernel refuses the first message and it was a GSO one, the same datagrams go again without
/// GSO at once, so nothing is lost. Only a kernel or device without GSO turns it off, and
/// then for [`GSO_REPROBE`]; a refusal that belongs to these datagrams (segments over the
/// route's MTU: `EINVAL`/`EMSGSIZE`) costs this batch one extra call and later batches keep GSO.
fn send_some(sock: &UdpSocket, d: &[(SocketAddr, Bytes)], st: &mut SendStats) -> io::Result<usize> {
    let off_until = GSO_OFF_UNTIL_MS.load(Ordering::Relaxed);
    let gso = off_until == 0 || now_ms() >= off_until;
    match send_some_with(sock, d, gso, st) {
        Err(e)
            if gso
                && group(d, true).0 > 1
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE | libc::ENOPROTOOPT)
                ) =>
        {
            st.gso_fallbacks += 1;
            if matches!(e.raw_os_error(), Some(libc::EIO | libc::ENOPROTOOPT)) {
                GSO_OFF_UNTIL_MS
                    .store(now_ms() + GSO_REPROBE.as_millis() as u64, Ordering::Relaxed);
                tracing::debug!(error = %e, reprobe_in = ?GSO_REPROBE, "UDP GSO unavailable; plain sends until the next probe");
            } else {
                tracing::debug!(error = %e, "UDP GSO refused for this batch; sent it without GSO");
            }
            send_some_with(sock, d, false, st)
        }
        r => {
            if gso && off_until != 0 && r.is_ok() {
                // A probe after GSO_REPROBE went through: on again.
                GSO_OFF_UNTIL_MS.store(0, Ordering::Relaxed);
            }
            r
        }
    }
}

fn send_some_with(
    sock: &UdpSocket,
    d: &[(SocketAddr, Bytes)],
    gso: bool,
    st: &mut SendStats,
) -> io::Result<usize> {
    // Plan the messages: (first datagram index, count, segment size).
    let mut plan = Vec::with_capacity(BATCH);
    let mut at = 0;
    while at < d.len() && plan.len() < BATCH {
        let (n, seg) = group(&d[at..], gso);
        plan.push((at, n, seg));
        at += n;
    }
    let addrs: Vec<socket2::SockAddr> = plan.iter().map(|&(i, _, _)| d[i].0.into()).collect();
    let mut iovs: Vec<libc::iovec> = d[..at]
        .iter()
        .map(|(_, p)| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut cmsgs = vec![Cmsg([0; 32]); plan.len()];
    // SAFETY: CMSG_SPACE/CMSG_LEN are arithmetic.
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize,
            libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize,
        )
    };
    let mut msgs: Vec<libc::mmsghdr> = Vec::with_capacity(plan.len());
    for (k, &(i, n, seg)) in plan.iter().enumerate() {
        // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
        let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
        m.msg_hdr.msg_name = addrs[k].as_ptr() as *mut libc::c_void;
        m.msg_hdr.msg_namelen = addrs[k].len();
        m.msg_hdr.msg_iov = iovs[i..].as_mut_ptr();
        m.msg_hdr.msg_iovlen = n as _;
        if n > 1 {
            m.msg_hdr.msg_control = cmsgs[k].0.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` writable, aligned bytes in `cmsgs[k]`,
            // enough for one header and a u16, so CMSG_FIRSTHDR is non-null and in bounds.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = len as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
            }
        }
        msgs.push(m);
    }
    // SAFETY: every pointer in `msgs` refers to `addrs`, `iovs`, `cmsgs` or payloads in `d`,
    // all alive and unmoved for the duration of the call.
    let sent = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let done = &plan[..sent as usize];
    st.gso_messages += done.iter().filter(|&&(_, n, _)| n > 1).count() as u64;
    Ok(done.iter().map(|&(_, n, _)| n).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(send_all(&tx, &batch).await, (sizes.len() as u64, 0));
        let mut buf = vec![0u8; 70_000];
        for (i, &n) in sizes.iter().enumerate() {
            let (got, _) =
                tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv_from(&mut buf))
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
            let (n, _) =
                tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv_from(&mut buf))
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
    /// every datagram arrives, and the next batch uses GSO again.
    #[tokio::test]
    async fn a_refused_gso_batch_is_resent_and_gso_stays_on() {
        const SO_NO_CHECK: libc::c_int = 11;
        let set_no_check = |sock: &UdpSocket, on: libc::c_int| {
            // SAFETY: setsockopt reads one c_int from the pointer for its length.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_NO_CHECK,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_NO_CHECK: {}", io::Error::last_os_error());
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
        set_no_check(&tx, 1);
        let st = send_all_counted(&tx, &batch(1)).await;
        assert_eq!((st.sent, st.failed), (20, 0), "{st:?}");
        assert_eq!(st.gso_messages, 0, "{st:?}");
        assert!(
            st.gso_fallbacks >= 1,
            "the refused GSO batch was resent: {st:?}"
        );
        expect_all(&rx, 1).await;
        set_no_check(&tx, 0);
        let st = send_all_counted(&tx, &batch(2)).await;
        assert_eq!((st.sent, st.failed), (20, 0), "{st:?}");
        eprintln!("FIGURE GSO after a refused batch: next batch {st:?}");
        assert!(st.gso_messages >= 1, "GSO is used again: {st:?}");
        expect_all(&rx, 2).await;
    }

    #[test]
    fn groups_respect_the_rules() {
        let a: SocketAddr = "127.0.0.1:1".parse().expect("lit");
        let b: SocketAddr = "127.0.0.1:2".parse().expect("lit");
        let d = |v: &[(SocketAddr, usize)]| -> Vec<(SocketAddr, Bytes)> {
            v.iter()
                .map(|&(s, n)| (s, Bytes::from(vec![0; n])))
                .collect()
        };
        assert_eq!(
            group(&d(&[(a, 10), (a, 10), (a, 3), (a, 10)]), true),
            (3, 10)
        );
        assert_eq!(group(&d(&[(a, 10), (b, 10)]), true), (1, 10));
        assert_eq!(group(&d(&[(a, 10), (a, 11)]), true), (1, 10));
        assert_eq!(group(&d(&[(a, 0), (a, 0)]), true), (1, 0));
        assert_eq!(group(&d(&[(a, 10), (a, 10)]), false), (1, 10));
        assert_eq!(group(&d(&[(a, 40_000), (a, 40_000)]), true), (1, 40_000));
        assert_eq!(group(&d(&vec![(a, 100); 100]), true), (64, 100));
    }
}
