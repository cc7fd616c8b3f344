"""pytest fixtures: a real quic-relay on loopback (port 0, the port read from its log)."""

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: How long the relay may take to start (a cold debug binary on a busy 2-core machine).
RELAY_START_S = 30


def relay_binary() -> str:
    """The quic-relay binary: $QUIC_RELAY_BIN, else the workspace's target/{debug,release}."""
    env = os.environ.get("QUIC_RELAY_BIN")
    if env:
        return env
    for profile in ("debug", "release"):
        p = ROOT / "target" / profile / "quic-relay"
        if p.exists():
            return str(p)
    found = shutil.which("quic-relay")
    if found:
        return found
    pytest.fail(
        "no quic-relay binary: run `cargo build -p quic-relay` in the workspace or set QUIC_RELAY_BIN"
    )


class Relay:
    def __init__(self, extra=()):
        self.proc = subprocess.Popen(
            [relay_binary(), "--bind", "127.0.0.1", "--port", "0", *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"},
        )
        self.addr = None
        got = threading.Event()
        self.log = []

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                m = re.search(r"quic-relay listening addr=(\S+)", line)
                if m and self.addr is None:
                    self.addr = m.group(1)
                    got.set()

        threading.Thread(target=read, daemon=True).start()
        if not got.wait(RELAY_START_S):
            self.stop()
            pytest.fail("quic-relay did not start: " + "".join(self.log[-20:]))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def relay():
    r = Relay()
    yield r.addr
    r.stop()
