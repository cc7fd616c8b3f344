"""peer_portal: peer-to-peer QUIC for Python, a drop-in for quic-portal.

Two programs meet through a quic-relay and a shared dict; the connection goes direct when NAT
hole punching works and through the relay when it does not, with the server's certificate
pinned by the client::

    from peer_portal import Portal
    server = Portal.create_server(dict=d, relay="198.18.0.1:4433")   # one process
    client = Portal.create_client(dict=d)                            # another
    client.send(b"hello"); print(server.recv(timeout_ms=1000))

See the package README for the asyncio API, datagrams, paths and the migration from quic-portal.
"""

from .exceptions import (
    ConnectionClosedError,
    ConnectionError,
    MessageTooLargeError,
    PeerTimeoutError,
    PinMismatchError,
    PortalError,
    PortalTimeoutError,
    RelayRefusedError,
    RelayUnreachableError,
)
from .portal import (
    DICT_KEY,
    MAX_MESSAGE_BYTES,
    AsyncPortal,
    Listener,
    PeerOptions,
    Portal,
    PortalOptions,
    QuicTransportOptions,
    listen,
)
from ._core import new_session

__version__ = "0.1.0"

__all__ = [
    "AsyncPortal",
    "ConnectionClosedError",
    "ConnectionError",
    "DICT_KEY",
    "Listener",
    "MAX_MESSAGE_BYTES",
    "MessageTooLargeError",
    "PeerOptions",
    "PeerTimeoutError",
    "PinMismatchError",
    "Portal",
    "PortalError",
    "PortalOptions",
    "PortalTimeoutError",
    "QuicTransportOptions",
    "RelayRefusedError",
    "RelayUnreachableError",
    "listen",
    "new_session",
]
