//! Batched I/O with `recvmmsg`/`sendmmsg`.

use std::mem::{size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use netkit::{Dest, SendBatch};
use tracing::warn;

use super::{Outcome, PeerAddr, Server};
use crate::defaults::{BATCH, MAX_DATAGRAM};
use crate::tcp::lock;

/// Messages per `sendmmsg`: up to one forward or two replies (an ACK and a peer notice) per
/// received datagram. A GRO buffer holds up to 64 datagrams; a batch that fills up goes out
/// as the next datagram is added.
const MAX_SENDS: usize = 3 * BATCH;

/// The first 12 octets of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
const V4_MAPPED: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];

fn to_peer(ss: &libc::sockaddr_storage) -> Option<PeerAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in when the family is AF_INET.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            // IPv4-mapped, built directly: s_addr is in network order, as the octets are.
            let mut ip = V4_MAPPED;
            ip[12..].copy_from_slice(&sin.sin_addr.s_addr.to_ne_bytes());
            Some(PeerAddr::from_octets(ip, u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 when the family is AF_INET6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(PeerAddr::from_octets(
                sin6.sin6_addr.s6_addr,
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// How long the loop lets datagrams gather after a partial batch (see the loop). Small next
/// to any real path's delay; it roughly halves the relay's CPU per datagram at 50k/s.
const COALESCE: std::time::Duration = std::time::Duration::from_micros(20);

/// `UDP_GRO` (linux/udp.h): with this socket option the kernel hands over a burst of
/// equal-size datagrams from one source as one buffer, with a control message carrying the
/// segment size. A QUIC sender's GSO batch then crosses the relay whole: one receive, one
/// GSO send, instead of being cut into datagrams on the way in and glued on the way out.
const UDP_GRO: libc::c_int = 104;

/// Asks for GRO on the relay socket; without it (old kernels) every datagram comes alone.
fn enable_gro(fd: libc::c_int) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: a valid fd and a pointer to a c_int of the stated size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            UDP_GRO,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}

/// The segment size of a GRO buffer, if the kernel coalesced this one.
#[inline]
fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    if h.msg_controllen == 0 {
        // A datagram that came alone: no control message to walk.
        return None;
    }
    // SAFETY: the kernel filled msg_control (our aligned buffer) and set msg_controllen
    // to what it wrote; CMSG_FIRSTHDR/CMSG_NXTHDR stay within it and return null at its
    // end; a UDP_GRO message carries an int (read unaligned to be safe).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let seg = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(seg).ok().filter(|&s| s > 0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// `recvmmsg(2)` with `MSG_WAITFORONE` and no timeout (the socket's `SO_RCVTIMEO` applies), as
/// the bare system call ([`netkit::syscall`]): glibc's wrapper is a cancellation point that
/// costs tens of instructions per wake-up in a multi-threaded process.
///
/// # Safety
/// `hdrs` points at `count` valid message headers, as for `recvmmsg`.
// Kept a function of its own (a call per wake-up) so that profiles and the benchmark, which
// counts wake-ups as calls of a function named `recvmmsg`, still see it.
#[inline(never)]
unsafe fn recvmmsg(fd: libc::c_int, hdrs: *mut libc::mmsghdr, count: usize) -> Result<usize, i32> {
    // SAFETY: as the caller promises.
    unsafe { netkit::syscall::recvmmsg(fd, hdrs, count, libc::MSG_WAITFORONE) }
}

/// Room for one `cmsghdr` + an int (the GRO segment size), aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u64; 4]);

/// Counts what one batch of sends did.
fn count_sends(st: &netkit::SendStats, io: &crate::metrics::IoCounters) {
    if st.failed > 0 {
        io.send_errors.fetch_add(st.failed, Ordering::Relaxed);
    }
    if st.gso_messages > 0 {
        io.gso_batches.fetch_add(st.gso_messages, Ordering::Relaxed);
        io.gso_datagrams
            .fetch_add(st.gso_datagrams, Ordering::Relaxed);
    }
    if st.gso_fallbacks > 0 {
        let failures = io
            .gso_failures
            .fetch_add(st.gso_fallbacks, Ordering::Relaxed)
            + st.gso_fallbacks;
        if failures.is_power_of_two() {
            let error = st.gso_error.map(std::io::Error::from_raw_os_error);
            warn!(error = ?error, failures, retry_after = ?netkit::send::GSO_RETRY_AFTER,
                "UDP GSO send failed; sent that burst datagram by datagram");
        }
    }
}

/// The relay's replies are copied into the send batch, which takes this much at most.
const _: () = assert!(crate::proto::MAX_ALT_REPLY_LEN <= netkit::send::MAX_COPY);

pub(super) fn run(server: &mut Server, shutdown: &AtomicBool) {
    // The default 50 us timer slack would stretch the 20 us coalescing wait to ~70 us.
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and affects only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong) };
    let fd = server.socket.as_raw_fd();
    let mut bufs = vec![0u8; BATCH * MAX_DATAGRAM];
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { zeroed() }; BATCH];
    let mut iovs: Vec<libc::iovec> = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0
        };
        BATCH
    ];
    // SAFETY: as above.
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; BATCH];
    let gro = enable_gro(fd);
    tracing::debug!(gro, "UDP receive offload");
    let mut recv_cmsgs: Vec<CmsgBuf> = vec![CmsgBuf([0; 4]); BATCH];
    let mut batch = match SendBatch::for_socket(&server.socket, MAX_SENDS) {
        Ok(b) => b,
        Err(e) => {
            // getsockname on a bound socket does not fail; if it did, nothing could be sent.
            warn!(error = %e, "cannot set up batched sends; relay loop not started");
            return;
        }
    };
    tracing::debug!(
        gso = batch.gso_supported(),
        "UDP segmentation offload for forwarded bursts"
    );
    let metrics = server.metrics.clone();
    let io = &metrics.io;

    // The receive headers point into buffers that never move (none of these vectors
    // grows), so they are set up once; as each received message is read, the two fields
    // the kernel rewrote are restored. Rebuilding all BATCH of them per wake-up was most
    // of the relay's own instructions per datagram at low rates, where each wake-up
    // carries one datagram.
    let recv_controllen = if gro { size_of::<CmsgBuf>() } else { 0 };
    for i in 0..BATCH {
        iovs[i] = libc::iovec {
            // SAFETY: in bounds: bufs holds BATCH buffers of MAX_DATAGRAM bytes.
            iov_base: unsafe { bufs.as_mut_ptr().add(i * MAX_DATAGRAM) }.cast(),
            iov_len: MAX_DATAGRAM,
        };
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = if gro {
            (&mut recv_cmsgs[i] as *mut CmsgBuf).cast()
        } else {
            std::ptr::null_mut()
        };
        h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_controllen = recv_controllen as _;
    }

    while !shutdown.load(Ordering::Relaxed) {
        // SAFETY: hdrs describes BATCH valid, writable buffers and address slots.
        let n = match unsafe { recvmmsg(fd, hdrs.as_mut_ptr(), BATCH) } {
            Ok(n) => n,
            Err(e) => {
                if e != libc::EAGAIN && e != libc::EINTR {
                    let count = io.recv_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if count.is_power_of_two() {
                        let e = std::io::Error::from_raw_os_error(e);
                        warn!(error = %e, count, "receive failed");
                    }
                }
                Server::maybe_tick(&metrics, Instant::now(), &mut lock(&server.core));
                continue;
            }
        };
        let now = Instant::now();
        // The receive buffers are only read from here until the next receive; sends point
        // into them (forwards leave straight from where they arrived).
        let bufs = &bufs[..];
        let mut tx = batch.start(server.socket.as_fd());
        // One lock per batch: uncontended (the TCP thread takes it per TCP frame only),
        // it costs a couple of atomic operations, not one per datagram.
        let mut core = lock(&server.core);
        for i in 0..n {
            let h = &mut hdrs[i];
            let len = h.msg_len as usize;
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            // A GRO buffer is several datagrams of `seg` bytes (the last may be shorter),
            // each judged on its own as if it had come alone.
            let seg = if gro {
                gro_segment(&h.msg_hdr).unwrap_or(len)
            } else {
                len
            };
            // The kernel rewrote these two (the lengths of the address and control message
            // it wrote); the header is ready for the next receive once they are restored.
            // The other fields it writes are outputs only.
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_controllen = recv_controllen as _;
            if truncated {
                io.truncated.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(src) = to_peer(&names[i]) else {
                continue;
            };
            let base = i * MAX_DATAGRAM;
            let mut off = 0;
            while off < len || (len == 0 && off == 0) {
                let end = (off + seg.max(1)).min(len);
                let data = &bufs[base + off..base + end];
                if let Outcome::Forward(dst) = core.relay.handle(now, src, data) {
                    if dst.is_tcp() {
                        core.send_tcp(dst, data, &metrics.tcp);
                    } else {
                        // A full batch goes out as it fills (GRO buffers only); the socket
                        // blocks, so a push is never refused.
                        let _ = tx.push(Dest::from_octets(dst.ip_octets(), dst.port()), data);
                    }
                }
                while let Some(t) = core.relay.poll_transmit() {
                    if t.dst.is_tcp() {
                        core.send_tcp(t.dst, t.payload.as_bytes(), &metrics.tcp);
                    } else {
                        let dst = Dest::from_octets(t.dst.ip_octets(), t.dst.port());
                        let _ = tx.push_copy(dst, t.payload.as_bytes());
                    }
                }
                if end == len {
                    break;
                }
                off = end;
            }
        }
        Server::maybe_tick(&metrics, now, &mut core);
        drop(core);
        count_sends(&tx.finish(), io);
        // Under load, datagrams trickle in while a batch is processed; waking for each
        // handful costs more than the datagrams themselves. After a partial batch of
        // several, give the next ones a moment to gather (interrupt moderation). A lone
        // datagram (request/response traffic) never waits, and a full batch means more
        // are queued already.
        if (2..BATCH).contains(&n) {
            std::thread::sleep(COALESCE);
        }
    }
}
