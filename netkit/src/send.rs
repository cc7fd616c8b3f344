//! Batched UDP sends: datagrams to any number of destinations leave in one `sendmmsg(2)` per
//! batch instead of one `sendto` each, and runs of equal-size datagrams to one destination (a
//! burst of one flow, the common case under load) go as one UDP GSO message (`UDP_SEGMENT`),
//! which the kernel cuts back into the original datagrams: one trip through the stack for up to
//! 64 of them. Payloads are gathered where they lie (no copy).
//!
//! A GSO message the kernel or the device refuses (`EMSGSIZE` for segments above the route's
//! MTU, `EIO` without checksum offload, ...) goes again datagram by datagram at once, so nothing
//! is lost, and GSO rests for [`GSO_RETRY_AFTER`] before a later batch tries it again.

use std::io;
use std::marker::PhantomData;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use crate::syscall::sendmmsg;

/// `UDP_SEGMENT` (linux/udp.h): a send carrying this control message is cut by the kernel into
/// datagrams of the given size. Not in every libc version.
const UDP_SEGMENT: libc::c_int = 103;
/// Most segments the kernel takes in one GSO send (UDP_MAX_SEGMENTS on older kernels).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO send: under the 65,507-byte UDP limit with margin for headers.
pub const MAX_GSO_BYTES: usize = 60_000;

/// How long GSO rests after a refused GSO message. One failed attempt per second costs one
/// system call; losing GSO for good would make every later burst cost one send per datagram,
/// and a route (and so its MTU or device) can change.
pub const GSO_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A destination as the send path keeps it: the IPv6 address (IPv4 ones IPv4-mapped), port and
/// IPv6 scope. Comparing two (to group a burst) and writing one as a `sockaddr` are a few
/// instructions, where a [`SocketAddr`] would be taken apart for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dest {
    ip: [u8; 16],
    port: u16,
    scope_id: u32,
}

/// The first 12 octets of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl Dest {
    /// From an IPv6 address's octets (IPv4-mapped for an IPv4 destination) and a port.
    #[inline]
    pub const fn from_octets(ip: [u8; 16], port: u16) -> Self {
        Dest {
            ip,
            port,
            scope_id: 0,
        }
    }
}

impl From<SocketAddr> for Dest {
    fn from(a: SocketAddr) -> Self {
        match a {
            SocketAddr::V4(a) => Dest::from_octets(a.ip().to_ipv6_mapped().octets(), a.port()),
            SocketAddr::V6(a) => Dest {
                ip: a.ip().octets(),
                port: a.port(),
                scope_id: a.scope_id(),
            },
        }
    }
}

/// What one [`SendBatch::send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    /// Datagrams the kernel took.
    pub sent: u64,
    /// Datagrams refused and skipped (a firewall rule, no route, an ICMP error pending, an IPv6
    /// destination for an IPv4 socket).
    pub failed: u64,
    /// GSO messages the kernel took, each carrying several datagrams.
    pub gso_messages: u64,
    /// Datagrams inside those GSO messages.
    pub gso_datagrams: u64,
    /// GSO messages the kernel refused, sent again datagram by datagram.
    pub gso_fallbacks: u64,
    /// The system error of the last refused GSO message, if any.
    pub gso_error: Option<i32>,
    /// The socket is non-blocking and full: only the first `sent + failed` datagrams were
    /// handled; send the rest when it is writable.
    pub blocked: bool,
}

impl SendStats {
    /// Datagrams handled from the front of the input (sent or skipped).
    pub fn handled(&self) -> usize {
        (self.sent + self.failed) as usize
    }
}

/// Room for one `cmsghdr` + `u16`, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u64; 4]);

/// Message buffers for batched sends on one UDP socket, allocated once and reused: no
/// allocation per send.
pub struct SendBatch {
    /// Whether the socket is IPv6 (IPv4 destinations then go IPv4-mapped).
    v6: bool,
    /// Whether the kernel supports UDP GSO on this socket.
    gso_supported: bool,
    /// GSO is not tried before this (after a refusal).
    gso_paused_until: Option<Instant>,
    /// How long a refusal pauses GSO.
    gso_retry_after: Duration,
    names: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgBuf>,
    hdrs: Vec<libc::mmsghdr>,
    /// Payloads copied by [`Pending::push_copy`], one slot per iovec; empty until the first.
    copies: Vec<[u8; MAX_COPY]>,
    /// The batch being filled.
    fill: Fill,
}

// SAFETY: the raw pointers inside the message buffers point only into the batch's own vectors
// or into payloads borrowed for the duration of one `send`; between sends they are dead.
unsafe impl Send for SendBatch {}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("v6", &self.v6)
            .field("capacity", &self.hdrs.len())
            .field("gso_supported", &self.gso_supported)
            .field("gso_paused_until", &self.gso_paused_until)
            .finish()
    }
}

impl SendBatch {
    /// Buffers for up to `capacity` datagrams per `sendmmsg` on `socket` (a UDP socket; its
    /// address family decides how destinations are written). Larger inputs go in several calls.
    pub fn for_socket(socket: &impl AsFd, capacity: usize) -> io::Result<Self> {
        let fd = socket.as_fd().as_raw_fd();
        // SAFETY: all-zero is a valid sockaddr_storage; getsockname writes at most `len` bytes.
        let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: a valid fd and an out buffer of the stated size.
        if unsafe {
            libc::getsockname(
                fd,
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        let v6 = ss.ss_family as libc::c_int == libc::AF_INET6;
        let capacity = capacity.max(1);
        Ok(SendBatch {
            v6,
            gso_supported: gso_supported(fd),
            gso_paused_until: None,
            gso_retry_after: GSO_RETRY_AFTER,
            // SAFETY: all-zero is a valid value for these plain C structs.
            names: vec![unsafe { zeroed() }; capacity],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                capacity
            ],
            cmsgs: vec![CmsgBuf([0; 4]); capacity],
            // SAFETY: as above.
            hdrs: vec![unsafe { zeroed() }; capacity],
            copies: Vec::new(),
            fill: Fill::default(),
        })
    }

    /// Whether this kernel does UDP GSO on the socket (since Linux 4.18).
    pub fn gso_supported(&self) -> bool {
        self.gso_supported
    }

    /// Turns GSO off for good (`false`) or back on where supported (`true`).
    pub fn set_gso(&mut self, on: bool) {
        self.gso_supported = on && self.gso_supported;
    }

    /// How long a refused GSO message pauses GSO (default [`GSO_RETRY_AFTER`]).
    pub fn set_gso_retry_after(&mut self, d: Duration) {
        self.gso_retry_after = d;
    }

    /// Whether the next send builds GSO messages.
    pub fn gso_enabled(&self) -> bool {
        // The clock is read only while paused: a send costs no clock read otherwise.
        self.gso_supported && self.gso_paused_until.is_none_or(|t| Instant::now() >= t)
    }

    /// Sends `datagrams` (destination, payload) on `socket` in order, in as few `sendmmsg`
    /// calls as the capacity allows. A datagram the kernel refuses is counted and skipped. On a
    /// non-blocking socket that fills up, stops and says so ([`SendStats::blocked`]); the
    /// first [`SendStats::handled`] datagrams are done.
    pub fn send<'p, D: Into<Dest>>(
        &mut self,
        socket: BorrowedFd<'_>,
        datagrams: impl IntoIterator<Item = (D, &'p [u8])>,
    ) -> SendStats {
        let mut pending = self.start(socket);
        for (dst, payload) in datagrams {
            if !pending.push(dst.into(), payload) {
                break;
            }
        }
        pending.finish()
    }

    /// Starts a batch on `socket` to be filled one datagram at a time with [`Pending::push`]
    /// and sent with [`Pending::finish`]: for a caller that decides each datagram's
    /// destination as it goes, without gathering a list first. Batches [`SendBatch::send`]
    /// exactly as it does.
    pub fn start<'p>(&mut self, socket: BorrowedFd<'_>) -> Pending<'_, 'p> {
        self.fill = Fill {
            fd: socket.as_raw_fd(),
            gso: self.gso_enabled(),
            ..Fill::default()
        };
        Pending {
            batch: self,
            _payloads: PhantomData,
        }
    }

    /// Sends the messages built so far (by [`Pending`]); false when the socket would block.
    #[inline]
    fn send_built(&mut self) -> bool {
        let f = &mut self.fill;
        if f.st.blocked {
            return false;
        }
        let (fd, msgs) = (f.fd, f.msgs);
        if msgs == 0 {
            return true;
        }
        let built = [f.niov as u64, f.gso_messages, f.gso_datagrams];
        (f.msgs, f.niov, f.open) = (0, 0, None);
        (f.gso_messages, f.gso_datagrams) = (0, 0);
        // SAFETY: hdrs[..msgs] were built by `Pending` and point at live names, iovecs,
        // control buffers and payloads borrowed for the duration of the batch.
        let first = unsafe { sendmmsg(fd, self.hdrs.as_mut_ptr(), msgs) };
        if first == Ok(msgs) {
            // All of it in one call, the usual case: counted as it was built, here rather
            // than in a call (at one datagram a wake-up, the call was a tenth of the send).
            let [datagrams, gso_messages, gso_datagrams] = built;
            let st = &mut self.fill.st;
            st.sent += datagrams;
            st.gso_messages += gso_messages;
            st.gso_datagrams += gso_datagrams;
            return true;
        }
        self.send_rest(fd, msgs, first)
    }

    /// Goes on after the first `sendmmsg` of the first `count` built messages returned
    /// `first` with less than all of them; false when the socket would block.
    #[inline(never)]
    fn send_rest(&mut self, fd: libc::c_int, count: usize, first: Result<usize, i32>) -> bool {
        // Counted in place: the stats are a fifth of a cache line's worth of copying.
        let st = &mut self.fill.st;
        let mut off = 0;
        let mut r = first;
        loop {
            match r {
                Ok(n) => {
                    for h in &self.hdrs[off..off + n] {
                        // msg_iovlen is size_t on glibc but int on musl.
                        #[allow(clippy::unnecessary_cast)]
                        let k = h.msg_hdr.msg_iovlen as u64;
                        st.sent += k;
                        if h.msg_hdr.msg_controllen != 0 {
                            st.gso_messages += 1;
                            st.gso_datagrams += k;
                        }
                    }
                    off += n;
                }
                Err(libc::EINTR) => {}
                Err(libc::EAGAIN) => {
                    st.blocked = true;
                    return false;
                }
                Err(err) => {
                    let h = &self.hdrs[off].msg_hdr;
                    if h.msg_controllen != 0 {
                        // A GSO message the kernel or the device would not take: its
                        // datagrams go one by one, and GSO rests.
                        send_separately(fd, h, st);
                        st.gso_fallbacks += 1;
                        st.gso_error = Some(err);
                        self.gso_paused_until = Some(Instant::now() + self.gso_retry_after);
                        tracing::debug!(error = %io::Error::from_raw_os_error(err),
                            retry_after = ?self.gso_retry_after,
                            "UDP GSO send refused; sent that message datagram by datagram");
                    } else {
                        // This datagram cannot go (firewall, no route, ...): skip it, keep
                        // the rest.
                        st.failed += 1;
                    }
                    off += 1;
                }
            }
            if off >= count {
                return true;
            }
            // SAFETY: as in `send_built`, for the messages not yet sent.
            r = unsafe { sendmmsg(fd, self.hdrs.as_mut_ptr().add(off), count - off) };
        }
    }
}

/// Longest payload [`Pending::push_copy`] takes: a reply built on the fly, not a datagram
/// passed on.
pub const MAX_COPY: usize = 256;

/// A batch being filled ([`SendBatch::start`]): datagrams pushed go out together, in as few
/// `sendmmsg` calls as the capacity allows (a full batch is sent as the next datagram is
/// pushed), runs of equal-size datagrams to one destination as one GSO message.
/// [`Pending::finish`] sends the rest; dropping it unfinished sends the rest too, uncounted.
#[must_use = "finish the batch to send what was pushed and read what happened"]
pub struct Pending<'b, 'p> {
    /// The batch, whose [`Fill`] is this one's state. Only a pointer, so that handing the
    /// batch on (to [`Pending::finish`]) moves eight bytes, not the state.
    batch: &'b mut SendBatch,
    /// The payloads pushed must outlive the batch: the messages point at them.
    _payloads: PhantomData<&'p [u8]>,
}

/// The state of the batch being filled, kept in the [`SendBatch`].
#[derive(Debug, Default)]
struct Fill {
    fd: libc::c_int,
    /// Whether this batch builds GSO messages.
    gso: bool,
    /// Messages and iovecs built and not yet sent.
    msgs: usize,
    niov: usize,
    /// GSO messages among those, and the datagrams in them: with these, a batch sent whole
    /// is counted without walking its headers again.
    gso_messages: u64,
    gso_datagrams: u64,
    /// The open message: destination, segment size, bytes, and whether a short segment closed
    /// it (only the last segment may be shorter).
    open: Option<(Dest, usize, usize, bool)>,
    st: SendStats,
}

impl std::fmt::Debug for Pending<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("fill", &self.batch.fill)
            .finish_non_exhaustive()
    }
}

impl<'p> Pending<'_, 'p> {
    /// Adds `payload` to `dst`. Returns `false`, taking nothing, when a non-blocking socket
    /// filled up ([`SendStats::blocked`]); every later push then does the same.
    #[inline]
    pub fn push(&mut self, dst: Dest, payload: &'p [u8]) -> bool {
        self.push_raw(dst, payload.as_ptr(), payload.len())
    }

    /// Adds a copy of `payload` (at most [`MAX_COPY`] bytes: a reply built on the fly, which
    /// need not outlive the batch). A longer payload is refused and counted as failed.
    /// Returns `false` as [`Pending::push`] does.
    pub fn push_copy(&mut self, dst: Dest, payload: &[u8]) -> bool {
        let b = &mut *self.batch;
        if payload.len() > MAX_COPY {
            b.fill.st.failed += 1;
            return !b.fill.st.blocked;
        }
        if b.fill.msgs == b.hdrs.len() || b.fill.niov == b.iovs.len() {
            // The copy goes where its iovec will be; make room first as push_raw would.
            if !b.send_built() {
                return false;
            }
        }
        if b.copies.is_empty() {
            // Allocated at the first copy: most users of a batch never copy.
            b.copies.resize(b.iovs.len(), [0; MAX_COPY]);
        }
        let slot = &mut b.copies[b.fill.niov];
        slot[..payload.len()].copy_from_slice(payload);
        // The copy stays put until the batch is sent: `copies` never grows again, and its slot
        // is not written before the message pointing at it has gone.
        let ptr = slot.as_ptr();
        self.push_raw(dst, ptr, payload.len())
    }

    /// Sends what was pushed and not yet sent; returns what the whole batch did.
    #[inline]
    pub fn finish(self) -> SendStats {
        self.batch.send_built();
        self.batch.fill.st
        // The drop that follows finds nothing to send.
    }

    #[inline]
    fn push_raw(&mut self, dst: Dest, ptr: *const u8, len: usize) -> bool {
        let b = &mut *self.batch;
        let iov = libc::iovec {
            iov_base: ptr.cast_mut().cast(),
            iov_len: len,
        };
        let f = &mut b.fill;
        if let Some((d, seg, bytes, closed)) = &mut f.open {
            // msg_iovlen is size_t on glibc but int on musl.
            #[allow(clippy::unnecessary_cast)]
            let count = b.hdrs[f.msgs - 1].msg_hdr.msg_iovlen as usize;
            if f.gso
                && f.niov < b.iovs.len()
                && *d == dst
                && !*closed
                && len > 0
                && len <= *seg
                && count < MAX_GSO_SEGMENTS
                && *bytes + len <= MAX_GSO_BYTES
            {
                b.iovs[f.niov] = iov;
                f.niov += 1;
                *bytes += len;
                *closed = len < *seg;
                let (seg, h) = (*seg, &mut b.hdrs[f.msgs - 1].msg_hdr);
                h.msg_iovlen = (count + 1) as _;
                if count == 1 {
                    set_segment(h, &mut b.cmsgs[f.msgs - 1], seg);
                    f.gso_messages += 1;
                    f.gso_datagrams += 1;
                }
                f.gso_datagrams += 1;
                return true;
            }
        }
        if f.msgs == b.hdrs.len() || f.niov == b.iovs.len() {
            if !b.send_built() {
                return false;
            }
        } else if f.st.blocked {
            return false;
        }
        let f = &mut b.fill;
        let (msgs, niov) = (f.msgs, f.niov);
        // One check for all the indexing below (names and hdrs have the same length): the
        // compiler would check each of the five accesses again, the lengths being reloaded
        // after every store through the raw pointers.
        assert!(msgs < b.hdrs.len() && niov < b.iovs.len() && b.names.len() == b.hdrs.len());
        // SAFETY: in bounds, as just checked.
        let name = unsafe { b.names.get_unchecked_mut(msgs) };
        let Some(namelen) = write_sockaddr(dst, b.v6, name) else {
            f.st.failed += 1;
            f.open = None;
            return true;
        };
        // SAFETY: in bounds, as checked above.
        let (h, slot) = unsafe {
            (
                &mut b.hdrs.get_unchecked_mut(msgs).msg_hdr,
                b.iovs.get_unchecked_mut(niov),
            )
        };
        *slot = iov;
        h.msg_name = (name as *mut libc::sockaddr_storage).cast();
        h.msg_namelen = namelen;
        h.msg_iov = slot;
        h.msg_iovlen = 1;
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        h.msg_flags = 0;
        f.msgs += 1;
        f.niov += 1;
        f.open = Some((dst, len, len, false));
        true
    }
}

impl Drop for Pending<'_, '_> {
    #[inline]
    fn drop(&mut self) {
        if self.batch.fill.msgs > 0 {
            self.batch.send_built();
        }
    }
}

/// Marks `h` as a GSO message of `seg`-byte segments, its control message in `buf`.
fn set_segment(h: &mut libc::msghdr, buf: &mut CmsgBuf, seg: usize) {
    h.msg_control = (buf as *mut CmsgBuf).cast();
    // SAFETY: CMSG_SPACE of a u16 fits the 32-byte aligned buffer, so CMSG_FIRSTHDR is
    // non-null and the header and its data lie within it.
    unsafe {
        h.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(h);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg as u16);
    }
}

/// Sends each iovec of `msg` as a datagram of its own (the fallback when GSO is refused).
fn send_separately(fd: libc::c_int, msg: &libc::msghdr, st: &mut SendStats) {
    // msg_iovlen is size_t on glibc but int on musl.
    #[allow(clippy::unnecessary_cast)]
    let n = msg.msg_iovlen as usize;
    for k in 0..n {
        // SAFETY: msg was built by `send`: msg_iov has msg_iovlen valid entries and msg_name a
        // valid address.
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
            st.failed += 1;
        } else {
            st.sent += 1;
        }
    }
}

/// Whether this kernel supports UDP GSO on `fd` (since Linux 4.18).
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

/// Writes `dst` as the socket's family wants it; returns the length, or `None` when an IPv4
/// socket is asked to reach an IPv6 address.
#[inline]
fn write_sockaddr(
    dst: Dest,
    v6: bool,
    out: &mut libc::sockaddr_storage,
) -> Option<libc::socklen_t> {
    if v6 {
        // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
        let sin6 =
            unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
        sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sin6.sin6_port = dst.port.to_be();
        sin6.sin6_flowinfo = 0;
        sin6.sin6_addr.s6_addr = dst.ip;
        sin6.sin6_scope_id = dst.scope_id;
        Some(size_of::<libc::sockaddr_in6>() as libc::socklen_t)
    } else {
        let ip = dst.ip;
        if ip[..12] != V4_MAPPED_PREFIX {
            return None;
        }
        // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
        let sin = unsafe { &mut *(out as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = dst.port.to_be();
        // s_addr is in network order, as the octets are.
        sin.sin_addr.s_addr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
        Some(size_of::<libc::sockaddr_in>() as libc::socklen_t)
    }
}

#[cfg(test)]
mod tests {
    //! On real loopback sockets. `SO_NO_CHECK` makes the kernel refuse every UDP GSO send on
    //! that socket (`EINVAL`, net/ipv4/udp.c) while plain sends work: a stand-in for the
    //! `EMSGSIZE` of a route whose MTU is below the segment size, which loopback (MTU 64 KiB)
    //! cannot produce.

    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    use super::*;

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
        assert_eq!(r, 0, "SO_NO_CHECK: {}", io::Error::last_os_error());
    }

    /// Receives `n` datagrams on `rx` (each tagged with its index in byte 0 and its length in
    /// bytes 1..3), in order.
    fn receive(rx: &UdpSocket, n: usize) -> Vec<(u8, usize)> {
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = vec![0u8; 65_536];
        (0..n)
            .map(|_| {
                let k = rx.recv(&mut buf).expect("a datagram arrives");
                assert_eq!(u16::from_be_bytes([buf[1], buf[2]]) as usize, k, "whole");
                (buf[0], k)
            })
            .collect()
    }

    fn payload(tag: u8, len: usize) -> Vec<u8> {
        let mut p = vec![tag; len.max(3)];
        p[1..3].copy_from_slice(&(len as u16).to_be_bytes());
        p.truncate(len);
        p
    }

    #[test]
    fn every_datagram_arrives_whole_and_in_order_in_few_messages() {
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind tx");
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind a");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind b");
        let (da, db) = (a.local_addr().expect("addr"), b.local_addr().expect("addr"));
        // A burst to a (the last shorter), one to b, a burst to a again that outgrows the
        // capacity of 8 datagrams per call, then a larger one (a new message).
        let sizes_a = [
            1200, 1200, 1200, 700, 1200, 1200, 1200, 1200, 1200, 1200, 1300,
        ];
        let to_a: Vec<Vec<u8>> = sizes_a
            .iter()
            .enumerate()
            .map(|(i, &l)| payload(i as u8, l))
            .collect();
        let to_b = payload(100, 50);
        let mut list: Vec<(SocketAddr, &[u8])> = to_a[..4].iter().map(|p| (da, &p[..])).collect();
        list.push((db, &to_b));
        list.extend(to_a[4..].iter().map(|p| (da, &p[..])));
        let mut batch = SendBatch::for_socket(&tx, 8).expect("batch");
        let st = batch.send(tx.as_fd(), list.iter().copied());
        assert_eq!((st.sent, st.failed, st.blocked), (12, 0, false), "{st:?}");
        let got = receive(&a, sizes_a.len());
        let want: Vec<(u8, usize)> = sizes_a
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u8, l))
            .collect();
        assert_eq!(got, want);
        assert_eq!(receive(&b, 1), vec![(100, 50)]);
        if batch.gso_supported() {
            // First call (8 iovecs): a0-a3 (closed by the short a3), b, a4-a6. Second: a7-a9,
            // then a10 alone (larger than the run's segment size).
            assert_eq!((st.gso_messages, st.gso_datagrams), (3, 10), "{st:?}");
        } else {
            assert_eq!(st.gso_messages, 0);
        }
    }

    #[test]
    fn pushed_and_copied_datagrams_arrive_in_order_and_a_full_batch_goes_as_it_fills() {
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind tx");
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind rx");
        let dst = Dest::from(rx.local_addr().expect("addr"));
        let kept: Vec<Vec<u8>> = (0..3).map(|i| payload(i, 100 + usize::from(i))).collect();
        // Capacity 2: the third datagram makes the batch send the first two.
        let mut batch = SendBatch::for_socket(&tx, 2).expect("batch");
        let mut p = batch.start(tx.as_fd());
        assert!(p.push(dst, &kept[0]));
        {
            // A reply built on the fly and dropped before the batch is sent.
            let reply = payload(9, 40);
            assert!(p.push_copy(dst, &reply));
        }
        assert!(p.push(dst, &kept[1]));
        assert!(p.push(dst, &kept[2]));
        assert!(
            p.push_copy(dst, &[0u8; MAX_COPY + 1]),
            "refused, not blocked"
        );
        let st = p.finish();
        assert_eq!((st.sent, st.failed, st.blocked), (4, 1, false), "{st:?}");
        assert_eq!(receive(&rx, 4), vec![(0, 100), (9, 40), (1, 101), (2, 102)]);
    }

    #[test]
    fn an_ipv6_destination_on_an_ipv4_socket_is_skipped_and_counted() {
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind tx");
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind rx");
        let p = payload(1, 10);
        let q = payload(2, 10);
        let v6: SocketAddr = "[2001:db8::1]:9".parse().expect("addr");
        let mut batch = SendBatch::for_socket(&tx, 4).expect("batch");
        let st = batch.send(
            tx.as_fd(),
            [(v6, &p[..]), (rx.local_addr().expect("addr"), &q[..])],
        );
        assert_eq!((st.sent, st.failed), (1, 1), "{st:?}");
        assert_eq!(receive(&rx, 1), vec![(2, 10)]);
    }

    #[test]
    fn a_refused_gso_message_is_resent_one_by_one_and_gso_rests_then_resumes() {
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind tx");
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind rx");
        let dst = rx.local_addr().expect("addr");
        let mut batch = SendBatch::for_socket(&tx, 16).expect("batch");
        if !batch.gso_supported() {
            // Nothing to refuse: the kernel has no UDP GSO (before Linux 4.18).
            return;
        }
        let burst: Vec<Vec<u8>> = (0..8).map(|i| payload(i, 1200)).collect();
        let list = || burst.iter().map(|p| (dst, &p[..]));
        let want: Vec<(u8, usize)> = (0..8).map(|i| (i, 1200)).collect();

        set_no_check(&tx, true);
        let st = batch.send(tx.as_fd(), list());
        assert_eq!((st.sent, st.failed, st.gso_fallbacks), (8, 0, 1), "{st:?}");
        assert!(st.gso_error.is_some());
        assert_eq!(receive(&rx, 8), want, "the refused message arrives whole");

        // GSO rests: the next burst goes datagram by datagram even though it would pass.
        set_no_check(&tx, false);
        assert!(!batch.gso_enabled());
        let st = batch.send(tx.as_fd(), list());
        assert_eq!((st.sent, st.gso_messages), (8, 0), "{st:?}");
        assert_eq!(receive(&rx, 8), want);

        // Once the pause is over, bursts go as GSO messages again.
        batch.set_gso_retry_after(Duration::ZERO);
        batch.gso_paused_until = Some(Instant::now());
        assert!(batch.gso_enabled());
        let st = batch.send(tx.as_fd(), list());
        assert_eq!(
            (st.sent, st.gso_messages, st.gso_datagrams),
            (8, 1, 8),
            "{st:?}"
        );
        assert_eq!(receive(&rx, 8), want);
    }
}
