"""One peer of the NAT-lab test (python/tests/nat_lab.rs runs two of these in network namespaces).

    lab_peer.py server RELAY    prints the rendezvous as one JSON line, echoes, prints its path
    lab_peer.py client INFO     dials with the rendezvous JSON, checks echoes byte for byte

Each prints {"path": ...} on success and exits 0; any failure exits non-zero with a message.
"""

import hashlib
import json
import os
import sys

from peer_portal import ConnectionClosedError, Portal

SIZES = [0, 1024, 1 << 20, 16 << 20]
WAIT_MS = 60_000


class PrintingDict(dict):
    """A rendezvous dict whose entry is handed to the test through stdout."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(json.dumps(value), flush=True)


def server(relay):
    p = Portal.create_server(dict=PrintingDict(), relay=relay)
    for _ in SIZES:
        m = p.recv(timeout_ms=WAIT_MS)
        if m is None:
            sys.exit("server: no message within 60 s")
        p.send(m)
    dg = p.recv_datagram(timeout_ms=WAIT_MS)
    if dg is not None:
        p.send_datagram(dg)
    print(json.dumps({"path": p.path}), flush=True)
    try:
        p.recv(timeout_ms=WAIT_MS)
    except ConnectionClosedError:
        pass
    p.close()


def client(info):
    p = Portal.create_client(dict={"peer_portal": json.loads(info)}, peer_timeout=60)
    for n in SIZES:
        data = os.urandom(n)
        p.send(data)
        back = p.recv(timeout_ms=WAIT_MS)
        if back is None or hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
            sys.exit(f"client: echo of {n} bytes differs or is missing")
    # Datagrams may be lost: a few tries.
    for _ in range(20):
        p.send_datagram(b"datagram")
        if p.recv_datagram(timeout_ms=500) == b"datagram":
            break
    else:
        sys.exit("client: no datagram echoed in 20 tries")
    print(json.dumps({"path": p.path}), flush=True)
    p.close()


if __name__ == "__main__":
    {"server": server, "client": client}[sys.argv[1]](sys.argv[2])
