//! Relay metrics: a snapshot the socket loop publishes every tick, served as Prometheus text.
//!
//! The loop counts in plain integers (no atomics or locks per packet) and copies them here
//! every [`crate::sessions::TICK`]; readers see values at most that old.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;

use crate::sessions::{RegResult, Stats};

/// Calls `$family(name, kind, help, samples)` once per row, so the exposition reads as a
/// table. A row is the family's help as a doc comment, then `KIND NAME = value;` for one
/// unlabelled sample, `KIND NAME { label = "value" => sample, ... }` for labelled ones, or
/// `KIND NAME in samples;` for samples built beforehand.
macro_rules! families {
    ($family:ident;) => {};
    ($family:ident; $(#[doc = $help:literal])+ $kind:ident $name:ident $($row:tt)*) => {
        families!(@row $family, concat!($($help),+).trim_start(), $kind, $name; $($row)*);
    };
    (@row $family:ident, $help:expr, $kind:ident, $name:ident; in $samples:expr; $($rest:tt)*) => {
        $family(stringify!($name), stringify!($kind), $help, $samples);
        families!($family; $($rest)*);
    };
    (@row $family:ident, $help:expr, $kind:ident, $name:ident; = $v:expr; $($rest:tt)*) => {
        $family(stringify!($name), stringify!($kind), $help, &[("", $v)]);
        families!($family; $($rest)*);
    };
    (
        @row $family:ident, $help:expr, $kind:ident, $name:ident;
        { $($key:ident = $val:literal => $v:expr),* $(,)? }
        $($rest:tt)*
    ) => {
        $family(
            stringify!($name),
            stringify!($kind),
            $help,
            &[$((concat!(stringify!($key), "=\"", $val, "\""), $v)),*],
        );
        families!($family; $($rest)*);
    };
}

/// Counters the loop adds to outside the state machine.
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Datagrams longer than the receive buffer (cannot happen with the default 64 KiB buffers).
    pub truncated: AtomicU64,
    /// Datagrams the kernel refused to send (e.g. a firewall rule, no route).
    pub send_errors: AtomicU64,
    /// Receive errors other than timeouts.
    pub recv_errors: AtomicU64,
    /// Sends that carried a burst of several datagrams as one GSO batch.
    pub gso_batches: AtomicU64,
    /// Datagrams sent inside GSO batches.
    pub gso_datagrams: AtomicU64,
    /// GSO batches the kernel refused (sent again datagram by datagram).
    pub gso_failures: AtomicU64,
}

/// Counters of the TCP listener (PROTOCOL.md §11), kept by its thread.
#[derive(Debug, Default)]
pub struct TcpCounters {
    /// Connections open now (gauge).
    pub open: AtomicU64,
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused at once because `--tcp-max-connections` were open.
    pub refused_total_limit: AtomicU64,
    /// Connections refused at once because their IP had `--tcp-max-per-ip` open.
    pub refused_ip_limit: AtomicU64,
    /// Connections closed by the peer (EOF or reset) or by a write error.
    pub closed_peer: AtomicU64,
    /// Connections closed because a frame's length was invalid.
    pub closed_malformed: AtomicU64,
    /// Connections closed because no registration came within the handshake timeout.
    pub closed_handshake_timeout: AtomicU64,
    /// Connections closed because nothing came within the idle timeout.
    pub closed_idle: AtomicU64,
    /// Connections closed because the relay shut down.
    pub closed_shutdown: AtomicU64,
    /// Non-member connections closed to make room for a new one at `--tcp-max-connections`.
    pub closed_evicted: AtomicU64,
    /// Frames received from TCP members and peers.
    pub frames_in: AtomicU64,
    /// Frames written to TCP connections.
    pub frames_out: AtomicU64,
    /// Frames to a TCP connection dropped because its write queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Frames dropped because all TCP write queues together held `--tcp-queue-budget-bytes`.
    pub dropped_budget: AtomicU64,
    /// Bytes queued for all TCP connections now (gauge).
    pub queued_bytes: AtomicU64,
    /// Datagrams from a TCP member to a UDP member that the UDP socket would not take.
    pub udp_send_errors: AtomicU64,
}

/// The published counters. Cheap to read from any thread.
#[derive(Debug, Default)]
pub struct Metrics {
    /// The state machine's counters as of the last tick: one uncontended lock per tick for
    /// the loop, none per packet.
    published: Mutex<Stats>,
    /// Counted by the socket loop itself.
    pub io: IoCounters,
    /// Counted by the TCP listener.
    pub tcp: TcpCounters,
}

impl Metrics {
    /// Copies the state machine's counters (called by the loop every tick and at exit).
    pub fn publish(&self, s: &Stats) {
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone_from(s);
    }

    /// A copy of the last published state-machine counters.
    pub fn snapshot(&self) -> Stats {
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let s = self.snapshot();
        let io = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        };
        let reg_labels: Vec<String> = RegResult::ALL
            .iter()
            .map(|r| format!("result=\"{}\"", r.label()))
            .collect();
        let reg_samples: Vec<(&str, u64)> = reg_labels
            .iter()
            .zip(RegResult::ALL)
            .map(|(l, r)| (l.as_str(), s.reg(r)))
            .collect();
        let t = &self.tcp;
        families! { family;
            // Sessions: how many, and how they end.
            /// Sessions by state.
            gauge quic_relay_sessions {
                state = "paired" => s.sessions_paired,
                state = "unpaired" => s.sessions_unpaired,
            }
            /// Sessions removed for idleness, by the state they were in.
            counter quic_relay_sessions_expired_total {
                state = "paired" => s.expired_paired,
                state = "unpaired" => s.expired_unpaired,
            }
            /// Members that left a session: by BYE, ignored BYEs, or replaced after going silent.
            counter quic_relay_leaves_total {
                how = "bye" => s.byes,
                how = "bye_ignored" => s.byes_ignored,
                how = "stale_replaced" => s.stale_replaced,
                how = "tcp_closed" => s.tcp_left,
                how = "evicted_unconfirmed" => s.evicted_unconfirmed,
            }
            // Registrations.
            /// Registrations by result (new, join, refresh, rebind, or the ERR reason).
            counter quic_relay_registrations_total in &reg_samples;
            /// Extended registrations whose echoed cookie was wrong or stale.
            counter quic_relay_cookies_rejected_total = s.cookies_rejected;
            /// Registrations let through unmetered because the rate-limit table was full.
            counter quic_relay_rate_table_full_total = s.rate_table_full;
            /// Replies not sent because they would have been longer than the request.
            counter quic_relay_replies_suppressed_total = s.replies_suppressed;
            // Forwarding over UDP.
            /// Datagrams forwarded between members.
            counter quic_relay_forwarded_packets_total = s.forwarded_packets;
            /// Payload bytes forwarded between members.
            counter quic_relay_forwarded_bytes_total = s.forwarded_bytes;
            /// Datagrams dropped, by reason.
            counter quic_relay_dropped_packets_total {
                reason = "unknown_source" => s.dropped_unknown_source,
                reason = "unpaired" => s.dropped_unpaired,
                reason = "unverified" => s.dropped_unverified,
                reason = "truncated" => io(&self.io.truncated),
                reason = "send_error" => io(&self.io.send_errors),
            }
            /// Bursts to one peer sent as one UDP GSO batch, and the datagrams in them.
            counter quic_relay_gso_batches_total {
                unit = "batches" => io(&self.io.gso_batches),
                unit = "datagrams" => io(&self.io.gso_datagrams),
                unit = "failed_batches" => io(&self.io.gso_failures),
            }
            /// Socket receive errors other than timeouts.
            counter quic_relay_receive_errors_total = io(&self.io.recv_errors);
            // Members over TCP.
            /// TCP connections open now.
            gauge quic_relay_tcp_connections = io(&t.open);
            /// TCP connections: accepted, refused by a cap, and closed, by reason.
            counter quic_relay_tcp_connections_total {
                event = "accepted" => io(&t.accepted),
                event = "refused_total_limit" => io(&t.refused_total_limit),
                event = "refused_ip_limit" => io(&t.refused_ip_limit),
                event = "closed_peer" => io(&t.closed_peer),
                event = "closed_malformed" => io(&t.closed_malformed),
                event = "closed_handshake_timeout" => io(&t.closed_handshake_timeout),
                event = "closed_idle" => io(&t.closed_idle),
                event = "closed_shutdown" => io(&t.closed_shutdown),
                event = "closed_evicted" => io(&t.closed_evicted),
            }
            /// Frames on TCP connections: received, written, dropped at a full write queue, and
            /// datagrams from TCP members the UDP socket refused.
            counter quic_relay_tcp_frames_total {
                dir = "in" => io(&t.frames_in),
                dir = "out" => io(&t.frames_out),
                dir = "dropped_queue_full" => io(&t.dropped_queue_full),
                dir = "dropped_budget" => io(&t.dropped_budget),
                dir = "udp_send_error" => io(&t.udp_send_errors),
            }
            /// Bytes waiting in the write queues of all TCP connections.
            gauge quic_relay_tcp_queued_bytes = io(&t.queued_bytes);
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes, with the workspace's small
/// Prometheus responder ([`netkit::prometheus`]): a full HTTP stack would be most of the
/// relay's build time for one read-only page.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    netkit::prometheus::serve(listener, Arc::new(move || metrics.render()), shutdown).await;
}
