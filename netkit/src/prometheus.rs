//! A minimal HTTP/1.1 responder for the Prometheus text exposition format: `GET /metrics` (and
//! `/`) get the text a render function makes, everything else a short error; one request per
//! connection. Scrapes in flight, the time to send a request head and its size are bounded.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::debug;

/// Scrapes answered at once; more wait in the kernel's backlog. A scraper asks every few
/// seconds; eight at once is several scrapers misbehaving already.
pub const MAX_SCRAPES: usize = 8;
/// A scrape that has not been answered within this long is dropped (a client that opens a
/// connection and sends nothing must not hold a slot).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read (a scrape's is a few hundred bytes); a longer one gets 431.
pub const MAX_REQUEST_HEAD: u64 = 8192;
/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Makes the exposition text, once per scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` (and `/`) on `listener` with the text `render` makes, until
/// `shutdown` completes; then the scrapes in flight are cancelled.
pub async fn serve(listener: TcpListener, render: Render, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            r = listener.accept() => match crate::accept::or_pause(r, Duration::from_millis(50)).await {
                Some((s, _)) => s,
                None => continue,
            },
        };
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
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

/// What a request gets: status line and, unless it is the metrics, a body.
fn route(request_line: &str) -> (&'static str, Option<&'static str>) {
    let mut parts = request_line.split_ascii_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics" | "/")) => ("200 OK", None),
        (Some("GET"), Some(_)) => ("404 Not Found", Some("not found; try /metrics\n")),
        (Some(_), Some(_)) => ("405 Method Not Allowed", Some("only GET\n")),
        _ => ("400 Bad Request", Some("bad request\n")),
    }
}

/// Reads one request head from `stream` and answers it.
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
        None => (CONTENT_TYPE, render()),
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
    use tokio::net::TcpStream;

    async fn ask(request: &[u8]) -> String {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let render: Render = Arc::new(|| "x_total 1\n".into());
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

    /// Over a real loopback listener: a scrape is answered, a silent connection does not hold
    /// up the next one, and shutdown ends the server.
    #[tokio::test]
    async fn serves_scrapes_over_tcp_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(|| "up 1\n".into()), async {
            let _ = stopped.await;
        }));
        let _silent = TcpStream::connect(addr).await.expect("connect");
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nup 1\n"), "{out}");
        stop.send(()).expect("server alive");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .expect("join");
    }

    proptest! {
        /// Whatever arrives, the responder answers with a status line (or the peer's early
        /// close ends it) and never panics.
        #[test]
        fn any_request_gets_a_status_line(req in prop::collection::vec(any::<u8>(), 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let out = rt.block_on(async {
                let (mut client, server) = tokio::io::duplex(1 << 16);
                let render: Render = Arc::new(String::new);
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
