"""Exceptions of peer_portal: one class per way a connection fails, all under PortalError.

quic-portal programs catch ``PortalError`` and ``ConnectionError``; both exist here with the same
meaning. The others say what went wrong, so a program can react (retry, ask for a new pin, ...).
"""

import builtins


class PortalError(Exception):
    """Base class of every peer_portal error."""


class ConnectionError(PortalError, builtins.ConnectionError):
    """The connection could not be made or was lost (quic-portal's name)."""


class ConnectionClosedError(ConnectionError):
    """The connection was closed (by either side, or it timed out) while in use."""


class PinMismatchError(ConnectionError):
    """The listener's certificate does not match the fingerprint the dialer pinned.

    Either the fingerprint is wrong (a stale rendezvous dict, a typo) or someone else answered.
    """


class RelayRefusedError(ConnectionError):
    """The relay refused the registration (session full, rate limit, token required, ...)."""


class PortalTimeoutError(PortalError, builtins.TimeoutError):
    """Something did not happen in time."""


class RelayUnreachableError(PortalTimeoutError):
    """The relay did not answer the registration (over UDP, nor over TCP) in time."""


class PeerTimeoutError(PortalTimeoutError):
    """The other peer did not join the session (or publish it in the dict) in time."""


class MessageTooLargeError(PortalError, builtins.ValueError):
    """A message or datagram is larger than the limit (``MAX_MESSAGE_BYTES``, or the path's
    ``max_datagram_size`` for datagrams)."""


__all__ = [
    "PortalError",
    "ConnectionError",
    "ConnectionClosedError",
    "PinMismatchError",
    "RelayRefusedError",
    "PortalTimeoutError",
    "RelayUnreachableError",
    "PeerTimeoutError",
    "MessageTooLargeError",
]
