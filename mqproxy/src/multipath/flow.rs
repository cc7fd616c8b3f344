//! Striped TCP flows: one flow's bytes spread over subflow streams on every path, put back in
//! order at the other end, chunks of a dead path resent on a live one.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, trace};

use super::sched::{self, PathView, ReorderBuffer, Scheduler, SendBuffer, MAX_PATHS};
use super::table::PathTable;
use crate::defaults::{
    FLOW_EVENTS, FLOW_STALL_TIMEOUT, FLOW_WINDOW, RECEIVED_ACK_EVERY, RECEIVE_BUDGET, ROOM_POLL,
};
use crate::proto::{Record, MAX_CHUNK};

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
        let Some(path) = sched::pick_chunk(self.table.scheduler(), &views, chunk.len() as u64)
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
