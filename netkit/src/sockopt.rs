//! Socket options the workspace sets by hand: integer options through `setsockopt(2)`, and
//! socket buffers sized past the `net.core.[rw]mem_max` ceiling where the process may.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Which of a socket's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffer {
    /// The receive buffer (`SO_RCVBUF`).
    Recv,
    /// The send buffer (`SO_SNDBUF`).
    Send,
}

/// Sets an integer socket option.
pub fn set_int(
    s: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt on a valid fd with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_fd().as_raw_fd(),
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an integer socket option.
pub fn get_int(s: &impl AsFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on a valid fd writes at most `len` bytes into the live c_int, and its
    // length into the live `len`.
    let r = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks for `size` bytes of buffer: forced (`SO_*BUFFORCE`) when the process has
/// CAP_NET_ADMIN, else as much as `net.core.[rw]mem_max` allows. What the kernel granted is
/// for the caller to read back: a smaller buffer is not an error, only slower at high rates.
pub fn set_buffer(s: &impl AsFd, which: Buffer, size: usize) -> io::Result<()> {
    let v = size.min(i32::MAX as usize) as libc::c_int;
    let (forced, plain) = match which {
        Buffer::Recv => (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        Buffer::Send => (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    };
    set_int(s, libc::SOL_SOCKET, forced, v).or_else(|_| set_int(s, libc::SOL_SOCKET, plain, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_grow_and_bad_options_fail() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let get = |name| get_int(&s, libc::SOL_SOCKET, name).expect("getsockopt");
        set_buffer(&s, Buffer::Recv, 4096).expect("recv buffer");
        set_buffer(&s, Buffer::Send, 4096).expect("send buffer");
        // Linux doubles the value for its bookkeeping, and never goes below its minimum.
        assert!(get(libc::SO_RCVBUF) >= 4096);
        assert!(get(libc::SO_SNDBUF) >= 4096);
        assert!(set_int(&s, libc::SOL_SOCKET, -1, 1).is_err());
        assert!(get_int(&s, libc::SOL_SOCKET, -1).is_err());
    }
}
