//! The post-deploy health check: where to probe, the relay's `REG`/`ACK` round trip (with a
//! token when the relay wants one) and mqproxy's authenticated connect.

use super::*;

impl Deployer {
    /// Where to send the health check: --health-addr, else the ssh host and the port the
    /// service was configured with (from --args, else the remote environment file).
    pub(super) fn health_target(&self, script_out: &str) -> Result<SocketAddr> {
        if let Some(a) = &self.opts.health_addr {
            return resolve(a).with_context(|| format!("--health-addr {a}"));
        }
        let env = section(script_out, "env").unwrap_or_default();
        let mut port = service_port(self.opts.product, self.opts.args.as_deref(), &env)?;
        if port == 0 {
            port = self.bound_udp_port()?;
        }
        let host = host_part(&self.opts.host);
        resolve(&format!("{}:{port}", bracket_v6(host)))
            .with_context(|| format!("health check address of --host {}", self.opts.host))
    }

    pub(super) fn health(&self, script_out: &str) -> Result<()> {
        if self.opts.dry_run {
            let what = match self.opts.product {
                Product::Relay => "send REG:<uuid> over UDP, expect ACK",
                Product::Mqproxy => "run `mqproxy client` until it authenticates",
            };
            println!(
                "    {what}, to {} (port from --args or the remote environment file, else 4433), for up to {:?}",
                self.opts.health_addr.as_deref().unwrap_or(host_part(&self.opts.host)),
                self.opts.health_timeout
            );
            return Ok(());
        }
        let addr = self.health_target(script_out)?;
        match self.opts.product {
            Product::Relay => {
                let secret = self.relay_secret()?;
                relay_health(addr, self.opts.health_timeout, secret.as_deref())
            }
            Product::Mqproxy => self.mqproxy_health(addr),
        }
    }

    /// Health-check polls of 250 ms that fit in --health-timeout.
    pub(super) fn polls(&self) -> u64 {
        self.opts.health_timeout.as_secs().max(1) * 4
    }

    /// The UDP port the running service bound, for a service configured with port 0 (the OS
    /// picks one; tests do this so that no port is picked and released before the service
    /// binds it). Read over ssh from `/proc`: the pid's socket inodes, looked up in
    /// `/proc/net/udp{,6}`, so it works whatever the service logs and whichever manager runs it.
    pub(super) fn bound_udp_port(&self) -> Result<u16> {
        let mut script = self.service_pid_script();
        script.push_str(&format!(
            "[ -n \"$pid\" ] || {{ echo \"the service's pid is unknown (no pid file or MainPID): with port 0 pass --health-addr\" >&2; exit 1; }}\n\
             i=0\n\
             while [ \"$i\" -lt {polls} ]; do\n\
             inodes=$(ls -l \"/proc/$pid/fd\" 2>/dev/null | sed -n 's/.*socket:\\[\\([0-9]*\\)\\].*/\\1/p')\n\
             port=$(for n in $inodes; do awk -v n=\"$n\" '$10 == n {{ split($2, a, \":\"); print a[2] }}' /proc/net/udp /proc/net/udp6 2>/dev/null; done | head -n 1)\n\
             [ -n \"$port\" ] && break\n\
             sleep 0.25; i=$((i + 1))\n\
             done\n\
             [ -n \"$port\" ] || {{ echo \"process $pid bound no UDP socket within the health timeout\" >&2; exit 1; }}\n\
             echo \"port=$port\"\n",
            polls = self.polls()
        ));
        let out = self.ssh(&script, "find the UDP port the service bound")?;
        let hex = out
            .lines()
            .find_map(|l| l.strip_prefix("port="))
            .ok_or_else(|| anyhow!("the host printed no bound port"))?;
        let port = u16::from_str_radix(hex.trim(), 16)
            .with_context(|| format!("the bound port {hex:?} from /proc/net/udp"))?;
        println!("    configured with port 0: the service bound UDP port {port}");
        Ok(port)
    }

    /// The first secret of the running relay's secret file (`--secret-file` in its command
    /// line, else `QUIC_RELAY_SECRET_FILE` in its environment, e.g. from a systemd drop-in),
    /// read over ssh from the process itself, so the check mints a token exactly as a peer's
    /// backend would. `None` when the relay runs without tokens (or its pid is unknown, with
    /// a --start-cmd that keeps no pid file).
    pub(super) fn relay_secret(&self) -> Result<Option<Vec<u8>>> {
        let mut script = self.service_pid_script();
        script.push_str(
            "[ -n \"$pid\" ] || exit 0\n\
             f=$(tr '\\0' '\\n' < \"/proc/$pid/cmdline\" | sed -n -e '/^--secret-file$/{{n;p;q;}}' -e 's/^--secret-file=//p' | head -n 1)\n\
             [ -n \"$f\" ] || f=$(tr '\\0' '\\n' < \"/proc/$pid/environ\" | sed -n 's/^QUIC_RELAY_SECRET_FILE=//p' | head -n 1)\n\
             [ -n \"$f\" ] || exit 0\n\
             case \"$f\" in /*) ;; *) f=\"/proc/$pid/cwd/$f\" ;; esac\n\
             echo '--- secret ---'\n\
             cat \"$f\"\n\
             echo\n\
             echo '--- end ---'\n",
        );
        let out = self.ssh(&script, "read the relay's secret for a health-check token")?;
        let Some(text) = section(&out, "secret") else {
            return Ok(None);
        };
        // The relay mints with nothing but checks against every line; its first non-empty line
        // (trimmed, as the relay reads it) is as good as any.
        let secret = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .ok_or_else(|| anyhow!("the relay's secret file on the host holds no secret"))?;
        println!("    the relay requires tokens: minting one with its secret file's first secret");
        Ok(Some(secret.as_bytes().to_vec()))
    }

    /// Runs the local `mqproxy client` against the server until it logs that it authenticated.
    /// The token and certificate pin are read from the host, so the check proves what a real
    /// client would see.
    pub(super) fn mqproxy_health(&self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + self.opts.health_timeout;
        let client = target_dir().join("release/mqproxy");
        if !client.is_file() {
            bail!(
                "the mqproxy health check runs {} as a client: build it with cargo build --release --locked -p mqproxy",
                client.display()
            );
        }
        let mut script = self.preamble();
        let wait_secs = self.opts.health_timeout.as_secs().max(1);
        if self.opts.health_cert_sha256.is_none() {
            // The server creates its certificate at first start: wait for it, then print the
            // SHA-256 of its DER form (what `--server-cert-sha256` pins), with coreutils only.
            script.push_str(&format!(
                "cert=\"$STATE_DIRECTORY/server-cert.pem\"\n\
                 i=0\n\
                 while [ ! -s \"$cert\" ] && [ \"$i\" -lt {} ]; do sleep 0.25; i=$((i + 1)); done\n\
                 [ -s \"$cert\" ] || {{ echo \"no certificate at $cert (did the server start? is --cert given? then pass --health-cert-sha256)\" >&2; exit 1; }}\n\
                 echo \"fp=$(sed -n '/BEGIN CERTIFICATE/,/END CERTIFICATE/{{/-----/d;p}}' \"$cert\" | sed '/^$/q' | base64 -d | sha256sum | cut -d' ' -f1)\"\n",
                wait_secs * 4
            ));
        }
        script.push_str("echo \"token=$(cat \"$CREDENTIALS_DIRECTORY/token\")\"\n");
        let out = self.ssh(&script, "read the mqproxy token and certificate")?;
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_owned)
        };
        let token = field("token").ok_or_else(|| anyhow!("the host printed no token"))?;
        let fp = match &self.opts.health_cert_sha256 {
            Some(f) => f.clone(),
            None => field("fp").ok_or_else(|| anyhow!("the host printed no fingerprint"))?,
        };
        let dir = std::env::temp_dir().join(format!("xtask-deploy-{}", random_hex(6)?));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let result = (|| {
            let token_file = dir.join("token");
            write_private(&token_file, token.as_bytes())?;
            let log = dir.join("client.log");
            let mut cmd = Command::new(&client);
            cmd.args(["client", "--server", &addr.to_string(), "--token-file"])
                .arg(&token_file)
                .args(["--server-cert-sha256", &fp, "--socks5", "127.0.0.1:0"])
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1");
            let mut guard = ChildGuard::spawn(cmd, "mqproxy client", &log)?;
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains(MQPROXY_CONNECTED) {
                    return Ok(());
                }
                if text.contains(MQPROXY_REFUSED) {
                    bail!("mqproxy at {addr} refused the token from the host:\n{text}");
                }
                guard.check_alive()?;
                if Instant::now() >= deadline {
                    bail!(
                        "mqproxy client did not authenticate with {addr} within {:?}; its log:\n{}",
                        self.opts.health_timeout,
                        crate::process::log_tail(&log, 10)
                    );
                }
                std::thread::sleep(HEALTH_POLL);
            }
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}

/// Sends `REG:<uuid>\n` until the relay answers `ACK` (relay/PROTOCOL.md §3.1, §4.1); with a
/// secret, the registration carries a token minted with it (§6), valid for 10 minutes.
pub fn relay_health(addr: SocketAddr, timeout: Duration, secret: Option<&[u8]>) -> Result<()> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal address")
    } else {
        "[::]:0".parse().expect("literal address")
    };
    let sock = UdpSocket::bind(bind).context("bind a UDP socket for the health check")?;
    sock.set_read_timeout(Some(HEALTH_POLL))
        .context("set the health check's read timeout")?;
    let session: Uuid = random_uuid()?
        .parse()
        .context("a random session id parses as a UUID")?;
    let reg = match secret {
        None => Registration::original(session).encode(),
        Some(secret) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("the system clock is before 1970")?
                .as_secs();
            Registration {
                session,
                extended: Some(Extended {
                    peer: None,
                    token: Some(Token::mint(secret, session, now + 600)),
                    cookie: None,
                    alt_aware: false,
                    alt: false,
                }),
            }
            .encode()
        }
    };
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no reply");
    let mut buf = [0u8; 600];
    while Instant::now() < deadline {
        if let Err(e) = sock.send_to(&reg, addr) {
            // E.g. ICMP port unreachable from the previous round: nothing listens yet.
            last = format!("send: {e}");
            std::thread::sleep(HEALTH_POLL);
            continue;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if matches!(Reply::parse(&buf[..n]), Some(Reply::Ack { .. })) => {
                println!("    {from} answered ACK");
                return Ok(());
            }
            Ok((n, from)) => {
                last = format!(
                    "{from} answered {:?}",
                    String::from_utf8_lossy(&buf[..n.min(80)])
                )
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                last = format!("receive: {e}");
                std::thread::sleep(HEALTH_POLL);
            }
        }
    }
    bail!("no ACK from the relay at {addr} within {timeout:?} (last: {last})")
}
