#!/usr/bin/env python3
"""Captures golden vectors from the per-flow fork of udp-over-tcp (nicktdot/udp-over-tcp 0.2.0).

The fork is on no registry CI reaches (not crates.io, PyPI or Debian), so CI cannot run it; this
script was run by hand against a binary built from the fork's source (`cargo build --release`)
and its output committed as flow-fork-vectors.txt, which udp-over-tcp's tests replay.

Usage: capture_flow_fork.py FORK_BINARY > flow-fork-vectors.txt

It runs the fork on the connect side with a fixed --udp-sendto, plays its TCP listener, sends
datagrams into the fork's UDP port from IPv4 and IPv6 sources and records the exact bytes the fork
wrote on TCP. Then it checks the other direction: a frame written the same way into the fork is
delivered as the datagram it carries (the fork drops frames it cannot parse, silently).
"""

import os
import socket
import subprocess
import sys
import time


def listening_ports(pid, proto, family):
    """Ports of `pid`'s sockets (from /proc: the fork binds port 0 and does not print it)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    table = f"/proc/{pid}/net/{proto}{'6' if family == socket.AF_INET6 else ''}"
    ports = []
    with open(table) as f:
        next(f)
        for line in f:
            cols = line.split()
            if cols[9] in inodes:
                ports.append(int(cols[1].split(":")[1], 16))
    return ports


def wait_port(pid, proto, family):
    deadline = time.time() + 10
    while time.time() < deadline:
        ports = listening_ports(pid, proto, family)
        if ports:
            return ports[0]
        time.sleep(0.02)
    sys.exit(f"the fork bound no {proto} socket within 10 s")


def read_exact(conn, n):
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            sys.exit("the fork closed the TCP connection")
        out += chunk
    return out


def read_frame(conn):
    head = read_exact(conn, 4)
    return head + read_exact(conn, int.from_bytes(head, "little"))


def capture(fork, family, host):
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.bind((host, 0))
    lst.listen(1)
    lst.settimeout(10)
    sink = socket.socket(family, socket.SOCK_DGRAM)
    sink.bind((host, 0))
    sink.settimeout(10)
    fmt = (lambda h, p: f"[{h}]:{p}") if family == socket.AF_INET6 else (lambda h, p: f"{h}:{p}")
    proc = subprocess.Popen(
        [
            fork,
            "--tcp-connect", fmt(host, lst.getsockname()[1]),
            "--udp-bind", fmt(host, 0),
            "--udp-sendto", fmt(host, sink.getsockname()[1]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "RUST_LOG": "info"},
        text=True,
    )
    try:
        conn, _ = lst.accept()
        conn.settimeout(10)
        # The fork drops datagrams until its loop has taken the connection, which it logs.
        for line in proc.stderr:
            if "TCP connection established" in line:
                break
        else:
            sys.exit("the fork exited without connecting")
        fork_udp = wait_port(proc.pid, "udp", family)
        app = socket.socket(family, socket.SOCK_DGRAM)
        app.bind((host, 0))
        src = app.getsockname()
        lines = []
        for payload in [b"", b"hi", b"hello, per-flow fork"]:
            app.sendto(payload, (host, fork_udp))
            wire = read_frame(conn)
            lines.append(f"{fmt(host, src[1])} {payload.hex() or '-'} {wire.hex()}")
        # The other direction: the fork must accept a frame whose length counts the address.
        for _, payload_hex, wire_hex in (l.split() for l in lines):
            conn.sendall(bytes.fromhex(wire_hex))
            got, _ = sink.recvfrom(70000)
            want = b"" if payload_hex == "-" else bytes.fromhex(payload_hex)
            if got != want:
                sys.exit(f"the fork delivered {got!r}, not {want!r}")
        return lines
    finally:
        proc.kill()
        proc.wait()


def main():
    fork = sys.argv[1]
    print("# Captured from the per-flow fork (nicktdot/udp-over-tcp 0.2.0, commit 954e110) by")
    print("# capture_flow_fork.py: one frame per line, as the fork wrote it on TCP.")
    print("# source-address payload-hex(- = empty) wire-hex")
    for line in capture(fork, socket.AF_INET, "127.0.0.1"):
        print(line)
    for line in capture(fork, socket.AF_INET6, "::1"):
        print(line)


if __name__ == "__main__":
    main()
