//! Prometheus text exposition of the proxy's counters and per-path health, served on
//! `--metrics ADDR` (`GET /metrics`) by a deliberately small HTTP responder: one read-only page
//! does not justify an HTTP stack in the build.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::multipath::PathReport;
use crate::relay_session::PathMetrics;

/// Scrapes answered at once; more wait in the kernel's backlog.
const MAX_SCRAPES: usize = 8;
/// A scrape that has not sent its request head within this long is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read (a scrape's is a few hundred bytes).
const MAX_REQUEST_HEAD: u64 = 8192;

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
        let families: [(&str, Kind, &str, Field); 7] = [
            (
                "mqproxy_path_usable",
                Kind::Gauge,
                "1 while the path is scheduled on (connected and not silent).",
                |r| f64::from(u8::from(r.usable)),
            ),
            (
                "mqproxy_path_rtt_seconds",
                Kind::Gauge,
                "Smoothed round-trip time of the path's QUIC connection.",
                |r| r.rtt.as_secs_f64(),
            ),
            (
                "mqproxy_path_cwnd_bytes",
                Kind::Gauge,
                "Congestion window of the path's QUIC connection.",
                |r| r.cwnd as f64,
            ),
            (
                "mqproxy_path_sent_packets_total",
                Kind::Counter,
                "Packets sent on the path's current connection.",
                |r| r.sent_packets as f64,
            ),
            (
                "mqproxy_path_lost_packets_total",
                Kind::Counter,
                "Packets declared lost on the path's current connection.",
                |r| r.lost_packets as f64,
            ),
            (
                "mqproxy_path_tx_bytes_total",
                Kind::Counter,
                "UDP bytes sent on the path's current connection.",
                |r| r.tx_bytes as f64,
            ),
            (
                "mqproxy_path_rx_bytes_total",
                Kind::Counter,
                "UDP bytes received on the path's current connection.",
                |r| r.rx_bytes as f64,
            ),
        ];
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
        let families: [(&str, Kind, &str, Field); 4] = [
            (
                "mqproxy_relay_session_direct",
                Kind::Gauge,
                "1 while the relay-session connection runs on a hole-punched direct path.",
                |m| &m.direct,
            ),
            (
                "mqproxy_relay_session_relayed",
                Kind::Gauge,
                "1 while the relay-session connection runs through the relay.",
                |m| &m.relayed,
            ),
            (
                "mqproxy_relay_session_connections_total",
                Kind::Counter,
                "Connections established through the relay session.",
                |m| &m.connections,
            ),
            (
                "mqproxy_relay_session_path_changes_total",
                Kind::Counter,
                "Moves of a live relay-session connection between the direct and relay paths.",
                |m| &m.path_changes,
            ),
        ];
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

/// Serves `GET /metrics` (and `/`) on `listener` with the text `render` makes, until
/// `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let render = render.clone();
        tasks.spawn(async move {
            let _slot = slot;
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &*render)).await {
                debug!(error = %e, "metrics scrape timed out");
            }
        });
    }
    tasks.shutdown().await;
}

/// What a request gets: status line and body.
fn route(request_line: &str) -> (&'static str, Option<&'static str>) {
    let mut parts = request_line.split_ascii_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics" | "/")) => ("200 OK", None),
        (Some("GET"), Some(_)) => ("404 Not Found", Some("not found; try /metrics\n")),
        (Some(_), Some(_)) => ("405 Method Not Allowed", Some("only GET\n")),
        _ => ("400 Bad Request", Some("bad request\n")),
    }
}

async fn answer<S>(stream: S, render: &(dyn Fn() -> String + Send + Sync)) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (r, mut w) = tokio::io::split(stream);
    let mut head = BufReader::new(r.take(MAX_REQUEST_HEAD));
    let mut line = Vec::new();
    head.read_until(b'\n', &mut line).await?;
    let request_line = String::from_utf8_lossy(&line).into_owned();
    // The rest of the head up to its empty line; a head that never ends is answered 431.
    let mut complete = false;
    loop {
        let mut l = Vec::new();
        if head.read_until(b'\n', &mut l).await? == 0 {
            break;
        }
        if l == b"\r\n" || l == b"\n" {
            complete = true;
            break;
        }
    }
    let (status, body) = if !complete && head.get_ref().limit() == 0 {
        (
            "431 Request Header Fields Too Large",
            Some("request head too large\n"),
        )
    } else {
        route(&request_line)
    };
    let (ctype, body) = match body {
        None => ("text/plain; version=0.0.4; charset=utf-8", render()),
        Some(b) => ("text/plain; charset=utf-8", b.to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(body.as_bytes()).await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    async fn ask(request: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(|| "x_total 1\n".into());
        let task = tokio::spawn(async move { answer(server, &*render).await });
        client.write_all(request).await.expect("write");
        let mut out = String::new();
        client.read_to_string(&mut out).await.expect("read");
        task.await.expect("join").expect("answer");
        out
    }

    #[tokio::test]
    async fn answers_get_metrics_and_refuses_the_rest() {
        let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("version=0.0.4") && ok.ends_with("\r\n\r\nx_total 1\n"),
            "{ok}"
        );
        let nf = ask(b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let post = ask(b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let bad = ask(b"\r\n\r\n").await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 10_000));
        let big = ask(&huge).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    }

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

    proptest! {
        /// Whatever arrives, the responder answers with a status line (or the peer's early
        /// close ends it) and never panics.
        #[test]
        fn any_request_gets_a_status_line(req in prop::collection::vec(any::<u8>(), 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let out = rt.block_on(async {
                let (mut client, server) = tokio::io::duplex(1 << 16);
                let render: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(String::new);
                let task = tokio::spawn(async move { answer(server, &*render).await });
                client.write_all(&req).await.expect("write");
                client.shutdown().await.expect("eof");
                let mut out = Vec::new();
                client.read_to_end(&mut out).await.expect("read");
                let _ = task.await.expect("no panic");
                out
            });
            prop_assert!(out.starts_with(b"HTTP/1.1 "));
        }
    }
}
