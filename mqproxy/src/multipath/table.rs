//! The path table of one bundle: one QUIC connection per path ([`PathConn`]), each watched
//! by a health monitor, and per-packet UDP scheduling over the usable ones.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, VarInt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::sched::{self, PathView, Scheduler, MAX_PATHS};
use crate::defaults::{DATAGRAM_QUEUE_TARGET, HEALTH_INTERVAL, ROOM_SLACK, SUSPECT_AFTER};
use crate::proto::{self};

/// Health of one path, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathReport {
    /// Position in the client's `--path` list.
    pub index: usize,
    /// The local address of the client's side (client) or the client's address (server).
    pub addr: SocketAddr,
    /// Scheduled on now.
    pub usable: bool,
    /// Smoothed RTT.
    pub rtt: Duration,
    /// Congestion window in bytes.
    pub cwnd: u64,
    /// Packets sent and declared lost.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// UDP bytes sent and received on the path.
    pub tx_bytes: u64,
    /// UDP bytes received on the path.
    pub rx_bytes: u64,
    /// Largest UDP payload this side sends on the path now (what path MTU discovery found).
    pub mtu: u16,
    /// Times this side's MTU discovery judged a loss burst an MTU black hole and fell back to
    /// the minimum.
    pub black_holes: u64,
}

/// One path's connection and what the health monitor learned about it.
#[derive(Debug)]
pub struct PathConn {
    /// Position in the client's `--path` list.
    pub index: usize,
    /// Unique per insertion into the table. Not `Connection::stable_id`: that is the
    /// connection's heap address, which a redialed connection may reuse once the lost one is
    /// freed, so a flow would take the new connection for the old one and never open a
    /// subflow on it.
    pub generation: u64,
    /// The path's QUIC connection.
    pub conn: Connection,
    addr: SocketAddr,
    usable: AtomicBool,
    /// TCP chunk bytes all striped flows have unacknowledged on this path.
    pub(super) tcp_in_flight: AtomicU64,
}

impl PathConn {
    pub(super) fn view(&self, tcp_extra: u64) -> PathView {
        let stats = self.conn.stats();
        let srtt = stats.path.rtt;
        let cwnd = stats.path.cwnd;
        let in_flight = self.tcp_in_flight.load(Ordering::Relaxed) + tcp_extra;
        PathView {
            usable: self.usable.load(Ordering::Relaxed) && self.conn.close_reason().is_none(),
            srtt,
            room: (2 * cwnd + ROOM_SLACK).saturating_sub(in_flight),
            load: in_flight,
            bandwidth: bandwidth(cwnd, srtt),
        }
    }

    fn datagram_view(&self) -> PathView {
        let queued = (crate::defaults::DATAGRAM_BUFFER as u64)
            .saturating_sub(self.conn.datagram_send_buffer_space() as u64);
        let stats = self.conn.stats();
        PathView {
            usable: self.usable.load(Ordering::Relaxed) && self.conn.close_reason().is_none(),
            srtt: stats.path.rtt,
            room: DATAGRAM_QUEUE_TARGET.saturating_sub(queued),
            load: queued,
            bandwidth: bandwidth(stats.path.cwnd, stats.path.rtt),
        }
    }

    fn report(&self) -> PathReport {
        let s = self.conn.stats();
        PathReport {
            index: self.index,
            addr: self.addr,
            usable: self.usable.load(Ordering::Relaxed),
            rtt: s.path.rtt,
            cwnd: s.path.cwnd,
            sent_packets: s.path.sent_packets,
            lost_packets: s.path.lost_packets,
            tx_bytes: s.udp_tx.bytes,
            rx_bytes: s.udp_rx.bytes,
            mtu: s.path.current_mtu,
            black_holes: s.path.black_holes_detected,
        }
    }
}

/// Bytes per second a window of `cwnd` bytes per `rtt` delivers.
fn bandwidth(cwnd: u64, rtt: Duration) -> u64 {
    let us = rtt.as_micros().max(1) as u64;
    cwnd.saturating_mul(1_000_000) / us
}

/// The live paths of one bundle, indexed by path number, and the scheduler that spreads
/// traffic over them. A single-path client has a table with one entry.
#[derive(Debug)]
pub struct PathTable {
    slots: Mutex<[Option<Arc<PathConn>>; MAX_PATHS]>,
    /// Bumped whenever a path comes, goes, or changes usability: flows re-plan then.
    changed: watch::Sender<u64>,
    scheduler: Mutex<Scheduler>,
    /// Source of [`Path::generation`].
    generations: AtomicU64,
    /// Whether silence makes a path unusable. Only paths with [`PATH_KEEPALIVE`] are never
    /// silent while alive; a single ordinary connection may be quiet for seconds.
    detect_silence: std::sync::atomic::AtomicBool,
}

impl PathTable {
    /// An empty table.
    pub fn new(scheduler: Scheduler) -> Self {
        PathTable {
            slots: Mutex::new(Default::default()),
            changed: watch::Sender::new(0),
            scheduler: Mutex::new(scheduler),
            generations: AtomicU64::new(0),
            detect_silence: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Turns silence detection on: for bundles whose paths send [`PATH_KEEPALIVE`](crate::defaults::PATH_KEEPALIVE)s.
    pub fn detect_silence(&self) {
        self.detect_silence.store(true, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Option<Arc<PathConn>>; MAX_PATHS]> {
        // Each critical section is one assignment or a clone: a poisoned lock is consistent.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scheduler in use.
    pub fn scheduler(&self) -> Scheduler {
        *self.scheduler.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the scheduler (the server learns it from the client's PATH_BIND).
    pub fn set_scheduler(&self, s: Scheduler) {
        *self.scheduler.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Subscribes to path changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Adds (or replaces) path `index`; the returned monitor future must be polled for the
    /// path to stay healthy in the table (it ends when the connection does).
    pub fn insert(
        self: &Arc<Self>,
        index: usize,
        conn: Connection,
    ) -> (
        Arc<PathConn>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let path = Arc::new(PathConn {
            index,
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
            addr: conn.remote_address(),
            conn,
            usable: AtomicBool::new(true),
            tcp_in_flight: AtomicU64::new(0),
        });
        let old = self.lock()[index].replace(path.clone());
        if let Some(old) = old {
            old.conn
                .close(VarInt::from_u32(crate::proto::close::SHUTDOWN), b"replaced");
        }
        self.bump();
        let table = Arc::downgrade(self);
        let p = path.clone();
        (path, async move { monitor(table, p).await })
    }

    /// Removes path `index` if it still holds `path` (not a newer connection of that path).
    pub fn remove(&self, path: &PathConn) {
        let index = path.index;
        let mut slots = self.lock();
        if slots[index]
            .as_ref()
            .is_some_and(|p| p.generation == path.generation)
        {
            slots[index] = None;
            drop(slots);
            self.bump();
        }
    }

    /// PathConn `index`, if connected.
    pub fn get(&self, index: usize) -> Option<Arc<PathConn>> {
        self.lock().get(index).cloned().flatten()
    }

    /// Every connected path.
    pub fn all(&self) -> Vec<Arc<PathConn>> {
        self.lock().iter().flatten().cloned().collect()
    }

    /// Connected paths whose connection is open.
    pub fn live_count(&self) -> usize {
        self.all()
            .iter()
            .filter(|p| p.conn.close_reason().is_none())
            .count()
    }

    /// The usable path with the lowest RTT, or with `backup` the first usable one (for
    /// signalling streams); any open one if none is usable.
    pub fn best(&self) -> Option<Arc<PathConn>> {
        let all = self.all();
        let open = |p: &&Arc<PathConn>| p.conn.close_reason().is_none();
        let mut usable = all
            .iter()
            .filter(open)
            .filter(|p| p.usable.load(Ordering::Relaxed));
        let pick = if self.scheduler() == Scheduler::Backup {
            usable.next()
        } else {
            usable.min_by_key(|p| p.conn.rtt())
        };
        pick.or_else(|| all.iter().find(open)).cloned()
    }

    /// Waits up to `timeout` for an open path.
    pub async fn wait_best(&self, timeout: Duration) -> Option<Arc<PathConn>> {
        let mut rx = self.subscribe();
        let wait = async {
            loop {
                if let Some(p) = self.best() {
                    return p;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }

    /// Health of every connected path.
    pub fn reports(&self) -> Vec<PathReport> {
        self.all().iter().map(|p| p.report()).collect()
    }

    /// Sends one UDP packet of session `id`: picks the path (two for `redundant`), fragments
    /// for it and queues the DATAGRAMs. `Err` names why the packet was dropped.
    pub async fn send_packet(
        &self,
        id: u32,
        packet_id: u16,
        payload: &[u8],
    ) -> Result<(), &'static str> {
        // Arrays, not Vecs: this runs per UDP packet, and the table has MAX_PATHS slots.
        let slots: [Option<Arc<PathConn>>; MAX_PATHS] = self.lock().clone();
        let views: [PathView; MAX_PATHS] = std::array::from_fn(|i| {
            slots[i]
                .as_ref()
                .map(|p| p.datagram_view())
                .unwrap_or_default()
        });
        let len = (payload.len() + proto::DATAGRAM_HEADER_LEN) as u64;
        let Some((first, second)) = sched::pick_datagram(self.scheduler(), &views, len) else {
            return Err("no usable path");
        };
        let targets = [Some(first), second]
            .into_iter()
            .flatten()
            .filter_map(|i| slots[i].as_ref());
        let Some(max) = targets
            .clone()
            .filter_map(|p| p.conn.max_datagram_size())
            .min()
        else {
            return Err("connection has no DATAGRAM support");
        };
        let frags = proto::fragment(id, packet_id, payload, max).map_err(|_| "too large")?;
        let mut sent = false;
        for (n, p) in targets.enumerate() {
            for f in &frags {
                // The first copy waits for queue space (backpressure); a redundant copy never
                // holds up the first.
                let r = if n == 0 {
                    p.conn.send_datagram_wait(f.clone()).await.is_ok()
                } else {
                    p.conn.send_datagram(f.clone()).is_ok()
                };
                sent |= r;
            }
        }
        if sent {
            Ok(())
        } else {
            Err("connection lost")
        }
    }
}

/// Watches one path: usable while it keeps hearing from the peer. Ends when the connection
/// does or the table is gone.
async fn monitor(table: std::sync::Weak<PathTable>, path: Arc<PathConn>) {
    let mut last_rx = path.conn.stats().udp_rx.datagrams;
    let mut heard = Instant::now();
    let mut next_log = Instant::now() + Duration::from_secs(10);
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = path.conn.closed() => break,
            _ = tick.tick() => {}
        }
        let Some(table) = table.upgrade() else { return };
        let now = Instant::now();
        let s = path.conn.stats();
        if s.udp_rx.datagrams != last_rx {
            last_rx = s.udp_rx.datagrams;
            heard = now;
        }
        let limit = SUSPECT_AFTER.max(4 * s.path.rtt);
        let usable =
            !table.detect_silence.load(Ordering::Relaxed) || now.duration_since(heard) < limit;
        if path.usable.swap(usable, Ordering::Relaxed) != usable {
            let r = path.report();
            if usable {
                info!(path = r.index, addr = %r.addr, rtt_ms = r.rtt.as_millis() as u64, "path usable again");
            } else {
                warn!(path = r.index, addr = %r.addr, silent_ms = now.duration_since(heard).as_millis() as u64,
                    lost = r.lost_packets, "path silent; not scheduling on it");
            }
            table.bump();
        }
        if now >= next_log {
            next_log = now + Duration::from_secs(10);
            let r = path.report();
            debug!(path = r.index, addr = %r.addr, usable = r.usable, rtt_ms = r.rtt.as_millis() as u64,
                cwnd = r.cwnd, sent = r.sent_packets, lost = r.lost_packets,
                tx_bytes = r.tx_bytes, rx_bytes = r.rx_bytes, "path health");
        }
    }
    if let Some(table) = table.upgrade() {
        let r = path.report();
        warn!(path = r.index, addr = %r.addr, reason = ?path.conn.close_reason(), lost = r.lost_packets,
            tx_bytes = r.tx_bytes, rx_bytes = r.rx_bytes, "path down");
        path.usable.store(false, Ordering::Relaxed);
        table.remove(&path);
    }
}
