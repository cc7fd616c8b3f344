"""peer_portal end to end: two real Python processes through a real quic-relay on loopback.

The server runs in a child process (multiprocessing, spawn: a fresh interpreter); the client in
the test's own process. They meet through a plain dict shared by a multiprocessing.Manager.
"""

import asyncio
import hashlib
import inspect
import multiprocessing as mp
import os
import socket
import time

import pytest

import peer_portal
from peer_portal import AsyncPortal, Portal

CTX = mp.get_context("spawn")

#: Generous bound for anything that should take milliseconds (a busy 2-core CI machine).
WAIT_S = 60


def echo_server(d, relay, relay_only, count, results):
    """Child process: accept through the dict, report the path, echo `count` messages and one
    datagram, then wait for the client to close."""
    try:
        p = Portal.create_server(dict=d, relay=relay, relay_only=relay_only)
        results.put(("path", p.path))
        for _ in range(count):
            m = p.recv(timeout_ms=WAIT_S * 1000)
            if m is None:
                results.put(("error", "echo server: recv timed out"))
                return
            p.send(m)
        dg = p.recv_datagram(timeout_ms=WAIT_S * 1000)
        if dg is not None:
            p.send_datagram(dg)
        try:
            p.recv(timeout_ms=WAIT_S * 1000)
        except peer_portal.ConnectionClosedError:
            pass
        results.put(("done", None))
    except Exception as e:  # reported to the test, which fails with it
        results.put(("error", f"{type(e).__name__}: {e}"))


class Child:
    """A child process running `target(dict, *args, results)`."""

    def __init__(self, target, *args):
        self.manager = CTX.Manager()
        self.dict = self.manager.dict()
        self.results = self.manager.Queue()
        self.proc = CTX.Process(target=target, args=(self.dict, *args, self.results), daemon=True)
        self.proc.start()

    def get(self, what):
        kind, value = self.results.get(timeout=WAIT_S)
        assert kind != "error", value
        assert kind == what, (kind, value)
        return value

    def stop(self):
        self.proc.join(WAIT_S)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.manager.shutdown()


@pytest.fixture
def child():
    made = []

    def start(target, *args):
        c = Child(target, *args)
        made.append(c)
        return c

    yield start
    for c in made:
        c.stop()


SIZES = [0, 1024, 1 << 20, 16 << 20]


def echo_sizes(client):
    for n in SIZES:
        data = os.urandom(n)
        client.send(data)
        back = client.recv(timeout_ms=WAIT_S * 1000)
        assert back is not None, f"no echo of {n} bytes"
        assert len(back) == n
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest(), f"{n} B differ"


def test_dict_pair_echoes_every_size_byte_exact(relay, child):
    server = child(echo_server, relay, False, len(SIZES))
    # Nothing but the shared dict: the relay, the session and the pin come from it.
    client = Portal.create_client(dict=server.dict, peer_timeout=WAIT_S)
    assert set(server.dict[peer_portal.DICT_KEY]) == {"session", "fingerprint", "relay"}
    assert server.get("path") == "direct"  # loopback: punching works
    assert client.path == "direct"
    assert client.is_connected()
    echo_sizes(client)
    client.send_datagram(b"datagram")
    assert client.recv_datagram(timeout_ms=WAIT_S * 1000) == b"datagram"
    client.close()
    assert not client.is_connected()
    assert server.get("done") is None


def test_relay_only_echoes_every_size(relay, child):
    server = child(echo_server, relay, True, len(SIZES))
    client = Portal.create_client(dict=server.dict, relay_only=True, peer_timeout=WAIT_S)
    assert server.get("path") == "relay"
    assert client.path == "relay"
    echo_sizes(client)
    client.send_datagram(b"via relay")
    assert client.recv_datagram(timeout_ms=WAIT_S * 1000) == b"via relay"
    client.close()
    assert server.get("done") is None


def test_recv_timeout_returns_none(relay, child):
    server = child(echo_server, relay, False, 1)
    client = Portal.create_client(dict=server.dict, peer_timeout=WAIT_S)
    start = time.monotonic()
    assert client.recv(timeout_ms=300) is None
    assert time.monotonic() - start >= 0.29
    assert client.recv_datagram(timeout_ms=50) is None
    # No path change on a quiet loopback connection: the wait times out with None.
    assert client.wait_path_change(timeout_ms=100) is None
    assert client.path == "direct"
    # The connection is still usable after a timeout.
    client.send(b"after the timeout")
    assert client.recv(timeout_ms=WAIT_S * 1000) == b"after the timeout"
    client.close()


def listen_only(d, relay, results):
    """Child process: publish a rendezvous, then try to accept (the client will refuse it)."""
    try:
        Portal.create_server(dict=d, relay=relay)
        results.put(("accepted", None))
    except Exception as e:
        results.put(("failed", type(e).__name__))


def test_wrong_pin_raises_pin_mismatch(relay, child):
    server = child(listen_only, relay)
    deadline = time.monotonic() + WAIT_S
    while peer_portal.DICT_KEY not in server.dict and time.monotonic() < deadline:
        time.sleep(0.05)
    info = dict(server.dict[peer_portal.DICT_KEY])
    good = info["fingerprint"]
    wrong = ("0" if good[0] != "0" else "1") + good[1:]
    with pytest.raises(peer_portal.PinMismatchError) as e:
        Portal.create_client(relay=relay, session=info["session"], pin=wrong, peer_timeout=WAIT_S)
    assert "fingerprint" in str(e.value)
    # The server's accept fails too: the client refused the handshake.
    kind, _ = server.results.get(timeout=WAIT_S)
    assert kind == "failed"


def test_malformed_pin_is_refused_before_dialing(relay):
    with pytest.raises(peer_portal.PinMismatchError, match="64 hex digits"):
        Portal.create_client(relay=relay, session=peer_portal.new_session(), pin="abc")


def test_peer_that_never_joins_times_out(relay):
    pin = "00" * 32
    start = time.monotonic()
    with pytest.raises(peer_portal.PeerTimeoutError):
        Portal.create_client(relay=relay, session=peer_portal.new_session(), pin=pin, peer_timeout=1)
    assert time.monotonic() - start < WAIT_S


def test_empty_dict_times_out():
    with pytest.raises(peer_portal.PeerTimeoutError, match="rendezvous dict"):
        Portal.create_client(dict={}, peer_timeout=0.2)


def test_silent_relay_is_unreachable():
    # A UDP socket that never answers, with no TCP listener on its port.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    addr = "%s:%d" % silent.getsockname()
    try:
        with pytest.raises(peer_portal.RelayUnreachableError, match="no reply from relay"):
            peer_portal.listen(addr, register_timeout=1)
    finally:
        silent.close()


def test_bad_arguments_name_the_input():
    with pytest.raises(ValueError, match="not-a-uuid"):
        peer_portal.listen("127.0.0.1:9", "not-a-uuid")
    with pytest.raises(ValueError, match="host:port"):
        peer_portal.listen("no port here")
    with pytest.raises(ValueError, match="relay="):
        Portal.create_server(dict={})
    with pytest.raises(TypeError):
        Portal("not a connection")


def test_quic_portal_calls_bind_as_in_quic_portal():
    """quic-portal's own calls, by position and by name with its defaults, reach peer_portal's
    argument checks (a missing relay, an empty dict) rather than a TypeError."""
    quic_portal = pytest.importorskip("quic_portal")
    names = ("local_port", "stun_servers", "punch_timeout", "transport_options")
    assert peer_portal.portal.QUIC_PORTAL_ARGS == names
    for name, fails_with in (
        ("create_server", ValueError),
        ("create_client", peer_portal.PeerTimeoutError),
    ):
        theirs = inspect.signature(getattr(quic_portal.Portal, name)).parameters
        assert list(theirs) == ["dict", *names]
        defaults = [p.default for p in list(theirs.values())[1:]]
        ours = getattr(Portal, name)
        extra = {"peer_timeout": 0.1} if name == "create_client" else {}
        with pytest.raises(fails_with):
            ours({}, *defaults, **extra)
        with pytest.raises(fails_with):
            ours(dict={}, **dict(zip(names, defaults)), **extra)
        with pytest.raises(TypeError, match=f"{name}.. takes at most 5 positional"):
            ours({}, *defaults, None)
        with pytest.raises(TypeError, match="multiple values for argument 'local_port'"):
            ours({}, 5555, local_port=5555)
        with pytest.raises(TypeError, match=f"{name}.. got an unexpected keyword argument 'bogus'"):
            ours({}, bogus=1)
    # local_port by position is the one bound; the other three are dropped.
    split = peer_portal.portal._split("create_server", (5555, [], 15, None), {"relay": "r:1"})
    assert split == ("r:1", None, {"local_port": 5555})


def test_options_are_the_native_signatures():
    """PeerOptions are _core.bind's keyword-only parameters (connect adds peer_timeout), and
    the defaults its docs quote are the native ones."""
    from peer_portal import _core

    def keyword_only(f):
        ps = inspect.signature(f).parameters.values()
        return {p.name: p.default for p in ps if p.kind is p.KEYWORD_ONLY and p.name != "_async"}

    bind, connect = keyword_only(_core.bind), keyword_only(_core.connect)
    assert set(bind) == peer_portal.PeerOptions.__optional_keys__
    assert set(connect) == set(bind) | {"peer_timeout"}
    for name, default in bind.items():
        assert f"{name}: " in peer_portal.PeerOptions.__doc__
        assert f"(default {default!r})" in peer_portal.PeerOptions.__doc__, name
    # Every option a Portal constructor takes is listed in its help().
    for f in (Portal.create_server, Portal.create_client, AsyncPortal.create_client):
        for name in peer_portal.PortalOptions.__optional_keys__:
            assert name in f.__doc__.split("Options:", 1)[1], (f, name)


def test_too_large_message_is_refused_and_connection_survives(relay, child):
    server = child(echo_server, relay, False, 1)
    client = Portal.create_client(dict=server.dict, peer_timeout=WAIT_S)
    with pytest.raises(peer_portal.MessageTooLargeError):
        client.send(bytes(peer_portal.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(peer_portal.MessageTooLargeError):
        client.send_datagram(bytes(100_000))
    client.send("text is sent as UTF-8: é")
    assert client.recv(timeout_ms=WAIT_S * 1000) == "text is sent as UTF-8: é".encode()
    client.close()


def test_asyncio_api(relay, child):
    server = child(echo_server, relay, False, 2)

    async def main():
        client = await AsyncPortal.create_client(dict=server.dict, peer_timeout=WAIT_S)
        assert client.path == "direct"
        # A cancelled recv must not lose the message that arrives after it.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.recv(), 0.2)
        assert await client.recv(timeout_ms=50) is None
        await client.send(b"one")
        assert await client.recv(timeout_ms=WAIT_S * 1000) == b"one"
        big = os.urandom(1 << 20)
        await client.send(big)
        assert await client.recv(timeout_ms=WAIT_S * 1000) == big
        client.send_datagram(b"async datagram")
        assert await client.recv_datagram(timeout_ms=WAIT_S * 1000) == b"async datagram"
        await client.close()

    asyncio.run(main())
    assert server.get("path") == "direct"
    assert server.get("done") is None


def test_blocking_recv_releases_the_gil(relay, child):
    """A thread blocked in recv must not stop other Python threads."""
    import threading

    server = child(echo_server, relay, False, 1)
    client = Portal.create_client(dict=server.dict, peer_timeout=WAIT_S)
    got = []
    t = threading.Thread(target=lambda: got.append(client.recv(timeout_ms=WAIT_S * 1000)))
    t.start()
    # Pure-Python work on this thread while the other waits in Rust.
    n = 0
    start = time.monotonic()
    while time.monotonic() - start < 0.3:
        n += 1
    assert n > 10_000, "the main thread barely ran while another thread was in recv"
    client.send(b"wake up")
    t.join(WAIT_S)
    assert got == [b"wake up"]
    client.close()


def test_forked_child_works_after_the_parent_used_the_runtime(relay):
    """multiprocessing's default start method on Linux forks: a child forked after the parent
    used the package must get a working runtime of its own, not the parent's thread-less copy."""
    warm = peer_portal.listen(relay)  # the parent's runtime now exists
    assert len(warm.fingerprint) == 64
    fork = mp.get_context("fork")
    with fork.Manager() as m:
        d, results = m.dict(), m.Queue()
        p = fork.Process(target=echo_server, args=(d, relay, False, 1, results), daemon=True)
        p.start()
        client = Portal.create_client(dict=d, peer_timeout=WAIT_S)
        client.send(b"from the parent")
        assert client.recv(timeout_ms=WAIT_S * 1000) == b"from the parent"
        assert results.get(timeout=WAIT_S) == ("path", "direct")
        client.send_datagram(b"d")
        client.recv_datagram(timeout_ms=2000)
        client.close()
        assert results.get(timeout=WAIT_S) == ("done", None)
        p.join(WAIT_S)
