//! The binaries' log set-up (feature `logging`): every binary of the workspace logs the same way,
//! to stderr, filtered by `RUST_LOG`, coloured only on a terminal.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Whether log lines on stderr may carry ANSI colours: stderr is a terminal and `NO_COLOR`
/// (<https://no-color.org>) is unset or empty.
pub fn use_colour() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Installs the global subscriber: stderr, `RUST_LOG` or else `default_filter` ("info"),
/// colours per [`use_colour`].
pub fn init(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_ansi(use_colour())
        .with_writer(std::io::stderr)
        .init();
}
