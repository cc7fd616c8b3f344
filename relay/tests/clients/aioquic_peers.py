"""aioquic (a third-party QUIC stack, from PyPI) through quic-relay: proof that the relay carries
QUIC it knows nothing about. Each peer registers with the relay (`REG:<uuid>\\n` -> `ACK\\n`, the
original form) from the very UDP socket it then hands to aioquic, so the relay forwards the QUIC
packets between the two registered addresses.

usage:
  aioquic_peers.py pair RELAY_HOST RELAY_PORT SESSION
      An aioquic server (bound on 127.0.0.2) and an aioquic client (on 127.0.0.1) both register,
      complete a handshake through the relay and exchange 1 MiB each way on one stream.
  aioquic_peers.py dial RELAY_HOST RELAY_PORT SESSION PIN ALPN BIND_IP
      An aioquic client registers and dials whatever listens on the session (a peer_sdk::accept
      listener), accepts only the certificate whose SHA-256 is PIN (hex), sends 1 MiB on a stream
      and expects it echoed.

Prints one line "ok handshake_ms=<ms> bytes=<n>" on success; exits non-zero with a reason
otherwise. Driven by relay/tests/aioquic.rs and peer-sdk/tests/aioquic.rs.
"""

import asyncio
import datetime
import hashlib
import os
import socket
import ssl
import sys
import tempfile
import time

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MIB = 1 << 20
TIMEOUT = 20.0


def payload(n, salt):
    """`n` bytes of a 251-byte cycle (prime, so it never lines up with packet sizes)."""
    cycle = bytes((i + salt) % 251 for i in range(251))
    return (cycle * (n // 251 + 1))[:n]


def register(bind_ip, relay, session):
    """Registers from a fresh socket and returns that socket (for QUIC to use next)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind_ip, 0))
    sock.settimeout(1.0)
    reg = f"REG:{session}\n".encode()
    for _ in range(10):
        sock.sendto(reg, relay)
        try:
            data, src = sock.recvfrom(2048)
        except socket.timeout:
            continue
        if src == relay and data == b"ACK\n":
            sock.setblocking(False)
            return sock
        sys.exit(f"unexpected reply {data!r} from {src}")
    sys.exit("the relay did not acknowledge the registration")


def pinned(protocol, pin):
    """Pinning: the handshake ran without a CA; accept only the certificate with this SHA-256."""
    cert = protocol._quic.tls._peer_certificate
    if cert is None:
        sys.exit("no peer certificate")
    got = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    if got != pin:
        protocol.close()
        sys.exit(f"certificate fingerprint {got} is not the pinned {pin}")


def self_signed(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


async def dial(sock, relay, alpn, server_name, pin, salt, expect_echo):
    """QUIC client on `sock` to `relay`; sends 1 MiB on one stream and checks what comes back."""
    loop = asyncio.get_running_loop()
    config = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name=server_name)
    config.verify_mode = ssl.CERT_NONE  # replaced by the fingerprint pin below
    quic = QuicConnection(configuration=config)
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: QuicConnectionProtocol(quic), sock=sock
    )
    try:
        start = time.monotonic()
        protocol.connect(relay)
        await asyncio.wait_for(protocol.wait_connected(), TIMEOUT)
        handshake_ms = (time.monotonic() - start) * 1000
        pinned(protocol, pin)
        reader, writer = await protocol.create_stream()
        out = payload(MIB, salt)
        writer.write(out)
        writer.write_eof()
        back = await asyncio.wait_for(reader.read(), TIMEOUT)
        want = out if expect_echo else payload(MIB, salt + 1)
        if back != want:
            sys.exit(f"got {len(back)} bytes back, not the expected {len(want)}")
        print(f"transfer done after {time.monotonic() - start:.2f} s", file=sys.stderr)
        protocol.close()
        await asyncio.wait_for(protocol.wait_closed(), TIMEOUT)
        return handshake_ms, len(out) + len(back)
    finally:
        transport.close()


async def pair(relay, session):
    loop = asyncio.get_running_loop()
    cert, key = self_signed("relay-test")
    with tempfile.TemporaryDirectory() as d:
        cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        server_config = QuicConfiguration(is_client=False, alpn_protocols=["relay-test"])
        server_config.load_cert_chain(cert_path, key_path)
    server_got = asyncio.get_running_loop().create_future()

    def on_stream(reader, writer):
        async def serve():
            data = await reader.read()
            ok = data == payload(MIB, 7)
            # The server answers with its own 1 MiB, so each direction carries different bytes.
            writer.write(payload(MIB, 8))
            writer.write_eof()
            if not server_got.done():
                server_got.set_result(ok)

        asyncio.ensure_future(serve())

    # Two different IPs: two original-form peers on one IP would look like one peer rebinding.
    server_sock = register("127.0.0.2", relay, session)
    client_sock = register("127.0.0.1", relay, session)
    server_transport, _ = await loop.create_datagram_endpoint(
        lambda: QuicServer(configuration=server_config, stream_handler=on_stream),
        sock=server_sock,
    )
    try:
        pin = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        handshake_ms, n = await dial(
            client_sock, relay, "relay-test", "relay-test", pin, 7, expect_echo=False
        )
        if not await asyncio.wait_for(server_got, TIMEOUT):
            sys.exit("the server received other bytes than the client sent")
        return handshake_ms, n
    finally:
        server_transport.close()


def main():
    mode, host, port, session = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    relay = (host, port)
    if mode == "pair":
        handshake_ms, n = asyncio.run(pair(relay, session))
    elif mode == "dial":
        pin, alpn, bind_ip = sys.argv[5].lower(), sys.argv[6], sys.argv[7]
        sock = register(bind_ip, relay, session)
        # peer-sdk's listener presents a certificate for "peer-sdk" (tls::SERVER_NAME).
        handshake_ms, n = asyncio.run(
            dial(sock, relay, alpn, "peer-sdk", pin, 3, expect_echo=True)
        )
    else:
        sys.exit(f"unknown mode {mode!r}: use pair or dial")
    print(f"ok handshake_ms={handshake_ms:.1f} bytes={n}", flush=True)


if __name__ == "__main__":
    main()
