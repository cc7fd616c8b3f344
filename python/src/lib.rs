//! `peer_portal._core`: the native half of the `peer_portal` Python package, over `peer_sdk`.
//!
//! The Python layer (`peer_portal/portal.py`) holds the quic-portal compatible `Portal` API and
//! the dict rendezvous; this module only binds, connects, accepts and moves messages:
//! - `Listener` is a registered listening peer (`bind`) whose certificate fingerprint is
//!   known before anyone dials; `Listener::accept` turns it into a `Connection`.
//! - `connect` dials a listener with its fingerprint pinned.
//! - `Connection` (module `connection`) carries messages (one length-prefixed unidirectional QUIC stream per
//!   direction, see [`frame`]), unreliable datagrams, and the path.
//!
//! Every blocking call releases the GIL while it waits and checks for signals (Ctrl-C) every
//! [`SIGNAL_CHECK`]; every `*_async` call returns an asyncio awaitable whose cancellation drops
//! the Rust future.

#![allow(unsafe_op_in_unsafe_fn)] // pyo3's generated glue

mod connection;
pub mod frame;

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use peer_sdk::quinn;
use peer_sdk::{ClientTls, Fingerprint, Identity, Options, Peer, PeerConnection, ServerTls};
use peer_sdk::{Strategy, Uuid};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::IntoPyObjectExt as _;

use crate::connection::Connection;
use crate::frame::MAX_MESSAGE_BYTES;

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

/// How a call waits for its result: every blocking call and its `*_async` twin share one body
/// and differ only in this.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// On the calling thread, the GIL released ([`block_on`]).
    Block,
    /// As an asyncio awaitable ([`future_into_py`]).
    Async,
}

impl Wait {
    fn of(asynchronous: bool) -> Self {
        if asynchronous {
            Wait::Async
        } else {
            Wait::Block
        }
    }

    /// Runs `fut` and makes its Python value with `done` (under the GIL); returns the value, or
    /// an awaitable of it.
    fn run<'py, F, T>(
        self,
        py: Python<'py>,
        fut: F,
        done: fn(Python<'_>, F::Output) -> PyResult<T>,
    ) -> PyResult<Bound<'py, PyAny>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
        T: for<'a> IntoPyObject<'a> + Send + 'static,
    {
        match self {
            Wait::Block => {
                let out = block_on(py, fut)?;
                done(py, out)?.into_bound_py_any(py)
            }
            Wait::Async => future_into_py(py, async move {
                let out = fut.await;
                Python::attach(|py| done(py, out))
            }),
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
    let addrs = relay.to_socket_addrs().map_err(|e| {
        Failure::BadArgument(format!(
            "relay {relay:?}: {e}: expected \"host:port\", e.g. \"198.18.0.1:4433\""
        ))
    })?;
    netkit::resolve::ipv4_first(addrs)
        .ok_or_else(|| Failure::BadArgument(format!("relay {relay:?} resolves to no address")))
}

/// Builds the SDK options from the Python arguments `bind` and `connect` share (`timeouts`:
/// register, peer and direct, in seconds), or the exception that names the bad one.
fn options(
    py: Python<'_>,
    relay: &str,
    session: &str,
    relay_only: bool,
    local_port: u16,
    timeouts: [f64; 3],
) -> PyResult<Options> {
    options_of(relay, session, relay_only, local_port, timeouts).map_err(|e| e.into_py(py))
}

fn options_of(
    relay: &str,
    session: &str,
    relay_only: bool,
    local_port: u16,
    [register_timeout_s, peer_timeout_s, direct_timeout_s]: [f64; 3],
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
    fn accept<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.accept_with(py, Wait::Block)
    }

    /// `accept` as an asyncio awaitable.
    fn accept_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.accept_with(py, Wait::Async)
    }
}

impl Listener {
    fn accept_with<'py>(&self, py: Python<'py>, wait: Wait) -> PyResult<Bound<'py, PyAny>> {
        let (peer, id) = self.take(py)?;
        wait.run(py, peer.accept(ServerTls::Identity(id)), |py, c| {
            c.map(Connection::new)
                .map_err(|e| Failure::from(e).into_py(py))
        })
    }

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
/// With `_async` (what `bind_async` passes), an asyncio awaitable of it.
#[pyfunction]
#[pyo3(signature = (relay, session, *, relay_only=false, local_port=0, register_timeout=10.0, direct_timeout=1.0, _async=false))]
#[allow(clippy::too_many_arguments)]
fn bind<'py>(
    py: Python<'py>,
    relay: &str,
    session: &str,
    relay_only: bool,
    local_port: u16,
    register_timeout: f64,
    direct_timeout: f64,
    _async: bool,
) -> PyResult<Bound<'py, PyAny>> {
    // The listener waits for its dialer without a limit.
    let timeouts = [register_timeout, 0.0, direct_timeout];
    let o = options(py, relay, session, relay_only, local_port, timeouts)?;
    Wait::of(_async).run(py, bind_inner(o), |py, l| l.map_err(|e| e.into_py(py)))
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
/// fingerprint is `pin`. With `_async` (what `connect_async` passes), an asyncio awaitable.
#[pyfunction]
#[pyo3(signature = (relay, session, pin, *, relay_only=false, local_port=0, register_timeout=10.0, peer_timeout=60.0, direct_timeout=1.0, _async=false))]
#[allow(clippy::too_many_arguments)]
fn connect<'py>(
    py: Python<'py>,
    relay: &str,
    session: &str,
    pin: &str,
    relay_only: bool,
    local_port: u16,
    register_timeout: f64,
    peer_timeout: f64,
    direct_timeout: f64,
    _async: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let pin = parse_pin(py, pin)?;
    let timeouts = [register_timeout, peer_timeout, direct_timeout];
    let o = options(py, relay, session, relay_only, local_port, timeouts)?;
    Wait::of(_async).run(py, connect_inner(o, pin), |py, c| {
        c.map(Connection::new).map_err(|e| e.into_py(py))
    })
}

/// The module `peer_portal._core`.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(new_session, m)?)?;
    m.add_function(wrap_pyfunction!(bind, m)?)?;
    m.add_function(wrap_pyfunction!(connect, m)?)?;
    // The asyncio twins are the same functions returning an awaitable.
    let partial = m.py().import("functools")?.getattr("partial")?;
    let kwargs = pyo3::types::PyDict::new(m.py());
    kwargs.set_item("_async", true)?;
    for name in ["bind", "connect"] {
        let twin = partial.call((m.getattr(name)?,), Some(&kwargs))?;
        m.add(format!("{name}_async"), twin)?;
    }
    m.add_class::<Listener>()?;
    m.add_class::<Connection>()?;
    m.add("MAX_MESSAGE_BYTES", MAX_MESSAGE_BYTES)?;
    m.add("RECV_BUFFER_BYTES", RECV_BUFFER_BYTES)?;
    Ok(())
}
