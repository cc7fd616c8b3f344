#!/usr/bin/env python3
"""Captures golden vectors from Mullvad's udp2tcp (mullvad/udp-over-tcp 0.4.0).

Mullvad's crate is `publish = false`: no registry CI reaches carries it (not crates.io, PyPI or
Debian), so CI cannot run it. This script was run by hand against a binary built from its
source (`cargo build --release --features clap --bin udp2tcp`) and its output committed as
mullvad-vectors.txt, which udp-over-tcp's tests replay.

Usage: capture_mullvad.py UDP2TCP_BINARY > mullvad-vectors.txt

It runs udp2tcp with --tcp-forward at a TCP listener played here, sends datagrams into its UDP
port and records the exact bytes it wrote on TCP; then it writes those frames back and checks
udp2tcp delivers each datagram to the client that sent.
"""

import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from capture_flow_fork import read_exact, wait_port  # noqa: E402


def main():
    binary = sys.argv[1]
    host = "127.0.0.1"
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind((host, 0))
    lst.listen(1)
    lst.settimeout(10)
    proc = subprocess.Popen(
        [binary, "--udp-listen", f"{host}:0", "--tcp-forward", f"{host}:{lst.getsockname()[1]}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        udp_port = wait_port(proc.pid, "udp", socket.AF_INET)
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        app.bind((host, 0))
        app.settimeout(10)
        payloads = [b"hi", b"", b"hello, mullvad"]
        # udp2tcp connects on the first datagram and sends it once connected.
        app.sendto(payloads[0], (host, udp_port))
        conn, _ = lst.accept()
        conn.settimeout(10)
        frames = []
        for i, payload in enumerate(payloads):
            if i:
                app.sendto(payload, (host, udp_port))
            head = read_exact(conn, 2)
            frames.append((payload, head + read_exact(conn, int.from_bytes(head, "big"))))
        for payload, wire in frames:
            conn.sendall(wire)
            got, src = app.recvfrom(70000)
            if got != payload or src[1] != udp_port:
                sys.exit(f"udp2tcp delivered {got!r} from {src}, not {payload!r}")
        print("# Captured from Mullvad's udp2tcp (mullvad/udp-over-tcp 0.4.0) by capture_mullvad.py:")
        print("# one frame per line, as it wrote it on TCP. payload-hex(- = empty) wire-hex")
        for payload, wire in frames:
            print(f"{payload.hex() or '-'} {wire.hex()}")
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
