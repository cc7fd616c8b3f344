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

# Exchange 50 numbered datagrams each way; ACKs from keepalives are skipped like the original did.
n = 50
received = set()
deadline = time.time() + 30
sock.settimeout(0.2)
i = 0
while len(received) < n and time.time() < deadline:
    if i < n:
        sock.sendto(f"{role}:{i}".encode(), relay)
        i += 1
    try:
        data, src = sock.recvfrom(2048)
    except socket.timeout:
        if i >= n:
            # resend everything the other side may not have yet (it may have started later)
            i = 0
        continue
    if data == b"ACK\n":
        continue
    other, num = data.decode().split(":")
    if other == role:
        sys.exit(f"received my own datagram {data!r}")
    received.add(int(num))
stop.set()
if len(received) < n:
    sys.exit(f"only {len(received)} of {n} datagrams arrived")
# Keep answering briefly so the other side can finish too.
end = time.time() + 2
while time.time() < end:
    sock.sendto(f"{role}:{n - 1}".encode(), relay)
    time.sleep(0.1)
print(f"ok {len(received)}")
