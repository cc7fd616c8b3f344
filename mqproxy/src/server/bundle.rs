//! Multipath bundles: the paths of one client held together, and each path connection's loop
//! (its streams and its DATAGRAMs).

use super::*;

/// One path connection's hold on its bundle. The bundle's tasks hold the bundle too (a
/// cycle), so when the last holder goes (its connection and grace period over, or the server
/// shutting down and aborting it) the tasks are aborted, which frees the bundle.
pub(super) struct BundleHold(pub(super) Arc<Bundle>);

impl BundleHold {
    pub(super) fn new(b: Arc<Bundle>) -> Self {
        b.holders.fetch_add(1, Ordering::Relaxed);
        BundleHold(b)
    }
}

impl Drop for BundleHold {
    fn drop(&mut self) {
        if self.0.holders.fetch_sub(1, Ordering::Relaxed) == 1 {
            locked(&self.0.tasks).abort_all();
        }
    }
}

pub(super) fn hex_id(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything one client has on the server: its paths (one connection each; a single-path
/// client is a bundle of one), UDP sessions and striped TCP flows. Session and flow tasks
/// belong to the bundle, not to the connection whose stream started them, so they survive
/// the loss of that path; dropping the bundle aborts them.
pub(super) struct Bundle {
    pub(super) id: Option<[u8; BUNDLE_ID_LEN]>,
    pub(super) paths: Arc<PathTable>,
    pub(super) table: Arc<SessionTable>,
    pub(super) tasks: Mutex<JoinSet<()>>,
    /// Striped flows: where SUBFLOW streams of each go.
    pub(super) flows: Mutex<HashMap<u64, mpsc::Sender<Subflow>>>,
    /// UDP sessions: where a re-attached signalling stream goes.
    pub(super) attach: Mutex<HashMap<u32, mpsc::Sender<(SendStream, FrameReader)>>>,
    /// Each path loop's session-event queue (pre-OPEN delivery and reassembly cleanup).
    pub(super) events: Mutex<Vec<mpsc::Sender<SessionEvent>>>,
    /// Live [`BundleHold`]s.
    pub(super) holders: std::sync::atomic::AtomicUsize,
}

pub(super) fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map or set call: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Bundle {
    pub(super) fn new(id: Option<[u8; BUNDLE_ID_LEN]>, ctx: &ServerState) -> Self {
        Bundle {
            id,
            paths: Arc::new(PathTable::new(Scheduler::default())),
            table: Arc::new(SessionTable::new(ctx.cfg.max_udp_sessions)),
            tasks: Mutex::new(JoinSet::new()),
            flows: Mutex::new(HashMap::new()),
            attach: Mutex::new(HashMap::new()),
            events: Mutex::new(Vec::new()),
            holders: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub(super) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        let mut t = locked(&self.tasks);
        while t.try_join_next().is_some() {}
        t.spawn(f.in_current_span());
    }

    pub(super) fn broadcast(&self, ev: impl Fn() -> SessionEvent) {
        locked(&self.events)
            .retain(|tx| !matches!(tx.try_send(ev()), Err(mpsc::error::TrySendError::Closed(_))));
    }
}

impl ServerState {
    /// The bundle `id`, created on first use.
    pub(super) fn bundle(&self, id: [u8; BUNDLE_ID_LEN]) -> Arc<Bundle> {
        let mut map = locked(&self.bundles);
        if let Some(b) = map.get(&id).and_then(|w| w.upgrade()) {
            return b;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let b = Arc::new(Bundle::new(Some(id), self));
        map.insert(id, Arc::downgrade(&b));
        b
    }
}

/// Open/close notices from UDP session tasks to their connection loop.
#[derive(Debug)]
pub(super) enum SessionEvent {
    Opened(u32),
    Closed(u32),
}

/// One authenticated connection (one path of its bundle): accepts streams and dispatches
/// DATAGRAMs. Fragments of a packet always travel on one path, so reassembly is per path.
pub(super) struct ConnLoop {
    pub(super) conn: Connection,
    pub(super) ctx: Arc<ServerState>,
    pub(super) bundle: Arc<Bundle>,
    pub(super) index: usize,
    pub(super) table: Arc<SessionTable>,
    pub(super) rx: DatagramRx,
    pub(super) pre_open: PreOpenBuffer,
}

impl ConnLoop {
    pub(super) fn new(
        conn: Connection,
        ctx: Arc<ServerState>,
        bundle: Arc<Bundle>,
        index: usize,
    ) -> Self {
        ConnLoop {
            table: bundle.table.clone(),
            bundle,
            index,
            conn,
            ctx,
            rx: DatagramRx::new(),
            pre_open: PreOpenBuffer::default(),
        }
    }

    pub(super) async fn run(mut self) -> String {
        let (events_tx, mut events_rx) = mpsc::channel(EVENT_QUEUE);
        locked(&self.bundle.events).push(events_tx);
        loop {
            let pre_open_deadline = self.pre_open.next_deadline();
            tokio::select! {
                r = self.conn.accept_bi() => match r {
                    Ok((send, recv)) => {
                        let stream = StreamCtx {
                            ctx: self.ctx.clone(),
                            bundle: self.bundle.clone(),
                            index: self.index,
                            client: self.conn.remote_address().ip(),
                        };
                        // Owned by the bundle: a UDP session or striped flow outlives this path.
                        self.bundle.spawn(stream.serve(send, recv));
                    }
                    Err(e) => return e.to_string(),
                },
                r = self.conn.read_datagram() => match r {
                    Ok(d) => self.on_datagram(Instant::now(), d),
                    Err(e) => return e.to_string(),
                },
                Some(ev) = events_rx.recv() => match ev {
                    SessionEvent::Opened(id) => {
                        let now = Instant::now();
                        for d in self.pre_open.take(id) {
                            self.on_datagram(now, d);
                        }
                    }
                    SessionEvent::Closed(id) => self.rx.forget(id),
                },
                _ = sleep_until_opt(pre_open_deadline), if pre_open_deadline.is_some() => {
                    let n = self.pre_open.expire(Instant::now());
                    self.ctx.metrics.datagrams_dropped.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    }

    pub(super) fn on_datagram(&mut self, now: Instant, d: Bytes) {
        let m = &self.ctx.metrics;
        let table = &self.table;
        // Any DATAGRAM of an open session, even one dropped below, keeps it from idling out.
        let lookup = |id| {
            table
                .get(id)
                .inspect(|s: &Arc<Session>| s.activity.touch(now))
        };
        let (session, id, payload) = match self.rx.receive(now, &d, lookup) {
            Received::Packet {
                session,
                session_id,
                payload,
            } => (session, session_id, payload),
            Received::Pending => return,
            Received::Malformed(e) => {
                inc(&m.datagrams_dropped);
                trace!(error = %e, "bad DATAGRAM");
                return;
            }
            // It may have overtaken its UDP_SESSION_OPEN: hold it a moment.
            Received::UnknownSession(id) => {
                if !self.pre_open.push(now, id, d) {
                    inc(&m.datagrams_dropped);
                }
                return;
            }
            Received::Discarded(_) => {
                inc(&m.datagrams_dropped);
                return;
            }
            Received::Duplicate => {
                inc(&m.udp_duplicates);
                return;
            }
        };
        match session.sender.send(&payload) {
            Ok(_) => inc(&m.udp_packets_out),
            // Full socket buffer: UDP is lossy; dropping beats stalling every session.
            Err(e) => {
                inc(&m.datagrams_dropped);
                trace!(error = %e, session = id, "UDP send failed");
            }
        }
    }
}

pub(super) async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
