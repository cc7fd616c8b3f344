//! The binary answers `--version` with its own name and the package version, as the original did.

use std::process::Command;

#[test]
fn the_binary_names_itself_in_its_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_udp-over-tcp"))
        .arg("--version")
        .output()
        .expect("run --version");
    assert!(out.status.success(), "udp-over-tcp --version failed");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("udp-over-tcp {}", env!("CARGO_PKG_VERSION")),
    );
}
