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
