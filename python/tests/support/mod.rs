//! Shared by the Python package's Rust-driven tests: finding the venv that has peer_portal.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The Python with peer_portal installed, or why there is none.
pub fn python() -> Result<PathBuf, String> {
    let py = std::env::var_os("PEER_PORTAL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyvenv/bin/python")
        });
    let ok = Command::new(&py)
        .args(["-c", "import peer_portal"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(py)
    } else {
        Err(format!(
            "{} cannot import peer_portal: build it into that venv (python/README.md, \
             `maturin develop`) or set PEER_PORTAL_PYTHON",
            py.display()
        ))
    }
}
