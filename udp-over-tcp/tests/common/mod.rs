//! Shared test harness: reading a child's log lines for the addresses it bound, temp dirs, and
//! the skip-or-fail rule for external tools. (mqproxy's tests/common holds the same line helpers
//! for its own binaries.)

#![allow(dead_code)] // each test binary uses a different part

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A fresh directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "udp-over-tcp-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating a temp dir");
    d
}

/// Whether an external tool can be used. A missing tool skips the test with a message, except
/// under CI=true or when ignored tests were asked for (`--ignored`, `--include-ignored`), where
/// it fails the test.
pub fn have(tool: &str, probe: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        let msg = format!("`{tool} {}` failed: the tool is missing", probe.join(" "));
        let asked = std::env::args().any(|a| a == "--ignored" || a == "--include-ignored");
        if std::env::var("CI").as_deref() == Ok("true") || asked {
            panic!("{msg} (CI=true or --ignored: failing instead of skipping)");
        }
        eprintln!("SKIPPED: {msg}");
    }
    ok
}

/// Reads `stream` (a child's piped stdout or stderr) on a thread until a line contains
/// `needle`, and returns that line with terminal colour codes removed. This is how a test
/// learns the address a process bound for port 0; the rest of the stream keeps being drained.
pub fn wait_for_line(
    stream: impl std::io::Read + Send + 'static,
    needle: &'static str,
    timeout: Duration,
) -> String {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            let plain = strip_ansi(&line);
            if plain.contains(needle) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(plain);
                }
            }
        }
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("no line containing {needle:?} within {timeout:?}"))
}

/// The value of `key=` in a log line (up to the next space), e.g. `tcp=127.0.0.1:7878`;
/// `Some(...)` around it (a Debug-logged option) is removed.
pub fn field(line: &str, key: &str) -> String {
    let v = line
        .split(&format!("{key}="))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"));
    v.trim_start_matches("Some(")
        .trim_end_matches(')')
        .to_owned()
}

/// `s` without terminal colour codes (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Kills a child process when dropped.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command to completion off the async threads.
pub async fn output(mut cmd: Command) -> std::process::Output {
    let what = format!("{cmd:?}");
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("blocking task")
        .unwrap_or_else(|e| panic!("running {what}: {e}"))
}
