"""The Portal API: quic-portal's names and semantics over peer-sdk (hole punching, the relay when
punching fails, TCP to the relay when UDP is blocked, the listener's certificate pinned).

Rendezvous through a shared dict: the server registers with the relay, then writes its session
id, certificate fingerprint and relay address into ``dict[DICT_KEY]``; the client waits for that
entry and dials with the fingerprint pinned. Nothing else needs to be passed by hand.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, TypeVar, Union, cast

if sys.version_info >= (3, 11):
    from typing import TypedDict, Unpack
else:  # Unpack is only read by type checkers here (annotations are not evaluated)
    from typing import TypedDict

    if TYPE_CHECKING:
        from typing_extensions import Unpack

from . import _core
from .exceptions import ConnectionError, PeerTimeoutError, PortalError

logger = logging.getLogger("peer_portal")

#: The key the server writes into the rendezvous dict. Its value is a plain dict with the
#: keys ``session``, ``fingerprint`` and ``relay`` (all ``str``).
DICT_KEY = "peer_portal"

#: The largest message ``send`` accepts (and ``recv`` returns).
MAX_MESSAGE_BYTES: int = _core.MAX_MESSAGE_BYTES

#: How often the client looks into the rendezvous dict while waiting for the server (a Modal
#: Dict is a network call: not much more often than this).
DICT_POLL_S = 0.05

Data = Union[bytes, bytearray, memoryview, str]


# The keyword options every way of making a connection shares, each declared and described once
# (PEP 692: `**options: Unpack[...]` types them key by key). One left out takes the default of
# `_core`'s signature (python/src/lib.rs), which the docs below quote (tests check both).


class PeerOptions(TypedDict, total=False):
    """How a peer reaches the other: the keyword options of :func:`listen` (and of
    ``_core.bind``), and with :class:`PortalOptions` of ``create_server`` and ``create_client``.
    Any may be left out.

    Keys:
        relay_only: never try a direct path (default False).
        local_port: the local UDP port, 0 for any (default 0).
        register_timeout: seconds to wait for the relay's answer (default 10.0).
        direct_timeout: seconds to try hole punching before using the relay (default 1.0).
    """

    relay_only: bool
    local_port: int
    register_timeout: float
    direct_timeout: float


class PortalOptions(PeerOptions, total=False):
    """Where the peers meet, besides :class:`PeerOptions`: the keyword options
    ``create_server`` and ``create_client`` share (of :class:`Portal` and :class:`AsyncPortal`).

    Keys:
        relay: the relay, "host:port". The server needs it; the client's default is the relay
            the server wrote into the dict.
        session: the session id (a UUID). The server's default is a new random one; the
            client's, the server's from the dict.
        stun_servers, punch_timeout, transport_options: quic-portal's, accepted and ignored
            (the relay replaces STUN; peer-sdk's transport settings apply).
    """

    relay: str
    session: str
    stun_servers: Any
    punch_timeout: Any
    transport_options: Any


#: quic-portal's parameters after ``dict``, which ``Portal.create_server`` and
#: ``Portal.create_client`` also take by position, in this order.
QUIC_PORTAL_ARGS = ("local_port", "stun_servers", "punch_timeout", "transport_options")

_F = TypeVar("_F", bound=Callable[..., Any])


def _options_doc(*kinds: Any) -> Callable[[_F], _F]:
    """Appends the keys documented in ``kinds`` (the TypedDicts above) to a function's
    docstring: help() lists every option a function takes, each described in one place."""

    def add(f: _F) -> _F:
        if f.__doc__ is not None:  # None under `python -OO`
            keys = "\n".join(inspect.cleandoc(k.__doc__).split("Keys:\n", 1)[1] for k in kinds)
            f.__doc__ = f"{inspect.cleandoc(f.__doc__)}\n\nOptions:\n{keys}"
        return f

    return add


def _split(
    what: str, args: Tuple[Any, ...], options: PortalOptions
) -> Tuple[Optional[str], Optional[str], PeerOptions]:
    """quic-portal's positional ``args`` (see QUIC_PORTAL_ARGS) and the keyword ``options``
    as the relay, the session and the :class:`PeerOptions` for ``_core``. A bad call raises
    the TypeError Python raises for a function with these parameters spelled out."""
    if len(args) > len(QUIC_PORTAL_ARGS):
        raise TypeError(f"{what}() takes at most {1 + len(QUIC_PORTAL_ARGS)} positional arguments")
    given: Dict[str, Any] = {**options}
    for name, value in zip(QUIC_PORTAL_ARGS, args):
        if name in given:
            raise TypeError(f"{what}() got multiple values for argument {name!r}")
        given[name] = value
    unknown = sorted(set(given) - PortalOptions.__optional_keys__)
    if unknown:
        raise TypeError(f"{what}() got an unexpected keyword argument {unknown[0]!r}")
    if any(given.get(name) is not None for name in QUIC_PORTAL_ARGS[1:]):
        logger.debug(
            "stun_servers, punch_timeout and transport_options are accepted for quic-portal "
            "compatibility and ignored: the relay replaces STUN"
        )
    peer = {k: v for k, v in given.items() if k in PeerOptions.__optional_keys__}
    return given.get("relay"), given.get("session"), cast(PeerOptions, peer)


def _as_bytes(data: Data) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"expected bytes, bytearray, memoryview or str, not {type(data).__name__}")


class QuicTransportOptions:
    """Accepted for quic-portal compatibility; peer_portal uses peer-sdk's transport settings
    (keepalive 5 s, idle timeout 60 s), so these values are not applied."""

    def __init__(
        self,
        max_idle_timeout_secs: int = 10,
        congestion_controller_type: str = "cubic",
        initial_window: int = 1024 * 1024,
        keep_alive_interval_secs: int = 2,
    ) -> None:
        self.max_idle_timeout_secs = max_idle_timeout_secs
        self.congestion_controller_type = congestion_controller_type
        self.initial_window = initial_window
        self.keep_alive_interval_secs = keep_alive_interval_secs


def _rendezvous_info(listener: "_core.Listener", relay: str) -> Dict[str, str]:
    return {"session": listener.session, "fingerprint": listener.fingerprint, "relay": relay}


def _dict_entry(d: Any, deadline: float, peer_timeout: float) -> Optional[Dict[str, str]]:
    """The server's entry in the rendezvous dict, or ``None`` while it is not there yet; raises
    PeerTimeoutError once ``deadline`` (a ``time.monotonic()`` instant) has passed. The sync
    and asyncio clients poll it, each sleeping its own way."""
    try:
        info = d[DICT_KEY]
    except KeyError:
        info = None
    if info is not None:
        return _check_info(info)
    if time.monotonic() >= deadline:
        raise PeerTimeoutError(
            f"no server wrote {DICT_KEY!r} into the rendezvous dict within {peer_timeout} s: "
            "is Portal.create_server running with the same dict?"
        )
    return None


def _read_dict(d: Any, peer_timeout: float) -> Dict[str, str]:
    """Waits for the server's entry in the rendezvous dict."""
    deadline = time.monotonic() + peer_timeout
    while True:
        info = _dict_entry(d, deadline, peer_timeout)
        if info is not None:
            return info
        time.sleep(DICT_POLL_S)


def _check_info(info: Any) -> Dict[str, str]:
    try:
        return {k: str(info[k]) for k in ("session", "fingerprint", "relay")}
    except (KeyError, TypeError) as e:
        raise PortalError(
            f"the rendezvous dict's {DICT_KEY!r} entry is {info!r}: expected a dict with "
            "session, fingerprint and relay (written by peer_portal's create_server)"
        ) from e


def _server_checks(relay: Optional[str], dict: Any, on_ready: Any) -> str:
    """The relay create_server needs, and a rendezvous to publish to (sync and asyncio)."""
    if relay is None:
        raise ValueError(
            "create_server needs relay=\"host:port\": peer_portal meets the client through "
            "a quic-relay (run one with `quic-relay`)"
        )
    if dict is None and on_ready is None:
        raise ValueError(
            "create_server needs dict= (the rendezvous shared with the client) or on_ready= "
            "(a callback that hands the session and fingerprint to the client)"
        )
    return relay


def _publish(
    info: Dict[str, str], dict: Any, on_ready: Optional[Callable[[Dict[str, str]], None]]
) -> None:
    """Hands the rendezvous to the client: into ``dict``, to ``on_ready``, or both."""
    if dict is not None:
        dict[DICT_KEY] = info
    if on_ready is not None:
        on_ready(info)


def _bind(
    bind: Callable[..., Any], relay: str, session: Optional[str], options: PeerOptions
) -> Any:
    """Calls ``_core.bind`` or ``_core.bind_async`` (a new random session when ``None``)."""
    return bind(relay, session or _core.new_session(), **options)


def _client_target(
    info: Optional[Dict[str, str]],
    relay: Optional[str],
    session: Optional[str],
    pin: Optional[str],
) -> Tuple[str, str, str]:
    """Relay, session and pin for the client: as given, else from the rendezvous ``info``."""
    if info is not None:
        session = session or info["session"]
        pin = pin or info["fingerprint"]
        relay = relay or info["relay"]
    if relay is None or session is None or pin is None:
        raise ValueError(
            "create_client needs dict= (written by create_server) or relay=, session= and "
            "pin= (the server's fingerprint)"
        )
    return relay, session, pin


def _connect(
    connect: Callable[..., Any],
    target: Tuple[str, str, str],
    peer_left: float,
    options: PeerOptions,
) -> Any:
    """Calls ``_core.connect`` or ``_core.connect_async``; ``peer_left`` is what remains of
    ``peer_timeout`` after waiting for the dict (never negative)."""
    relay, session, pin = target
    return connect(relay, session, pin, peer_timeout=max(0.0, peer_left), **options)


class Listener:
    """A server registered with the relay; its fingerprint is known before anyone dials.

    Use it when the session id and fingerprint travel some other way than a dict::

        listener = peer_portal.listen(relay="198.18.0.1:4433")
        print(listener.session, listener.fingerprint)   # give both to the client
        portal = listener.accept()
    """

    def __init__(self, core: "_core.Listener", relay: str) -> None:
        self._core = core
        self.relay = relay

    @property
    def session(self) -> str:
        """The session id (a UUID) the client must name."""
        return self._core.session

    @property
    def fingerprint(self) -> str:
        """The SHA-256 fingerprint of the certificate (64 hex digits) the client must pin."""
        return self._core.fingerprint

    @property
    def local_port(self) -> int:
        """The local UDP port."""
        return self._core.local_port

    @property
    def info(self) -> Dict[str, str]:
        """What a client needs: ``{"session", "fingerprint", "relay"}``."""
        return _rendezvous_info(self._core, self.relay)

    def accept(self) -> "Portal":
        """Waits for the client (no limit; Ctrl-C interrupts) and returns the connected Portal."""
        return Portal(self._core.accept())


@_options_doc(PeerOptions)
def listen(relay: str, session: Optional[str] = None, **options: Unpack[PeerOptions]) -> Listener:
    """Registers a server for ``session`` (a new random one when ``None``) at ``relay``
    ("host:port") with a fresh self-signed certificate. Blocks until the relay answered.

    Raises RelayUnreachableError, RelayRefusedError, ValueError (a bad relay or session)."""
    return Listener(_bind(_core.bind, relay, session, options), relay)


class Portal:
    """A connection to one peer: messages (reliable, ordered, boundaries kept), datagrams
    (unreliable), and the path they take (``"direct"``, ``"relay"`` or ``"relay-tcp"``).

    Make one with :meth:`create_server` / :meth:`create_client` (quic-portal's names), or with
    :func:`listen` and :meth:`Listener.accept`. Every blocking method releases the GIL while it
    waits. For asyncio, use :class:`AsyncPortal`.
    """

    def __init__(self, conn: "_core.Connection") -> None:
        if not isinstance(conn, _core.Connection):
            raise TypeError(
                "Portal() takes a connection: make one with Portal.create_server(...) or "
                "Portal.create_client(...)"
            )
        self._conn = conn
        self._watchers: list[threading.Thread] = []

    # --- creation (quic-portal's names) ----------------------------------------------------

    @staticmethod
    @_options_doc(PortalOptions, PeerOptions)
    def create_server(
        dict: Any = None,
        *quic_portal_args: Any,
        on_ready: Optional[Callable[[Dict[str, str]], None]] = None,
        **options: Unpack[PortalOptions],
    ) -> "Portal":
        """Registers with the relay, publishes the rendezvous, and waits for the client.

        Args:
            dict: any dict-like object shared with the client (a Modal Dict, a
                ``multiprocessing.Manager().dict()``, ...). The server writes
                ``dict["peer_portal"] = {"session", "fingerprint", "relay"}`` once registered.
            *quic_portal_args: ``local_port``, ``stun_servers``, ``punch_timeout``,
                ``transport_options`` by position, as quic-portal takes them (see Options).
            on_ready: called with the rendezvous info once registered (instead of, or besides,
                ``dict``): use it to hand the session and fingerprint over some other way.
            **options: ``relay`` (required) and the others below.

        Returns:
            the connected Portal.
        """
        relay, session, peer = _split("create_server", quic_portal_args, options)
        relay = _server_checks(relay, dict, on_ready)
        listener = Listener(_bind(_core.bind, relay, session, peer), relay)
        info = listener.info
        logger.info("registered: session %s, fingerprint %s", info["session"], info["fingerprint"])
        _publish(info, dict, on_ready)
        return listener.accept()

    @staticmethod
    @_options_doc(PortalOptions, PeerOptions)
    def create_client(
        dict: Any = None,
        *quic_portal_args: Any,
        pin: Optional[str] = None,
        peer_timeout: float = 60.0,
        **options: Unpack[PortalOptions],
    ) -> "Portal":
        """Dials the server: directly when hole punching works, through the relay otherwise.

        Args:
            dict: the dict the server writes its rendezvous into; the client waits (up to
                ``peer_timeout``) for it and takes session, fingerprint and relay from it.
            *quic_portal_args: as for :meth:`create_server`.
            pin: the server's certificate fingerprint, when not taken from ``dict`` (then
                ``relay`` and ``session`` are needed too).
            peer_timeout: seconds to wait for the server (in the dict, then at the relay).
            **options: see Options below.

        Raises:
            PinMismatchError: the server's certificate is not the pinned one.
            PeerTimeoutError: the server did not show up within ``peer_timeout``.
            RelayUnreachableError, RelayRefusedError: the relay did not answer, or refused.
        """
        relay, session, peer = _split("create_client", quic_portal_args, options)
        start = time.monotonic()
        info = None if dict is None else _read_dict(dict, peer_timeout)
        target = _client_target(info, relay, session, pin)
        left = peer_timeout - (time.monotonic() - start)
        return Portal(_connect(_core.connect, target, left, peer))

    # --- messages (quic-portal's names) ----------------------------------------------------

    def send(self, data: Data) -> None:
        """Sends one message (``str`` is sent as UTF-8). Blocks, without the GIL, only while
        QUIC flow control holds it back (the peer is not reading)."""
        self._conn.send(_as_bytes(data))

    def recv(self, timeout_ms: Optional[float] = None) -> Optional[bytes]:
        """The next message, or ``None`` if ``timeout_ms`` passes first (``None``: wait
        forever). Raises ConnectionClosedError once the peer closed and all was read."""
        return self._conn.recv(timeout_ms)

    def is_connected(self) -> bool:
        """Whether the connection is open."""
        return self._conn.is_connected()

    def close(self) -> None:
        """Closes the connection after the peer received what was sent (waits at most ~2 s)."""
        self._conn.close()

    def __enter__(self) -> "Portal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- beyond quic-portal ----------------------------------------------------------------

    def send_datagram(self, data: Data) -> None:
        """Sends one unreliable datagram (it may be lost; at most ``max_datagram_size``)."""
        self._conn.send_datagram(_as_bytes(data))

    def recv_datagram(self, timeout_ms: Optional[float] = None) -> Optional[bytes]:
        """The next datagram, or ``None`` if ``timeout_ms`` passes first."""
        return self._conn.recv_datagram(timeout_ms)

    @property
    def max_datagram_size(self) -> Optional[int]:
        """The largest datagram the current path takes."""
        return self._conn.max_datagram_size

    @property
    def path(self) -> str:
        """``"direct"``, ``"relay"`` or ``"relay-tcp"``: the way packets go now."""
        return self._conn.path

    def wait_path_change(self, timeout_ms: Optional[float] = None) -> Optional[str]:
        """Blocks until the path changes; the new path, or ``None`` on timeout or close."""
        return self._conn.wait_path_change(self._conn.path, timeout_ms)

    def on_path_change(self, callback: Callable[[str, str], None]) -> None:
        """Calls ``callback(old, new)`` from a background thread whenever the path changes,
        until the connection closes."""

        def watch() -> None:
            current = self._conn.path
            while self._conn.is_connected():
                new = self._conn.wait_path_change(current, 500)
                if new is not None and new != current:
                    try:
                        callback(current, new)
                    except Exception:  # a callback's bug must not end the watch silently
                        logger.exception("path change callback failed")
                    current = new

        t = threading.Thread(target=watch, name="peer_portal path watch", daemon=True)
        t.start()
        self._watchers.append(t)


class AsyncPortal:
    """The asyncio face of :class:`Portal`: ``await portal.recv()``. Cancelling an await
    cancels the operation in Rust (a cancelled ``send`` leaves the message stream unusable)."""

    def __init__(self, conn: "_core.Connection") -> None:
        self._conn = conn

    @staticmethod
    @_options_doc(PortalOptions, PeerOptions)
    async def create_server(
        dict: Any = None,
        *,
        on_ready: Optional[Callable[[Dict[str, str]], None]] = None,
        **options: Unpack[PortalOptions],
    ) -> "AsyncPortal":
        """As :meth:`Portal.create_server`, without blocking the event loop."""
        relay, session, peer = _split("create_server", (), options)
        relay = _server_checks(relay, dict, on_ready)
        core = await _bind(_core.bind_async, relay, session, peer)
        _publish(_rendezvous_info(core, relay), dict, on_ready)
        return AsyncPortal(await core.accept_async())

    @staticmethod
    @_options_doc(PortalOptions, PeerOptions)
    async def create_client(
        dict: Any = None,
        *,
        pin: Optional[str] = None,
        peer_timeout: float = 60.0,
        **options: Unpack[PortalOptions],
    ) -> "AsyncPortal":
        """As :meth:`Portal.create_client`, without blocking the event loop."""
        relay, session, peer = _split("create_client", (), options)
        start = time.monotonic()
        info = None
        if dict is not None:
            while (info := _dict_entry(dict, start + peer_timeout, peer_timeout)) is None:
                await asyncio.sleep(DICT_POLL_S)
        target = _client_target(info, relay, session, pin)
        left = peer_timeout - (time.monotonic() - start)
        return AsyncPortal(await _connect(_core.connect_async, target, left, peer))

    async def send(self, data: Data) -> None:
        """Sends one message."""
        await self._conn.send_async(_as_bytes(data))

    async def recv(self, timeout_ms: Optional[float] = None) -> Optional[bytes]:
        """The next message, or ``None`` if ``timeout_ms`` passes first."""
        return await self._conn.recv_async(timeout_ms)

    def send_datagram(self, data: Data) -> None:
        """Sends one unreliable datagram (never blocks)."""
        self._conn.send_datagram(_as_bytes(data))

    async def recv_datagram(self, timeout_ms: Optional[float] = None) -> Optional[bytes]:
        """The next datagram, or ``None`` if ``timeout_ms`` passes first."""
        return await self._conn.recv_datagram_async(timeout_ms)

    @property
    def path(self) -> str:
        """``"direct"``, ``"relay"`` or ``"relay-tcp"``."""
        return self._conn.path

    async def wait_path_change(self, timeout_ms: Optional[float] = None) -> Optional[str]:
        """Waits (in a worker thread) until the path changes; the new path or ``None``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            None, self._conn.wait_path_change, self._conn.path, timeout_ms
        )

    def is_connected(self) -> bool:
        """Whether the connection is open."""
        return self._conn.is_connected()

    async def close(self) -> None:
        """Closes the connection (in a worker thread: it waits up to ~2 s for the peer)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._conn.close)


__all__ = [
    "AsyncPortal",
    "DICT_KEY",
    "Listener",
    "MAX_MESSAGE_BYTES",
    "PeerOptions",
    "Portal",
    "PortalOptions",
    "QUIC_PORTAL_ARGS",
    "QuicTransportOptions",
    "listen",
    "ConnectionError",
]
