//! Unit tests of deploy's pure parts: argument parsing, ports, layout and helpers.

use super::*;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn ports_come_from_flags_then_env_then_default() -> Result<()> {
    let env = "# c\nQUIC_RELAY_ARGS=\"\"\nQUIC_RELAY_PORT=5000\n";
    assert_eq!(service_port(Product::Relay, None, env)?, 5000);
    assert_eq!(
        service_port(Product::Relay, Some("--bind 127.0.0.1 --port 6000"), env)?,
        6000
    );
    assert_eq!(
        service_port(
            Product::Relay,
            None,
            "QUIC_RELAY_ARGS=\"--port=7000\"\nQUIC_RELAY_PORT=5000"
        )?,
        7000
    );
    assert_eq!(service_port(Product::Relay, None, "")?, 4433);
    assert_eq!(
        service_port(Product::Mqproxy, None, "MQPROXY_LISTEN=0.0.0.0:9443\n")?,
        9443
    );
    assert!(service_port(Product::Relay, Some("--port x"), "").is_err());
    Ok(())
}

#[test]
fn bad_inputs_are_named() {
    let err = |v: &[&str]| format!("{:#}", parse(&s(v)).expect_err("must fail"));
    assert!(err(&["--host", "h", "--bin", "x"]).contains("--bin x"));
    assert!(err(&["--host", "h", "--args", "--port $(id)"]).contains("--args"));
    assert!(err(&["--host", "h", "--remote-root", "rel/dir"]).contains("--remote-root"));
    assert!(err(&["--args", "--port 1"]).contains("--host"));
    assert!(err(&["--host", "h", "--rollback", "--args", "-v"]).contains("--rollback"));
}

#[test]
fn unit_paths_follow_the_remote_root() {
    let l = Layout {
        root: "/tmp/r".into(),
        name: "quic-relay",
    };
    let unit = l.unit_text(Product::Relay);
    assert!(unit.contains("ExecStart=/tmp/r/opt/quic-relay/bin/quic-relay $QUIC_RELAY_ARGS"));
    assert!(unit.contains("EnvironmentFile=-/tmp/r/etc/quic-relay/quic-relay.env"));
    assert_eq!(l.bin(), "/tmp/r/opt/quic-relay/bin/quic-relay");
    let root = Layout {
        root: normalize_root("/").expect("valid"),
        name: "mqproxy",
    };
    assert_eq!(root.unit(), "/etc/systemd/system/mqproxy.service");
    assert_eq!(root.unit_text(Product::Mqproxy), Product::Mqproxy.unit());
}

#[test]
fn helpers() -> Result<()> {
    assert_eq!(scp_host("root@::1"), "root@[::1]");
    assert_eq!(scp_host("h.example"), "h.example");
    assert_eq!(host_part("u@1.2.3.4"), "1.2.3.4");
    assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    assert_eq!(
        section("x\n--- env ---\nA=1\n--- end ---\n", "env").as_deref(),
        Some("A=1\n")
    );
    let u = random_uuid()?;
    assert_eq!(u.len(), 36);
    assert_eq!(&u[14..15], "4");
    Ok(())
}
