//! `cargo xtask bench mqproxy`: UDP and TCP through mqproxy's SOCKS5 listener (client → QUIC →
//! server) on loopback, against the direct path and against both shadowsocks implementations
//! (shadowsocks-libev's `ss-local` → `ss-server`, shadowsocks-rust's `sslocal` → `ssserver`),
//! all in one run, with each ratio printed.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::load::{Pacer, StopOnDrop};
use super::median;
use super::sys::{self, RecvBatch, SendBatch};
use crate::cli::Args;
use proxies::{retry_port_clash, ss_rust_bins, start_mqproxy, start_ss, start_ss_rust, Proxy};

mod proxies;

pub const HELP: &str = "\
Usage: cargo xtask bench mqproxy [options]

Builds mqproxy and xtask in release (then re-runs itself from the release build), starts a UDP
echo server and a TCP source on 127.0.0.1, and measures four paths to them in the same run:

  direct    the load generator talks to the echo/source itself
  mqproxy   SOCKS5 → mqproxy client → QUIC (DATAGRAMs / streams) → mqproxy server
  ss-libev  SOCKS5 → ss-local → ss-server (shadowsocks-libev, aes-256-gcm, -u for UDP)
  ss-rust   SOCKS5 → sslocal → ssserver (shadowsocks-rust, aes-256-gcm, -U for TCP and UDP)

Both shadowsocks use the same AEAD cipher, aes-256-gcm (the AES-GCM family QUIC's TLS 1.3
negotiates here), so all three proxies pay for the same kind of encryption. mqproxy (through
rustls) and shadowsocks-rust run the same AES-GCM code, aws-lc's; shadowsocks-libev runs
libsodium's (mbed TLS's on a CPU without AES-NI).

  udp      paced offered loads through UDP ASSOCIATE (one association, one destination): the
           echoed packets/s and Mbit/s and the loss, per load
  tcp      one SOCKS5 CONNECT downloading from the TCP source: Mbit/s (after one unmeasured
           64 MiB download through each proxy, which also grows its heap)

For each proxy it also prints the CPU time its two processes spent (user and system, from
/proc) per echoed packet and per downloaded byte: on a busy host this is steadier than
throughput, which also counts waiting for a core. Ratios are of medians; for CPU the ratio
is shadowsocks' over mqproxy's, so above 1 means mqproxy is ahead, as for throughput.

Last, the QUIC packet size (UDP payload) each mqproxy process sends with, from its metrics
page: what path MTU discovery found. Loopback carries up to mqproxy's cap (65,000 bytes),
an ordinary 1,500-byte internet path at most 1,472, and each QUIC packet costs the same
per-packet work whatever its size: loopback figures flatter mqproxy on that account, as
loopback's 64 KiB TCP segments (and the kernel's segmentation offloads on a real NIC)
flatter shadowsocks.

Options:
  --quick       one repetition of short runs (a ~40 s smoke test; its medians are of one)
  --reps N      repetitions (default 5; medians are reported)
  --only WHAT   `udp` or `tcp`: run just that part
  --no-build    do not run cargo build first
  -h, --help    this text

shadowsocks-libev comes from Debian (`apt-get install shadowsocks-libev`); shadowsocks-rust
from crates.io (`cargo install shadowsocks-rust`; .ci/run installs it under
target/interop-tools/bin, which is searched after PATH). A missing one's column is left out,
with a note. Logs go to target/bench-mqproxy/.
";

/// The shared secret of both proxies (loopback only).
const SECRET: &str = "bench-secret";
/// shadowsocks cipher: AES-GCM, as QUIC's TLS 1.3 suite negotiates here, so both pay for the
/// same kind of encryption.
const SS_METHOD: &str = "aes-256-gcm";
/// Marks our datagrams (so a stray late echo from an earlier run is not counted).
const MAGIC: &[u8; 4] = b"MQBL";
const HEADER: usize = 16;
/// After sending, the receiver is drained once nothing arrived for this long...
const DRAIN_QUIET: Duration = Duration::from_millis(200);
/// ...or after this long with a trickle still arriving.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Receive poll period, to notice the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// How long a proxy may take to come up and relay a first echo.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Socket buffers for the load generator and the echo server.
const BUFFERS: usize = 8 << 20;

/// Offered UDP loads: (payload bytes, packets per second). 1,200 B is a full-size packet that
/// fits one DATAGRAM unfragmented; 64 B measures the per-packet cost. mqproxy carries all of
/// 50,000/s, so that load caps its ratio at what the shadowsocks deliver: 100,000/s shows how
/// far ahead it is.
const UDP_LOADS: [(usize, u64); 5] = [
    (1200, 20_000),
    (1200, 50_000),
    (1200, 100_000),
    (64, 50_000),
    (64, 100_000),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path3 {
    Direct,
    Mqproxy,
    SsLibev,
    SsRust,
}

impl Path3 {
    fn name(self) -> &'static str {
        match self {
            Path3::Direct => "direct",
            Path3::Mqproxy => "mqproxy",
            Path3::SsLibev => "ss-libev",
            Path3::SsRust => "ss-rust",
        }
    }
}

/// The shadowsocks paths, in the order their ratios are printed.
const SS_PATHS: [Path3; 2] = [Path3::SsLibev, Path3::SsRust];

#[derive(Debug)]
struct Plan {
    reps: usize,
    udp_duration: Duration,
    tcp_bytes: u64,
    run_udp: bool,
    run_tcp: bool,
}

pub fn run(args: &[String]) -> Result<()> {
    let mut a = Args::new(args);
    let Some(common) = super::Common::parse(&mut a, HELP)? else {
        return Ok(());
    };
    let (quick, no_build) = (common.quick, common.no_build);
    let only = a.value("--only")?;
    a.finish()?;
    let (run_udp, run_tcp) = match only.as_deref() {
        None => (true, true),
        Some("udp") => (true, false),
        Some("tcp") => (false, true),
        Some(other) => bail!("--only takes `udp` or `tcp`, not `{other}`"),
    };
    let plan = Plan {
        reps: common.reps(1, 5),
        udp_duration: Duration::from_secs_f64(if quick { 1.0 } else { 3.0 }),
        tcp_bytes: if quick { 64 << 20 } else { 256 << 20 },
        run_udp,
        run_tcp,
    };
    let target = crate::target_dir().join("release");
    if !no_build {
        super::build_release(&["xtask", "mqproxy"])?;
    }
    super::exec_release("mqproxy", args)?;
    let log_dir = crate::target_dir().join("bench-mqproxy");
    let mqproxy_bin = target.join("mqproxy");
    if !mqproxy_bin.is_file() {
        bail!("{} not found (build it first)", mqproxy_bin.display());
    }
    let have_ss = super::which("ss-local") && super::which("ss-server");
    if !have_ss {
        println!(
            "ss-local/ss-server not found (apt-get install shadowsocks-libev): no `ss-libev` column"
        );
    }
    let ss_rust = ss_rust_bins();
    if ss_rust.is_none() {
        println!(
            "sslocal/ssserver not found in PATH or target/interop-tools/bin (cargo install \
             shadowsocks-rust): no `ss-rust` column"
        );
    }

    let stop = AtomicBool::new(false);
    let echo = sys::bind_udp(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    sys::set_buffers(&echo, BUFFERS).context("echo socket buffers")?;
    echo.set_read_timeout(Some(POLL))?;
    let echo_addr = sys::local_v4(&echo)?;
    let source = TcpListener::bind("127.0.0.1:0").context("bind the TCP source")?;
    let source_addr = match source.local_addr()? {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => bail!("the TCP source bound IPv6"),
    };
    source.set_nonblocking(true)?;

    std::thread::scope(|s| -> Result<()> {
        let _stop = StopOnDrop(&stop);
        s.spawn(|| echo_server(&echo, &stop));
        s.spawn(|| tcp_source(&source, &stop));

        let mq = started_and_echoing(start_mqproxy(&mqproxy_bin, &log_dir)?, echo_addr)
            .context("mqproxy")?;
        let ss = if have_ss {
            Some(retry_port_clash("shadowsocks-libev", || {
                started_and_echoing(start_ss(&log_dir)?, echo_addr)
            })?)
        } else {
            None
        };
        let ssr = match &ss_rust {
            Some((local, server)) => Some(retry_port_clash("shadowsocks-rust", || {
                started_and_echoing(start_ss_rust(local, server, &log_dir)?, echo_addr)
            })?),
            None => None,
        };
        let mut paths: Vec<(Path3, Option<&Proxy>)> =
            vec![(Path3::Direct, None), (Path3::Mqproxy, Some(&mq))];
        if let Some(ss) = &ss {
            paths.push((Path3::SsLibev, Some(ss)));
        }
        if let Some(ssr) = &ssr {
            paths.push((Path3::SsRust, Some(ssr)));
        }
        // Every proxy has relayed a first echo (`started_and_echoing`).
        for (p, proxy) in &paths {
            if let Some(proxy) = proxy {
                // One unmeasured download each: the first through a fresh process also pays
                // for growing its heap (mqproxy's first 64 MiB took ~5,000 page faults, later
                // ones almost none), which a proxy that has run for a while no longer does.
                if plan.run_tcp {
                    tcp_run(Some(proxy.socks), source_addr, TCP_WARM_UP_BYTES)
                        .with_context(|| format!("{}: first download", p.name()))?;
                }
            }
        }
        println!(
            "udp: {} s per load, tcp: {} MiB per download, {} repetition(s); medians{}",
            plan.udp_duration.as_secs_f64(),
            plan.tcp_bytes >> 20,
            plan.reps,
            if plan.reps < 5 {
                " (fewer than the 5 a full run takes: figures are rougher)"
            } else {
                ""
            }
        );
        println!("load average at the start: {}\n", sys::load_average());
        let mut udp: UdpTable = vec![vec![Vec::new(); UDP_LOADS.len()]; paths.len()];
        let mut tcp: Vec<Vec<TcpResult>> = vec![Vec::new(); paths.len()];
        for rep in 0..plan.reps {
            // Interleave the paths in every repetition so host noise hits all of them alike.
            for (i, &(p, proxy)) in paths.iter().enumerate() {
                let socks = proxy.map(|x| x.socks);
                for (j, &(size, rate)) in UDP_LOADS.iter().enumerate() {
                    if !plan.run_udp {
                        break;
                    }
                    let (mut r, cpu) = with_cpu(proxy, || {
                        udp_run(socks, echo_addr, size, rate, plan.udp_duration)
                    })
                    .with_context(|| format!("{} udp {size} B at {rate}/s", p.name()))?;
                    r.cpu_us = cpu.map(|c| c.as_secs_f64() * 1e6 / r.echoed.max(1) as f64);
                    udp[i][j].push(r);
                }
                if plan.run_tcp {
                    let (mbit, cpu) =
                        with_cpu(proxy, || tcp_run(socks, source_addr, plan.tcp_bytes))
                            .with_context(|| format!("{} tcp download", p.name()))?;
                    tcp[i].push(TcpResult {
                        mbit,
                        cpu_ns_per_byte: cpu.map(|c| c.as_secs_f64() * 1e9 / plan.tcp_bytes as f64),
                    });
                }
            }
            for proxy in paths.iter().filter_map(|(_, p)| *p) {
                proxy.check()?;
            }
            eprintln!("repetition {} done", rep + 1);
        }
        if plan.run_udp {
            print_udp(&paths, &udp);
        }
        if plan.run_tcp {
            print_tcp(&paths, &tcp);
        }
        // What path MTU discovery settled on: every per-packet cost (AEAD, headers, ACKs,
        // system calls) of a QUIC download is paid once per packet of this size.
        match mq.quic_mtu().as_deref() {
            Ok([(sm, sb), (cm, cb)]) => println!(
                "mqproxy QUIC packets at the end: server sends {sm} B, client {cm} B \
                 (UDP payload; MTU black holes detected: server {sb}, client {cb})"
            ),
            Ok(_) => {}
            Err(e) => println!("mqproxy QUIC packet size unknown: {e:#}"),
        }
        println!("\nload average at the end: {}", sys::load_average());
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// SOCKS5 (just what the benchmark needs: no auth, IPv4)

fn socks_handshake(
    proxy: SocketAddrV4,
    cmd: u8,
    addr: SocketAddrV4,
) -> Result<(TcpStream, SocketAddrV4)> {
    let mut t = TcpStream::connect(proxy).with_context(|| format!("connect {proxy}"))?;
    t.set_read_timeout(Some(STARTUP_TIMEOUT))?;
    t.write_all(&[5, 1, 0])?;
    let mut m = [0u8; 2];
    t.read_exact(&mut m)?;
    if m != [5, 0] {
        bail!("{proxy}: method reply {m:?}");
    }
    let mut req = vec![5, cmd, 0, 1];
    req.extend_from_slice(&addr.ip().octets());
    req.extend_from_slice(&addr.port().to_be_bytes());
    t.write_all(&req)?;
    let mut r = [0u8; 10];
    t.read_exact(&mut r)?;
    if r[1] != 0 || r[3] != 1 {
        bail!("{proxy}: SOCKS reply {:#04x} (atyp {})", r[1], r[3]);
    }
    let mut bnd = SocketAddrV4::new(
        Ipv4Addr::new(r[4], r[5], r[6], r[7]),
        u16::from_be_bytes([r[8], r[9]]),
    );
    if bnd.ip().is_unspecified() {
        bnd.set_ip(*proxy.ip());
    }
    t.set_read_timeout(None)?;
    Ok((t, bnd))
}

fn socks_udp_header(to: SocketAddrV4) -> Vec<u8> {
    let mut h = vec![0, 0, 0, 1];
    h.extend_from_slice(&to.ip().octets());
    h.extend_from_slice(&to.port().to_be_bytes());
    h
}

/// The payload of a SOCKS5 UDP reply (after RSV, FRAG and the address).
fn strip_socks(p: &[u8]) -> Option<&[u8]> {
    let skip = match *p.get(3)? {
        1 => 10,
        4 => 22,
        3 => 7 + usize::from(*p.get(4)?),
        _ => return None,
    };
    p.get(skip..)
}

// ---------------------------------------------------------------------------------------------
// UDP

/// The UDP echo: everything back to its sender, in batches.
fn echo_server(sock: &UdpSocket, stop: &AtomicBool) {
    let mut batch = RecvBatch::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(n) = batch.recv(sock, libc::MSG_WAITFORONE) {
            if n > 0 {
                batch.send_routed(sock, |_, src| sys::Route::Forward(src));
            }
        }
    }
}

/// A socket and where to send: the echo itself, or a SOCKS relay with its control connection.
struct UdpPath {
    sock: UdpSocket,
    to: SocketAddrV4,
    header: Vec<u8>,
    socks: bool,
    _control: Option<TcpStream>,
}

fn udp_path(proxy: Option<SocketAddrV4>, echo: SocketAddrV4) -> Result<UdpPath> {
    let sock = sys::bind_udp(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    sys::set_buffers(&sock, BUFFERS).context("load socket buffers")?;
    sock.set_read_timeout(Some(POLL))?;
    let Some(proxy) = proxy else {
        return Ok(UdpPath {
            sock,
            to: echo,
            header: Vec::new(),
            socks: false,
            _control: None,
        });
    };
    let me = sys::local_v4(&sock)?;
    let (control, relay) = socks_handshake(proxy, 3, me)?;
    Ok(UdpPath {
        sock,
        to: relay,
        header: socks_udp_header(echo),
        socks: true,
        _control: Some(control),
    })
}

/// The unmeasured download through each proxy before the repetitions.
const TCP_WARM_UP_BYTES: u64 = 64 << 20;

/// `p` once it relays a first UDP echo: a start counts only then. For shadowsocks this is what
/// catches a port clash: its ports are picked in advance, and one that lost the UDP half of its
/// port to another socket keeps running with TCP alone (`retry_port_clash` then starts it
/// again on other ports).
fn started_and_echoing(p: Proxy, echo: SocketAddrV4) -> Result<Proxy> {
    warm_up(p.socks, echo).context("first echo")?;
    Ok(p)
}

/// Sends pings until one comes back: the proxy is up and relays UDP.
fn warm_up(proxy: SocketAddrV4, echo: SocketAddrV4) -> Result<()> {
    warm_up_path(&udp_path(Some(proxy), echo)?)
}

/// What one paced UDP run delivered.
#[derive(Debug, Clone, Copy)]
struct UdpResult {
    /// Echoed packets per second.
    pps: f64,
    /// Echoed payload Mbit/s.
    mbit: f64,
    /// Lost fraction of what was sent.
    loss: f64,
    /// Packets echoed.
    echoed: u64,
    /// CPU µs both proxy processes spent per echoed packet (its way there and back).
    cpu_us: Option<f64>,
}

/// Results per path, per load, per repetition.
type UdpTable = Vec<Vec<Vec<UdpResult>>>;

/// What one download delivered.
#[derive(Debug, Clone, Copy)]
struct TcpResult {
    mbit: f64,
    /// CPU ns both proxy processes spent per byte carried.
    cpu_ns_per_byte: Option<f64>,
}

/// Runs `f`; with a proxy, also the CPU time both its processes spent meanwhile. On a busy
/// host this is steadier than throughput: it does not count the time a process waited for a
/// core.
fn with_cpu<T>(
    proxy: Option<&Proxy>,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Option<Duration>)> {
    let before = proxy.map(Proxy::cpu).transpose()?;
    let r = f()?;
    let spent = match (proxy, before) {
        (Some(p), Some(b)) => Some(p.cpu()?.saturating_sub(b)),
        _ => None,
    };
    Ok((r, spent))
}

/// One paced run.
fn udp_run(
    proxy: Option<SocketAddrV4>,
    echo: SocketAddrV4,
    size: usize,
    rate: u64,
    duration: Duration,
) -> Result<UdpResult> {
    let path = udp_path(proxy, echo)?;
    if path.socks {
        warm_up_path(&path)?;
    }
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let run_id = super::load::random_u64() as u32;
    let stop = AtomicBool::new(false);
    let received = AtomicU64::new(0);
    let epoch = Instant::now();
    let last_rx_us = AtomicU64::new(0);
    let (sent, secs) = std::thread::scope(|s| {
        let rx =
            s.spawn(|| udp_receive(&path, run_id, total, &stop, &received, epoch, &last_rx_us));
        let _stop = StopOnDrop(&stop);
        let mut payload = path.header.clone();
        let off = payload.len();
        payload.resize(off + size.max(HEADER), 0);
        payload[off..off + 4].copy_from_slice(MAGIC);
        payload[off + 4..off + 8].copy_from_slice(&run_id.to_le_bytes());
        let mut batch = SendBatch::new();
        let mut pacer = Pacer::new(rate, total);
        let (mut seq, mut ok) = (0u64, 0u64);
        while !pacer.done() {
            for _ in 0..pacer.next_burst() {
                payload[off + 8..off + 16].copy_from_slice(&seq.to_le_bytes());
                seq += 1;
                batch.push(path.to, None, &payload);
                if batch.is_full() {
                    ok += batch.send(&path.sock).ok;
                }
            }
            if batch.len() > 0 {
                ok += batch.send(&path.sock).ok;
            }
        }
        let secs = pacer.elapsed().as_secs_f64();
        super::drain(epoch, &last_rx_us, DRAIN_QUIET, DRAIN_MAX, POLL);
        stop.store(true, Ordering::Relaxed);
        let _ = rx.join();
        (ok, secs)
    });
    let got = received.load(Ordering::Relaxed);
    let pps = got as f64 / secs.max(1e-9);
    let loss = if sent == 0 {
        1.0
    } else {
        1.0 - got as f64 / sent as f64
    };
    Ok(UdpResult {
        pps,
        mbit: pps * size as f64 * 8.0 / 1e6,
        loss: loss.max(0.0),
        echoed: got,
        cpu_us: None,
    })
}

/// Pings through `p` until one comes back (a new association's first packets open the
/// proxy's session, which is not what is measured).
fn warm_up_path(p: &UdpPath) -> Result<()> {
    let mut d = p.header.clone();
    d.extend_from_slice(b"warm-up");
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while Instant::now() < deadline {
        p.sock.send_to(&d, p.to)?;
        if let Ok(n) = p.sock.recv(&mut buf) {
            if strip_socks(&buf[..n]) == Some(&b"warm-up"[..]) {
                return Ok(());
            }
        }
    }
    bail!("no echo on a new association within {STARTUP_TIMEOUT:?}")
}

fn udp_receive(
    p: &UdpPath,
    run_id: u32,
    total: u64,
    stop: &AtomicBool,
    received: &AtomicU64,
    epoch: Instant,
    last_rx_us: &AtomicU64,
) {
    let mut seen = vec![0u64; (total as usize).div_ceil(64)];
    let mut batch = RecvBatch::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(n) = batch.recv(&p.sock, libc::MSG_WAITFORONE) else {
            continue;
        };
        if n > 0 {
            last_rx_us.store(epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        for i in 0..n {
            let d = batch.payload(i);
            let d = if p.socks {
                match strip_socks(d) {
                    Some(d) => d,
                    None => continue,
                }
            } else {
                d
            };
            if d.len() < HEADER || &d[..4] != MAGIC || d[4..8] != run_id.to_le_bytes() {
                continue;
            }
            let seq = u64::from_le_bytes(d[8..16].try_into().expect("8 bytes")) as usize;
            if seq >= seen.len() * 64 {
                continue;
            }
            let (w, b) = (seq / 64, 1u64 << (seq % 64));
            if seen[w] & b == 0 {
                seen[w] |= b;
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TCP

/// Serves downloads: a client sends the byte count (u64 LE), gets that many bytes, then EOF.
fn tcp_source(l: &TcpListener, stop: &AtomicBool) {
    std::thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut t, _)) => {
                    s.spawn(move || {
                        let _ = t.set_nonblocking(false);
                        let mut n = [0u8; 8];
                        if t.read_exact(&mut n).is_err() {
                            return;
                        }
                        let mut left = u64::from_le_bytes(n);
                        let buf = vec![0x5au8; 1 << 20];
                        while left > 0 {
                            let k = left.min(buf.len() as u64) as usize;
                            if t.write_all(&buf[..k]).is_err() {
                                return;
                            }
                            left -= k as u64;
                        }
                    });
                }
                Err(_) => std::thread::sleep(POLL),
            }
        }
    });
}

/// One download; returns Mbit/s.
fn tcp_run(proxy: Option<SocketAddrV4>, source: SocketAddrV4, bytes: u64) -> Result<f64> {
    let mut t = match proxy {
        None => TcpStream::connect(source)?,
        Some(p) => socks_handshake(p, 1, source)?.0,
    };
    let t0 = Instant::now();
    t.write_all(&bytes.to_le_bytes())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = t.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    if got != bytes {
        bail!("downloaded {got} of {bytes} bytes");
    }
    Ok(bytes as f64 * 8.0 / 1e6 / secs)
}

// ---------------------------------------------------------------------------------------------

fn print_udp(paths: &[(Path3, Option<&Proxy>)], udp: &UdpTable) {
    let idx = |p: Path3| paths.iter().position(|(q, _)| *q == p);
    let med =
        |v: &[UdpResult], f: fn(&UdpResult) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let cpu_med = |v: &[UdpResult]| {
        let c: Vec<f64> = v.iter().filter_map(|r| r.cpu_us).collect();
        (!c.is_empty()).then(|| median(&c))
    };
    println!(
        "{:<26} {:>12} {:>10} {:>8} {:>13} {:>14}",
        "UDP echo (offered)", "path", "pkt/s", "Mbit/s", "loss", "proxy CPU/pkt"
    );
    for (j, &(size, rate)) in UDP_LOADS.iter().enumerate() {
        let label = format!("{size} B at {rate}/s");
        for (i, (p, _)) in paths.iter().enumerate() {
            let (pps, mbit, loss) = (
                med(&udp[i][j], |r| r.pps),
                med(&udp[i][j], |r| r.mbit),
                med(&udp[i][j], |r| r.loss),
            );
            let cpu = cpu_med(&udp[i][j]).map_or(String::new(), |c| format!("{c:>11.2} µs"));
            println!(
                "{:<26} {:>12} {:>10.0} {:>8.1} {:>12.2}% {:>14}",
                label,
                p.name(),
                pps,
                mbit,
                loss * 100.0,
                cpu
            );
        }
        let pps = |p| idx(p).map(|i| med(&udp[i][j], |r| r.pps));
        print_ratios("pkt/s", &pps, false);
        let cpu = |p| idx(p).and_then(|i| cpu_med(&udp[i][j]));
        print_ratios("CPU/pkt", &cpu, true);
    }
}

fn print_tcp(paths: &[(Path3, Option<&Proxy>)], tcp: &[Vec<TcpResult>]) {
    let idx = |p: Path3| paths.iter().position(|(q, _)| *q == p);
    let mbit = |i: usize| median(&tcp[i].iter().map(|r| r.mbit).collect::<Vec<_>>());
    let cpu = |i: usize| {
        let c: Vec<f64> = tcp[i].iter().filter_map(|r| r.cpu_ns_per_byte).collect();
        (!c.is_empty()).then(|| median(&c))
    };
    println!(
        "\n{:<26} {:>12} {:>10} {:>15}",
        "TCP download", "path", "Mbit/s", "proxy CPU/byte"
    );
    for (i, (p, _)) in paths.iter().enumerate() {
        let c = cpu(i).map_or(String::new(), |c| format!("{c:>12.2} ns"));
        println!("{:<26} {:>12} {:>10.0} {:>15}", "", p.name(), mbit(i), c);
    }
    print_ratios("Mbit/s", &|p| idx(p).map(mbit), false);
    print_ratios("CPU/byte", &|p| idx(p).and_then(cpu), true);
}

/// mqproxy against direct, against each shadowsocks present and against the better of them.
/// A `cost` (CPU per unit) is better when lower: its ratios are shadowsocks' over mqproxy's,
/// so above 1 means mqproxy ahead, as for throughput.
fn print_ratios(what: &str, figure: &dyn Fn(Path3) -> Option<f64>, cost: bool) {
    let Some(m) = figure(Path3::Mqproxy) else {
        return;
    };
    print!("{:<26} {what}:", "");
    match figure(Path3::Direct) {
        Some(d) if !cost => print!(" mqproxy/direct {:.3}", m / d),
        _ => {}
    }
    let ahead = |s: f64| if cost { s / m } else { m / s };
    let mut best: Option<(Path3, f64)> = None;
    for p in SS_PATHS {
        if let Some(s) = figure(p) {
            if cost {
                print!("   {0}/mqproxy {1:.3}", p.name(), ahead(s));
            } else {
                print!("   mqproxy/{0} {1:.3}", p.name(), ahead(s));
            }
            if best.is_none_or(|(_, b)| ahead(s) < ahead(b)) {
                best = Some((p, s));
            }
        }
    }
    if let Some((p, s)) = best {
        let label = if cost {
            format!("better ss ({})/mqproxy", p.name())
        } else {
            format!("mqproxy/better ss ({})", p.name())
        };
        print!("   {label} {:.3}", ahead(s));
    }
    println!();
}
