//! The NAT matrix: for every ordered pair of punchable netlab NAT types (A dials, B listens),
//! connect two peer-sdk peers through a relay in the lab and record the path at connect, the
//! connect time and the direct share over the repetitions. Shared by the `lab_matrix` example
//! (`cargo xtask lab matrix`) and the `lab_matrix` CI test.

#![allow(dead_code)] // each includer uses a different part

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use netlab::{Lab, LabConfig, NatType, Side};
use peer_sdk::{ClientTls, Identity, Options, ServerTls, Uuid};
use quic_relay::server::{Server, ServerHandle};
use quic_relay::sessions::RelayConfig;

/// The relay's port on the lab's relay host.
const RELAY_PORT: u16 = 4433;
/// Upper bound for one connection attempt (registration, punching, handshake); a pair that
/// takes longer is reported as failed.
const PAIR_TIMEOUT: Duration = Duration::from_secs(20);

/// One connection attempt's outcome.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// `"direct"`, `"relay"`, or `"failed: ..."`.
    pub path: String,
    /// From the dialer's `connect` call to an established connection.
    pub connect: Duration,
    /// Birthday punching's probes sent by the easy side (either peer), or the port prediction
    /// sweep's packets sent by the dialer, by the time the connection was up, when it ran.
    pub birthday_probes: Option<u32>,
}

/// The outcomes of one ordered pair over the repetitions.
#[derive(Debug, Clone)]
pub struct PairResult {
    /// The dialing side's NAT.
    pub dialer: NatType,
    /// The listening side's NAT.
    pub listener: NatType,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
}

impl PairResult {
    /// How many attempts went direct.
    pub fn direct(&self) -> usize {
        self.attempts.iter().filter(|a| a.path == "direct").count()
    }

    /// Whether this pair needs birthday punching for its direct path.
    pub fn birthday(&self) -> bool {
        self.dialer.birthday_with(self.listener)
    }

    /// Whether this pair needs the port prediction sweep for its direct path.
    pub fn sweep(&self) -> bool {
        self.dialer.sweep_with(self.listener)
    }

    /// The budget beside a birthday or sweep pair (the SDK's limits, and the most packets an
    /// attempt used); empty for the others.
    pub fn budget(&self) -> String {
        use peer_sdk::rendezvous::{birthday as b, sweep as s};
        let used = self.attempts.iter().filter_map(|a| a.birthday_probes).max();
        let used = used.map_or("-".to_owned(), |u| u.to_string());
        if self.birthday() {
            format!(
                "budget: {} sockets, <= {} probes at {}/s; used <= {used} probes",
                b::SOCKETS,
                b::MAX_PROBES,
                b::PROBES_PER_TICK * 1000 / b::TICK.as_millis() as u32,
            )
        } else if self.sweep() {
            let span = s::SWEEP_LEAD + s::ROUND_INTERVAL * u32::from(s::ROUNDS);
            format!(
                "sweep: {} flows, <= {} packets per side in {} ms; used <= {used}",
                s::FLOWS,
                u32::from(s::FLOWS) * (1 + u32::from(s::ROUNDS)),
                span.as_millis(),
            )
        } else {
            String::new()
        }
    }

    /// The path expected with hole punching, port prediction and birthday punching
    /// (netlab's `direct_possible_with`).
    pub fn expected(&self) -> &'static str {
        if self.dialer.direct_possible_with(self.listener) {
            "direct"
        } else {
            "relay"
        }
    }

    /// Median connect time of the attempts that connected.
    pub fn median_connect(&self) -> Option<Duration> {
        let mut t: Vec<Duration> = self
            .attempts
            .iter()
            .filter(|a| !a.path.starts_with("failed"))
            .map(|a| a.connect)
            .collect();
        t.sort();
        t.get(t.len() / 2).copied()
    }

    /// Slowest connect time of the attempts that connected.
    pub fn max_connect(&self) -> Option<Duration> {
        self.attempts
            .iter()
            .filter(|a| !a.path.starts_with("failed"))
            .map(|a| a.connect)
            .max()
    }

    /// The paths seen, each with its count (`direct 9, relay 1`).
    pub fn paths(&self) -> String {
        let mut seen: Vec<(String, usize)> = Vec::new();
        for a in &self.attempts {
            match seen.iter_mut().find(|(p, _)| *p == a.path) {
                Some((_, n)) => *n += 1,
                None => seen.push((a.path.clone(), 1)),
            }
        }
        seen.iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn start_relay(lab: &Lab) -> Result<ServerHandle> {
    let addr = SocketAddr::from((lab.relay_ip(), RELAY_PORT));
    lab.run_in(&lab.relay_ns(), move || -> Result<ServerHandle> {
        Ok(Server::bind(addr, RelayConfig::default(), 4 << 20)?.spawn()?)
    })?
}

/// One attempt in a fresh lab: B (behind `listener`) accepts, A (behind `dialer`) connects and
/// echoes one short stream.
pub fn attempt(dialer: NatType, listener: NatType, salt: u128) -> Result<Attempt> {
    let lab = Lab::new(LabConfig::new(dialer, listener)).context("lab")?;
    let _relay = start_relay(&lab)?;
    let session = Uuid::from_u128(rand_u128() ^ salt);
    let mut opts = Options::new(SocketAddr::from((lab.relay_ip(), RELAY_PORT)), session);
    opts.register_timeout = PAIR_TIMEOUT;
    opts.peer_timeout = PAIR_TIMEOUT;
    let (tx, rx) = mpsc::channel();
    let lopts = opts.clone();
    let listener_thread =
        lab.spawn_thread(&lab.peer_ns(Side::B), move || -> Result<Option<u32>> {
            runtime().block_on(async move {
                let id = Identity::generate()?;
                let peer = peer_sdk::Peer::bind(lopts).await?;
                let _ = tx.send(id.fingerprint());
                let conn = tokio::time::timeout(PAIR_TIMEOUT, peer.accept(ServerTls::Identity(id)))
                    .await
                    .map_err(|_| anyhow!("listener: no connection in time"))??;
                let probes = easy_probes(&conn.status());
                // Echo one stream, then wait for the dialer to close.
                if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let _ = tokio::io::copy(&mut recv, &mut send).await;
                    let _ = send.finish();
                }
                let _ = tokio::time::timeout(PAIR_TIMEOUT, conn.closed()).await;
                Ok(probes)
            })
        })?;
    let pin = rx
        .recv_timeout(PAIR_TIMEOUT)
        .map_err(|_| anyhow!("listener did not register in time"))?;
    let result = lab.run_in(&lab.peer_ns(Side::A), move || -> Result<Attempt> {
        runtime().block_on(async move {
            let t = Instant::now();
            let conn = tokio::time::timeout(
                PAIR_TIMEOUT,
                peer_sdk::connect(opts, ClientTls::Pinned(pin)),
            )
            .await
            .map_err(|_| anyhow!("dialer: no connection in time"))??;
            let connect = t.elapsed();
            let path = conn.path_at_connect().kind().to_owned();
            let birthday_probes = easy_probes(&conn.status());
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(b"matrix echo").await?;
            send.finish()?;
            let back = tokio::time::timeout(PAIR_TIMEOUT, recv.read_to_end(64))
                .await
                .map_err(|_| anyhow!("echo timed out"))??;
            anyhow::ensure!(back == b"matrix echo", "echo differs: {back:?}");
            conn.close(0, b"done").await;
            Ok(Attempt {
                path,
                connect,
                birthday_probes,
            })
        })
    })?;
    let listener_probes = listener_thread
        .join()
        .map_err(|_| anyhow!("listener thread panicked"))??;
    result.map(|mut a| {
        a.birthday_probes = a.birthday_probes.or(listener_probes);
        a
    })
}

/// The probes a peer sent as birthday punching's easy side, or in the port prediction sweep.
fn easy_probes(s: &peer_sdk::Status) -> Option<u32> {
    use peer_sdk::rendezvous::birthday::BirthdayRole;
    s.birthday
        .filter(|b| b.role != BirthdayRole::Hard)
        .map(|b| b.packets)
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, RandomState};
    let s = RandomState::new();
    (u128::from(s.hash_one(1u8)) << 64) | u128::from(s.hash_one(2u8))
}

/// Runs every ordered pair of `types` `repeat` times (pairs in order, repetitions of a pair
/// back to back); `progress` is called after each attempt.
pub fn run(
    types: &[NatType],
    repeat: usize,
    mut progress: impl FnMut(&PairResult),
) -> Vec<PairResult> {
    let mut out = Vec::new();
    for &dialer in types {
        for &listener in types {
            let mut r = PairResult {
                dialer,
                listener,
                attempts: Vec::new(),
            };
            for i in 0..repeat {
                let a = attempt(dialer, listener, i as u128).unwrap_or_else(|e| Attempt {
                    path: format!("failed: {e:#}"),
                    connect: Duration::ZERO,
                    birthday_probes: None,
                });
                r.attempts.push(a);
            }
            progress(&r);
            out.push(r);
        }
    }
    out
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".to_owned(), |d| {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    })
}

/// One table line (also the header's column widths).
pub fn row(r: &PairResult) -> String {
    format!(
        "{:<22} {:<22} {:<8} {:<26} {:>9} {:>9} {:>7}  {}",
        r.dialer.name(),
        r.listener.name(),
        r.expected(),
        r.paths(),
        ms(r.median_connect()),
        ms(r.max_connect()),
        format!("{}/{}", r.direct(), r.attempts.len()),
        r.budget(),
    )
    .trim_end()
    .to_owned()
}

/// The table's header line.
pub fn header() -> String {
    format!(
        "{:<22} {:<22} {:<8} {:<26} {:>9} {:>9} {:>7}  {}",
        "A dials",
        "B listens",
        "theory",
        "paths at connect",
        "median",
        "max",
        "direct",
        "birthday probe budget"
    )
}

/// The whole table, with the overall direct share of the pairs where theory allows direct.
pub fn table(results: &[PairResult]) -> String {
    let mut s = header() + "\n";
    for r in results {
        s.push_str(&row(r));
        s.push('\n');
    }
    let (mut direct, mut total) = (0, 0);
    for r in results.iter().filter(|r| r.expected() == "direct") {
        direct += r.direct();
        total += r.attempts.len();
    }
    s.push_str(&format!(
        "direct share where theory allows it: {direct}/{total}\n"
    ));
    if let Some(line) = birthday_tail(results) {
        s.push_str(&line);
        s.push('\n');
    }
    s
}

/// Birthday punching against a random hard side, pooled over its pairs, beside what chance
/// alone predicts: each probe hits one of the hard side's [`SOCKETS`] mappings among the
/// [`PORTS`] a NAT hands out with probability p, so the probes to the first hit follow a geometric law and
/// a burst of [`MAX_PROBES`] misses with probability (1 - p)^MAX_PROBES. Agreement says the
/// misses are that law's tail, not lost mappings or badly timed probes. (A sequential hard
/// side is hit in the predicted window within a few probes, so its pairs are left out.)
///
/// [`SOCKETS`]: peer_sdk::rendezvous::birthday::SOCKETS
/// [`MAX_PROBES`]: peer_sdk::rendezvous::birthday::MAX_PROBES
/// [`PORTS`]: peer_sdk::rendezvous::birthday::PORTS
pub fn birthday_tail(results: &[PairResult]) -> Option<String> {
    use peer_sdk::rendezvous::birthday as b;
    let random = results.iter().filter(|r| {
        r.birthday() && (r.dialer == NatType::Symmetric || r.listener == NatType::Symmetric)
    });
    let (mut attempts, mut relayed, mut used) = (0, 0, Vec::new());
    for r in random {
        attempts += r.attempts.len();
        relayed += r.attempts.len() - r.direct();
        used.extend(
            r.attempts
                .iter()
                .filter(|a| a.path == "direct")
                .filter_map(|a| a.birthday_probes),
        );
    }
    if used.is_empty() {
        return None;
    }
    used.sort_unstable();
    let at = |q: f64| used[((used.len() as f64 * q) as usize).min(used.len() - 1)];
    let p = f64::from(b::SOCKETS) / f64::from(b::PORTS);
    // The q-quantile of the geometric law: the probes after which a hit came with probability q.
    let quantile = |q: f64| (1.0 - q).ln() / (1.0 - p).ln();
    let miss = (1.0 - p).powf(f64::from(b::MAX_PROBES));
    Some(format!(
        "birthday pairs with a random hard side: {relayed} of {attempts} attempts relayed (chance \
         alone: {:.2} %); probes to the first hit (counted per tick of {}): median {}, 90th \
         percentile {}, 99th {} (chance alone: {:.0}, {:.0}, {:.0})",
        miss * 100.0,
        b::PROBES_PER_TICK,
        at(0.5),
        at(0.9),
        at(0.99),
        quantile(0.5),
        quantile(0.9),
        quantile(0.99),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempts(probes: impl IntoIterator<Item = u32>, relayed: usize) -> Vec<Attempt> {
        let hit = |n| Attempt {
            path: "direct".to_owned(),
            connect: Duration::from_millis(300),
            birthday_probes: Some(n),
        };
        let miss = Attempt {
            path: "relay".to_owned(),
            connect: Duration::from_millis(2500),
            birthday_probes: Some(peer_sdk::rendezvous::birthday::MAX_PROBES),
        };
        let mut v: Vec<Attempt> = probes.into_iter().map(hit).collect();
        v.extend(std::iter::repeat_n(miss, relayed));
        v
    }

    #[test]
    fn the_birthday_tail_pools_random_hard_sides_only_and_states_chance() {
        let pair = |dialer, listener, attempts| PairResult {
            dialer,
            listener,
            attempts,
        };
        let results = [
            // Random hard side, both orders: pooled (1..=99 probes and one miss).
            pair(
                NatType::Symmetric,
                NatType::PortRestrictedOpen,
                attempts(1..=50, 1),
            ),
            pair(
                NatType::PortRestricted,
                NatType::Symmetric,
                attempts(51..=99, 0),
            ),
            // A sequential hard side and an easy pair: left out.
            pair(
                NatType::SymmetricSequential,
                NatType::PortRestricted,
                attempts([5000; 10], 3),
            ),
            pair(NatType::FullCone, NatType::None, attempts([7000; 5], 0)),
        ];
        let line = birthday_tail(&results).expect("a line");
        assert!(line.contains("1 of 100 attempts relayed"), "{line}");
        // 99 hits of 1..=99: the median is 50, the 90th percentile 90, the 99th 99.
        assert!(
            line.contains("median 50, 90th percentile 90, 99th 99"),
            "{line}"
        );
        // 256 mappings among 64512 ports: the geometric law's quantiles and the miss chance
        // at 1600 probes, computed independently here.
        let p: f64 = 256.0 / 64512.0;
        let q = |x: f64| ((1.0 - x).ln() / (1.0 - p).ln()).round();
        assert_eq!((q(0.5), q(0.9), q(0.99)), (174.0, 579.0, 1158.0));
        assert!(line.contains("(chance alone: 174, 579, 1158)"), "{line}");
        assert!(line.contains("(chance alone: 0.17 %)"), "{line}");
        // Without a random hard side there is nothing to say.
        assert_eq!(birthday_tail(&results[2..]), None);
    }
}
