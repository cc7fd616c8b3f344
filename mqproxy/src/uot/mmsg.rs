//! `sendmmsg(2)` for the tunnel's egress: every frame decoded from one TCP read leaves in one
//! system call per [`BATCH`] datagrams instead of one each (the listen side's per-datagram
//! `sendto` was the tunnel's bottleneck on loopback).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use bytes::Bytes;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams per `sendmmsg` call (the kernel caps a call at UIO_MAXIOV = 1024).
pub const BATCH: usize = 64;

/// Sends `datagrams` (destination, payload) from `sock`, waiting for room as needed. Returns
/// how many the kernel accepted; a datagram the kernel refuses (an ICMP error pending, no
/// route) is skipped and counted in the error total, like a failed `send_to`.
pub async fn send_all(sock: &UdpSocket, datagrams: &[(SocketAddr, Bytes)]) -> (u64, u64) {
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut rest = datagrams;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(BATCH)];
        match sock
            .async_io(Interest::WRITABLE, || send_some(sock, chunk))
            .await
        {
            Ok(n) => {
                sent += n as u64;
                rest = &rest[n.max(1)..];
                if n == 0 {
                    failed += 1;
                }
            }
            Err(_) => {
                // The first datagram of the chunk failed (its error is reported by this
                // call): skip it and carry on with the next.
                failed += 1;
                rest = &rest[1..];
            }
        }
    }
    (sent, failed)
}

/// One non-blocking `sendmmsg`: how many of `chunk` went out (at least one, or an error).
fn send_some(sock: &UdpSocket, chunk: &[(SocketAddr, Bytes)]) -> io::Result<usize> {
    let addrs: Vec<socket2::SockAddr> = chunk.iter().map(|(a, _)| (*a).into()).collect();
    let mut iovs: Vec<libc::iovec> = chunk
        .iter()
        .map(|(_, p)| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter()
        .zip(iovs.iter_mut())
        .map(|(a, iov)| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = a.as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = a.len();
            m.msg_hdr.msg_iov = iov as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: `msgs` points at `addrs` and `iovs`, which point at payloads in `chunk`; all
    // outlive the call, and the lengths passed are those of the vectors.
    let n = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sends_every_datagram_in_order_with_boundaries() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let tx = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let to = rx.local_addr().expect("addr");
        let batch: Vec<(SocketAddr, Bytes)> = (0..150u32)
            .map(|i| (to, Bytes::from(vec![i as u8; (i % 7) as usize])))
            .collect();
        assert_eq!(send_all(&tx, &batch).await, (150, 0));
        let mut buf = [0u8; 16];
        for i in 0..150u32 {
            let (n, _) = rx.recv_from(&mut buf).await.expect("recv");
            assert_eq!(&buf[..n], &vec![i as u8; (i % 7) as usize][..]);
        }
    }
}
