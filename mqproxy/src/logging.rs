//! Logging for the crate's binaries (`mqproxy`, `udp-over-tcp`, `udpsocks`): ANSI colours only
//! when stderr is a terminal and `NO_COLOR` is unset, and [`Escaped`] for text a peer chose
//! (a close reason inside an error, say) that reaches a log line through `Display`.

#![cfg(feature = "runtime")]

use std::fmt;

/// The binaries' subscriber (stderr, `RUST_LOG` or else the given filter, colours only on a
/// terminal without `NO_COLOR`), shared with the relay's and udp-over-tcp's.
pub use netkit::logging::{init, use_colour};

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
