//! Logging for the crate's binaries (`mqproxy`, `udp-over-tcp`, `udpsocks`): ANSI colours only
//! when stderr is a terminal and `NO_COLOR` is unset, and [`Escaped`] for text a peer chose
//! (a close reason inside an error, say) that reaches a log line through `Display`.

use std::fmt;
use std::io::IsTerminal as _;

/// Whether log lines on stderr may carry ANSI colours: stderr is a terminal and `NO_COLOR`
/// (<https://no-color.org>) is unset or empty.
pub fn use_colour() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Installs the binaries' subscriber: stderr, `RUST_LOG` or else `default_filter`, colours
/// per [`use_colour`].
pub fn init(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_ansi(use_colour())
        .with_writer(std::io::stderr)
        .init();
}

/// Formats the inner value's `Display` text with control characters (newlines, ESC, ...) and
/// backslashes escaped as Rust string escapes, so text a peer chose cannot start a forged log
/// line or colour the terminal: `error = %Escaped(&e)`.
#[derive(Debug)]
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.to_string();
        if s.chars().any(|c| c.is_control() || c == '\\') {
            for c in s.chars() {
                if c.is_control() || c == '\\' {
                    write!(f, "{}", c.escape_default())?;
                } else {
                    write!(f, "{c}")?;
                }
            }
            Ok(())
        } else {
            f.write_str(&s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_leaves_no_control_characters() {
        let s = Escaped("ok\n2026 INFO client authenticated client_id=admin\x1b[31m\\").to_string();
        assert_eq!(
            s,
            "ok\\n2026 INFO client authenticated client_id=admin\\u{1b}[31m\\\\"
        );
        assert_eq!(Escaped("plain é text").to_string(), "plain é text");
    }
}
