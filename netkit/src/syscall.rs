//! `recvmmsg(2)` and `sendmmsg(2)` as bare system calls, for the loops that make one of each
//! per wake-up.
//!
//! glibc's wrappers are thread-cancellation points: in a process with more than one thread
//! they bracket the call with the asynchronous-cancellation switch, tens of instructions per
//! call that buy nothing, since nothing in Rust cancels a thread. `libc::syscall` avoids that
//! but is a variadic function that shuffles its arguments and goes through `errno`. On x86-64
//! and AArch64 the call is made inline here instead (what glibc itself does inside its
//! wrappers); at low rates, where each wake-up carries one datagram, the wrappers were a tenth
//! of a relay's own instructions per datagram.

/// A system call with five arguments: its result, or `-errno` on failure (the kernel's
/// convention, no `errno` involved).
///
/// # Safety
/// The arguments must be valid for system call `nr` (pointers it reads or writes included).
#[inline(always)]
unsafe fn syscall5(nr: libc::c_long, args: [usize; 5]) -> isize {
    #[cfg(target_arch = "x86_64")]
    {
        let ret: isize;
        // SAFETY: as the caller promises. The kernel clobbers rcx and r11 and nothing else;
        // the call uses no stack.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") nr as isize => ret,
                in("rdi") args[0],
                in("rsi") args[1],
                in("rdx") args[2],
                in("r10") args[3],
                in("r8") args[4],
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }
    #[cfg(target_arch = "aarch64")]
    {
        let ret: isize;
        // SAFETY: as the caller promises. The kernel preserves every register but x0.
        unsafe {
            std::arch::asm!(
                "svc 0",
                in("x8") nr,
                inlateout("x0") args[0] => ret,
                in("x1") args[1],
                in("x2") args[2],
                in("x3") args[3],
                in("x4") args[4],
                options(nostack),
            );
        }
        ret
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        // SAFETY: as the caller promises.
        let r = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4]) };
        if r < 0 {
            -(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as isize)
        } else {
            r as isize
        }
    }
}

/// `recvmmsg(2)` with no timeout (the socket's `SO_RCVTIMEO` applies): the number of messages
/// received, or the system error.
///
/// # Safety
/// `hdrs` points at `count` valid message headers whose buffers are writable, as for
/// `recvmmsg`.
#[inline(always)]
pub unsafe fn recvmmsg(
    fd: libc::c_int,
    hdrs: *mut libc::mmsghdr,
    count: usize,
    flags: libc::c_int,
) -> Result<usize, i32> {
    let count = count.min(libc::c_uint::MAX as usize);
    // SAFETY: as the caller promises; the arguments are those of recvmmsg(2), the flags an
    // int and the timeout null.
    let r = unsafe {
        syscall5(
            libc::SYS_recvmmsg,
            [fd as usize, hdrs as usize, count, flags as usize, 0],
        )
    };
    if r < 0 {
        Err(-r as i32)
    } else {
        Ok(r as usize)
    }
}

/// `sendmmsg(2)` with no flags: the number of messages sent, or the system error.
///
/// # Safety
/// `hdrs` points at `count` valid message headers, as for `sendmmsg`.
#[inline(always)]
pub unsafe fn sendmmsg(
    fd: libc::c_int,
    hdrs: *mut libc::mmsghdr,
    count: usize,
) -> Result<usize, i32> {
    let count = count.min(libc::c_uint::MAX as usize);
    // SAFETY: as the caller promises; the arguments are those of sendmmsg(2).
    let r = unsafe {
        syscall5(
            libc::SYS_sendmmsg,
            [fd as usize, hdrs as usize, count, 0, 0],
        )
    };
    if r < 0 {
        Err(-r as i32)
    } else {
        Ok(r as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::mem::zeroed;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    use super::{recvmmsg, sendmmsg};

    /// A message header for one buffer, pointing at `iov`, which is set to `buf`.
    fn header(buf: &mut [u8], iov: &mut libc::iovec) -> libc::mmsghdr {
        *iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: all-zero is a valid mmsghdr.
        let mut h: libc::mmsghdr = unsafe { zeroed() };
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
        h
    }

    #[test]
    fn a_datagram_goes_through_both_calls_and_errors_come_back_as_errno() -> std::io::Result<()> {
        let rx = UdpSocket::bind("127.0.0.1:0")?;
        let tx = UdpSocket::bind("127.0.0.1:0")?;
        tx.connect(rx.local_addr()?)?;
        let mut payload = *b"hello";
        let (mut iov, mut riov) = (
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        );
        let mut h = header(&mut payload, &mut iov);
        // SAFETY: one valid header on a connected socket.
        assert_eq!(unsafe { sendmmsg(tx.as_raw_fd(), &mut h, 1) }, Ok(1));
        let mut buf = [0u8; 16];
        let mut r = header(&mut buf, &mut riov);
        // SAFETY: one valid header with a writable buffer.
        let n = unsafe { recvmmsg(rx.as_raw_fd(), &mut r, 1, libc::MSG_WAITFORONE) };
        assert_eq!(n, Ok(1));
        assert_eq!(&buf[..r.msg_len as usize], b"hello");
        // Nothing more queued: a non-blocking receive says EAGAIN, a bad descriptor EBADF.
        // SAFETY: as above.
        let n = unsafe { recvmmsg(rx.as_raw_fd(), &mut r, 1, libc::MSG_DONTWAIT) };
        assert_eq!(n, Err(libc::EAGAIN));
        // SAFETY: the descriptor is invalid, which is the point; nothing is read.
        assert_eq!(unsafe { sendmmsg(-1, &mut h, 1) }, Err(libc::EBADF));
        Ok(())
    }
}
