//! Thin libc wrappers the benchmarks need and std lacks: batched UDP I/O (sendmmsg/recvmmsg),
//! forced socket buffers, source-address choice with IP_PKTINFO, and CPU/RSS from /proc.
//!
//! IPv4 only: the benchmarks run on 127.0.0.0/8, where every address is local, which is what
//! lets one process act as millions of distinct peers.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use netkit::sockopt::{get_int, set_int};

/// Socket buffers of every test socket. 4 MiB holds many 1 ms pacing bursts even at 200k/s
/// (200 × 1200 B), so the loss we count is the relay's, not our sockets'.
pub const TEST_SOCKET_BUFFER: usize = 4 << 20;

/// Payload room per batch slot: above the 1200-byte test datagrams and any relay reply.
pub const SLOT: usize = 2048;

/// Messages per sendmmsg/recvmmsg call: enough to amortise the syscall, small enough that a
/// burst does not sit in our buffers long.
pub const BATCH: usize = 64;

/// Control-message room for an `in_pktinfo` and a receive timestamp, aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

// SAFETY: CMSG_SPACE is pure arithmetic on its argument.
const PKTINFO_SPACE: usize =
    unsafe { libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) } as usize;
// SAFETY: as above.
const PKTINFO_LEN: usize = unsafe { libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) } as usize;
// SAFETY: as above.
const TIMESTAMP_SPACE: usize =
    unsafe { libc::CMSG_SPACE(size_of::<libc::timespec>() as u32) } as usize;
const _: () = assert!(PKTINFO_SPACE + TIMESTAMP_SPACE <= size_of::<CmsgBuf>());

/// Binds a UDP socket with [`TEST_SOCKET_BUFFER`]-sized buffers.
pub fn bind_udp(addr: SocketAddrV4) -> Result<UdpSocket> {
    let sock = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
    set_buffers(&sock, TEST_SOCKET_BUFFER).with_context(|| format!("socket buffers of {addr}"))?;
    Ok(sock)
}

/// The socket's bound IPv4 address.
pub fn local_v4(sock: &UdpSocket) -> Result<SocketAddrV4> {
    match sock.local_addr()? {
        std::net::SocketAddr::V4(a) => Ok(a),
        other => bail!("expected an IPv4 socket, got {other}"),
    }
}

/// Sets both socket buffers so that the kernel reports at least `bytes`, the way the relay sets
/// its own (so that the baseline forwarder gets exactly the relay's buffers): the plain option
/// first, which the kernel caps at `net.core.[rw]mem_max` (and then doubles), and the `*FORCE`
/// option, which passes the cap as root, only when that was not enough. Unprivileged runs keep
/// the capped size.
pub fn set_buffers(sock: &UdpSocket, bytes: usize) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (plain, force) in [
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
    ] {
        set_int(sock, libc::SOL_SOCKET, plain, bytes)?;
        if get_int(sock, libc::SOL_SOCKET, plain)? < bytes {
            let _ = set_int(sock, libc::SOL_SOCKET, force, bytes);
        }
    }
    Ok(())
}

/// Makes received datagrams carry the time the kernel received them (`SO_TIMESTAMPNS`).
pub fn enable_timestamps(sock: &UdpSocket) -> io::Result<()> {
    set_int(sock, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

/// Now as Unix time in ns, the clock of [`RecvBatch::received_ns`].
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Makes received datagrams carry their destination address (`IP_PKTINFO`), so a socket bound to
/// 0.0.0.0 can tell which of many local addresses a reply was sent to.
pub fn enable_pktinfo(sock: &UdpSocket) -> io::Result<()> {
    set_int(sock, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
}

fn in_addr(ip: Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from(ip).to_be(),
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = a.port().to_be();
    sa.sin_addr = in_addr(*a.ip());
    sa
}

fn from_sockaddr(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )
}

fn empty_mmsghdr() -> libc::mmsghdr {
    // SAFETY: mmsghdr is plain old data (null pointers, zero lengths).
    unsafe { zeroed() }
}

/// Outgoing datagrams collected for one `sendmmsg` call.
///
/// The kernel structures point into this struct's own vectors, so they are rebuilt right before
/// each call rather than stored (the vectors never reallocate: capacity is fixed up front).
pub struct SendBatch {
    data: Vec<u8>,
    lens: Vec<usize>,
    dsts: Vec<libc::sockaddr_in>,
    srcs: Vec<Option<Ipv4Addr>>,
    cmsgs: Vec<CmsgBuf>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

/// What one [`SendBatch::send`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub ok: u64,
    pub failed: u64,
}

impl SendBatch {
    pub fn new() -> Self {
        SendBatch {
            data: vec![0; BATCH * SLOT],
            lens: Vec::with_capacity(BATCH),
            dsts: Vec::with_capacity(BATCH),
            srcs: Vec::with_capacity(BATCH),
            cmsgs: vec![CmsgBuf([0; 128]); BATCH],
            iovs: Vec::with_capacity(BATCH),
            hdrs: Vec::with_capacity(BATCH),
        }
    }

    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_full(&self) -> bool {
        self.lens.len() == BATCH
    }

    /// Queues `payload` for `dst`, sent from local address `src` when given (IP_PKTINFO).
    pub fn push(&mut self, dst: SocketAddrV4, src: Option<Ipv4Addr>, payload: &[u8]) {
        let i = self.lens.len();
        assert!(i < BATCH && payload.len() <= SLOT, "batch overfilled");
        self.data[i * SLOT..i * SLOT + payload.len()].copy_from_slice(payload);
        self.lens.push(payload.len());
        self.dsts.push(sockaddr(dst));
        self.srcs.push(src);
    }

    /// Sends everything queued (looping over partial sends) and empties the batch. A datagram
    /// the kernel refuses is counted and skipped: a benchmark counts errors, it does not stop.
    pub fn send(&mut self, sock: &UdpSocket) -> Sent {
        let n = self.lens.len();
        self.iovs.clear();
        self.hdrs.clear();
        for i in 0..n {
            self.iovs.push(libc::iovec {
                iov_base: self.data[i * SLOT..].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            });
        }
        for i in 0..n {
            let mut h = empty_mmsghdr();
            h.msg_hdr.msg_name = (&mut self.dsts[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            if let Some(src) = self.srcs[i] {
                let buf = &mut self.cmsgs[i];
                h.msg_hdr.msg_control = buf.0.as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = PKTINFO_SPACE as _;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: in_addr(src),
                    ipi_addr: in_addr(Ipv4Addr::UNSPECIFIED),
                };
                // SAFETY: msg_control points to a live, cmsghdr-aligned buffer of
                // PKTINFO_SPACE bytes, so the first header and its data fit inside it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::IPPROTO_IP;
                    (*c).cmsg_type = libc::IP_PKTINFO;
                    (*c).cmsg_len = PKTINFO_LEN as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>(), info);
                }
            }
            self.hdrs.push(h);
        }
        // SAFETY: the headers' pointers refer to this struct's buffers, which are neither
        // moved nor resized during the call.
        let sent = unsafe { send_all(sock, &mut self.hdrs[..n]) };
        self.lens.clear();
        self.dsts.clear();
        self.srcs.clear();
        sent
    }
}

/// Buffers for one `recvmmsg` call, and the datagrams it returned.
pub struct RecvBatch {
    data: Vec<u8>,
    srcs: Vec<libc::sockaddr_in>,
    cmsgs: Vec<CmsgBuf>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    fwd: Vec<libc::mmsghdr>,
    out_names: Vec<libc::sockaddr_in>,
    out_iovs: Vec<libc::iovec>,
    n: usize,
    /// Whether to ask for control messages; off where nobody reads them (the forwarder), so the
    /// baseline does no work the relay does not.
    want_cmsgs: bool,
}

impl RecvBatch {
    pub fn new() -> Self {
        Self::build(false)
    }

    /// Like [`RecvBatch::new`], and also collects control messages ([`RecvBatch::local_ip`],
    /// [`RecvBatch::received_ns`]).
    pub fn with_cmsgs() -> Self {
        Self::build(true)
    }

    /// Allocates the buffers and points the kernel structures at them once: the vectors never
    /// grow, so their heap storage (and every pointer into it) stays put even when the struct
    /// moves. Each receive then only resets the fields the kernel wrote in the previous one.
    fn build(want_cmsgs: bool) -> Self {
        let mut b = RecvBatch {
            data: vec![0; BATCH * SLOT],
            // SAFETY: sockaddr_in is plain old data; all-zero is valid.
            srcs: vec![unsafe { zeroed() }; BATCH],
            cmsgs: vec![CmsgBuf([0; 128]); BATCH],
            iovs: Vec::with_capacity(BATCH),
            hdrs: Vec::with_capacity(BATCH),
            fwd: Vec::with_capacity(BATCH),
            // SAFETY: sockaddr_in is plain old data; all-zero is valid.
            out_names: vec![unsafe { zeroed() }; BATCH],
            out_iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                BATCH
            ],
            n: 0,
            want_cmsgs,
        };
        for i in 0..BATCH {
            b.iovs.push(libc::iovec {
                iov_base: b.data[i * SLOT..].as_mut_ptr().cast(),
                iov_len: SLOT,
            });
        }
        for i in 0..BATCH {
            let mut h = empty_mmsghdr();
            h.msg_hdr.msg_name = (&mut b.srcs[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_iov = &mut b.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            if want_cmsgs {
                h.msg_hdr.msg_control = b.cmsgs[i].0.as_mut_ptr().cast();
            }
            b.hdrs.push(h);
        }
        b.reset(BATCH);
        b
    }

    /// Restores the fields the kernel overwrites (lengths, flags) in the first `n` headers.
    fn reset(&mut self, n: usize) {
        for h in &mut self.hdrs[..n] {
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if self.want_cmsgs {
                h.msg_hdr.msg_controllen = size_of::<CmsgBuf>() as _;
            }
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
    }

    /// Receives up to [`BATCH`] datagrams. With `MSG_WAITFORONE` it blocks (up to the socket's
    /// read timeout) for the first and then takes what is queued; with `MSG_DONTWAIT` it never
    /// blocks. A timeout or an empty socket yields `Ok(0)`.
    pub fn recv(&mut self, sock: &UdpSocket, flags: libc::c_int) -> io::Result<usize> {
        // Only the headers the last call filled were written by the kernel.
        self.reset(self.n);
        self.n = 0;
        // SAFETY: BATCH valid mmsghdrs pointing into this struct's buffers, which stay put
        // for the duration of the call; a null timeout means "use the socket's".
        let rc = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                BATCH as u32,
                flags,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        self.n = rc as usize;
        Ok(self.n)
    }

    pub fn payload(&self, i: usize) -> &[u8] {
        assert!(i < self.n);
        let len = (self.hdrs[i].msg_len as usize).min(SLOT);
        &self.data[i * SLOT..i * SLOT + len]
    }

    #[cfg(test)]
    pub fn source(&self, i: usize) -> SocketAddrV4 {
        assert!(i < self.n);
        from_sockaddr(&self.srcs[i])
    }

    /// The data of datagram `i`'s control message `level`/`kind`, if the kernel attached one.
    fn cmsg<T>(&self, i: usize, level: libc::c_int, kind: libc::c_int) -> Option<T> {
        assert!(i < self.n);
        let h = &self.hdrs[i].msg_hdr;
        // SAFETY: the kernel filled msg_control (our aligned buffer) and set msg_controllen to
        // what it wrote; CMSG_FIRSTHDR/CMSG_NXTHDR stay within it and return null at its end,
        // and a header of this level and kind carries a `T` (unaligned, hence read_unaligned).
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == level && (*c).cmsg_type == kind {
                    return Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<T>()));
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        None
    }

    /// The address the datagram was sent to, if the socket has [`enable_pktinfo`].
    pub fn local_ip(&self, i: usize) -> Option<Ipv4Addr> {
        let info: libc::in_pktinfo = self.cmsg(i, libc::IPPROTO_IP, libc::IP_PKTINFO)?;
        Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)))
    }

    /// When the kernel received the datagram (Unix time in ns), if the socket has
    /// [`enable_timestamps`]: lets a reader that runs late still tell when replies arrived.
    pub fn received_ns(&self, i: usize) -> Option<u64> {
        let ts: libc::timespec = self.cmsg(i, libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS)?;
        Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    /// Sends each received datagram, unchanged and without copying, or a fixed reply in its
    /// place, wherever `route` says. Returns how many the kernel took.
    pub fn send_routed(
        &mut self,
        sock: &UdpSocket,
        mut route: impl FnMut(&[u8], SocketAddrV4) -> Route,
    ) -> u64 {
        self.fwd.clear();
        for i in 0..self.n {
            let len = (self.hdrs[i].msg_len as usize).min(SLOT);
            let src = from_sockaddr(&self.srcs[i]);
            let (dst, iov) = match route(&self.data[i * SLOT..i * SLOT + len], src) {
                Route::Forward(dst) => (
                    dst,
                    libc::iovec {
                        iov_base: self.iovs[i].iov_base,
                        iov_len: len,
                    },
                ),
                // sendmmsg only reads the payload, so pointing it at a static is sound.
                Route::Reply(bytes) => (
                    src,
                    libc::iovec {
                        iov_base: bytes.as_ptr().cast_mut().cast(),
                        iov_len: bytes.len(),
                    },
                ),
            };
            let k = self.fwd.len();
            self.out_names[k] = sockaddr(dst);
            self.out_iovs[k] = iov;
            let mut h = empty_mmsghdr();
            h.msg_hdr.msg_name = (&mut self.out_names[k] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.out_iovs[k];
            h.msg_hdr.msg_iovlen = 1;
            self.fwd.push(h);
        }
        // SAFETY: the headers point at our buffers, names and iovecs (or static replies), all
        // alive and unmoved during the call.
        unsafe { send_all(sock, &mut self.fwd) }.ok
    }
}

/// Sends every message of `hdrs` with as few `sendmmsg` calls as the kernel allows; a message
/// the kernel refuses is skipped (counted as failed) and the rest still go.
///
/// # Safety
/// Every header's pointers (name, iovecs, control) must be valid for the call.
unsafe fn send_all(sock: &impl AsRawFd, hdrs: &mut [libc::mmsghdr]) -> Sent {
    let (n, mut off) = (hdrs.len(), 0);
    let mut sent = Sent::default();
    while off < n {
        // SAFETY: hdrs[off..n] are valid mmsghdrs (the caller's promise).
        let rc = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                hdrs[off..].as_mut_ptr(),
                (n - off) as u32,
                0,
            )
        };
        if rc > 0 {
            off += rc as usize;
            sent.ok += rc as u64;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // The first remaining message failed; skip it and carry on with the rest.
            off += 1;
            sent.failed += 1;
        }
    }
    sent
}

/// Where [`RecvBatch::send_routed`] sends one received datagram.
#[derive(Debug, Clone, Copy)]
pub enum Route {
    /// The datagram itself, unchanged, to this address.
    Forward(SocketAddrV4),
    /// These bytes instead, back to the datagram's source.
    Reply(&'static [u8]),
}

/// CPU time (user + system, all threads) a process has used so far.
///
/// Prefers the nanosecond `sum_exec_runtime` of each thread (`/proc/<pid>/task/*/schedstat`),
/// because `utime + stime` in `/proc/<pid>/stat` counts in 10 ms ticks, too coarse for a run of a
/// few hundred milliseconds of CPU. Falls back to the ticks when schedstat is unavailable.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    match cpu_time_schedstat(pid) {
        Ok(t) => Ok(t),
        Err(_) => cpu_time_stat(pid),
    }
}

fn cpu_time_schedstat(pid: u32) -> Result<Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may exit between listing and reading; its time is then gone either way.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let first = text.split_whitespace().next().context("empty schedstat")?;
        ns += first
            .parse::<u64>()
            .with_context(|| format!("{}: {text}", path.display()))?;
    }
    Ok(Duration::from_nanos(ns))
}

/// How many times the process's threads went to sleep (voluntary context switches, summed
/// over `/proc/<pid>/task/*/status`).
pub fn sleeps(pid: u32) -> Result<u64> {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(text) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        let line = text
            .lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches:"));
        n += line
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(n)
}

/// `utime + stime` from `/proc/<pid>/stat`, in clock ticks converted to time.
pub fn cpu_time_stat(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) may contain spaces; the numeric fields follow its last ')'.
    let after = text
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = [11, 12]
        .iter()
        .map(|&i| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .context("utime/stime")
        })
        .sum::<Result<u64>>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Datagrams the kernel dropped at UDP sockets bound to the local `ports` because their receive
/// buffer was full: the `drops` column of `/proc/net/udp`. Tells whether a loss happened at the
/// relay's socket or at ours.
pub fn udp_drops(ports: &[u16]) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/udp").context("read /proc/net/udp")?;
    let mut drops = 0;
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields
            .get(1)
            .and_then(|a| a.split_once(':'))
            .map(|(_, p)| p);
        if local_port
            .and_then(|p| u16::from_str_radix(p, 16).ok())
            .is_some_and(|p| ports.contains(&p))
        {
            drops += fields
                .last()
                .and_then(|d| d.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(drops)
}

/// The fraction of all CPUs in use over `window` (from `/proc/stat`), to warn when something
/// else is already loading the host.
pub fn host_busy(window: Duration) -> Result<f64> {
    fn sample() -> Result<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        let line = text.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Ok((v.iter().take(8).sum(), idle))
    }
    let (t0, i0) = sample()?;
    std::thread::sleep(window);
    let (t1, i1) = sample()?;
    let total = t1.saturating_sub(t0).max(1);
    Ok(1.0 - i1.saturating_sub(i0) as f64 / total as f64)
}

/// Resident set size (`VmRSS`) of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bad line {line:?}"))?;
    Ok(kb * 1024)
}

/// `/proc/loadavg`'s first three figures: how busy the shared host was while a bench ran
/// (other builds move every wall-time figure); "unknown" where it cannot be read.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pktinfo_selects_the_source_and_reports_the_destination() -> Result<()> {
        let rx = bind_udp(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        enable_pktinfo(&rx)?;
        enable_timestamps(&rx)?;
        let before = unix_ns();
        rx.set_read_timeout(Some(Duration::from_secs(2)))?;
        let port = local_v4(&rx)?.port();
        let tx = bind_udp(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        let tx_port = local_v4(&tx)?.port();
        let (from, to) = (Ipv4Addr::new(127, 9, 8, 7), Ipv4Addr::new(127, 6, 5, 4));
        let mut batch = SendBatch::new();
        batch.push(SocketAddrV4::new(to, port), Some(from), b"hello");
        assert_eq!(batch.send(&tx).ok, 1);
        let mut rb = RecvBatch::with_cmsgs();
        assert_eq!(rb.recv(&rx, libc::MSG_WAITFORONE)?, 1);
        assert_eq!(rb.payload(0), b"hello");
        assert_eq!(rb.source(0), SocketAddrV4::new(from, tx_port));
        assert_eq!(rb.local_ip(0), Some(to));
        let at = rb.received_ns(0).context("timestamp")?;
        assert!(before <= at && at <= unix_ns(), "{before} {at}");
        udp_drops(&[port])?;
        Ok(())
    }

    #[test]
    fn send_routed_forwards_and_replies() -> Result<()> {
        let lo = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let (fwd, a, b) = (bind_udp(lo)?, bind_udp(lo)?, bind_udp(lo)?);
        for s in [&fwd, &a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
        }
        let b_addr = local_v4(&b)?;
        a.send_to(b"data", local_v4(&fwd)?)?;
        a.send_to(b"REG:x", local_v4(&fwd)?)?;
        let mut rb = RecvBatch::new();
        let mut got = 0;
        while got < 2 {
            got += rb.recv(&fwd, libc::MSG_WAITFORONE)?;
            rb.send_routed(&fwd, |p, _| {
                if p.starts_with(b"REG:") {
                    Route::Reply(b"ACK\n")
                } else {
                    Route::Forward(b_addr)
                }
            });
        }
        let mut buf = [0u8; 16];
        assert_eq!(b.recv_from(&mut buf)?.0, 4);
        assert_eq!(&buf[..4], b"data");
        assert_eq!(a.recv_from(&mut buf)?.0, 4);
        assert_eq!(&buf[..4], b"ACK\n");
        Ok(())
    }

    #[test]
    fn buffers_are_at_least_what_was_asked() -> Result<()> {
        let sock = bind_udp(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
        set_buffers(&sock, 6 << 20)?;
        let rcv = get_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUF)?;
        // As root we get what we asked for; unprivileged, at least the default.
        assert!(rcv >= 6 << 20 || euid() != 0, "{rcv}");
        Ok(())
    }

    fn euid() -> u32 {
        // SAFETY: geteuid cannot fail and has no preconditions.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn proc_readings_of_this_process() -> Result<()> {
        let pid = std::process::id();
        assert!(rss_bytes(pid)? > 0);
        let busy = host_busy(Duration::from_millis(20))?;
        assert!((0.0..=1.0).contains(&busy), "{busy}");
        cpu_time(pid)?;
        cpu_time_stat(pid)?;
        sleeps(pid)?;
        Ok(())
    }
}
