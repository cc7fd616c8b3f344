//! Multipath at runtime, shared by client and server: the path table of one bundle (one QUIC
//! connection per path, each watched by a health monitor), per-packet UDP scheduling over it,
//! and striped TCP flows (one flow's bytes spread over subflow streams on every path, put back
//! in order at the other end, chunks of a dead path resent on a live one). The decisions are
//! made by the pure parts in [`crate::paths`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, trace, warn};

use crate::paths::{self, PathView, ReorderBuffer, Scheduler, SendBuffer, MAX_PATHS};
use crate::proto::{self, Record, MAX_CHUNK};

/// How often each path's health is sampled.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(50);
/// A path that has received nothing for this long (or 4 RTTs, if longer) is not scheduled on.
/// Path connections send keepalives every [`PATH_KEEPALIVE`], which the peer acknowledges, so
/// a live path hears something several times in this interval.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(300);
/// Keepalive interval of path connections: short, so a silent path is a dead path.
pub const PATH_KEEPALIVE: Duration = Duration::from_millis(100);
/// QUIC idle timeout of path connections: a path that stays silent this long is dropped (and
/// its client starts redialing it).
pub const PATH_IDLE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Datagram bytes queued in quinn on a path beyond which the path counts as full for UDP
/// scheduling: ~20 ms at 100 Mbit/s, so a busy path spills onto the next one instead of
/// building a queue.
pub const DATAGRAM_QUEUE_TARGET: u64 = 256 * 1024;
/// Unacknowledged bytes per striped flow and direction (the peer's reorder window). It must
/// cover the aggregate rate times the slowest path's round trip *with its queue* plus the
/// end-to-end acknowledgement: two 100 Mbit/s, 50 ms paths whose 1,000-packet queues fill reach
/// ~200 ms, ~5 MB, and a loss on one path holds the reorder buffer for another round trip.
/// At 6 MiB one flow reached 1.79x a single path, at 16 MiB 1.88x. Memory stays bounded by
/// the paths anyway: all flows together keep at most ~2 congestion windows per path in flight.
pub const FLOW_WINDOW: usize = 16 << 20;
/// Extra room over twice the congestion window that TCP chunks may occupy on a path, so a
/// small window still admits whole chunks.
const ROOM_SLACK: u64 = 256 * 1024;
/// A striped flow with no usable subflow this long gives up (resets its TCP connection).
pub const FLOW_STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a flow with data waiting for room looks at the paths again (room also frees when
/// acknowledgements arrive, which wakes it at once).
const ROOM_POLL: Duration = Duration::from_millis(2);
/// Bytes received in order between ACKs sent for receipt alone: the sender's paths see the
/// room within a fraction of [`ROOM_SLACK`].
const RECEIVED_ACK_EVERY: u64 = 64 * 1024;
/// Bytes all striped flows of this process may hold received but not yet written to their TCP
/// sockets (applications not reading). Below it, receipt is acknowledged at once, so a paused
/// download does not hold the paths; above it, only what is written is, so the senders' path
/// room fills and they wait: memory stays bounded at the price of head-of-line blocking.
pub const RECEIVE_BUDGET: u64 = 128 << 20;
/// Bytes held received and not yet written, over all flows of the process (see
/// [`RECEIVE_BUDGET`]).
static UNWRITTEN: AtomicU64 = AtomicU64::new(0);

/// Bytes striped flows of this process hold received and not yet written to TCP.
pub fn unwritten_bytes() -> u64 {
    UNWRITTEN.load(Ordering::Relaxed)
}

/// The `received` an ACK reports: everything received in order while the process is within
/// its [`RECEIVE_BUDGET`], else no more than was written (or reported before: an ACK never
/// takes back what an earlier one said).
fn received_to_ack(in_order: u64, written: u64, last: u64, unwritten: u64) -> u64 {
    if unwritten <= RECEIVE_BUDGET {
        in_order
    } else {
        last.max(written)
    }
}
/// Events queued from subflow readers to their flow: each carries at most one chunk and the
/// reorder window bounds the chunks outstanding.
const FLOW_EVENTS: usize = 256;

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
}

/// One path's connection and what the health monitor learned about it.
#[derive(Debug)]
pub struct Path {
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
    tcp_in_flight: AtomicU64,
}

impl Path {
    fn view(&self, tcp_extra: u64) -> PathView {
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
        let queued = (crate::transport::DATAGRAM_BUFFER as u64)
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
    slots: Mutex<[Option<Arc<Path>>; MAX_PATHS]>,
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

    /// Turns silence detection on: for bundles whose paths send [`PATH_KEEPALIVE`]s.
    pub fn detect_silence(&self) {
        self.detect_silence.store(true, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Option<Arc<Path>>; MAX_PATHS]> {
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
        Arc<Path>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let path = Arc::new(Path {
            index,
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
            addr: conn.remote_address(),
            conn,
            usable: AtomicBool::new(true),
            tcp_in_flight: AtomicU64::new(0),
        });
        let old = self.lock()[index].replace(path.clone());
        if let Some(old) = old {
            old.conn.close(
                VarInt::from_u32(crate::transport::close::SHUTDOWN),
                b"replaced",
            );
        }
        self.bump();
        let table = Arc::downgrade(self);
        let p = path.clone();
        (path, async move { monitor(table, p).await })
    }

    /// Removes path `index` if it still holds `path` (not a newer connection of that path).
    pub fn remove(&self, path: &Path) {
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

    /// Path `index`, if connected.
    pub fn get(&self, index: usize) -> Option<Arc<Path>> {
        self.lock().get(index).cloned().flatten()
    }

    /// Every connected path.
    pub fn all(&self) -> Vec<Arc<Path>> {
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
    pub fn best(&self) -> Option<Arc<Path>> {
        let all = self.all();
        let open = |p: &&Arc<Path>| p.conn.close_reason().is_none();
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
    pub async fn wait_best(&self, timeout: Duration) -> Option<Arc<Path>> {
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
        let slots: Vec<Option<Arc<Path>>> = self.lock().to_vec();
        let views: Vec<PathView> = slots
            .iter()
            .map(|s| s.as_ref().map(|p| p.datagram_view()).unwrap_or_default())
            .collect();
        let len = (payload.len() + proto::DATAGRAM_HEADER_LEN) as u64;
        let Some((first, second)) = paths::pick_datagram(self.scheduler(), &views, len) else {
            return Err("no usable path");
        };
        let targets: Vec<&Arc<Path>> = [Some(first), second]
            .into_iter()
            .flatten()
            .filter_map(|i| slots[i].as_ref())
            .collect();
        let Some(max) = targets
            .iter()
            .filter_map(|p| p.conn.max_datagram_size())
            .min()
        else {
            return Err("connection has no DATAGRAM support");
        };
        let frags = proto::fragment(id, packet_id, payload, max).map_err(|_| "too large")?;
        let mut sent = false;
        for (n, p) in targets.iter().enumerate() {
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
async fn monitor(table: std::sync::Weak<PathTable>, path: Arc<Path>) {
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

/// One subflow of a striped flow: a bidi stream on one path.
#[derive(Debug)]
pub struct Subflow {
    /// The path it runs on.
    pub path: usize,
    /// Its sending half.
    pub send: SendStream,
    /// Its receiving half.
    pub recv: RecvStream,
    /// Stream bytes already read past the opening frames.
    pub leftover: BytesMut,
}

impl Subflow {
    /// A subflow on `path` from a stream whose opening frames `r` has read.
    pub fn new(path: usize, send: SendStream, r: crate::transport::FrameReader) -> Self {
        let (recv, leftover) = r.into_parts();
        Subflow {
            path,
            send,
            recv,
            leftover,
        }
    }
}

enum Event {
    Record(Record),
    /// A subflow (path, generation) ended: its stream failed or broke the protocol.
    SubflowEnded(usize, u64),
    /// The TCP writer wrote everything up to this offset.
    Written(u64),
    /// The TCP writer finished after the peer's FIN (`true`) or failed (`false`).
    TcpWriteDone(bool),
    /// The peer finished a subflow: its side of the flow is over.
    PeerFinished,
    /// The peer reset a subflow: it abandoned the flow.
    PeerReset,
}

/// What a subflow writer is told.
enum WriterMsg {
    Record(Bytes),
    /// The flow failed: reset the stream so the peer stops at once.
    Reset,
}

/// How long a flow whose peer has finished its subflows may still take to complete (the last
/// ACK may travel on another path than the stream finish).
const PEER_FINISH_GRACE: Duration = Duration::from_secs(3);

/// Why a striped flow ended abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The peer broke the record protocol.
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    /// No path for [`FLOW_STALL_TIMEOUT`].
    #[error("no usable path for {0:?}")]
    Stalled(Duration),
    /// The peer abandoned the flow (its TCP side failed).
    #[error("the peer reset the flow")]
    PeerReset,
    /// The TCP side failed.
    #[error("tcp: {0}")]
    Tcp(std::io::Error),
}

/// Carries one TCP connection over striped subflows until both directions have ended and
/// every byte has been acknowledged. `first` is the subflow the flow was opened on; further
/// ones arrive on `more` (the client opens one per path, also when a path comes back).
/// Returns the bytes carried (TCP → paths, paths → TCP).
pub async fn run_flow(
    tcp: TcpStream,
    table: Arc<PathTable>,
    first: Subflow,
    more: mpsc::Receiver<Subflow>,
    early: Bytes,
) -> Result<(u64, u64), FlowError> {
    let _ = tcp.set_nodelay(true);
    let (mut tr, tw) = tcp.into_split();
    let mut f = Flow {
        table: table.clone(),
        changes: table.subscribe(),
        writers: Default::default(),
        writer_gen: [0; MAX_PATHS],
        next_gen: 0,
        wtasks: JoinSet::new(),
        tasks: JoinSet::new(),
        send: SendBuffer::new(FLOW_WINDOW),
        reorder: ReorderBuffer::new(FLOW_WINDOW),
        reported: [0; MAX_PATHS],
        fin_sent: None,
        tcp_eof: false,
        peer_done: false,
        pending: None,
        events_tx: None,
        written: 0,
        acked_received: 0,
    };
    let (ev_tx, ev_rx) = mpsc::channel(FLOW_EVENTS);
    f.events_tx = Some(ev_tx.clone());
    let (tcp_tx, tcp_rx) = mpsc::unbounded_channel::<Bytes>();
    let (abort_tx, abort_rx) = oneshot::channel();
    let mut tcp_task = crate::AbortOnDrop(tokio::spawn(tcp_writer(
        tw,
        tcp_rx,
        ev_tx.clone(),
        abort_rx,
    )));
    f.add_subflow(first);
    if !early.is_empty() {
        f.pending = Some(early);
    }
    let r = f.run(&mut tr, more, ev_rx, tcp_tx).await;
    f.release();
    // What this flow received and never wrote no longer counts against the budget.
    UNWRITTEN.fetch_sub(
        f.reorder.delivered().saturating_sub(f.written),
        Ordering::Relaxed,
    );
    if r.is_err() {
        for w in f.writers.iter().flatten() {
            let _ = w.send(WriterMsg::Reset);
        }
        // The application must not take a cut-short stream for a complete one: close its
        // connection with a reset, not the FIN an ordinary close (or dropping the write half)
        // would send. The TCP writer lets go of its half without shutting it down first.
        let _ = abort_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut tcp_task.0).await;
        let _ = tr.as_ref().set_zero_linger();
    }
    // Let the writers flush the last records (our final ACK and FIN) and finish their streams;
    // readers and the TCP writer are aborted with `tasks`.
    f.writers = Default::default();
    let drain = async { while f.wtasks.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    r
}

struct Flow {
    table: Arc<PathTable>,
    changes: watch::Receiver<u64>,
    /// Per path: the queue to that subflow's writer task.
    writers: [Option<mpsc::UnboundedSender<WriterMsg>>; MAX_PATHS],
    /// Per path: the generation of the current subflow (stale end events are ignored).
    writer_gen: [u64; MAX_PATHS],
    next_gen: u64,
    /// Subflow writers: awaited at the end so the last records get out.
    wtasks: JoinSet<()>,
    /// Subflow readers and the TCP writer.
    tasks: JoinSet<()>,
    send: SendBuffer,
    reorder: ReorderBuffer,
    /// What this flow last added to each path's shared in-flight counter.
    reported: [u64; MAX_PATHS],
    /// Offset of our FIN and the path it went on, once sent.
    fin_sent: Option<(u64, usize)>,
    tcp_eof: bool,
    /// The peer's FIN was delivered to TCP (or TCP can take no more).
    peer_done: bool,
    /// A chunk read from TCP waiting for a path with room.
    pending: Option<Bytes>,
    events_tx: Option<mpsc::Sender<Event>>,
    written: u64,
    /// The `received` of our last ACK.
    acked_received: u64,
}

impl Flow {
    fn add_subflow(&mut self, s: Subflow) {
        let Some(ev) = self.events_tx.clone() else {
            return;
        };
        if s.path >= MAX_PATHS {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let path = s.path;
        self.next_gen += 1;
        let g = self.next_gen;
        self.wtasks
            .spawn(subflow_writer(s.send, rx, path, g, ev.clone()));
        self.tasks
            .spawn(subflow_reader(s.recv, s.leftover, path, g, ev));
        self.writers[path] = Some(tx);
        self.writer_gen[path] = g;
        trace!(path, "subflow added");
        // A new subflow on a path replaces one that died with its connection: whatever that
        // one left unacknowledged goes again, and so do our ACK and FIN.
        for (offset, data) in self.send.reroute(path, path) {
            let mut rec = Record::data_header(offset, data.len());
            rec.extend_from_slice(&data);
            self.write_to(path, rec.freeze());
        }
        if self.reorder.delivered() > 0 {
            let ack = self.ack();
            self.write_to(path, ack);
        }
        if let Some((off, _)) = self.fin_sent {
            self.write_to(path, Self::record(&Record::Fin { offset: off }));
        }
    }

    fn usable(&self, path: usize) -> bool {
        self.writers[path].is_some() && self.table.get(path).is_some_and(|p| p.view(0).usable)
    }

    /// Updates the shared per-path in-flight counters from the send buffer.
    fn sync_in_flight(&mut self) {
        for i in 0..MAX_PATHS {
            let now = self.send.in_flight(i);
            let was = self.reported[i];
            if now != was {
                if let Some(p) = self.table.get(i) {
                    if now > was {
                        p.tcp_in_flight.fetch_add(now - was, Ordering::Relaxed);
                    } else {
                        p.tcp_in_flight.fetch_sub(
                            (was - now).min(p.tcp_in_flight.load(Ordering::Relaxed)),
                            Ordering::Relaxed,
                        );
                    }
                }
                self.reported[i] = now;
            }
        }
    }

    /// Gives back this flow's share of the per-path counters.
    fn release(&mut self) {
        for i in 0..MAX_PATHS {
            if let Some(p) = self.table.get(i) {
                let r = self.reported[i].min(p.tcp_in_flight.load(Ordering::Relaxed));
                p.tcp_in_flight.fetch_sub(r, Ordering::Relaxed);
            }
            self.reported[i] = 0;
        }
    }

    fn write_to(&mut self, path: usize, rec: Bytes) -> bool {
        match &self.writers[path] {
            Some(w) if w.send(WriterMsg::Record(rec)).is_ok() => true,
            _ => {
                self.writers[path] = None;
                false
            }
        }
    }

    fn views(&self) -> Vec<PathView> {
        (0..MAX_PATHS)
            .map(|i| match (&self.writers[i], self.table.get(i)) {
                (Some(_), Some(p)) => p.view(0),
                _ => PathView::default(),
            })
            .collect()
    }

    /// The usable subflow path for ACK and FIN records and rerouting: the lowest RTT, or with
    /// `backup` the first usable one (a backup path carries nothing while the primary lives).
    fn any_path(&self) -> Option<usize> {
        let views = self.views();
        let mut usable = (0..MAX_PATHS).filter(|&i| views[i].usable);
        if self.table.scheduler() == Scheduler::Backup {
            usable.next()
        } else {
            usable.min_by_key(|&i| views[i].srtt)
        }
    }

    /// Places the pending chunk if a path has room; `true` if it went.
    fn try_send_pending(&mut self) -> bool {
        let Some(chunk) = self.pending.take() else {
            return true;
        };
        let views = self.views();
        let Some(path) = paths::pick_chunk(self.table.scheduler(), &views, chunk.len() as u64)
        else {
            self.pending = Some(chunk);
            return false;
        };
        let offset = self.send.push(chunk.clone(), path);
        self.sync_in_flight();
        let mut rec = Record::data_header(offset, chunk.len());
        rec.extend_from_slice(&chunk);
        if !self.write_to(path, rec.freeze()) {
            self.reroute_dead();
        }
        true
    }

    /// Our acknowledgement as it stands: received in order, and written to TCP.
    fn ack(&mut self) -> Bytes {
        self.acked_received = received_to_ack(
            self.reorder.delivered(),
            self.written,
            self.acked_received,
            UNWRITTEN.load(Ordering::Relaxed),
        );
        Self::record(&Record::Ack {
            delivered: self.written,
            received: self.acked_received,
        })
    }

    /// Sends [`Self::ack`] on the best path.
    fn send_ack(&mut self) {
        if let Some(p) = self.any_path() {
            let ack = self.ack();
            self.write_to(p, ack);
        }
    }

    fn record(r: &Record) -> Bytes {
        let mut b = BytesMut::with_capacity(16);
        r.encode(&mut b);
        b.freeze()
    }

    /// Resends every chunk (and our FIN and latest ACK) of subflows that are gone or whose
    /// path is not usable, on the best usable path. Duplicates are harmless: the receiver
    /// keeps the first copy.
    fn reroute_dead(&mut self) {
        let Some(to) = self.any_path() else {
            return;
        };
        let mut lost = false;
        for dead in 0..MAX_PATHS {
            if dead == to || self.usable(dead) {
                continue;
            }
            if self.send.in_flight(dead) > 0 {
                let again = self.send.reroute(dead, to);
                debug!(
                    from = dead,
                    to,
                    chunks = again.len(),
                    "resending the chunks of a lost path"
                );
                for (offset, data) in again {
                    let mut rec = Record::data_header(offset, data.len());
                    rec.extend_from_slice(&data);
                    self.write_to(to, rec.freeze());
                }
                lost = true;
            }
            if let Some((off, p)) = self.fin_sent {
                if p == dead {
                    self.fin_sent = Some((off, to));
                    self.write_to(to, Self::record(&Record::Fin { offset: off }));
                }
            }
            if self.writers[dead].is_some() || self.table.get(dead).is_none() {
                lost = true;
            }
        }
        if lost && self.reorder.delivered() > 0 {
            let ack = self.ack();
            self.write_to(to, ack);
        }
        self.sync_in_flight();
    }

    fn done(&self) -> bool {
        self.peer_done && self.fin_sent.is_some() && self.send.all_acked()
    }

    async fn run(
        &mut self,
        tr: &mut tokio::net::tcp::OwnedReadHalf,
        mut more: mpsc::Receiver<Subflow>,
        mut events: mpsc::Receiver<Event>,
        tcp_tx: mpsc::UnboundedSender<Bytes>,
    ) -> Result<(u64, u64), FlowError> {
        let mut tcp_tx = Some(tcp_tx);
        let mut more_open = true;
        let mut stalled_since: Option<Instant> = None;
        let mut peer_finished: Option<Instant> = None;
        let mut read_buf = BytesMut::with_capacity(MAX_CHUNK);
        loop {
            if self.done() {
                return Ok((self.send.acked(), self.written));
            }
            if peer_finished.is_some_and(|t| t.elapsed() > PEER_FINISH_GRACE) {
                return Err(FlowError::Protocol("the peer ended the flow early".into()));
            }
            // Stall watchdog: no usable subflow at all.
            if self.any_path().is_none() {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > FLOW_STALL_TIMEOUT {
                    return Err(FlowError::Stalled(FLOW_STALL_TIMEOUT));
                }
            } else {
                stalled_since = None;
            }
            let placed = self.try_send_pending();
            let can_read =
                placed && !self.tcp_eof && self.send.room() >= MAX_CHUNK.min(FLOW_WINDOW);
            if placed && self.tcp_eof && self.fin_sent.is_none() {
                if let Some(p) = self.any_path() {
                    let off = self.send.next_offset();
                    self.fin_sent = Some((off, p));
                    self.write_to(p, Self::record(&Record::Fin { offset: off }));
                }
            }
            tokio::select! {
                r = tr.read_buf(&mut read_buf), if can_read => match r {
                    Ok(0) => self.tcp_eof = true,
                    Ok(_) => {
                        let chunk = read_buf.split().freeze();
                        self.pending = Some(chunk);
                        read_buf.reserve(MAX_CHUNK);
                    }
                    Err(e) => return Err(FlowError::Tcp(e)),
                },
                ev = events.recv() => {
                    let Some(ev) = ev else { return Err(FlowError::Protocol("event channel closed".into())) };
                    match ev {
                        Event::Record(Record::Data { offset, data }) => {
                            self.reorder.insert(offset, data).map_err(|e| FlowError::Protocol(e.to_string()))?;
                            while let Some(b) = self.reorder.pop() {
                                UNWRITTEN.fetch_add(b.len() as u64, Ordering::Relaxed);
                                if let Some(t) = &tcp_tx {
                                    let _ = t.send(b);
                                }
                            }
                            // Receipt frees the sender's paths even while our TCP side is not
                            // taking the bytes (its writes produce the delivered ACKs).
                            if self.reorder.delivered() - self.acked_received >= RECEIVED_ACK_EVERY
                                && UNWRITTEN.load(Ordering::Relaxed) <= RECEIVE_BUDGET
                            {
                                self.send_ack();
                            }
                            if self.reorder.finished() {
                                tcp_tx = None;
                            }
                        }
                        Event::Record(Record::Ack { delivered, received }) => {
                            if !self.send.ack(delivered, received) {
                                return Err(FlowError::Protocol("ack beyond the data sent".into()));
                            }
                            self.sync_in_flight();
                        }
                        Event::Record(Record::Fin { offset }) => {
                            self.reorder.set_fin(offset).map_err(|e| FlowError::Protocol(e.to_string()))?;
                            if self.reorder.finished() {
                                tcp_tx = None;
                            }
                        }
                        Event::SubflowEnded(path, g) => {
                            if self.writer_gen[path] == g {
                                self.writers[path] = None;
                            }
                            self.reroute_dead();
                        }
                        Event::Written(n) => {
                            UNWRITTEN.fetch_sub(n.saturating_sub(self.written), Ordering::Relaxed);
                            self.written = n;
                            self.send_ack();
                        }
                        Event::PeerFinished => {
                            peer_finished.get_or_insert_with(Instant::now);
                        }
                        Event::PeerReset => return Err(FlowError::PeerReset),
                        Event::TcpWriteDone(false) => {
                            return Err(FlowError::Tcp(std::io::Error::other("TCP write failed")));
                        }
                        Event::TcpWriteDone(true) => {
                            self.peer_done = true;
                            // Acknowledge the end so the peer can finish.
                            self.send_ack();
                        }
                    }
                }
                s = more.recv(), if more_open => match s {
                    Some(s) => self.add_subflow(s),
                    None => more_open = false,
                },
                r = self.changes.changed() => {
                    if r.is_ok() {
                        self.reroute_dead();
                    }
                }
                _ = tokio::time::sleep(ROOM_POLL), if self.pending.is_some() || stalled_since.is_some() || peer_finished.is_some() => {}
            }
        }
    }
}

/// Writes records to one subflow stream; finishes it when the flow drops the queue.
async fn subflow_writer(
    mut send: SendStream,
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    path: usize,
    g: u64,
    ev: mpsc::Sender<Event>,
) {
    while let Some(m) = rx.recv().await {
        let b = match m {
            WriterMsg::Record(b) => b,
            WriterMsg::Reset => {
                let _ = send.reset(VarInt::from_u32(0));
                return;
            }
        };
        if send.write_chunk(b).await.is_err() {
            let _ = ev.send(Event::SubflowEnded(path, g)).await;
            return;
        }
    }
    let _ = send.finish();
}

/// Reads records from one subflow stream into the flow's events.
async fn subflow_reader(
    mut recv: RecvStream,
    mut buf: BytesMut,
    path: usize,
    g: u64,
    ev: mpsc::Sender<Event>,
) {
    loop {
        loop {
            match Record::decode(&mut buf) {
                Ok(Some(r)) => {
                    if ev.send(Event::Record(r)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(path, error = %e, "bad subflow record");
                    let _ = recv.stop(VarInt::from_u32(0));
                    let _ = ev.send(Event::SubflowEnded(path, g)).await;
                    return;
                }
            }
        }
        match recv.read_chunk(MAX_CHUNK, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            Ok(None) => {
                let _ = ev.send(Event::PeerFinished).await;
                let _ = ev.send(Event::SubflowEnded(path, g)).await;
                return;
            }
            Err(quinn::ReadError::Reset(_)) => {
                let _ = ev.send(Event::PeerReset).await;
                return;
            }
            Err(_) => {
                let _ = ev.send(Event::SubflowEnded(path, g)).await;
                return;
            }
        }
    }
}

/// Writes in-order bytes to the TCP side, reporting progress (which becomes ACKs). On `abort`
/// (the flow failed) it drops its half without the FIN, so the flow can reset the connection.
async fn tcp_writer(
    mut tw: tokio::net::tcp::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    ev: mpsc::Sender<Event>,
    mut abort: oneshot::Receiver<()>,
) {
    let mut total = 0u64;
    loop {
        let b = tokio::select! {
            biased;
            _ = &mut abort => {
                tw.forget();
                return;
            }
            b = rx.recv() => b,
        };
        let Some(b) = b else { break };
        let written = tokio::select! {
            biased;
            _ = &mut abort => {
                tw.forget();
                return;
            }
            r = tw.write_all(&b) => r,
        };
        if let Err(e) = written {
            // The application closed or reset its socket: the flow is over.
            debug!(error = %e, "TCP write failed; aborting the flow");
            let _ = ev.send(Event::TcpWriteDone(false)).await;
            return;
        }
        total += b.len() as u64;
        if ev.send(Event::Written(total)).await.is_err() {
            return;
        }
    }
    let _ = tw.shutdown().await;
    let _ = ev.send(Event::TcpWriteDone(true)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_is_acknowledged_only_within_the_budget() {
        // Within the budget: everything received in order, whatever was written.
        assert_eq!(received_to_ack(900, 100, 500, 0), 900);
        assert_eq!(received_to_ack(900, 100, 500, RECEIVE_BUDGET), 900);
        // Over it: no more than written, and never less than an earlier ACK said.
        assert_eq!(received_to_ack(900, 100, 500, RECEIVE_BUDGET + 1), 500);
        assert_eq!(received_to_ack(900, 700, 500, RECEIVE_BUDGET + 1), 700);
        assert_eq!(received_to_ack(900, 0, 0, u64::MAX), 0);
    }
}
