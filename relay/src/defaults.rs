//! Every default timeout and size of the relay, in one place, each with the reason for its value.

use std::time::Duration;

/// UDP port the relay listens on, as the original relay did.
pub const PORT: u16 = 4433;

/// A paired session without forwarded traffic or registrations for this long is removed.
/// Five minutes, as the original: long enough to outlive an idle QUIC connection's keepalive gap.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(300);

/// A session still waiting for its second peer is removed after this long without a
/// registration. Short, because unpaired sessions are what a registration flood creates;
/// clients re-register every few seconds while they wait.
pub const UNPAIRED_TIMEOUT: Duration = Duration::from_secs(30);

/// Send and receive buffer requested for the relay socket. Bursts at 200,000 datagrams/s
/// overflow the kernel's default (about 200 KiB) within a millisecond of scheduling delay.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Datagrams read (and written) per system call.
pub const BATCH: usize = 64;

/// Largest datagram the relay forwards whole: the UDP maximum.
pub const MAX_DATAGRAM: usize = 65_536;

/// How often the socket loop wakes when idle, to run timers, publish metrics and notice shutdown.
pub const IDLE_WAKE: Duration = Duration::from_millis(100);

/// TCP connections open at once (PROTOCOL.md §11). Each costs a task, two small buffers and a
/// write queue; 4,096 is far below a 1 GiB box's limits and far above the share of peers whose
/// networks block UDP.
pub const TCP_MAX_CONNECTIONS: usize = 4096;

/// TCP connections open at once from one IP. A peer needs one; CGNAT and offices share IPs.
pub const TCP_MAX_PER_IP: usize = 64;

/// A TCP connection must become a session member (an accepted REG) within this long.
pub const TCP_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection that sends nothing for this long is closed. Clients re-register every
/// <= 25 s, so 90 s is three missed keepalives.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Frames queued for one TCP connection before further ones are dropped: about 300 KB of
/// 1,200-byte QUIC packets, a few round trips of a fast flow; QUIC reacts to the loss.
pub const TCP_WRITE_QUEUE: usize = 256;

/// Bytes queued for one TCP connection before further frames are dropped. A frame can be
/// 65,509 bytes, so the frame count alone let one non-reading connection hold 16 MiB; 512 KiB
/// is the 256 QUIC-sized frames above with room to spare, and 8 maximum-size datagrams.
pub const TCP_WRITE_QUEUE_BYTES: usize = 512 << 10;

/// Bytes queued for all TCP connections together before further frames are dropped: bounds
/// the relay's memory whatever the number of connections (64 non-reading members from one IP
/// could otherwise hold 64 x 512 KiB). 32 MiB is 3% of a 1 GiB box, and 64 connections each
/// with a full round trip of a 40 Mbit/s flow in flight.
pub const TCP_QUEUE_BUDGET_BYTES: usize = 32 << 20;

/// How often the relay logs that the TCP byte budget is exhausted, at most: once is enough to
/// tell the operator, every drop would flood the log during exactly the attack it reports.
pub const TCP_BUDGET_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How long a return-routability cookie is valid (PROTOCOL.md §12): the relay accepts the
/// cookie of this period and of the previous one. Clients echo it at once, so a minute is
/// generous; short enough that a leaked cookie soon stops working.
pub const COOKIE_PERIOD: Duration = Duration::from_secs(60);
