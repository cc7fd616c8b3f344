//! The few system calls the lab needs that std does not wrap: entering a network namespace,
//! opening a TAP device, waiting on a file descriptor, and waiting for a termination signal.
//!
//! All `unsafe` of the crate lives here, each block next to the invariant that makes it sound.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

/// Where `ip netns add NAME` leaves the handle of a named namespace.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Opens the handle of a named network namespace (as created by `ip netns add`).
pub(crate) fn open_netns(name: &str) -> io::Result<OwnedFd> {
    let file = File::open(netns_path(name))
        .map_err(|e| io::Error::new(e.kind(), format!("open /run/netns/{name}: {e}")))?;
    Ok(OwnedFd::from(file))
}

/// Moves the calling thread (only this thread) into the network namespace behind `fd`.
///
/// Sockets created afterwards by this thread, and threads it spawns afterwards, belong to that
/// namespace. Also safe to call between `fork` and `exec` (a single system call, no allocation).
pub(crate) fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns only reads its integer arguments; `fd` is a live descriptor for the whole call
    // because the BorrowedFd borrows it.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Moves the calling thread into the named network namespace.
///
/// Use it at the start of a thread you own (the lab's `run_in` and `spawn_thread` do this for
/// you); never on a thread you share with other code, such as a tokio worker.
pub fn enter_netns(name: &str) -> io::Result<()> {
    let fd = open_netns(name)?;
    setns_net(std::os::fd::AsFd::as_fd(&fd))
        .map_err(|e| io::Error::new(e.kind(), format!("setns into {name}: {e}")))
}

/// Creates (or attaches to) the TAP interface `ifname` in the calling thread's network namespace
/// and returns its queue: each `read` yields one Ethernet frame, each `write` injects one.
///
/// The interface lives while the descriptor is open; it is created down.
pub(crate) fn open_tap(ifname: &str) -> io::Result<File> {
    let name = CString::new(ifname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {ifname:?} longer than 15 bytes"),
        ));
    }
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data (integers, arrays and a union of them); all-zero is a valid
    // value for every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // No packet-information header: frames are read and written exactly as on the wire.
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is, and the descriptor is
    // open for the whole call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("TUNSETIFF {ifname}: {e}")));
    }
    Ok(file)
}

/// Waits until `fd` is readable or `timeout` passes; `Ok(false)` on timeout.
///
/// The lab's forwarding threads poll with a short timeout so they notice a stop request.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd and we pass a count of 1; the descriptor is borrowed, so
    // open, for the whole call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// True when a process with this id exists (it may belong to someone else: ids are reused).
pub(crate) fn process_alive(pid: u32) -> bool {
    std::path::Path::new("/proc").join(pid.to_string()).exists()
}

/// Sends SIGKILL to the process group `pgid` (the lab starts every child as a group leader).
pub(crate) fn kill_group(pgid: u32) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid) {
        sigkill(-pgid);
    }
}

/// Sends SIGKILL to one process.
pub(crate) fn kill_pid(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        sigkill(pid);
    }
}

fn sigkill(target: libc::pid_t) {
    // 0, 1, -1 and init would signal our own group, init, or everything we may signal.
    if matches!(target, -1..=1) {
        return;
    }
    // SAFETY: kill only reads its integer arguments.
    unsafe {
        libc::kill(target, libc::SIGKILL);
    }
}

/// The effective user id (the lab needs root for namespaces and nftables).
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Blocks SIGINT and SIGTERM for the calling thread and the threads it starts afterwards, so
/// that [`wait_for_termination`] can collect them instead of the default action killing the
/// process before it removed its namespaces. Call it first thing in `main`.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Waits for SIGINT or SIGTERM (blocked beforehand with [`block_termination_signals`]) and
/// returns its number.
pub fn wait_for_termination() -> io::Result<i32> {
    let set = termination_set();
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is a valid place for the signal number.
    let rc = unsafe { libc::sigwait(&set, &mut sig) };
    if rc == 0 {
        Ok(sig)
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before sigaddset reads it, and
    // both only touch the set we pass.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Makes the child that `cmd` spawns enter the network namespace behind `fd` before it execs.
pub(crate) fn enter_netns_on_exec(cmd: &mut std::process::Command, fd: OwnedFd) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child between fork and exec, where only
    // async-signal-safe work is allowed: it makes one system call (setns) on a descriptor the
    // child inherited from the parent (fork copies it; O_CLOEXEC closes it at exec), and reads
    // errno on failure. It allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || setns_net(std::os::fd::AsFd::as_fd(&fd)));
    }
}
