//! The proxies `cargo xtask bench mqproxy` measures: mqproxy's server and client, and the two
//! shadowsocks implementations' server and local side, each pair started and watched as a
//! [`Proxy`] whose CPU time can be read.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{SECRET, SS_METHOD, STARTUP_TIMEOUT};
use crate::bench::{sys, which};
use crate::process::ChildGuard;

/// A proxy pair (server + local SOCKS5 side), killed when dropped.
pub(super) struct Proxy {
    pub(super) socks: SocketAddrV4,
    children: Vec<std::cell::RefCell<ChildGuard>>,
    /// mqproxy's metrics pages, server's then client's (none for shadowsocks).
    metrics: Vec<SocketAddr>,
}

impl Proxy {
    /// A proxy of a server and a client process, once its SOCKS5 listener answers.
    fn up(socks: SocketAddrV4, server: ChildGuard, client: ChildGuard) -> Result<Proxy> {
        let p = Proxy {
            socks,
            children: vec![server.into(), client.into()],
            metrics: Vec::new(),
        };
        p.wait_listening()?;
        Ok(p)
    }

    pub(super) fn check(&self) -> Result<()> {
        for c in &self.children {
            c.borrow_mut().check_alive()?;
        }
        Ok(())
    }

    /// CPU time (user and system) both processes have used so far.
    pub(super) fn cpu(&self) -> Result<Duration> {
        self.children
            .iter()
            .map(|c| sys::cpu_time(c.borrow().pid()))
            .sum()
    }

    /// The QUIC packet size each mqproxy process sends with now and how many MTU black holes
    /// it has detected, server's then client's, from their metrics pages (the sum over their
    /// connections of black holes; the largest MTU, for one connection each in the bench).
    pub(super) fn quic_mtu(&self) -> Result<Vec<(u64, u64)>> {
        self.metrics
            .iter()
            .map(|&addr| {
                let s = crate::bench::metrics::scrape(addr)?;
                let max = |name| {
                    s.family(name)
                        .into_iter()
                        .map(|(_, v)| v as u64)
                        .max()
                        .unwrap_or(0)
                };
                let sum = |name| s.family(name).into_iter().map(|(_, v)| v as u64).sum();
                Ok((
                    max("mqproxy_path_mtu_bytes"),
                    sum("mqproxy_path_black_holes_total"),
                ))
            })
            .collect()
    }

    fn wait_listening(&self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while TcpStream::connect(self.socks).is_err() {
            self.check()?;
            if Instant::now() > deadline {
                bail!("SOCKS5 listener {} not up", self.socks);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

pub(super) fn start_mqproxy(bin: &Path, log_dir: &Path) -> Result<Proxy> {
    // Port 0 for both: each binds its own and logs it ("server running listen=..",
    // "client running socks5=.."), which is read back instead of picking ports here.
    let mut server = Command::new(bin);
    server
        .args(["server", "--listen", "127.0.0.1:0", "--token", SECRET])
        .args(["--allow-private", "--metrics", "127.0.0.1:0", "--state-dir"])
        .arg(log_dir.join("state"))
        .env("RUST_LOG", "info");
    let mut server = ChildGuard::spawn(
        server,
        "mqproxy server",
        &log_dir.join("mqproxy-server.log"),
    )?;
    let listen = server.wait_logged("server running", "listen", Duration::from_secs(15))?;
    let server_metrics = server.wait_logged("Prometheus", "metrics", Duration::from_secs(15))?;
    let mut client = Command::new(bin);
    client
        .args(["client", "--server", &listen, "--token", SECRET])
        .args([
            "--insecure",
            "--socks5",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info");
    let mut client = ChildGuard::spawn(
        client,
        "mqproxy client",
        &log_dir.join("mqproxy-client.log"),
    )?;
    let socks: SocketAddrV4 = client
        .wait_logged("client running", "socks5", Duration::from_secs(15))?
        .parse()
        .context("the mqproxy client's logged SOCKS5 address")?;
    let client_metrics = client.wait_logged("Prometheus", "metrics", Duration::from_secs(15))?;
    let mut p = Proxy::up(socks, server, client)?;
    for a in [server_metrics, client_metrics] {
        p.metrics
            .push(a.parse().context("an mqproxy's logged metrics address")?);
    }
    Ok(p)
}

/// Attempts at starting a third-party proxy on picked ports: another process may take a port
/// between its pick and the proxy's bind, which shows as a start that fails.
const PORT_CLASH_ATTEMPTS: u32 = 3;

/// Starts a proxy whose ports had to be picked in advance, again on fresh ports when the start
/// fails (e.g. "Address already in use"), up to [`PORT_CLASH_ATTEMPTS`] times.
pub(super) fn retry_port_clash(what: &str, start: impl Fn() -> Result<Proxy>) -> Result<Proxy> {
    let mut attempt = 1;
    loop {
        match start() {
            Ok(p) => return Ok(p),
            Err(e) if attempt < PORT_CLASH_ATTEMPTS => {
                eprintln!("{what} did not start ({e:#}); again on other ports");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn start_ss(log_dir: &Path) -> Result<Proxy> {
    // shadowsocks-libev does not report a port it bound for 0: these are picked and released
    // (the one place left, for programs that cannot do better); a clash makes the start fail,
    // and `retry_port_clash` starts it again on other ports.
    let (sp, cp) = (
        crate::bench::free_tcp_udp_port()?,
        crate::bench::free_tcp_udp_port()?,
    );
    let mut server = Command::new("ss-server");
    server.args([
        "-s",
        "127.0.0.1",
        "-p",
        &sp.to_string(),
        "-k",
        SECRET,
        "-m",
        SS_METHOD,
        "-u",
    ]);
    let server = ChildGuard::spawn(server, "ss-server", &log_dir.join("ss-server.log"))?;
    let mut local = Command::new("ss-local");
    local.args(["-s", "127.0.0.1", "-p", &sp.to_string(), "-b", "127.0.0.1"]);
    local.args(["-l", &cp.to_string(), "-k", SECRET, "-m", SS_METHOD, "-u"]);
    let local = ChildGuard::spawn(local, "ss-local", &log_dir.join("ss-local.log"))?;
    Proxy::up(SocketAddrV4::new(Ipv4Addr::LOCALHOST, cp), server, local)
}

/// shadowsocks-rust's `sslocal` and `ssserver`: from PATH, else where .ci/run installs them.
pub(super) fn ss_rust_bins() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let installed = crate::target_dir().join("interop-tools").join("bin");
    let find = |name: &str| {
        if which(name) {
            Some(std::path::PathBuf::from(name))
        } else {
            let p = installed.join(name);
            p.is_file().then_some(p)
        }
    };
    Some((find("sslocal")?, find("ssserver")?))
}

pub(super) fn start_ss_rust(local_bin: &Path, server_bin: &Path, log_dir: &Path) -> Result<Proxy> {
    // Like shadowsocks-libev, shadowsocks-rust does not report a port it bound for 0.
    let (sp, cp) = (
        crate::bench::free_tcp_udp_port()?,
        crate::bench::free_tcp_udp_port()?,
    );
    let server_addr = format!("127.0.0.1:{sp}");
    let mut server = Command::new(server_bin);
    server.args(["-s", &server_addr, "-k", SECRET, "-m", SS_METHOD, "-U"]);
    let server = ChildGuard::spawn(server, "ssserver", &log_dir.join("ssserver.log"))?;
    let mut local = Command::new(local_bin);
    local.args(["-s", &server_addr, "-b", &format!("127.0.0.1:{cp}")]);
    local.args(["-k", SECRET, "-m", SS_METHOD, "-U"]);
    let local = ChildGuard::spawn(local, "sslocal", &log_dir.join("sslocal.log"))?;
    Proxy::up(SocketAddrV4::new(Ipv4Addr::LOCALHOST, cp), server, local)
}
