//! Option parsing of both roles: defaults, files, flags and the refusals.

use super::*;

/// A relay session both ends share.
const SESSION: &str = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";

/// Writes `toml` to `file` in this test's temporary folder; returns the folder and the file.
fn config_file(test: &str, file: &str, toml: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("mqproxy-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let f = dir.join(file);
    std::fs::write(&f, toml).expect("write");
    (dir, f)
}

/// Server options with `toml` as `--config`, the self-signed certificate kept next to it.
fn server_with_file(test: &str, file: &str, toml: &str) -> ServerOpts {
    let (dir, f) = config_file(test, file, toml);
    ServerOpts {
        config: Some(f),
        state_dir: Some(dir),
        ..Default::default()
    }
}

#[test]
fn cli_overrides_file_overrides_defaults() {
    let opts = ServerOpts {
        udp_idle_timeout: Some(9),
        ..server_with_file(
            "config",
            "server.toml",
            "listen = \"127.0.0.1:5000\"\ntoken = \"fromfile\"\nudp-idle-timeout = 7\nno-udp = true\n",
        )
    };
    let c = opts.resolve().expect("valid");
    assert_eq!(c.listen, "127.0.0.1:5000".parse().expect("lit"));
    assert_eq!(c.token, b"fromfile");
    assert_eq!(c.udp_idle_timeout, Duration::from_secs(9));
    assert!(!c.udp_enabled);
    assert_eq!(c.max_conns, crate::defaults::DEFAULT_MAX_CONNS);
}

/// Both roles declare the shared keys through one macro; each still refuses a key it does
/// not have with the key's line and the list of its own keys.
#[test]
fn unknown_keys_are_refused_with_their_line_in_both_roles() {
    let server = server_with_file("unknown", "server.toml", "token = \"t\"\nlistn = \"x\"\n");
    let (_, client_file) = config_file(
        "unknown",
        "client.toml",
        "server = \"a:1\"\n\nmetrix = \"127.0.0.1:9464\"\n",
    );
    let client = ClientOpts {
        config: Some(client_file),
        ..Default::default()
    };
    for (result, wanted, other_role_key) in [
        (
            server.resolve().map(drop),
            [
                "line 2",
                "unknown field `listn`",
                "`listen`",
                "`relay-token`",
            ],
            "`scheduler`",
        ),
        (
            client.resolve().map(drop),
            [
                "line 3",
                "unknown field `metrix`",
                "`metrics`",
                "`scheduler`",
            ],
            "`listen`",
        ),
    ] {
        let e = result.expect_err("unknown key").to_string();
        for w in wanted {
            assert!(e.contains(w), "{w} missing: {e}");
        }
        assert!(
            !e.contains(other_role_key),
            "the other role's key offered: {e}"
        );
    }
}

#[test]
fn token_file_and_verification_rules() {
    let (_, f) = config_file("token", "token", "s3cret\n");
    let base = ClientOpts {
        server: Some("example.com:4433".into()),
        token_file: Some(f),
        ..Default::default()
    };
    let err = base.clone().resolve().expect_err("no verification");
    assert!(err.to_string().contains("--insecure"), "{err}");
    let c = ClientOpts {
        insecure: true,
        ..base.clone()
    }
    .resolve()
    .expect("valid");
    assert_eq!(c.token, b"s3cret");
    let err = ClientOpts {
        server_cert_sha256: Some("zz".into()),
        ..base
    }
    .resolve()
    .expect_err("bad pin");
    assert!(err.to_string().contains("64 hex digits"), "{err}");
}

#[test]
fn relay_flags_need_each_other_and_valid_values() {
    let relay: SocketAddr = "198.18.0.1:4433".parse().expect("lit");
    let relay_flag = vec![relay.to_string()];
    let client = ClientOpts {
        token: Some("t".into()),
        server_cert_sha256: Some("ab".repeat(32)),
        ..Default::default()
    };
    let err = |o: ClientOpts| o.resolve().expect_err("invalid").to_string();
    let e = err(ClientOpts {
        relay: relay_flag.clone(),
        ..client.clone()
    });
    assert!(e.contains("--session"), "{e}");
    let e = err(ClientOpts {
        session: Some(SESSION.into()),
        ..client.clone()
    });
    assert!(e.contains("--relay"), "{e}");
    let e = err(ClientOpts {
        relay: relay_flag.clone(),
        session: Some("not-a-uuid".into()),
        ..client.clone()
    });
    assert!(e.contains("--session") && e.contains("UUID"), "{e}");
    let e = err(ClientOpts {
        relay: relay_flag.clone(),
        session: Some(SESSION.into()),
        relay_token: Some("12:zz".into()),
        ..client.clone()
    });
    assert!(e.contains("--relay-token"), "{e}");
    let e = err(ClientOpts {
        relay: relay_flag.clone(),
        session: Some(SESSION.into()),
        server: Some("example.com:4433".into()),
        ..client.clone()
    });
    assert!(
        e.contains("--server") && e.contains("--relay") && e.contains("--path"),
        "{e}"
    );
    // With --path, --server and --relay together: direct paths plus the relay path.
    let c = ClientOpts {
        relay: relay_flag.clone(),
        session: Some(SESSION.into()),
        server: Some("198.18.0.1:4433".into()),
        path: vec!["198.18.10.2".parse().expect("lit")],
        ..client.clone()
    }
    .resolve()
    .expect("valid");
    assert_eq!(c.server, "198.18.0.1:4433");
    assert_eq!(c.paths.len(), 1);
    assert!(c.relay.is_some());
    let e = err(ClientOpts {
        relay: relay_flag.clone(),
        session: Some(SESSION.into()),
        server: Some("198.18.0.1:4433".into()),
        path: (1..=8u8)
            .map(|i| std::net::IpAddr::from([198, 18, 10, i]))
            .collect(),
        ..client.clone()
    });
    assert!(e.contains("relay session counting as one"), "{e}");
    let c = ClientOpts {
        relay: relay_flag.clone(),
        session: Some(SESSION.into()),
        relay_token: Some(format!("1700000000:{}", "cd".repeat(32))),
        ..client.clone()
    }
    .resolve()
    .expect("valid");
    let r = c.relay.expect("relay set");
    assert_eq!(r.relays, [relay]);
    assert_eq!(r.session.to_string(), SESSION);
    assert_eq!(r.token.expect("token").expiry, 1_700_000_000);

    // The server: the same keys from a config file.
    let server = server_with_file(
        "relay",
        "server.toml",
        &format!("token = \"t\"\nrelay = \"{relay}\"\nsession = \"{SESSION}\"\n"),
    );
    let c = server.clone().resolve().expect("valid");
    assert_eq!(c.relay.expect("relay set").relays, [relay]);
    assert!(!c.also_listen);
    // --listen with --relay: both front ends.
    let c = ServerOpts {
        listen: Some("198.18.0.1:4433".parse().expect("lit")),
        ..server
    }
    .resolve()
    .expect("valid");
    assert!(c.also_listen && c.relay.is_some());
    assert_eq!(c.listen, "198.18.0.1:4433".parse().expect("lit"));

    // Names resolve (localhost: no network needed); junk is refused with the flag named.
    let c = ClientOpts {
        relay: vec!["localhost:4433".into()],
        session: Some(SESSION.into()),
        ..client.clone()
    }
    .resolve()
    .expect("localhost resolves");
    let r = c.relay.expect("relay set").relays[0];
    assert!(r.ip().is_loopback() && r.port() == 4433, "{r}");
    let e = err(ClientOpts {
        relay: vec!["no-port".into()],
        session: Some(SESSION.into()),
        ..client
    });
    assert!(e.contains("--relay") && e.contains("HOST:PORT"), "{e}");
}

#[test]
fn paths_and_scheduler() {
    let base = ClientOpts {
        server: Some("example.com:4433".into()),
        token: Some("t".into()),
        insecure: true,
        ..Default::default()
    };
    let c = ClientOpts {
        path: vec![
            "198.18.0.1".parse().expect("lit"),
            "100.64.0.1".parse().expect("lit"),
        ],
        scheduler: Some("backup".into()),
        ..base.clone()
    }
    .resolve()
    .expect("valid");
    assert_eq!(c.paths.len(), 2);
    assert_eq!(c.scheduler, crate::multipath::sched::Scheduler::Backup);
    let err = ClientOpts {
        scheduler: Some("fastest".into()),
        ..base.clone()
    }
    .resolve()
    .expect_err("unknown scheduler");
    assert!(err.to_string().contains("--scheduler"), "{err}");
    let err = ClientOpts {
        path: vec!["198.18.0.1".parse().expect("lit"); 2],
        ..base
    }
    .resolve()
    .expect_err("duplicate path");
    assert!(err.to_string().contains("twice"), "{err}");
}

#[test]
fn several_relays_from_flags_or_a_toml_list() {
    let client = ClientOpts {
        token: Some("t".into()),
        server_cert_sha256: Some("ab".repeat(32)),
        session: Some(SESSION.into()),
        ..Default::default()
    };
    let a: SocketAddr = "198.18.0.1:4433".parse().expect("lit");
    let b: SocketAddr = "198.18.0.2:4433".parse().expect("lit");
    let b6: SocketAddr = "[2001:db8::2]:4433".parse().expect("lit");
    let c = ClientOpts {
        relay: vec![a.to_string(), format!("{b},{b6}")],
        ..client.clone()
    }
    .resolve()
    .expect("valid");
    let r = c.relay.expect("relay set");
    assert_eq!(r.relays, [a, b]);
    assert_eq!(r.relay_other_family, [(b, b6)]);

    // Each bad value is named in the error, the good ones around it are not.
    let err = |relay: Vec<String>| {
        ClientOpts {
            relay,
            ..client.clone()
        }
        .resolve()
        .expect_err("invalid")
        .to_string()
    };
    let e = err(vec![a.to_string(), "198.18.0.9".into()]);
    assert!(e.contains("--relay") && e.contains("198.18.0.9"), "{e}");
    assert!(!e.contains("198.18.0.1:4433"), "{e}");
    let e = err(vec![format!("{a},{b}")]);
    assert!(e.contains("same IP family"), "{e}");
    let e = err(vec![format!("{a},junk")]);
    assert!(e.contains("other-family") && e.contains("junk"), "{e}");
    let e = err((1..=17).map(|i| format!("198.18.1.{i}:4433")).collect());
    assert!(e.contains("at most 16"), "{e}");

    // The config file: a list, and a single string still works; flags replace the file's.
    let server = server_with_file(
        "relays",
        "list.toml",
        &format!("token = \"t\"\nsession = \"{SESSION}\"\nrelay = [\"{a}\", \"{b},{b6}\"]\n"),
    );
    let r = server.clone().resolve().expect("valid").relay.expect("set");
    assert_eq!(r.relays, [a, b]);
    assert_eq!(r.relay_other_family, [(b, b6)]);
    let r = ServerOpts {
        relay: vec![b.to_string()],
        ..server
    }
    .resolve()
    .expect("valid")
    .relay
    .expect("set");
    assert_eq!(r.relays, [b], "the command line overrides the file");
    let r = server_with_file(
        "relays",
        "one.toml",
        &format!("token = \"t\"\nsession = \"{SESSION}\"\nrelay = \"{a}\"\n"),
    )
    .resolve()
    .expect("valid")
    .relay
    .expect("set");
    assert_eq!(r.relays, [a]);
    let e = server_with_file(
        "relays",
        "bad.toml",
        &format!("token = \"t\"\nsession = \"{SESSION}\"\nrelay = [\"{a}\", \"nope\"]\n"),
    )
    .resolve()
    .expect_err("bad relay in the file")
    .to_string();
    assert!(e.contains("--relay") && e.contains("\"nope\""), "{e}");
}
