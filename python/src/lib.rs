//! `peer_portal._core`: the native half of the `peer_portal` Python package, over `peer_sdk`.
//!
//! The Python layer (`peer_portal/portal.py`) holds the quic-portal compatible `Portal` API and
//! the dict rendezvous; this module only binds, connects, accepts and moves messages:
//! - `Listener` is a registered listening peer (`bind`) whose certificate fingerprint is
//!   known before anyone dials; `Listener::accept` turns it into a `Connection`.
//! - `connect` dials a listener with its fingerprint pinned.
//! - `Connection` carries messages (one length-prefixed unidirectional QUIC stream per
//!   direction, see [`frame`]), unreliable datagrams, and the path.
//!
//! Every blocking call releases the GIL while it waits and checks for signals (Ctrl-C) every
//! [`SIGNAL_CHECK`]; every `*_async` call returns an asyncio awaitable whose cancellation drops
//! the Rust future.

#![allow(unsafe_op_in_unsafe_fn)] // pyo3's generated glue

pub mod frame;

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use peer_sdk::quinn;
use peer_sdk::{ClientTls, Fingerprint, Identity, Options, Peer, PeerConnection, ServerTls};
use peer_sdk::{Strategy, Uuid};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};

use crate::frame::{Message, MAX_MESSAGE_BYTES};

/// How often a blocking call wakes to let Python handle signals (Ctrl-C): short enough to feel
/// immediate, long enough to cost nothing.
pub const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Received messages waiting for `recv`, in bytes (each message also counts
/// [`MESSAGE_OVERHEAD`]): past this the reader stops reading and QUIC flow control slows the
/// sender, so a peer that sends faster than Python reads cannot grow our memory. 64 MiB holds
/// four of the largest messages the tests send (16 MiB) and is far above one bandwidth-delay
/// product on any link the SDK targets.
pub const RECV_BUFFER_BYTES: usize = 64 << 20;

/// What one queued message costs in the receive budget beyond its bytes, so that a flood of
/// empty messages is bounded too (1 Mi empty messages at most).
pub const MESSAGE_OVERHEAD: usize = 64;

/// How long `close` waits for the peer to be told the connection is closed.
pub const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Tokio worker threads: the machine kinds this targets have few cores, and Python calls in
/// from its own threads; two workers keep QUIC and the relay keepalives moving while one is busy.
const WORKER_THREADS: usize = 2;

/// The runtime all connections of this process run on, made on first use. A process forked
/// (multiprocessing's default start method on Linux) after its parent made one inherits the
/// runtime without its threads: the child then makes its own, keyed by process id.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::Mutex<Option<(u32, &'static tokio::runtime::Runtime)>> =
        std::sync::Mutex::new(None);
    let pid = std::process::id();
    let mut rt = RT.lock().unwrap_or_else(|p| p.into_inner());
    match *rt {
        Some((p, r)) if p == pid => r,
        _ => {
            // Leaked on purpose: it lives as long as the process (one per process, or one more
            // in a forked child, whose inherited copy has no threads to drop).
            let r: &'static tokio::runtime::Runtime = Box::leak(Box::new(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(WORKER_THREADS)
                    .thread_name("peer-portal")
                    .enable_all()
                    .build()
                    .expect("the tokio runtime starts (threads and an epoll instance)"),
            ));
            *rt = Some((pid, r));
            r
        }
    }
}

/// `future_into_py` on our runtime (pyo3-async-runtimes takes it on first use; in a process
/// forked after its parent used asyncio with this package, asyncio calls are not supported:
/// use the `spawn` start method).
fn future_into_py<F, T>(py: Python<'_>, fut: F) -> PyResult<Bound<'_, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'py> IntoPyObject<'py> + Send + 'static,
{
    let _ = pyo3_async_runtimes::tokio::init_with_runtime(runtime());
    pyo3_async_runtimes::tokio::future_into_py(py, fut)
}

/// Runs `fut` on the runtime from a Python thread: the GIL is released while it waits, and
/// signals are checked every [`SIGNAL_CHECK`] (a `KeyboardInterrupt` drops the future).
fn block_on<F>(py: Python<'_>, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    let mut fut = std::pin::pin!(fut);
    loop {
        let r = py.detach(|| {
            runtime().block_on(async { tokio::time::timeout(SIGNAL_CHECK, fut.as_mut()).await })
        });
        match r {
            Ok(v) => return Ok(v),
            Err(_) => py.check_signals()?,
        }
    }
}

/// The typed Python exceptions live in `peer_portal.exceptions` (so they can also subclass the
/// matching builtins); raise one of them by name.
fn exception(py: Python<'_>, name: &str, msg: String) -> PyErr {
    match py
        .import("peer_portal.exceptions")
        .and_then(|m| m.getattr(name))
    {
        Ok(ty) => PyErr::from_type(ty.cast_into().expect("exceptions are types"), msg),
        Err(e) => e,
    }
}

/// Why a connection could not be made or used, before it is turned into a Python exception
/// (the conversion needs the GIL; the error is made without it).
#[derive(Debug)]
enum Failure {
    Sdk(peer_sdk::Error),
    Closed(String),
    TooLarge(usize, usize),
    Datagram(String),
    BadArgument(String),
}

impl Failure {
    fn into_py(self, py: Python<'_>) -> PyErr {
        match self {
            Failure::Sdk(e) => sdk_error(py, e),
            Failure::Closed(why) => exception(py, "ConnectionClosedError", why),
            Failure::TooLarge(len, max) => exception(
                py,
                "MessageTooLargeError",
                format!("message of {len} bytes is larger than the limit of {max} bytes"),
            ),
            Failure::Datagram(why) => exception(py, "PortalError", why),
            Failure::BadArgument(why) => PyValueError::new_err(why),
        }
    }
}

impl From<peer_sdk::Error> for Failure {
    fn from(e: peer_sdk::Error) -> Self {
        Failure::Sdk(e)
    }
}

/// Whether a handshake failed because the listener's certificate did not match the pin.
fn is_pin_mismatch(e: &quinn::ConnectionError) -> bool {
    match e {
        // rustls reports our verifier's refusal as an invalid certificate, and the alert it
        // sends (and Quinn's close reason) says so.
        quinn::ConnectionError::TransportError(t) => {
            let reason = t.to_string();
            reason.contains("invalid peer certificate") || reason.contains("certificate")
        }
        _ => false,
    }
}

fn sdk_error(py: Python<'_>, e: peer_sdk::Error) -> PyErr {
    let msg = e.to_string();
    let name = match &e {
        peer_sdk::Error::RelayUnreachable { .. } => "RelayUnreachableError",
        peer_sdk::Error::Refused { .. } => "RelayRefusedError",
        peer_sdk::Error::PeerTimeout { .. } => "PeerTimeoutError",
        peer_sdk::Error::BadFingerprint(_) => "PinMismatchError",
        peer_sdk::Error::Connection(c) if is_pin_mismatch(c) => {
            return exception(
                py,
                "PinMismatchError",
                format!(
                    "the listener's certificate does not match the pinned fingerprint ({msg}): \
                     check the fingerprint the listener published"
                ),
            )
        }
        _ => "ConnectionError",
    };
    exception(py, name, msg)
}

/// Resolves `relay` ("host:port", IPv4 first like quic-portal).
fn relay_addr(relay: &str) -> Result<SocketAddr, Failure> {
    let addrs: Vec<SocketAddr> = relay
        .to_socket_addrs()
        .map_err(|e| {
            Failure::BadArgument(format!(
                "relay {relay:?}: {e}: expected \"host:port\", e.g. \"198.18.0.1:4433\""
            ))
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| Failure::BadArgument(format!("relay {relay:?} resolves to no address")))
}

/// Builds the SDK options from the Python arguments.
#[allow(clippy::too_many_arguments)]
fn options(
    relay: &str,
    session: &str,
    relay_only: bool,
    local_port: u16,
    register_timeout_s: f64,
    peer_timeout_s: f64,
    direct_timeout_s: f64,
) -> Result<Options, Failure> {
    let relay = relay_addr(relay)?;
    let session: Uuid = session.parse().map_err(|e| {
        Failure::BadArgument(format!(
            "session {session:?}: {e}: expected a UUID (e.g. from `quic-relay session`)"
        ))
    })?;
    let secs = |what: &str, s: f64| {
        Duration::try_from_secs_f64(s).map_err(|_| {
            Failure::BadArgument(format!(
                "{what} = {s}: expected a non-negative number of seconds"
            ))
        })
    };
    let mut o = Options::new(relay, session);
    o.register_timeout = secs("register_timeout", register_timeout_s)?;
    o.peer_timeout = secs("peer_timeout", peer_timeout_s)?;
    o.direct_timeout = secs("direct_timeout", direct_timeout_s)?;
    if relay_only {
        o.strategy = Strategy::RelayOnly;
    }
    if local_port != 0 {
        o.bind = Some(match relay {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], local_port)),
            SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, local_port)),
        });
    }
    Ok(o)
}

/// A new random session id (a UUID v4), as text.
#[pyfunction]
fn new_session() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

/// A registered listening peer: its certificate fingerprint is known, the dialer has not
/// connected yet.
#[pyclass(module = "peer_portal._core")]
struct Listener {
    peer: std::sync::Mutex<Option<(Peer, Identity)>>,
    fingerprint: String,
    session: String,
    local_port: u16,
}

#[pymethods]
impl Listener {
    /// The SHA-256 fingerprint of this listener's certificate (64 hex digits): the dialer pins it.
    #[getter]
    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The session id this listener registered.
    #[getter]
    fn session(&self) -> String {
        self.session.clone()
    }

    /// The local UDP port.
    #[getter]
    fn local_port(&self) -> u16 {
        self.local_port
    }

    /// Waits (without a limit; Ctrl-C interrupts) for the dialer and returns the connection.
    fn accept(&self, py: Python<'_>) -> PyResult<Connection> {
        let (peer, id) = self.take(py)?;
        let conn = block_on(py, peer.accept(ServerTls::Identity(id)))?
            .map_err(|e| Failure::from(e).into_py(py))?;
        Ok(Connection::new(conn))
    }

    /// `accept` as an asyncio awaitable.
    fn accept_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let (peer, id) = self.take(py)?;
        future_into_py(py, async move {
            let conn = peer.accept(ServerTls::Identity(id)).await;
            Python::attach(|py| match conn {
                Ok(c) => Ok(Connection::new(c)),
                Err(e) => Err(Failure::from(e).into_py(py)),
            })
        })
    }
}

impl Listener {
    fn take(&self, py: Python<'_>) -> PyResult<(Peer, Identity)> {
        self.peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                exception(
                    py,
                    "PortalError",
                    "accept was already called on this listener".into(),
                )
            })
    }
}

async fn bind_inner(opts: Options) -> Result<Listener, Failure> {
    let session = opts.session.to_string();
    let id = Identity::generate()?;
    let fingerprint = id.fingerprint().to_string();
    let peer = Peer::bind(opts).await?;
    let local_port = peer.local_addr()?.port();
    Ok(Listener {
        peer: std::sync::Mutex::new(Some((peer, id))),
        fingerprint,
        session,
        local_port,
    })
}

/// Registers a listening peer for `session` at `relay` with a fresh self-signed certificate.
#[pyfunction]
#[pyo3(signature = (relay, session, *, relay_only=false, local_port=0, register_timeout=10.0, direct_timeout=1.0))]
fn bind(
    py: Python<'_>,
    relay: &str,
    session: &str,
    relay_only: bool,
    local_port: u16,
    register_timeout: f64,
    direct_timeout: f64,
) -> PyResult<Listener> {
    let o = options(
        relay,
        session,
        relay_only,
        local_port,
        register_timeout,
        // The listener waits for its dialer without a limit.
        0.0,
        direct_timeout,
    )
    .map_err(|e| e.into_py(py))?;
    block_on(py, bind_inner(o))?.map_err(|e| e.into_py(py))
}

/// `bind` as an asyncio awaitable.
#[pyfunction]
#[pyo3(signature = (relay, session, *, relay_only=false, local_port=0, register_timeout=10.0, direct_timeout=1.0))]
fn bind_async<'py>(
    py: Python<'py>,
    relay: &str,
    session: &str,
    relay_only: bool,
    local_port: u16,
    register_timeout: f64,
    direct_timeout: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let o = options(
        relay,
        session,
        relay_only,
        local_port,
        register_timeout,
        0.0,
        direct_timeout,
    )
    .map_err(|e| e.into_py(py))?;
    future_into_py(py, async move {
        let l = bind_inner(o).await;
        Python::attach(|py| l.map_err(|e| e.into_py(py)))
    })
}

async fn connect_inner(opts: Options, pin: Fingerprint) -> Result<PeerConnection, Failure> {
    Ok(Peer::bind(opts)
        .await?
        .connect(ClientTls::Pinned(pin))
        .await?)
}

fn parse_pin(py: Python<'_>, pin: &str) -> PyResult<Fingerprint> {
    pin.parse()
        .map_err(|e: peer_sdk::Error| exception(py, "PinMismatchError", e.to_string()))
}

/// Dials the listener of `session` at `relay`, accepting only the certificate whose SHA-256
/// fingerprint is `pin`.
#[pyfunction]
#[pyo3(signature = (relay, session, pin, *, relay_only=false, local_port=0, register_timeout=10.0, peer_timeout=60.0, direct_timeout=1.0))]
#[allow(clippy::too_many_arguments)]
fn connect(
    py: Python<'_>,
    relay: &str,
    session: &str,
    pin: &str,
    relay_only: bool,
    local_port: u16,
    register_timeout: f64,
    peer_timeout: f64,
    direct_timeout: f64,
) -> PyResult<Connection> {
    let pin = parse_pin(py, pin)?;
    let o = options(
        relay,
        session,
        relay_only,
        local_port,
        register_timeout,
        peer_timeout,
        direct_timeout,
    )
    .map_err(|e| e.into_py(py))?;
    let c = block_on(py, connect_inner(o, pin))?.map_err(|e| e.into_py(py))?;
    Ok(Connection::new(c))
}

/// `connect` as an asyncio awaitable.
#[pyfunction]
#[pyo3(signature = (relay, session, pin, *, relay_only=false, local_port=0, register_timeout=10.0, peer_timeout=60.0, direct_timeout=1.0))]
#[allow(clippy::too_many_arguments)]
fn connect_async<'py>(
    py: Python<'py>,
    relay: &str,
    session: &str,
    pin: &str,
    relay_only: bool,
    local_port: u16,
    register_timeout: f64,
    peer_timeout: f64,
    direct_timeout: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let pin = parse_pin(py, pin)?;
    let o = options(
        relay,
        session,
        relay_only,
        local_port,
        register_timeout,
        peer_timeout,
        direct_timeout,
    )
    .map_err(|e| e.into_py(py))?;
    future_into_py(py, async move {
        let c = connect_inner(o, pin).await;
        Python::attach(|py| c.map(Connection::new).map_err(|e| e.into_py(py)))
    })
}

/// The sending half: one unidirectional stream, opened on first use.
#[derive(Debug, Default)]
struct Sender {
    stream: Option<quinn::SendStream>,
    /// A send was interrupted mid-message (Ctrl-C, asyncio cancellation): the stream's framing
    /// is lost, so later sends fail instead of sending garbage.
    broken: bool,
}

/// Marks the sender broken unless the write completes.
struct BreakUnlessDone<'a>(&'a mut Sender, bool);

impl Drop for BreakUnlessDone<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.broken = true;
        }
    }
}

/// State shared by a connection's Python object, its reader task and its async calls.
struct Inner {
    conn: quinn::Connection,
    peer: std::sync::Mutex<Option<PeerConnection>>,
    sender: Mutex<Sender>,
    received: Mutex<mpsc::UnboundedReceiver<(Message, OwnedSemaphorePermit)>>,
    status: tokio::sync::watch::Receiver<peer_sdk::Status>,
    closed: AtomicBool,
    _reader: AbortOnDrop,
}

/// Aborts the reader task with the connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Inner {
    /// Writes one framed message.
    async fn send(&self, data: &[u8]) -> Result<(), Failure> {
        if data.len() > MAX_MESSAGE_BYTES {
            return Err(Failure::TooLarge(data.len(), MAX_MESSAGE_BYTES));
        }
        let mut guard = self.sender.lock().await;
        let sender = &mut *guard;
        if sender.broken {
            return Err(Failure::Closed(
                "an earlier send was interrupted mid-message; the message stream is unusable: \
                 open a new Portal"
                    .into(),
            ));
        }
        if sender.stream.is_none() {
            let s = self.conn.open_uni().await.map_err(|e| closed(&e))?;
            sender.stream = Some(s);
        }
        let mut done = BreakUnlessDone(sender, false);
        let stream = done.0.stream.as_mut().expect("opened above");
        let r = frame::write(stream, data).await;
        done.1 = true;
        r.map_err(|e| Failure::Closed(format!("send failed: {e}")))
    }

    async fn recv(&self) -> Result<Message, Failure> {
        let mut rx = self.received.lock().await;
        match rx.recv().await {
            Some((m, _permit)) => Ok(m),
            None => Err(closed_reason(&self.conn)),
        }
    }
}

fn closed(e: &quinn::ConnectionError) -> Failure {
    Failure::Closed(format!("connection closed: {e}"))
}

fn closed_reason(conn: &quinn::Connection) -> Failure {
    match conn.close_reason() {
        Some(e) => closed(&e),
        None => Failure::Closed("the peer closed its message stream".into()),
    }
}

/// Reads the peer's message stream into the bounded queue until it ends.
async fn reader(
    conn: quinn::Connection,
    tx: mpsc::UnboundedSender<(Message, OwnedSemaphorePermit)>,
) {
    let budget = Arc::new(Semaphore::new(RECV_BUFFER_BYTES));
    let Ok(mut stream) = conn.accept_uni().await else {
        return;
    };
    loop {
        match frame::read(&mut stream, &budget).await {
            Ok(Some(m)) => {
                if tx.send(m).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "bad message stream from the peer; closing");
                conn.close(frame::PROTOCOL_ERROR.into(), e.to_string().as_bytes());
                return;
            }
        }
    }
}

/// An established connection to the peer.
#[pyclass(module = "peer_portal._core")]
struct Connection {
    inner: Arc<Inner>,
}

impl Connection {
    fn new(pc: PeerConnection) -> Connection {
        let conn = pc.connection().clone();
        let status = pc.watch_status();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = AbortOnDrop(runtime().spawn(reader(conn.clone(), tx)));
        Connection {
            inner: Arc::new(Inner {
                conn,
                peer: std::sync::Mutex::new(Some(pc)),
                sender: Mutex::new(Sender::default()),
                received: Mutex::new(rx),
                status,
                closed: AtomicBool::new(false),
                _reader: reader,
            }),
        }
    }
}

fn timeout_of(timeout_ms: Option<f64>) -> PyResult<Option<Duration>> {
    timeout_ms
        .map(|ms| {
            Duration::try_from_secs_f64(ms / 1000.0).map_err(|_| {
                PyValueError::new_err(format!(
                    "timeout_ms = {ms}: expected a non-negative number of milliseconds or None"
                ))
            })
        })
        .transpose()
}

/// Awaits `fut` for at most `limit` (forever when `None`); `None` on timeout.
async fn within<F: Future>(limit: Option<Duration>, fut: F) -> Option<F::Output> {
    match limit {
        Some(d) => tokio::time::timeout(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

fn message_to_py(py: Python<'_>, m: Message) -> PyResult<Py<PyAny>> {
    let b = PyBytes::new_with(py, m.len, |buf| {
        m.copy_to(buf);
        Ok(())
    })?;
    Ok(b.into_any().unbind())
}

#[pymethods]
impl Connection {
    /// Sends one message (its boundaries are kept). Blocks, without the GIL, while QUIC flow
    /// control holds it back.
    fn send(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let inner = &self.inner;
        block_on(py, inner.send(data))?.map_err(|e| e.into_py(py))
    }

    /// `send` as an asyncio awaitable.
    fn send_async<'py>(&self, py: Python<'py>, data: Vec<u8>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        future_into_py(py, async move {
            let r = inner.send(&data).await;
            Python::attach(|py| r.map_err(|e| e.into_py(py)))
        })
    }

    /// The next message, or `None` when `timeout_ms` passes first (`None`: wait forever).
    #[pyo3(signature = (timeout_ms=None))]
    fn recv(&self, py: Python<'_>, timeout_ms: Option<f64>) -> PyResult<Py<PyAny>> {
        let limit = timeout_of(timeout_ms)?;
        let inner = &self.inner;
        match block_on(py, within(limit, inner.recv()))? {
            None => Ok(py.None()),
            Some(Ok(m)) => message_to_py(py, m),
            Some(Err(e)) => Err(e.into_py(py)),
        }
    }

    /// `recv` as an asyncio awaitable.
    #[pyo3(signature = (timeout_ms=None))]
    fn recv_async<'py>(
        &self,
        py: Python<'py>,
        timeout_ms: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let limit = timeout_of(timeout_ms)?;
        let inner = self.inner.clone();
        future_into_py(py, async move {
            let r = within(limit, inner.recv()).await;
            Python::attach(|py| match r {
                None => Ok(py.None()),
                Some(Ok(m)) => message_to_py(py, m),
                Some(Err(e)) => Err(e.into_py(py)),
            })
        })
    }

    /// Sends one unreliable datagram (it may be lost; at most `max_datagram_size` bytes).
    fn send_datagram(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        self.inner
            .conn
            .send_datagram(data.to_vec().into())
            .map_err(|e| match e {
                quinn::SendDatagramError::TooLarge => {
                    Failure::TooLarge(data.len(), self.inner.conn.max_datagram_size().unwrap_or(0))
                }
                quinn::SendDatagramError::ConnectionLost(e) => closed(&e),
                e => Failure::Datagram(format!("datagram not sent: {e}")),
            })
            .map_err(|e| e.into_py(py))
    }

    /// The next datagram, or `None` when `timeout_ms` passes first.
    #[pyo3(signature = (timeout_ms=None))]
    fn recv_datagram(&self, py: Python<'_>, timeout_ms: Option<f64>) -> PyResult<Py<PyAny>> {
        let limit = timeout_of(timeout_ms)?;
        let conn = self.inner.conn.clone();
        match block_on(py, within(limit, conn.read_datagram()))? {
            None => Ok(py.None()),
            Some(Ok(d)) => Ok(PyBytes::new(py, &d).into_any().unbind()),
            Some(Err(e)) => Err(closed(&e).into_py(py)),
        }
    }

    /// `recv_datagram` as an asyncio awaitable.
    #[pyo3(signature = (timeout_ms=None))]
    fn recv_datagram_async<'py>(
        &self,
        py: Python<'py>,
        timeout_ms: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let limit = timeout_of(timeout_ms)?;
        let conn = self.inner.conn.clone();
        future_into_py(py, async move {
            let r = within(limit, conn.read_datagram()).await;
            Python::attach(|py| match r {
                None => Ok(py.None()),
                Some(Ok(d)) => Ok(PyBytes::new(py, &d).into_any().unbind()),
                Some(Err(e)) => Err(closed(&e).into_py(py)),
            })
        })
    }

    /// The largest datagram the path takes now (`None` if the peer does not accept datagrams).
    #[getter]
    fn max_datagram_size(&self) -> Option<usize> {
        self.inner.conn.max_datagram_size()
    }

    /// The path datagrams take now: `"direct"`, `"relay"` or `"relay-tcp"`.
    #[getter]
    fn path(&self) -> &'static str {
        self.inner.status.borrow().path.kind()
    }

    /// Waits until the path differs from `current` and returns the new one, or `None` when
    /// `timeout_ms` passes first or the connection is gone.
    #[pyo3(signature = (current, timeout_ms=None))]
    fn wait_path_change(
        &self,
        py: Python<'_>,
        current: String,
        timeout_ms: Option<f64>,
    ) -> PyResult<Option<&'static str>> {
        let limit = timeout_of(timeout_ms)?;
        let mut rx = self.inner.status.clone();
        let r = block_on(
            py,
            within(limit, async move {
                rx.wait_for(|s| s.path.kind() != current)
                    .await
                    .ok()
                    .map(|s| s.path.kind())
            }),
        )?;
        Ok(r.flatten())
    }

    /// Whether the connection is open (not closed by either side, not timed out).
    fn is_connected(&self) -> bool {
        !self.inner.closed.load(Ordering::Relaxed) && self.inner.conn.close_reason().is_none()
    }

    /// Closes the connection (at once; the peer is told within [`CLOSE_WAIT`]). Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.inner.closed.store(true, Ordering::Relaxed);
        let pc = self
            .inner
            .peer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(pc) = pc {
            // Let the peer read what was sent before the close.
            let sender = &self.inner.sender;
            block_on(py, async move {
                if let Some(s) = sender.lock().await.stream.as_mut() {
                    let _ = s.finish();
                    let _ = tokio::time::timeout(CLOSE_WAIT, s.stopped()).await;
                }
                let _ = tokio::time::timeout(CLOSE_WAIT, pc.close(0, b"closed")).await;
            })?;
        }
        Ok(())
    }
}

/// The module `peer_portal._core`.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(new_session, m)?)?;
    m.add_function(wrap_pyfunction!(bind, m)?)?;
    m.add_function(wrap_pyfunction!(bind_async, m)?)?;
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    m.add_function(wrap_pyfunction!(connect_async, m)?)?;
    m.add_class::<Listener>()?;
    m.add_class::<Connection>()?;
    m.add("MAX_MESSAGE_BYTES", MAX_MESSAGE_BYTES)?;
    m.add("RECV_BUFFER_BYTES", RECV_BUFFER_BYTES)?;
    Ok(())
}
