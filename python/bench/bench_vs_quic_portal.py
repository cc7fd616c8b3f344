"""peer_portal against quic-portal, on loopback, in one run (`cargo xtask bench python` runs it).

For each library a server runs in a child process and the client in this one:
- peer_portal: Portal.create_server/create_client through a local quic-relay (the direct,
  hole-punched path, as quic-portal's; also the relay-only path, for information);
- quic-portal: its direct API, Portal.listen / Portal.connect (no STUN).

Measured, alternating the libraries in each repetition so both see the same machine:
- round trip of a 1 KiB message (client send, server echo, client recv): p50 and p99;
- one-way bulk: the client sends N messages of 1 MiB, the server answers once all arrived;
  goodput = N x 1 MiB x 8 / seconds.
Ratios are peer_portal / quic-portal: round trip <= 1.0 and bulk >= 1.0 meet the targets.
"""

import argparse
import multiprocessing as mp
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

CTX = mp.get_context("spawn")
WAIT_MS = 60_000
MSG_RTT = 1024
MSG_BULK = 1 << 20


def serve(portal, ready):
    """Echo until b"bulk:<n>", then swallow n messages and answer b"done"; b"quit" ends."""
    ready.put(("ready", None))
    while True:
        m = portal.recv(timeout_ms=WAIT_MS)
        if m is None or m == b"quit":
            return
        if m.startswith(b"bulk:"):
            n = int(m[5:])
            for _ in range(n):
                if portal.recv(timeout_ms=WAIT_MS) is None:
                    return
            portal.send(b"done")
        else:
            portal.send(m)


def pp_server(d, relay, relay_only, ready):
    from peer_portal import Portal

    serve(Portal.create_server(dict=d, relay=relay, relay_only=relay_only), ready)


def qp_server(port, ready):
    import logging

    logging.getLogger("quic_portal").setLevel(logging.WARNING)
    from quic_portal import Portal

    p = Portal()
    ready.put(("listening", None))
    p.listen(local_port=port)
    serve(p, ready)


def rtt(portal, count):
    payload = os.urandom(MSG_RTT)
    samples = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        portal.send(payload)
        back = portal.recv(timeout_ms=WAIT_MS)
        samples.append((time.perf_counter_ns() - t0) / 1000)
        assert back == payload, "echo differs"
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def bulk(portal, count):
    payload = os.urandom(MSG_BULK)
    portal.send(b"bulk:%d" % count)
    t0 = time.perf_counter()
    for _ in range(count):
        portal.send(payload)
    assert portal.recv(timeout_ms=WAIT_MS) == b"done"
    return count * MSG_BULK * 8 / (time.perf_counter() - t0) / 1e9


def start_relay(binary):
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"},
    )
    for line in proc.stderr:
        m = re.search(r"quic-relay listening addr=(\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1)
    sys.exit("quic-relay exited before listening")


def connect_pp(relay, relay_only):
    from peer_portal import Portal

    m = CTX.Manager()
    d, ready = m.dict(), m.Queue()
    proc = CTX.Process(target=pp_server, args=(d, relay, relay_only, ready), daemon=True)
    proc.start()
    client = Portal.create_client(dict=d, relay_only=relay_only, peer_timeout=60)
    ready.get(timeout=60)
    want = "relay" if relay_only else "direct"
    assert client.path == want, f"peer_portal took the {client.path} path, not {want}"
    return client, proc, m


def connect_qp():
    from quic_portal import Portal

    # quic-portal's API takes a port number, not a socket: pick one the kernel says is free.
    port = _free_port()
    m = CTX.Manager()
    ready = m.Queue()
    proc = CTX.Process(target=qp_server, args=(port, ready), daemon=True)
    proc.start()
    ready.get(timeout=60)
    client = Portal()
    deadline = time.monotonic() + 30
    while True:
        try:
            client.connect("127.0.0.1", port, local_port=_free_port())
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    # quic-portal's listen returns once the client's stream carries data: send first.
    client.send(b"ping")
    ready.get(timeout=60)
    assert client.recv(timeout_ms=WAIT_MS) == b"ping"
    return client, proc, m


def _free_port():
    """A UDP port on loopback that was free a moment ago (bound, read back, released)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--relay-bin", required=True, help="the quic-relay binary")
    ap.add_argument("--rtt-count", type=int, default=2000, help="1 KiB round trips per run")
    ap.add_argument("--bulk-count", type=int, default=512, help="1 MiB messages per bulk run")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (medians are reported)")
    args = ap.parse_args()

    import quic_portal
    import peer_portal

    relay_proc, relay = start_relay(args.relay_bin)
    conns = {
        "peer_portal": connect_pp(relay, False),
        "quic-portal": connect_qp(),
        "peer_portal relay-only": connect_pp(relay, True),
    }
    res = {name: {"p50": [], "p99": [], "gbps": []} for name in conns}
    for rep in range(args.reps):
        for name, (client, _, _) in conns.items():
            p50, p99 = rtt(client, args.rtt_count)
            gbps = bulk(client, args.bulk_count)
            res[name]["p50"].append(p50)
            res[name]["p99"].append(p99)
            res[name]["gbps"].append(gbps)
            print(
                f"  rep {rep + 1}: {name:<24} rtt p50 {p50:8.1f} us  p99 {p99:8.1f} us  "
                f"bulk {gbps:6.2f} Gbit/s",
                flush=True,
            )
    for client, proc, m in conns.values():
        client.send(b"quit")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
        client.close()
        m.shutdown()
    relay_proc.terminate()
    relay_proc.wait(10)

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in res.items()}
    print()
    print(
        f"peer_portal {peer_portal.__version__} vs quic-portal {quic_portal.__version__}, loopback, "
        f"{args.rtt_count} x 1 KiB round trips, {args.bulk_count} x 1 MiB bulk, "
        f"median of {args.reps}"
    )
    print(f"{'':<26}{'rtt p50 (us)':>14}{'rtt p99 (us)':>14}{'bulk (Gbit/s)':>15}")
    for n, v in med.items():
        print(f"{n:<26}{v['p50']:>14.1f}{v['p99']:>14.1f}{v['gbps']:>15.2f}")
    pp, qp = med["peer_portal"], med["quic-portal"]
    rows = [
        ("rtt p50 ratio (pp/qp, target <= 1.0)", pp["p50"] / qp["p50"], lambda r: r <= 1.0),
        ("rtt p99 ratio (pp/qp, target <= 1.0)", pp["p99"] / qp["p99"], lambda r: r <= 1.0),
        ("bulk ratio (pp/qp, target >= 1.0)", pp["gbps"] / qp["gbps"], lambda r: r >= 1.0),
    ]
    for label, r, ok in rows:
        print(f"{label:<40}{r:>8.2f}  {'PASS' if ok(r) else 'FAIL'}")


if __name__ == "__main__":
    main()
