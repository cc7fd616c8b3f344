//! Prometheus text exposition of the proxy's counters and per-path health, served on
//! `--metrics ADDR` (`GET /metrics`) by the workspace's shared responder,
//! [`netkit::prometheus::serve`].

#![cfg(feature = "runtime")]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::multipath::PathReport;
use crate::relay_session::PathMetrics;

/// A table of families, one row each: the help as a doc comment, then `KIND NAME => field,`
/// (how to read the family's value from a path's record). Gives `[(name, kind, help, field)]`.
macro_rules! families {
    ($($(#[doc = $help:literal])+ $kind:ident $name:ident => $field:expr,)*) => {
        [$((stringify!($name), Kind::$kind, concat!($($help),+).trim_start(), $field)),*]
    };
}

/// Exposition text under construction. Each family's `# HELP` and `# TYPE` come once, before
/// its samples, as the format requires.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// Whether a family counts up (`counter`) or goes up and down (`gauge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only increases (resets when its source restarts).
    Counter,
    /// Any value.
    Gauge,
}

impl Exposition {
    /// Starts a family.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// Adds a sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family of one unlabelled sample read from a counter or gauge.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, v: &AtomicU64) {
        self.family(name, kind, help);
        self.sample(name, &[], v.load(Ordering::Relaxed) as f64);
    }

    /// Per-path health families, each path with its labels (its index and address, and on
    /// the server its bundle).
    pub fn paths(&mut self, paths: &[(Vec<(&'static str, String)>, PathReport)]) {
        type Field = fn(&PathReport) -> f64;
        let families: [(&str, Kind, &str, Field); 9] = families! {
            /// 1 while the path is scheduled on (connected and not silent).
            Gauge mqproxy_path_usable => |r| f64::from(u8::from(r.usable)),
            /// Smoothed round-trip time of the path's QUIC connection.
            Gauge mqproxy_path_rtt_seconds => |r| r.rtt.as_secs_f64(),
            /// Congestion window of the path's QUIC connection.
            Gauge mqproxy_path_cwnd_bytes => |r| r.cwnd as f64,
            /// Packets sent on the path's current connection.
            Counter mqproxy_path_sent_packets_total => |r| r.sent_packets as f64,
            /// Packets declared lost on the path's current connection.
            Counter mqproxy_path_lost_packets_total => |r| r.lost_packets as f64,
            /// UDP bytes sent on the path's current connection.
            Counter mqproxy_path_tx_bytes_total => |r| r.tx_bytes as f64,
            /// UDP bytes received on the path's current connection.
            Counter mqproxy_path_rx_bytes_total => |r| r.rx_bytes as f64,
            /// Largest UDP payload this side sends on the path's connection (path MTU discovery's finding).
            Gauge mqproxy_path_mtu_bytes => |r| f64::from(r.mtu),
            /// Loss bursts this side's MTU discovery took for an MTU black hole (each drops the MTU to the minimum).
            Counter mqproxy_path_black_holes_total => |r| r.black_holes as f64,
        };
        for (name, kind, help, field) in families {
            self.family(name, kind, help);
            for (labels, r) in paths {
                let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                self.sample(name, &l, field(r));
            }
        }
    }

    /// Which path a peer-sdk (relay session) connection uses, per relay-session path.
    pub fn relay_paths(&mut self, relay: &[(String, Arc<PathMetrics>)]) {
        type Field = fn(&PathMetrics) -> &AtomicU64;
        let families: [(&str, Kind, &str, Field); 4] = families! {
            /// 1 while the relay-session connection runs on a hole-punched direct path.
            Gauge mqproxy_relay_session_direct => |m| &m.direct,
            /// 1 while the relay-session connection runs through the relay.
            Gauge mqproxy_relay_session_relayed => |m| &m.relayed,
            /// Connections established through the relay session.
            Counter mqproxy_relay_session_connections_total => |m| &m.connections,
            /// Moves of a live relay-session connection between the direct and relay paths.
            Counter mqproxy_relay_session_path_changes_total => |m| &m.path_changes,
        };
        for (name, kind, help, field) in families {
            self.family(name, kind, help);
            for (path, m) in relay {
                let v = field(m).load(Ordering::Relaxed) as f64;
                self.sample(name, &[("path", path)], v);
            }
        }
    }

    /// Bytes striped flows hold for applications that are not reading.
    pub fn unwritten(&mut self) {
        let name = "mqproxy_flow_unwritten_bytes";
        self.family(
            name,
            Kind::Gauge,
            "Bytes striped flows received and have not written to their TCP sockets yet \
             (applications not reading); receipt is no longer acknowledged above 128 MiB.",
        );
        self.sample(name, &[], crate::multipath::unwritten_bytes() as f64);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_escapes_labels_and_groups_families() {
        let mut e = Exposition::default();
        e.family("a_total", Kind::Counter, "A.");
        e.sample("a_total", &[("path", "0"), ("addr", "x\"y\\z\n")], 3.0);
        e.sample("a_total", &[], 4.5);
        assert_eq!(
            e.finish(),
            "# HELP a_total A.\n# TYPE a_total counter\n\
             a_total{path=\"0\",addr=\"x\\\"y\\\\z\\n\"} 3\na_total 4.5\n"
        );
    }
}
