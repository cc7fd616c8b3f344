//! Batched I/O with `recvmmsg`/`sendmmsg`.

use std::mem::{size_of, zeroed};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tracing::warn;

use super::{Outcome, PeerAddr, Server};
use crate::defaults::{BATCH, MAX_DATAGRAM};
use crate::proto::ReplyBuf;
use crate::tcp::lock;

/// Sends gathered before they go out: up to one forward or two replies (an ACK and a peer
/// notice) per received datagram. A GRO buffer holds up to 64 datagrams, so the loop sends
/// what it has gathered whenever fewer than three slots are left.
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

/// Writes `dst` as the socket's family wants it; returns the length, or `None` when an IPv4
/// socket is asked to reach an IPv6 peer (impossible: such a peer could not have sent to it).
fn write_sockaddr(
    dst: PeerAddr,
    v6: bool,
    out: &mut libc::sockaddr_storage,
) -> Option<libc::socklen_t> {
    let ip = dst.ip_octets();
    if v6 {
        // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
        let sin6 =
            unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
        sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sin6.sin6_port = dst.port().to_be();
        sin6.sin6_flowinfo = 0;
        sin6.sin6_addr.s6_addr = ip;
        sin6.sin6_scope_id = 0;
        Some(size_of::<libc::sockaddr_in6>() as libc::socklen_t)
    } else {
        if ip[..12] != V4_MAPPED[..12] {
            return None;
        }
        // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
        let sin = unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = dst.port().to_be();
        sin.sin_addr.s_addr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
        Some(size_of::<libc::sockaddr_in>() as libc::socklen_t)
    }
}

/// What to send: a slice of a receive buffer (forward) or of a reply buffer.
#[derive(Clone, Copy)]
enum Payload {
    /// `len` bytes at `offset` in the receive buffers (a datagram, or one segment of a
    /// GRO buffer).
    Received {
        offset: usize,
        len: usize,
    },
    Reply(usize),
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

/// `UDP_SEGMENT` (linux/udp.h): a send carrying this control message is cut by the kernel
/// into datagrams of the given size.
const UDP_SEGMENT: libc::c_int = 103;
/// Most segments the kernel takes in one GSO send (UDP_MAX_SEGMENTS on older kernels).
const MAX_GSO_SEGMENTS: usize = 64;
/// Most bytes in one GSO send: an IP packet's limit less headers, with margin.
const MAX_GSO_BYTES: usize = 60_000;

/// After a GSO batch fails (e.g. `EMSGSIZE`: segments larger than the route's MTU), the
/// batch goes out datagram by datagram and GSO rests this long before the next batch tries
/// it again. One failed attempt per second costs one system call; losing GSO for good (as
/// before) made every later burst cost one send per datagram for the rest of the process.
pub(super) const GSO_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether forwarded bursts go out as GSO batches now.
#[derive(Debug, Clone, Copy)]
pub(super) struct Gso {
    supported: bool,
    paused_until: Option<Instant>,
}

impl Gso {
    pub(super) fn new(supported: bool) -> Self {
        Gso {
            supported,
            paused_until: None,
        }
    }

    /// Whether to build GSO batches for a send at `now`.
    pub(super) fn enabled(&self, now: Instant) -> bool {
        self.supported && self.paused_until.is_none_or(|t| now >= t)
    }

    /// A GSO batch failed at `now`: rest for [`GSO_RETRY_AFTER`].
    pub(super) fn failed(&mut self, now: Instant) {
        self.paused_until = Some(now + GSO_RETRY_AFTER);
    }
}

/// Room for one `cmsghdr` + `u16`, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u64; 4]);

/// Whether this kernel supports UDP GSO (since Linux 4.18).
fn gso_supported(fd: libc::c_int) -> bool {
    let mut val: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd and an int-sized out buffer.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0
}

/// Turns the list of sends into `mmsghdr`s, returning how many. Consecutive forwards to the
/// same peer with the same size (a burst of one flow, the common case under load) become
/// one GSO send: one trip through the stack for up to 64 datagrams, gathered straight from
/// the receive buffers. Everything else is one message per datagram.
#[allow(clippy::too_many_arguments)]
fn build_sends(
    sends: &[(Payload, PeerAddr)],
    bufs: &mut [u8],
    replies: &[ReplyBuf],
    v6: bool,
    gso: bool,
    names: &mut [libc::sockaddr_storage],
    iovs: &mut [libc::iovec],
    cmsgs: &mut [CmsgBuf],
    hdrs: &mut [libc::mmsghdr],
) -> usize {
    let base = bufs.as_mut_ptr();
    let iov_of = |p: Payload| -> libc::iovec {
        let (ptr, len) = match p {
            Payload::Received { offset, len } => {
                // SAFETY: in bounds: offset + len lies within one received buffer.
                let ptr = unsafe { base.add(offset) };
                (ptr, len)
            }
            Payload::Reply(r) => (
                replies[r].as_bytes().as_ptr().cast_mut(),
                replies[r].as_bytes().len(),
            ),
        };
        libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        }
    };
    let mut count = 0;
    let mut next_iov = 0;
    let mut i = 0;
    while i < sends.len() {
        let (payload, dst) = sends[i];
        // How many following sends join this one in a GSO batch.
        let mut run = 1;
        if let (true, Payload::Received { len: seg, .. }) = (gso, payload) {
            let mut total = seg;
            while i + run < sends.len() && run < MAX_GSO_SEGMENTS && seg > 0 {
                match sends[i + run] {
                    (Payload::Received { len, .. }, d)
                        if d == dst && len <= seg && len > 0 && total + len <= MAX_GSO_BYTES =>
                    {
                        total += len;
                        run += 1;
                        if len < seg {
                            break; // only the last segment may be shorter
                        }
                    }
                    _ => break,
                }
            }
        }
        let Some(namelen) = write_sockaddr(dst, v6, &mut names[count]) else {
            i += run;
            continue;
        };
        let first_iov = next_iov;
        for &(p, _) in &sends[i..i + run] {
            iovs[next_iov] = iov_of(p);
            next_iov += 1;
        }
        let h = &mut hdrs[count].msg_hdr;
        h.msg_name = (&mut names[count] as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = namelen;
        h.msg_iov = &mut iovs[first_iov];
        h.msg_iovlen = run as _;
        h.msg_flags = 0;
        if run > 1 {
            let Payload::Received { len: seg, .. } = payload else {
                unreachable!("GSO runs are forwards")
            };
            let buf = &mut cmsgs[count];
            h.msg_control = (buf as *mut CmsgBuf).cast();
            // SAFETY: CMSG_SPACE of a u16 fits the 32-byte aligned buffer.
            unsafe {
                h.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
            }
        } else {
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
        }
        count += 1;
        i += run;
    }
    count
}

/// Sends each iovec of `msg` as a datagram of its own (the fallback when GSO fails).
fn send_separately(fd: libc::c_int, msg: &libc::msghdr, errors: &std::sync::atomic::AtomicU64) {
    // msg_iovlen is size_t on glibc but int on musl.
    #[allow(clippy::unnecessary_cast)]
    let n = msg.msg_iovlen as usize;
    for k in 0..n {
        // SAFETY: msg was built by build_sends: msg_iov has msg_iovlen valid entries and
        // msg_name a valid address.
        let r = unsafe {
            let iov = &*msg.msg_iov.add(k);
            libc::sendto(
                fd,
                iov.iov_base,
                iov.iov_len,
                0,
                msg.msg_name.cast(),
                msg.msg_namelen,
            )
        };
        if r < 0 {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends every message of `hdrs`. A message that fails is skipped (counted), except a GSO
/// batch, whose datagrams are then sent one by one; returns that batch's error, if any.
pub(super) fn send_all(
    fd: libc::c_int,
    hdrs: &mut [libc::mmsghdr],
    io: &crate::metrics::IoCounters,
) -> Option<std::io::Error> {
    let count = hdrs.len();
    let mut gso_error = None;
    let mut off = 0;
    while off < count {
        // SAFETY: hdrs[off..count] describe valid buffers and addresses.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr().add(off),
                (count - off) as libc::c_uint,
                0,
            )
        };
        if r >= 0 {
            off += r as usize;
            continue;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if hdrs[off].msg_hdr.msg_controllen != 0 {
            // A GSO batch the kernel or the device would not take (EMSGSIZE for segments
            // above the MTU, EIO without checksum offload): its datagrams go one by one.
            send_separately(fd, &hdrs[off].msg_hdr, &io.send_errors);
            gso_error = Some(err);
        } else {
            // This datagram cannot go (firewall, no route, ...): skip it, keep the rest.
            io.send_errors.fetch_add(1, Ordering::Relaxed);
        }
        off += 1;
    }
    gso_error
}

/// The send side of the loop: the sends gathered from one batch, the replies they point into,
/// and the message buffers they are built in. Allocated once; none of its vectors grows.
struct Outbox {
    sends: Vec<(Payload, PeerAddr)>,
    replies: Vec<ReplyBuf>,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgBuf>,
    hdrs: Vec<libc::mmsghdr>,
    gso: Gso,
}

impl Outbox {
    fn new(gso: Gso) -> Self {
        Outbox {
            sends: Vec::with_capacity(MAX_SENDS),
            replies: Vec::with_capacity(2 * BATCH),
            // SAFETY: all-zero is a valid value for these plain C structs.
            names: vec![unsafe { zeroed() }; MAX_SENDS],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                MAX_SENDS
            ],
            cmsgs: vec![CmsgBuf([0; 4]); MAX_SENDS],
            // SAFETY: as above.
            hdrs: vec![unsafe { zeroed() }; MAX_SENDS],
            gso,
        }
    }

    /// Builds the gathered sends into messages (GSO runs where possible when `gso_enabled`),
    /// sends them, counts what happened and empties the outbox.
    fn flush(
        &mut self,
        fd: libc::c_int,
        bufs: &mut [u8],
        v6: bool,
        gso_enabled: bool,
        io: &crate::metrics::IoCounters,
        now: Instant,
    ) {
        if self.sends.is_empty() {
            return;
        }
        let count = build_sends(
            &self.sends,
            bufs,
            &self.replies,
            v6,
            gso_enabled,
            &mut self.names,
            &mut self.iovs,
            &mut self.cmsgs,
            &mut self.hdrs,
        );
        for h in &self.hdrs[..count] {
            if h.msg_hdr.msg_controllen != 0 {
                io.gso_batches.fetch_add(1, Ordering::Relaxed);
                io.gso_datagrams
                    .fetch_add(h.msg_hdr.msg_iovlen as u64, Ordering::Relaxed);
            }
        }
        if let Some(err) = send_all(fd, &mut self.hdrs[..count], io) {
            self.gso.failed(now);
            let failures = io.gso_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if failures.is_power_of_two() {
                warn!(error = %err, failures, retry_after = ?GSO_RETRY_AFTER,
                    "UDP GSO send failed; sent that burst datagram by datagram");
            }
        }
        self.sends.clear();
        self.replies.clear();
    }
}

pub(super) fn run(server: &mut Server, shutdown: &AtomicBool) {
    // The default 50 us timer slack would stretch the 20 us coalescing wait to ~70 us.
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and affects only this thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong) };
    let fd = server.socket.as_raw_fd();
    let v6 = server.local_addr.is_ipv6();
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
    let gso = Gso::new(gso_supported(fd));
    tracing::debug!(?gso, "UDP segmentation offload for forwarded bursts");
    let mut out = Outbox::new(gso);
    let metrics = server.metrics.clone();
    let io = &metrics.io;

    // The receive headers point into buffers that never move (none of these vectors
    // grows), so they are set up once; before each receive only the fields the kernel
    // wrote in the last one are restored. Rebuilding all BATCH of them per wake-up was
    // most of the relay's own instructions per datagram at low rates, where each
    // wake-up carries one datagram.
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
    }
    let recv_controllen = if gro { size_of::<CmsgBuf>() } else { 0 };
    let mut filled = BATCH;

    while !shutdown.load(Ordering::Relaxed) {
        for h in &mut hdrs[..filled] {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_controllen = recv_controllen as _;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        filled = 0;
        // SAFETY: hdrs describes BATCH valid, writable buffers and address slots.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let now = Instant::now();
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => {
                    let count = io.recv_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if count.is_power_of_two() {
                        warn!(error = %e, count, "receive failed");
                    }
                }
            }
            Server::maybe_tick(&metrics, now, &mut lock(&server.core));
            continue;
        }
        filled = n as usize;
        // One lock per batch: uncontended (the TCP thread takes it per TCP frame only),
        // it costs a couple of atomic operations, not one per datagram.
        let mut core = lock(&server.core);
        let gso_now = out.gso.enabled(now);
        for i in 0..n as usize {
            let len = hdrs[i].msg_len as usize;
            if hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                io.truncated.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(src) = to_peer(&names[i]) else {
                continue;
            };
            // A GRO buffer is several datagrams of `seg` bytes (the last may be shorter),
            // each judged on its own as if it had come alone.
            let seg = if gro {
                gro_segment(&hdrs[i].msg_hdr).unwrap_or(len)
            } else {
                len
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
                        out.sends.push((
                            Payload::Received {
                                offset: base + off,
                                len: end - off,
                            },
                            dst,
                        ));
                    }
                }
                while let Some(t) = core.relay.poll_transmit() {
                    if t.dst.is_tcp() {
                        core.send_tcp(t.dst, t.payload.as_bytes(), &metrics.tcp);
                    } else {
                        out.replies.push(t.payload);
                        out.sends
                            .push((Payload::Reply(out.replies.len() - 1), t.dst));
                    }
                }
                if out.sends.len() + 3 > MAX_SENDS {
                    // Only with GRO buffers: send what is gathered to make room.
                    out.flush(fd, &mut bufs, v6, gso_now, io, now);
                }
                if end == len {
                    break;
                }
                off = end;
            }
        }
        Server::maybe_tick(&metrics, now, &mut core);
        drop(core);
        out.flush(fd, &mut bufs, v6, gso_now, io, now);
        // Under load, datagrams trickle in while a batch is processed; waking for each
        // handful costs more than the datagrams themselves. After a partial batch of
        // several, give the next ones a moment to gather (interrupt moderation). A lone
        // datagram (request/response traffic) never waits, and a full batch means more
        // are queued already.
        if (2..BATCH).contains(&(n as usize)) {
            std::thread::sleep(COALESCE);
        }
    }
}
#[cfg(test)]
mod tests {
    //! GSO recovery on real loopback sockets. `SO_NO_CHECK` makes the kernel refuse every
    //! UDP GSO send on that socket (`EINVAL`, net/ipv4/udp.c) while plain sends work: a
    //! stand-in for the `EMSGSIZE` of a route whose MTU is below the segment size, which
    //! loopback (MTU 64 KiB) cannot produce.

    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::metrics::IoCounters;

    fn set_no_check(s: &UdpSocket, on: bool) {
        let v: libc::c_int = on.into();
        // SAFETY: a valid fd and a pointer to a c_int of the stated size.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&v as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "SO_NO_CHECK: {}", std::io::Error::last_os_error());
    }

    /// Sends `n` datagrams of `len` bytes from `tx` to `rx` the way the relay loop does,
    /// as one GSO batch when `gso`; returns the batch's error and the sizes `rx` got.
    fn burst(
        tx: &UdpSocket,
        rx: &UdpSocket,
        n: usize,
        len: usize,
        gso: bool,
        io: &IoCounters,
    ) -> (Option<std::io::Error>, Vec<usize>) {
        let mut bufs = vec![7u8; crate::defaults::BATCH * MAX_DATAGRAM];
        let dst = PeerAddr::from(rx.local_addr().expect("rx addr"));
        let sends: Vec<(Payload, PeerAddr)> = (0..n)
            .map(|index| {
                (
                    Payload::Received {
                        offset: index * MAX_DATAGRAM,
                        len,
                    },
                    dst,
                )
            })
            .collect();
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { zeroed() }; n];
        let mut iovs = vec![
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0
            };
            n
        ];
        let mut cmsgs = vec![CmsgBuf([0; 4]); n];
        // SAFETY: as above.
        let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; n];
        let count = build_sends(
            &sends,
            &mut bufs,
            &[],
            false,
            gso,
            &mut names,
            &mut iovs,
            &mut cmsgs,
            &mut hdrs,
        );
        assert_eq!(count, if gso { 1 } else { n }, "messages built");
        let err = send_all(tx.as_raw_fd(), &mut hdrs[..count], io);
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut got = Vec::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while got.len() < n {
            match rx.recv(&mut buf) {
                Ok(k) => got.push(k),
                Err(_) => break,
            }
        }
        (err, got)
    }

    #[test]
    fn a_refused_gso_batch_is_resent_one_by_one_and_gso_resumes() {
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind tx");
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind rx");
        if !gso_supported(tx.as_raw_fd()) {
            eprintln!("SKIP: this kernel has no UDP GSO");
            return;
        }
        let io = IoCounters::default();
        set_no_check(&tx, true);
        let (err, got) = burst(&tx, &rx, 8, 1200, true, &io);
        assert!(
            err.is_some(),
            "the kernel took a GSO batch with SO_NO_CHECK set"
        );
        assert_eq!(
            got,
            vec![1200; 8],
            "the refused batch arrives whole, datagram by datagram"
        );
        assert_eq!(io.send_errors.load(Ordering::Relaxed), 0);

        // The loop pauses GSO after the failure, and only for GSO_RETRY_AFTER.
        let t0 = Instant::now();
        let mut gso = Gso::new(true);
        assert!(gso.enabled(t0));
        gso.failed(t0);
        assert!(!gso.enabled(t0 + GSO_RETRY_AFTER / 2));
        assert!(gso.enabled(t0 + GSO_RETRY_AFTER));

        // Later bursts go as GSO batches again once the kernel takes them.
        set_no_check(&tx, false);
        let (err, got) = burst(&tx, &rx, 8, 1200, gso.enabled(t0 + GSO_RETRY_AFTER), &io);
        assert!(err.is_none(), "GSO batch refused: {err:?}");
        assert_eq!(got, vec![1200; 8], "the GSO batch arrives as 8 datagrams");
    }
}
