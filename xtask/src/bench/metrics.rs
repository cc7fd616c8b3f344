//! Reads the relay's Prometheus text exposition (`GET /metrics`) with a minimal HTTP/1.0 client.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Generous: the relay answers from a separate thread, but the host is small and busy.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);

/// The relay republishes its metrics this often; waiting one period makes a scrape current.
pub const PUBLISH_PERIOD: Duration = Duration::from_millis(100);

/// One scrape: series (name plus labels, e.g. `quic_relay_sessions{state="paired"}`) to value.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    series: HashMap<String, f64>,
}

impl Scrape {
    /// The series' value, 0 when absent (counters the relay has not touched yet).
    pub fn get(&self, series: &str) -> f64 {
        self.series.get(series).copied().unwrap_or(0.0)
    }

    /// Sum of several series, e.g. the accepted registration results.
    pub fn sum(&self, series: &[&str]) -> f64 {
        series.iter().map(|s| self.get(s)).sum()
    }

    /// Every series whose name (before the labels) is `name`, for diagnostics.
    pub fn family(&self, name: &str) -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = self
            .series
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(name))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Parses the text exposition format (comments skipped, optional timestamps ignored).
    pub fn parse(text: &str) -> Scrape {
        let mut series = HashMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, rest) = match line.find('}') {
                Some(end) => (&line[..=end], &line[end + 1..]),
                None => match line.split_once(char::is_whitespace) {
                    Some(kv) => kv,
                    None => continue,
                },
            };
            let key: String = key.chars().filter(|c| !c.is_whitespace()).collect();
            if let Some(Ok(v)) = rest.split_whitespace().next().map(str::parse::<f64>) {
                series.insert(key, v);
            }
        }
        Scrape { series }
    }
}

/// Fetches and parses `http://<addr>/metrics`.
pub fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .with_context(|| format!("connect to metrics at {addr}"))?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    // HTTP/1.0: no keep-alive and no chunked encoding, so the body is everything until EOF.
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .context("read metrics response")?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .or_else(|| resp.split_once("\n\n"))
        .context("no HTTP header end")?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1).is_none_or(|c| c != "200") {
        bail!("metrics at {addr}: {status}");
    }
    Ok(Scrape::parse(body))
}

/// Scrapes until `done` holds or `timeout` passes; returns the last scrape either way.
pub fn wait_for(
    addr: SocketAddr,
    timeout: Duration,
    done: impl Fn(&Scrape) -> bool,
) -> Result<Scrape> {
    let start = Instant::now();
    loop {
        let s = scrape(addr)?;
        if done(&s) || start.elapsed() >= timeout {
            return Ok(s);
        }
        std::thread::sleep(PUBLISH_PERIOD / 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_comments_and_timestamps() {
        let s = Scrape::parse(
            "# HELP quic_relay_sessions Sessions.\n# TYPE quic_relay_sessions gauge\n\
             quic_relay_sessions{state=\"paired\"} 12\n\
             quic_relay_sessions{state=\"unpaired\"} 3 1700000000000\n\
             quic_relay_forwarded_packets_total 4.5e3\n\
             quic_relay_registrations_total{result=\"new\"} 7\n",
        );
        assert_eq!(s.get("quic_relay_sessions{state=\"paired\"}"), 12.0);
        assert_eq!(s.get("quic_relay_sessions{state=\"unpaired\"}"), 3.0);
        assert_eq!(s.get("quic_relay_forwarded_packets_total"), 4500.0);
        assert_eq!(s.get("absent"), 0.0);
        assert_eq!(s.family("quic_relay_sessions").len(), 2);
        assert_eq!(
            s.sum(&[
                "quic_relay_registrations_total{result=\"new\"}",
                "quic_relay_sessions{state=\"paired\"}"
            ]),
            19.0
        );
    }
}
