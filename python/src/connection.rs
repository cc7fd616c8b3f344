//! A connection's Python object: framed messages over one unidirectional QUIC stream per
//! direction (a reader task fills a bounded queue), unreliable datagrams, the path, close.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use peer_sdk::quinn;
use peer_sdk::PeerConnection;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};

use crate::frame::{self, Message, MAX_MESSAGE_BYTES};
use crate::{block_on, runtime, Failure, Wait, CLOSE_WAIT, RECV_BUFFER_BYTES};

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
pub(crate) struct Connection {
    inner: Arc<Inner>,
}

impl Connection {
    pub(crate) fn new(pc: PeerConnection) -> Connection {
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

/// The Python value of a finished send.
fn sent(py: Python<'_>, r: Result<(), Failure>) -> PyResult<()> {
    r.map_err(|e| e.into_py(py))
}

/// What a method with an asyncio twin gives Python: the value (blocking) or an awaitable.
type PyAwaitable<'py> = PyResult<Bound<'py, PyAny>>;

/// What `recv*` and `recv_datagram*` wait for.
#[derive(Clone, Copy)]
enum Incoming {
    /// The next message of the peer's message stream.
    Message,
    /// The next datagram.
    Datagram,
}

/// A received message or datagram, as Python `bytes`.
trait ToPyBytes: Send + 'static {
    fn to_py_bytes(self, py: Python<'_>) -> PyResult<Py<PyAny>>;
}

impl ToPyBytes for Message {
    fn to_py_bytes(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        message_to_py(py, self)
    }
}

impl ToPyBytes for bytes::Bytes {
    fn to_py_bytes(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(PyBytes::new(py, &self).into_any().unbind())
    }
}

/// Waits (as `wait` says) for what `next` yields, for at most `timeout_ms`: its bytes, `None`
/// on timeout, or the exception of its failure.
fn bytes_or_none<'py, T: ToPyBytes>(
    py: Python<'py>,
    wait: Wait,
    timeout_ms: Option<f64>,
    next: impl Future<Output = Result<T, Failure>> + Send + 'static,
) -> PyAwaitable<'py> {
    let limit = timeout_of(timeout_ms)?;
    wait.run(py, within(limit, next), |py, r| match r {
        None => Ok(py.None()),
        Some(Ok(v)) => v.to_py_bytes(py),
        Some(Err(e)) => Err(e.into_py(py)),
    })
}

impl Connection {
    /// `recv`, `recv_datagram` and their asyncio twins: the next message or datagram, or `None`
    /// after `timeout_ms`.
    fn next_with<'py>(
        &self,
        py: Python<'py>,
        what: Incoming,
        wait: Wait,
        timeout_ms: Option<f64>,
    ) -> PyAwaitable<'py> {
        match what {
            Incoming::Message => {
                let inner = self.inner.clone();
                bytes_or_none(py, wait, timeout_ms, async move { inner.recv().await })
            }
            Incoming::Datagram => {
                let conn = self.inner.conn.clone();
                let next = async move { conn.read_datagram().await.map_err(|e| closed(&e)) };
                bytes_or_none(py, wait, timeout_ms, next)
            }
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
        // Borrowing `data` (no copy) keeps this one off Wait::run, which wants an owned future.
        let r = block_on(py, self.inner.send(data))?;
        sent(py, r)
    }

    /// `send` as an asyncio awaitable.
    fn send_async<'py>(&self, py: Python<'py>, data: Vec<u8>) -> PyAwaitable<'py> {
        let inner = self.inner.clone();
        Wait::Async.run(py, async move { inner.send(&data).await }, sent)
    }

    /// The next message, or `None` when `timeout_ms` passes first (`None`: wait forever).
    #[pyo3(signature = (timeout_ms=None))]
    fn recv<'py>(&self, py: Python<'py>, timeout_ms: Option<f64>) -> PyAwaitable<'py> {
        self.next_with(py, Incoming::Message, Wait::Block, timeout_ms)
    }

    /// `recv` as an asyncio awaitable.
    #[pyo3(signature = (timeout_ms=None))]
    fn recv_async<'py>(&self, py: Python<'py>, timeout_ms: Option<f64>) -> PyAwaitable<'py> {
        self.next_with(py, Incoming::Message, Wait::Async, timeout_ms)
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
    fn recv_datagram<'py>(&self, py: Python<'py>, timeout_ms: Option<f64>) -> PyAwaitable<'py> {
        self.next_with(py, Incoming::Datagram, Wait::Block, timeout_ms)
    }

    /// `recv_datagram` as an asyncio awaitable.
    #[pyo3(signature = (timeout_ms=None))]
    fn recv_datagram_async<'py>(
        &self,
        py: Python<'py>,
        timeout_ms: Option<f64>,
    ) -> PyAwaitable<'py> {
        self.next_with(py, Incoming::Datagram, Wait::Async, timeout_ms)
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
