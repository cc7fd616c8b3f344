"""A client written the way the original quic-relay's Python client worked (field notes §1):
a SO_REUSEADDR|SO_REUSEPORT socket, REG retried 5 times with 2 s timeouts, a keepalive REG
every 3 s, then plain datagrams. Used unchanged against this relay by tests/original_client.rs.

usage: original_client.py RELAY_HOST RELAY_PORT SESSION ROLE(a|b) BIND_IP
Prints one line: "ok <n>" after exchanging n datagrams with the other peer, or exits non-zero.
"""
import socket
import sys
import threading
import time

host, port, session, role, bind_ip = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
relay = (host, port)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind((bind_ip, 0))
sock.settimeout(2.0)

reg = f"REG:{session}\n".encode()
for attempt in range(5):
    sock.sendto(reg, relay)
    try:
        data, _ = sock.recvfrom(2048)
    except socket.timeout:
        continue
    if data == b"ACK\n":
        break
    sys.exit(f"unexpected reply {data!r}")
else:
    sys.exit("no ACK after 5 attempts")

stop = threading.Event()


def keepalive():
    while not stop.wait(3.0):
        sock.sendto(reg, relay)


threading.Thread(target=keepalive, daemon=True).start()

# Exchange 50 numbered datagrams each way. Each side cycles through its 50 until it has all of
# the other's, then goes on for 2 s so the other side can finish (datagrams sent before the
# other peer registered were dropped by the relay, as they were by the original).
n = 50
received = set()
sock.settimeout(0.005)


def pump(until):
    i = 0
    while until():
        sock.sendto(f"{role}:{i % n}".encode(), relay)
        i += 1
        try:
            data, _ = sock.recvfrom(2048)
        except socket.timeout:
            continue
        if data == b"ACK\n":  # a keepalive's answer
            continue
        other, num = data.decode().split(":")
        if other == role:
            sys.exit(f"received my own datagram {data!r}")
        received.add(int(num))


deadline = time.time() + 30
pump(lambda: len(received) < n and time.time() < deadline)
if len(received) < n:
    sys.exit(f"only {len(received)} of {n} datagrams arrived")
linger = time.time() + 2
pump(lambda: time.time() < linger)
stop.set()
print(f"ok {len(received)}")
