//! The server's counters and its Prometheus page (per-path health of every bundle included).

use super::*;

/// Counters (and gauges, marked) of a running server.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Connections accepted for handshake.
    pub connections: AtomicU64,
    /// Connections refused because `--max-conns` were authenticating.
    pub refused_max_conns: AtomicU64,
    /// QUIC Initials answered with a Retry (address not validated yet); they hold no slot.
    pub retries: AtomicU64,
    /// Connections that authenticated.
    pub authenticated: AtomicU64,
    /// Connections refused for a wrong token or version.
    pub auth_failures: AtomicU64,
    /// Gauge: connections currently open.
    pub connections_open: AtomicU64,
    /// TCP CONNECT streams served.
    pub tcp_streams: AtomicU64,
    /// Gauge: UDP sessions open (each holds one UDP socket).
    pub udp_sessions_open: AtomicU64,
    /// UDP sessions opened.
    pub udp_sessions_total: AtomicU64,
    /// UDP sessions refused (any status).
    pub udp_sessions_refused: AtomicU64,
    /// UDP sessions refused with SESSION_LIMIT: the connection's, the client's or the
    /// process-wide cap was reached.
    pub udp_sessions_refused_limit: AtomicU64,
    /// Gauge: the process-wide UDP session cap in force.
    pub udp_sessions_limit: AtomicU64,
    /// DATAGRAMs dropped before authentication.
    pub datagrams_before_auth: AtomicU64,
    /// DATAGRAMs dropped: malformed, unknown session, full buffers.
    pub datagrams_dropped: AtomicU64,
    /// UDP packets relayed client → destination.
    pub udp_packets_out: AtomicU64,
    /// UDP packets relayed destination → client.
    pub udp_packets_in: AtomicU64,
    /// Connections that joined a multipath bundle (PATH_BIND).
    pub paths_bound: AtomicU64,
    /// Striped (multipath) TCP flows served.
    pub tcp_flows: AtomicU64,
    /// UDP packets that arrived twice (over two paths) and were delivered once.
    pub udp_duplicates: AtomicU64,
}

pub(super) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub(super) fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

impl ServerState {
    /// The server's Prometheus page: counters, and the health of every multipath bundle's
    /// paths; `relay` adds the relay-session path gauges.
    pub(crate) fn render_metrics(
        &self,
        relay: Option<&Arc<crate::relay_session::PathMetrics>>,
    ) -> String {
        use crate::metrics::{Exposition, Kind};
        let m = &self.metrics;
        let mut e = Exposition::default();
        let c = Kind::Counter;
        let counters: [(&str, Kind, &str, &AtomicU64); 19] = [
            (
                "mqproxy_server_connections_total",
                c,
                "Connections accepted for handshake.",
                &m.connections,
            ),
            (
                "mqproxy_server_refused_max_conns_total",
                c,
                "Connections refused because --max-conns were authenticating.",
                &m.refused_max_conns,
            ),
            (
                "mqproxy_server_retries_total",
                c,
                "QUIC Initials answered with a Retry to validate the client's address.",
                &m.retries,
            ),
            (
                "mqproxy_server_authenticated_total",
                c,
                "Connections that authenticated.",
                &m.authenticated,
            ),
            (
                "mqproxy_server_auth_failures_total",
                c,
                "Connections refused for a wrong token or version.",
                &m.auth_failures,
            ),
            (
                "mqproxy_server_connections",
                Kind::Gauge,
                "Connections open.",
                &m.connections_open,
            ),
            (
                "mqproxy_server_tcp_streams_total",
                c,
                "TCP CONNECT streams served.",
                &m.tcp_streams,
            ),
            (
                "mqproxy_server_udp_sessions",
                Kind::Gauge,
                "UDP sessions open (one UDP socket each).",
                &m.udp_sessions_open,
            ),
            (
                "mqproxy_server_udp_sessions_total",
                c,
                "UDP sessions opened.",
                &m.udp_sessions_total,
            ),
            (
                "mqproxy_server_udp_sessions_refused_total",
                c,
                "UDP sessions refused.",
                &m.udp_sessions_refused,
            ),
            (
                "mqproxy_server_udp_sessions_refused_limit_total",
                c,
                "UDP sessions refused with SESSION_LIMIT (per connection, per client or process-wide cap).",
                &m.udp_sessions_refused_limit,
            ),
            (
                "mqproxy_server_udp_sessions_limit",
                Kind::Gauge,
                "Process-wide cap on UDP sessions.",
                &m.udp_sessions_limit,
            ),
            (
                "mqproxy_server_datagrams_before_auth_total",
                c,
                "DATAGRAMs dropped before authentication.",
                &m.datagrams_before_auth,
            ),
            (
                "mqproxy_server_datagrams_dropped_total",
                c,
                "DATAGRAMs dropped: malformed, unknown session, full buffers.",
                &m.datagrams_dropped,
            ),
            (
                "mqproxy_server_udp_packets_out_total",
                c,
                "UDP packets relayed client to destination.",
                &m.udp_packets_out,
            ),
            (
                "mqproxy_server_udp_packets_in_total",
                c,
                "UDP packets relayed destination to client.",
                &m.udp_packets_in,
            ),
            (
                "mqproxy_server_paths_bound_total",
                c,
                "Connections that joined a multipath bundle.",
                &m.paths_bound,
            ),
            (
                "mqproxy_server_tcp_flows_total",
                c,
                "Striped (multipath) TCP flows served.",
                &m.tcp_flows,
            ),
            (
                "mqproxy_server_udp_duplicates_total",
                c,
                "UDP packets that arrived over two paths and were delivered once.",
                &m.udp_duplicates,
            ),
        ];
        for (name, kind, help, v) in counters {
            e.single(name, kind, help, v);
        }
        let bundles: Vec<(String, Arc<Bundle>)> = locked(&self.bundles)
            .iter()
            .filter_map(|(id, w)| w.upgrade().map(|b| (hex_id(&id[..4]), b)))
            .chain(
                locked(&self.solo)
                    .iter()
                    .filter_map(|w| w.upgrade().map(|b| ("none".to_owned(), b))),
            )
            .collect();
        let paths: Vec<_> = bundles
            .iter()
            .flat_map(|(id, b)| {
                b.paths.reports().into_iter().map(move |r| {
                    let labels = vec![
                        ("bundle", id.clone()),
                        ("path", r.index.to_string()),
                        ("remote", r.addr.to_string()),
                    ];
                    (labels, r)
                })
            })
            .collect();
        e.paths(&paths);
        e.unwritten();
        if let Some(r) = relay {
            e.relay_paths(&[("relay-session".to_owned(), r.clone())]);
        }
        e.finish()
    }

    /// Serves the metrics page on `--metrics`, if set, until the returned task is dropped.
    pub(crate) fn serve_metrics(
        self: &Arc<Self>,
        listener: Option<std::net::TcpListener>,
        relay: Option<Arc<crate::relay_session::PathMetrics>>,
    ) -> Option<crate::AbortOnDrop<()>> {
        let l = listener?;
        let l = match l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
        {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "metrics listener unusable");
                return None;
            }
        };
        if let Ok(a) = l.local_addr() {
            info!(metrics = %a, "serving Prometheus metrics at /metrics");
        }
        let ctx = self.clone();
        let render = Arc::new(move || ctx.render_metrics(relay.as_ref()));
        Some(crate::AbortOnDrop(tokio::spawn(
            netkit::prometheus::serve(l, render, std::future::pending()).in_current_span(),
        )))
    }
}

/// Binds `--metrics` at start, so a taken port fails there.
pub(crate) fn bind_metrics(
    addr: Option<SocketAddr>,
) -> Result<Option<std::net::TcpListener>, ServerError> {
    addr.map(|a| {
        std::net::TcpListener::bind(a).map_err(|source| ServerError::Bind { addr: a, source })
    })
    .transpose()
}
