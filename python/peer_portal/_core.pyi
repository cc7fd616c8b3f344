"""Type stubs of peer_portal._core, the native module (Rust, over peer-sdk)."""

from typing import Any, Awaitable, Optional

MAX_MESSAGE_BYTES: int
RECV_BUFFER_BYTES: int

def new_session() -> str:
    """A new random session id (UUID v4)."""

class Listener:
    """A registered listening peer; the dialer has not connected yet."""

    @property
    def fingerprint(self) -> str: ...
    @property
    def session(self) -> str: ...
    @property
    def local_port(self) -> int: ...
    def accept(self) -> Connection: ...
    def accept_async(self) -> Awaitable[Connection]: ...

class Connection:
    """An established connection to the peer."""

    def send(self, data: bytes) -> None: ...
    def send_async(self, data: bytes) -> Awaitable[None]: ...
    def recv(self, timeout_ms: Optional[float] = None) -> Optional[bytes]: ...
    def recv_async(self, timeout_ms: Optional[float] = None) -> Awaitable[Optional[bytes]]: ...
    def send_datagram(self, data: bytes) -> None: ...
    def recv_datagram(self, timeout_ms: Optional[float] = None) -> Optional[bytes]: ...
    def recv_datagram_async(
        self, timeout_ms: Optional[float] = None
    ) -> Awaitable[Optional[bytes]]: ...
    @property
    def max_datagram_size(self) -> Optional[int]: ...
    @property
    def path(self) -> str: ...
    def wait_path_change(self, current: str, timeout_ms: Optional[float] = None) -> Optional[str]: ...
    def is_connected(self) -> bool: ...
    def close(self) -> None: ...

def bind(
    relay: str,
    session: str,
    *,
    relay_only: bool = False,
    local_port: int = 0,
    register_timeout: float = 10.0,
    direct_timeout: float = 1.0,
) -> Listener: ...
def bind_async(
    relay: str,
    session: str,
    *,
    relay_only: bool = False,
    local_port: int = 0,
    register_timeout: float = 10.0,
    direct_timeout: float = 1.0,
) -> Awaitable[Listener]: ...
def connect(
    relay: str,
    session: str,
    pin: str,
    *,
    relay_only: bool = False,
    local_port: int = 0,
    register_timeout: float = 10.0,
    peer_timeout: float = 60.0,
    direct_timeout: float = 1.0,
) -> Connection: ...
def connect_async(
    relay: str,
    session: str,
    pin: str,
    *,
    relay_only: bool = False,
    local_port: int = 0,
    register_timeout: float = 10.0,
    peer_timeout: float = 60.0,
    direct_timeout: float = 1.0,
) -> Awaitable[Connection]: ...
