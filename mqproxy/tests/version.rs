//! Every binary of the package answers `--version` with its own name and the package version.

use std::process::Command;

#[test]
fn each_binary_names_itself_in_its_version() {
    for (name, exe) in [
        ("mqproxy", env!("CARGO_BIN_EXE_mqproxy")),
        ("udpsocks", env!("CARGO_BIN_EXE_udpsocks")),
    ] {
        let out = Command::new(exe)
            .arg("--version")
            .output()
            .expect("run --version");
        assert!(out.status.success(), "{name} --version failed");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION")),
        );
    }
}
