//! Every default timeout, size and limit of the proxy, in one place, each with the reason for
//! its value. The modules that enforce them import them from here.

use std::time::Duration;

// QUIC transport, both roles.

/// Bytes of DATAGRAMs quinn may queue each way. At 1,400 bytes each this is ~6,000 packets:
/// enough to ride out a scheduling hiccup at a few hundred Mbit/s without dropping.
pub const DATAGRAM_BUFFER: usize = 8 << 20;
/// Per-stream receive window: one TCP flow can keep ~8 MiB in flight (about 650 Mbit/s at
/// 100 ms RTT).
pub const STREAM_WINDOW: u32 = 8 << 20;
/// Connection-wide receive and send windows, shared by all flows.
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// Concurrent bidi streams the peer may open: the UDP session cap plus room for TCP flows.
pub const MAX_STREAMS: u32 = 4096;

/// Longest interval between client keepalives: keeps a server whose idle timeout is 15 s or
/// more (and typical NAT UDP bindings, 30 s and up) from timing the connection out.
pub const KEEPALIVE_MAX: Duration = Duration::from_secs(5);

/// Initial RTT estimate of path connections (see [`path_transport_config`](crate::transport::path_transport_config)).
pub const PATH_INITIAL_RTT: Duration = Duration::from_millis(100);

/// Largest QUIC packet (UDP payload) an endpoint accepts and path MTU discovery tries (quinn
/// stops at 1,452). Where a path carries more (loopback, jumbo frames), fewer, bigger packets
/// carry the same bytes and every per-packet cost (AEAD setup, header protection, ACK
/// bookkeeping, system calls) is paid less often: one TCP flow through the proxy on loopback
/// took 1.39 ns of the proxy's CPU per byte at 6,500-byte packets and 1.24 ns at 65,000
/// (`cargo xtask bench mqproxy --only tcp`, medians of 5). On an ordinary path nothing changes
/// on the wire: quinn-udp sets DF, a bigger probe fails locally (EMSGSIZE) or is lost, and the
/// search settles below the path's limit. 65,000 stays under IPv4's 65,507-byte UDP limit;
/// quinn's GSO batches are capped to fit the kernel's 64 KiB per send (see `transport`).
pub const MAX_UDP_PAYLOAD: u16 = 65_000;

/// Kernel buffer asked for on the QUIC UDP socket, each way. The default (~208 KiB) overflows
/// under a burst of GSO-sized sends at Gbit/s rates, and every overflow is a loss that halves
/// the congestion window: with it, one TCP flow ran at ~2 Gbit/s on loopback with hundreds of
/// receive-buffer drops per GiB.
pub const UDP_SOCKET_BUFFER: usize = 8 << 20;

// Server: connections, authentication, streams, multipath bundles.

/// How long a client has to finish the QUIC handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to authenticate after the handshake; it holds a `--max-conns` slot
/// meanwhile, so this bounds how long a silent client blocks others.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new stream may take to say what it is.
pub const STREAM_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connect timeout towards a destination.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// DNS timeout for a destination name.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `--udp-idle-timeout`.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default QUIC idle timeout (the client keeps it alive at a third of this).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `--max-conns`: connections between handshake and authentication. Only connections
/// from validated addresses (after a QUIC Retry) take a slot, so a flood of Initials from
/// spoofed or silent sources cannot fill them; 256 leaves room for many clients
/// reconnecting at once after a server restart.
pub const DEFAULT_MAX_CONNS: usize = 256;
/// UDP packets one session forwards per wake-up before yielding to the others.
pub const UDP_BATCH: usize = 64;
/// Session open/close notices queued from stream tasks to the connection loop; a notice per
/// session event, so the session cap bounds what can be outstanding.
pub const EVENT_QUEUE: usize = DEFAULT_MAX_SESSIONS;
/// How long a multipath bundle outlives its last path: a client whose every path dropped at
/// once (a flapping uplink) gets its UDP sessions and TCP flows back if a path returns in time.
pub const BUNDLE_GRACE: Duration = Duration::from_secs(10);
/// Striped TCP flows per bundle (each holds two [`FLOW_WINDOW`] buffers at most).
pub const MAX_FLOWS: usize = 1024;

// Server: UDP sessions.

/// UDP sessions per connection (the original's limit): a client behind one SOCKS listener
/// rarely talks to more destinations at once, and each costs a socket on the server.
pub const DEFAULT_MAX_SESSIONS: usize = 1024;
/// Default `--max-udp-sessions-per-client`: sessions all connections from one client address
/// (an IPv6 /64) may hold together. Two connections' worth of [`DEFAULT_MAX_SESSIONS`]: a
/// multipath client or a reconnect overlapping its old connection fits, ten connections do not.
pub const DEFAULT_MAX_SESSIONS_PER_CLIENT: usize = 2 * DEFAULT_MAX_SESSIONS;
/// File descriptors one UDP session holds: its socket and the clone the dispatcher sends on.
pub const FDS_PER_SESSION: u64 = 2;
/// Share of `RLIMIT_NOFILE` the default process-wide session cap may use: half, so the QUIC
/// socket, TCP CONNECT streams (one descriptor each) and the metrics page keep the other half
/// and a client opening sessions cannot make the server's own `socket()` or `accept()` fail.
pub const SESSION_FD_SHARE_DIVISOR: u64 = 2;
/// Upper bound of the derived process-wide cap, whatever `RLIMIT_NOFILE` allows: each session
/// also costs a task and kernel socket buffers (about 200 KiB of receive buffer at the
/// default `rmem_default`), so an unlimited descriptor table must not mean unlimited memory.
pub const MAX_SESSIONS_TOTAL_CEILING: usize = 65_536;
/// Pre-OPEN buffer: packets held per connection (the original's 16).
pub const PRE_OPEN_PACKETS: usize = 16;
/// Pre-OPEN buffer: bytes held per connection (the original's 32 KiB).
pub const PRE_OPEN_BYTES: usize = 32 * 1024;
/// Pre-OPEN buffer: how long a packet waits for its session (the original's 250 ms; an OPEN
/// sent with the packet arrives within about one RTT).
pub const PRE_OPEN_TTL: Duration = Duration::from_millis(250);
/// Reassembly memory per connection across all its sessions: 4 slots × 64 KiB per session
/// would allow 256 MiB at 1,024 sessions, so a connection-wide budget bounds it.
pub const REASSEMBLY_BUDGET: usize = 8 << 20;

// Client.

/// How long a request waits for the connection to the server to come (back) up.
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long the server may take to answer a CONNECT (its DNS and TCP timeouts, plus margin).
pub const CONNECT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SOCKS or HTTP client may take to send its greeting and request.
pub const INGRESS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to answer authentication.
pub const AUTH_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnection delay; doubles per failure up to [`BACKOFF_MAX`], each with ±50 % jitter
/// so many clients do not reconnect in lockstep after a server restart.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest reconnection delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest redial delay of one path of a multipath client (the others carry the traffic
/// meanwhile, and a path that comes back should be in use again within seconds).
pub const PATH_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Concurrent SOCKS/HTTP client connections: each holds a task and buffers (~130 KiB while
/// splicing), so this caps the client at roughly half a GiB.
pub const MAX_INGRESS_CONNECTIONS: usize = 4096;
/// Destinations (= UDP sessions) per UDP association; the server's per-connection default.
pub const MAX_SESSIONS_PER_ASSOCIATION: usize = DEFAULT_MAX_SESSIONS;
/// After the server refuses a destination, packets to it are dropped for this long before the
/// next attempt, so a chatty client does not turn every packet into an OPEN.
pub const REFUSED_HOLD: Duration = Duration::from_secs(1);
/// Largest SOCKS handshake message (greeting, auth or request) buffered.
pub const MAX_HANDSHAKE: usize = 1024;

// Multipath: path health and striped TCP flows.

/// How often each path's health is sampled.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(50);
/// A path that has received nothing for this long (or 4 RTTs, if longer) is not scheduled on.
/// Path connections send keepalives every [`PATH_KEEPALIVE`], which the peer acknowledges, so
/// a live path hears something several times in this interval.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(300);
/// Keepalive interval of path connections: short, so a silent path is a dead path.
pub const PATH_KEEPALIVE: Duration = Duration::from_millis(100);
/// QUIC idle timeout of path connections: a path that stays silent this long is dropped (and
/// its client starts redialing it).
pub const PATH_IDLE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Datagram bytes queued in quinn on a path beyond which the path counts as full for UDP
/// scheduling: ~20 ms at 100 Mbit/s, so a busy path spills onto the next one instead of
/// building a queue.
pub const DATAGRAM_QUEUE_TARGET: u64 = 256 * 1024;
/// Unacknowledged bytes per striped flow and direction (the peer's reorder window). It must
/// cover the aggregate rate times the slowest path's round trip *with its queue* plus the
/// end-to-end acknowledgement: two 100 Mbit/s, 50 ms paths whose 1,000-packet queues fill reach
/// ~200 ms, ~5 MB, and a loss on one path holds the reorder buffer for another round trip.
/// At 6 MiB one flow reached 1.79x a single path, at 16 MiB 1.88x. Memory stays bounded by
/// the paths anyway: all flows together keep at most ~2 congestion windows per path in flight.
pub const FLOW_WINDOW: usize = 16 << 20;
/// Extra room over twice the congestion window that TCP chunks may occupy on a path, so a
/// small window still admits whole chunks.
pub const ROOM_SLACK: u64 = 256 * 1024;
/// A striped flow with no usable subflow this long gives up (resets its TCP connection).
pub const FLOW_STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a flow with data waiting for room looks at the paths again (room also frees when
/// acknowledgements arrive, which wakes it at once).
pub const ROOM_POLL: Duration = Duration::from_millis(2);
/// Bytes received in order between ACKs sent for receipt alone: the sender's paths see the
/// room within a fraction of [`ROOM_SLACK`].
pub const RECEIVED_ACK_EVERY: u64 = 64 * 1024;
/// Bytes all striped flows of this process may hold received but not yet written to their TCP
/// sockets (applications not reading). Below it, receipt is acknowledged at once, so a paused
/// download does not hold the paths; above it, only what is written is, so the senders' path
/// room fills and they wait: memory stays bounded at the price of head-of-line blocking.
pub const RECEIVE_BUDGET: u64 = 128 << 20;
/// Events queued from subflow readers to their flow: each carries at most one chunk and the
/// reorder window bounds the chunks outstanding.
pub const FLOW_EVENTS: usize = 256;

// Relay sessions.

/// How long a client waits for the server to be registered in the session before the attempt
/// fails (and is retried with backoff).
pub const PEER_WAIT: Duration = Duration::from_secs(10);
