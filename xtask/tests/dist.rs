//! `cargo xtask dist --bin quic-relay`: the archive holds the expected files (among them the
//! completions and man pages the binary wrote), and both the archive's SHA256SUMS and the one
//! next to it verify with `sha256sum -c`.

use std::path::Path;
use std::process::Command;

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn relay_archive_lists_the_files_and_sums_verify() {
    let out = std::env::temp_dir().join(format!("xtask-dist-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let printed = run_ok(
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["dist", "--bin", "quic-relay", "--out"])
            .arg(&out),
    );
    let archive = printed
        .lines()
        .find(|l| l.ends_with(".tar.gz"))
        .unwrap_or_else(|| panic!("dist printed no archive:\n{printed}"));
    let name = Path::new(archive)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("archive name");
    let version = env!("CARGO_PKG_VERSION"); // xtask and quic-relay are both 0.1.0 for now
    assert!(
        name.starts_with(&format!("quic-relay-{version}-")),
        "{name}"
    );
    let stem = name.trim_end_matches(".tar.gz");

    let listing = run_ok(Command::new("tar").arg("-tzf").arg(archive));
    for f in [
        "quic-relay",
        "README.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "SHA256SUMS",
        "deploy/README.md",
        "deploy/quic-relay.service",
        "deploy/quic-relay.env",
        "deploy/mqproxy.service",
        "deploy/cloud-init.yaml",
        "deploy/security-group.json",
        "deploy/99-quic-relay.conf",
        "completions/quic-relay.bash",
        "completions/_quic-relay",
        "completions/quic-relay.fish",
        "man/quic-relay.1",
        "man/quic-relay-token.1",
        "man/quic-relay-session.1",
    ] {
        let path = format!("{stem}/{f}");
        assert!(
            listing.lines().any(|l| l == path),
            "{path} missing from:\n{listing}"
        );
    }

    run_ok(
        Command::new("sha256sum")
            .arg("-c")
            .arg("SHA256SUMS")
            .current_dir(&out),
    );
    run_ok(
        Command::new("tar")
            .arg("-xzf")
            .arg(archive)
            .arg("-C")
            .arg(&out),
    );
    let checked = run_ok(
        Command::new("sha256sum")
            .args(["-c", "SHA256SUMS"])
            .current_dir(out.join(stem)),
    );
    assert!(checked.contains("quic-relay: OK"), "{checked}");
    let unpacked = out.join(stem).join("quic-relay");
    let version_line = run_ok(Command::new(&unpacked).arg("--version"));
    assert!(version_line.contains(version), "{version_line}");
    // Generated from the shipped binary's clap definition: its flags and subcommands are in them.
    let bash = std::fs::read_to_string(out.join(stem).join("completions/quic-relay.bash"))
        .expect("bash completion");
    assert!(
        bash.contains("--secret-file") && bash.contains("token"),
        "{bash}"
    );
    let man = std::fs::read_to_string(out.join(stem).join("man/quic-relay.1")).expect("man page");
    assert!(
        man.contains(".TH quic-relay") && man.contains("QUIC_RELAY_PORT"),
        "{man}"
    );
    assert!(
        !listing.lines().any(|l| l.contains("help")),
        "pages for clap's help pseudo-subcommand:\n{listing}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
